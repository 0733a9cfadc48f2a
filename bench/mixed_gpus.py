"""Mixed cards in one run, simulated on this CPU: 8 gloo processes made unequal by an injected
per-rank slowdown (bench/simulated_ranks.py), like the reference box's 2 fast and 6 slower
cards, with links unlimited or modelled as PCIe gen1 x4 (~1 GB/s) and x1 (~250 MB/s) carrying
the `base` preset's gradients.

    python bench/mixed_gpus.py [--steps 6] [--batch-seconds 1.5]

For each profile: achieved positions/s (a full step's positions over the median step time) over
the sum of every rank's solo positions/s, with equal shares and with train.rank_shares=auto, and
that over the ceiling: the same figure for 8 equal cards with equal shares, which loses only what
the simulation itself costs (8 trainers on this machine's cores), so the ratio to the ceiling
means the same on any machine. Solo speeds are measured by one-process runs of each card kind.
Every run reads from one shared data server; a forward lasts its simulated time whatever the
real one took, so that 8 processes on 2 cores measure the schedule rather than the contention.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.flight as flight
import torch

from common import ROOT, header, save

import config  # noqa: E402 (path set by common)
import demo_corpus  # noqa: E402 (path set by common)
from custom_transformer import CustomTransformer  # noqa: E402

PORT = 18830
CEILING = ("1:1.0, link unlimited", "equal")   # 8 equal cards: what the simulation itself loses
FLAGS = ["--preset", "tiny", "--ws-port", "-1", "--set", "train.checkpoint_every=1000", "--set", "data.prefetch=2",
         "--set", "data.batch_size=1"]


def base_gradient_shares() -> tuple[float, float]:
    """The `base` preset's fp32 gradient bytes, and the share PowerSGD (rank 1) sends of them."""
    cfg = config.load_config(str(config.DEFAULT_CONFIG), [], "base")
    with torch.device("meta"):
        params = list(CustomTransformer(cfg.model).parameters())
    total = sum(p.numel() for p in params)
    sent = sum(p.shape[0] + p[0].numel() if p.dim() >= 2 else p.numel() for p in params)
    return 4.0 * total, sent / total


def run(source: list[str], out: Path, speeds: list[float], batch_seconds: float, steps: int, extra: list[str],
        link: float = 0.0, gradient_bytes: float = 0.0, sent_share: float = 1.0, most_sequences: list[int] | None = None
        ) -> dict:
    """The trainer on len(speeds) simulated cards -> positions/s (a full step's positions over the
    median step time after two of warm-up), the work per rank and the step losses."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SIM_SPEEDS": ",".join(map(str, speeds)),
           "SIM_BATCH_SECONDS": str(batch_seconds), "SIM_LINK_BYTES_PER_S": str(link),
           "SIM_GRADIENT_BYTES": str(gradient_bytes), "SIM_SENT_SHARE": str(sent_share)}
    if most_sequences:
        env["SIM_MOST_SEQUENCES"] = ",".join(map(str, most_sequences))
    command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(len(speeds))]
               if len(speeds) > 1 else [sys.executable])
    proc = subprocess.run([*command, "bench/simulated_ranks.py", *source, "--out", str(out),
                           "--steps", str(steps), *FLAGS, *extra], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    messages = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in messages if m["type"] == "step"]
    # A step's positions are taken from the first (no rank is short of data yet: the demo corpus is
    # small, and near an epoch's end its ranks step with padding batches); its time is the median
    # of the steps after two of warm-up.
    positions = steps[0]["tokens_per_s"] * steps[0]["step_time_s"]
    seconds = statistics.median(m["step_time_s"] for m in steps[2:])
    work = next(m for m in messages if m["type"] == "run")
    shares = (f"{work['batches_per_step_by_process']} x {work['batch_size_by_process']}"
              if len(set(work["batches_per_step_by_process"])) > 1 or len(set(work["batch_size_by_process"])) > 1
              else f"equal, {work['batches_per_step_by_process'][0]} x {work['batch_size_by_process'][0]}")
    return {"positions_per_s": positions / seconds, "shares": shares, "losses": [m["loss"] for m in steps],
            "positions": [m["tokens_per_s"] * m["step_time_s"] for m in steps]}


def loss_curves(source: list[str], work: Path, steps: int) -> list[str]:
    """Auto against equal shares on the 1:0.2 box, the same positions per step (tokens_per_step),
    against the noise of the data order: equal shares with another data.seed. The compute is
    barely stretched: only the losses count here."""
    speeds = [1.0, 1.0] + [0.2] * 6
    same = ["--set", "train.tokens_per_step=8192", "--set", "train.warmup_steps=5"]   # 32 sequences of 256
    curves = {name: run(source, work / f"loss-{name}", speeds, 0.01, steps, same + extra)
              for name, extra in (("equal", []), ("auto", ["--set", "train.rank_shares=auto"]),
                                  ("equal, data.seed=1", ["--set", "data.seed=1"]))}
    tail = slice(steps // 2, None)

    def mean_gap(a, b):
        return statistics.mean(abs(x - y) for x, y in zip(curves[a]["losses"][tail], curves[b]["losses"][tail]))

    auto_gap, noise = mean_gap("auto", "equal"), mean_gap("equal, data.seed=1", "equal")
    lines = [f"# loss curves, 1:0.2 box, {steps} steps of about 8,192 positions (positions per step: equal "
             f"{statistics.mean(curves['equal']['positions']):,.0f}, auto {statistics.mean(curves['auto']['positions']):,.0f})",
             f"{'step':>6} " + " ".join(f"{name:>20}" for name in curves)]
    for step in range(0, steps, max(1, steps // 8)):
        lines.append(f"{step + 1:>6} " + " ".join(f"{curve['losses'][step]:>20.4f}" for curve in curves.values()))
    lines.append(f"mean |loss gap| over the last {steps - steps // 2} steps: auto vs equal {auto_gap:.4f}; "
                 f"another data order vs equal (noise) {noise:.4f}")
    print("\n".join(lines), flush=True)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-seconds", type=float, default=1.5, help="simulated compute of a batch on a fast card")
    parser.add_argument("--loss-steps", type=int, default=40, help="steps of the loss-curve comparison")
    args = parser.parse_args()
    shards = demo_corpus.build(ROOT / "data" / "demo")
    gradient_bytes, powersgd_share = base_gradient_shares()
    work = Path(tempfile.mkdtemp(prefix="bench-mixed-"))
    lines = [*header(), f"# 8 simulated cards: 2 at speed 1 and 6 slower; {args.batch_seconds} s per batch on a fast "
             f"card; base gradients {gradient_bytes / 1e6:,.0f} MB fp32, PowerSGD rank 1 sends "
             f"{powersgd_share:.2%} of them", f"{'profile':<44} {'batches x sequences per step':<44} {'pos/s':>8} {'of solo':>8} {'of ceiling':>10}"]
    print("\n".join(lines), flush=True)
    data = work / "data"
    data.mkdir()
    for shard in shards:
        shutil.copy(shard, data)
    # One data server for every run, as the reference box's data machine (8 trainers each with an
    # embedded server would spend the 2 cores on serving).
    server = subprocess.Popen([sys.executable, str(ROOT / "flight_server.py"), "--root", str(data), "--port",
                               str(PORT)], stderr=subprocess.DEVNULL, cwd=ROOT)
    source = ["--flight-host", "127.0.0.1", "--port", str(PORT), "--files", *sorted(s.name for s in shards)]
    try:
        flight.connect(f"grpc://127.0.0.1:{PORT}").wait_for_available(timeout=60)
        solo = {}
        for speed in (1.0, 0.5, 0.2):
            solo[speed] = run(source, work / f"solo-{speed}", [speed], args.batch_seconds, args.steps, [])["positions_per_s"]
            lines.append(f"{'solo card at speed ' + str(speed):<44} {'-':<44} {solo[speed]:>8.0f} {'-':>8} {'-':>10}")
            print(lines[-1], flush=True)
        cases = []
        for slow in (1.0, 0.5, 0.2):
            for shares in ("equal", "auto"):
                cases.append((f"1:{slow}, link unlimited", slow, shares, [], 0.0, 1.0, None))
        # Memory as the reference box has it: a 24 GB card holds 3 sequences a batch where an 8 GB
        # one holds 1. Equal shares must size every batch for the smallest card.
        for shares, extra in (("equal", []), ("auto", ["--set", "data.batch_size=3"])):
            cases.append(("1:0.5, 24 vs 8 GB (3 vs 1 sequences)", 0.5, shares, extra, 0.0, 1.0, [3, 3, 1, 1, 1, 1, 1, 1]))
        accumulate = ["--set", "train.tokens_per_step=7680"]   # 3 batches of 1 x 256 per share of 1 (10 shares)
        for link_name, link in (("x4 gen1, 1 GB/s", 1e9), ("x1 gen1, 250 MB/s", 2.5e8)):
            cases.append((f"1:0.5, {link_name}, none", 0.5, "auto", accumulate, link, 1.0, None))
            cases.append((f"1:0.5, {link_name}, fp16", 0.5, "auto", accumulate + ["--set", "train.grad_compression=fp16"],
                          link, 0.5, None))
            cases.append((f"1:0.5, {link_name}, powersgd", 0.5, "auto",
                          accumulate + ["--set", "train.grad_compression=powersgd"], link, powersgd_share, None))
        results = {}
        for name, slow, shares, extra, link, sent, most in cases:
            speeds = [1.0, 1.0] + [slow] * 6
            flags = [*extra, *(["--set", "train.rank_shares=auto"] if shares == "auto" else [])]
            result = run(source, work / f"case-{len(results)}", speeds, args.batch_seconds, args.steps, flags, link,
                         gradient_bytes, sent, most)
            efficiency = result["positions_per_s"] / sum(solo[s] for s in speeds)
            results[(name, shares)] = (result, efficiency)
            ceiling = results[CEILING][1]   # the first case
            lines.append(f"{name + ', ' + shares:<44} {result['shares']:<44} {result['positions_per_s']:>8.0f} "
                         f"{efficiency:>8.2f} {efficiency / ceiling:>10.2f}")
            print(lines[-1], flush=True)
        auto_free = min(e for (name, shares), (_, e) in results.items() if "unlimited" in name and shares == "auto")
        x1 = max(e for (name, _), (_, e) in results.items() if "x1" in name)
        lines.append(f"ceiling of this simulation here (8 equal cards, equal shares): {ceiling:.2f} of the solo sum; "
                     f"auto shares without link cost: worst {auto_free:.2f} of the solo sum, {auto_free / ceiling:.2f} "
                     f"of the ceiling (goal >= 0.85); x1 link, best compression with accumulation: {x1:.2f}, "
                     f"{x1 / ceiling:.2f} of the ceiling (goal >= 0.70)")
        print(lines[-1], flush=True)
        lines += loss_curves(source, work, args.loss_steps)
        save("mixed_gpus", lines)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
