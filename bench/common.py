"""Shared by the benchmarks: run one case in a fresh process and read its peak memory, so that
cases never inherit each other's allocations. Every benchmark process keeps its freed host
memory for reuse, as the trainer's and inference's CPU processes do (parallel.reuse_host_memory)."""
from __future__ import annotations

import json
import platform
import resource
import subprocess
import time
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import parallel  # noqa: E402

parallel.reuse_host_memory()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def run_case(script: str, *args: str, timeout: float = 1800) -> dict:
    """Run `script --case args...` in a new interpreter; it prints one JSON line last."""
    proc = subprocess.run([sys.executable, script, "--case", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["killed"]
        return {"error": f"exit {proc.returncode}: {tail[0][:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    return f"{platform.node()} | {device} | torch {torch.__version__}"


def save(name: str, lines: list[str]) -> Path:
    path = ROOT / "bench" / "results" / f"{name}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def flop_counter() -> "torch.utils.flop_counter.FlopCounterMode":
    """torch's FLOP counter, taught the CPU flash-attention kernels it does not list (counted as
    its other SDPA kernels are: every query against every key it is given, masks ignored)."""
    from torch.utils import flop_counter as fc

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return fc.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})


def header() -> list[str]:
    """The first lines of every result: the command as run, the machine, the time."""
    return [f"# {' '.join(['bench/' + Path(sys.argv[0]).name, *sys.argv[1:]])}", f"# {machine()}",
            f"# {time.strftime('%Y-%m-%d %H:%M')}"]



def logistic_regression(x: np.ndarray, y: np.ndarray, classes: int, l2: float = 1e-3, steps: int = 3000):
    """Multinomial logistic regression by full-batch gradient descent on standardised inputs."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros((z.shape[1], classes))
    onehot = np.eye(classes)[y]
    for _ in range(steps):
        logits = z @ w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        w -= 0.5 * (z.T @ (p - onehot) / len(z) + l2 * w)
    return lambda xs: (np.hstack([(xs - mean) / std, np.ones((len(xs), 1))]) @ w).argmax(1)
