"""Shared by the benchmarks: run one case in a fresh process and read its peak memory, so that
cases never inherit each other's allocations."""
from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def save(name: str, text: str) -> Path:
    path = ROOT / "bench" / "results" / f"{name}.txt"
    path.write_text(text)
    return path
