"""Blocked sliding-window attention against dense masked SDPA, n = 4k .. 256k positions.

    python bench/attention.py [--window 512] [--heads 4] [--max-n 262144]

Each (kernel, n) runs forward in a fresh process; peak memory is the growth of the process's
peak RSS over its size after the inputs were made (CPU) or torch's peak allocation (GPU). Dense
runs until its predicted score memory no longer fits. Headline: SWA memory ratio 256k / 32k
(linear growth is 8; the goal is <= 9).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import header, peak_rss_bytes, run_case, save

from attention import dense_attention, local_attention  # noqa: E402

QK_DIM, V_DIM = 48, 32   # the small preset's MLA head: nope 32 + rope 16, value 32


def case(kernel: str, n: int, window: int, heads: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k = (torch.randn(1, heads, n, QK_DIM, generator=g).to(device, dtype) for _ in range(2))
    v = torch.randn(1, heads, n, V_DIM, generator=g).to(device, dtype)
    doc = torch.zeros(1, n, dtype=torch.long, device=device)
    scale = QK_DIM ** -0.5

    def run():
        if kernel == "swa":
            return local_attention(q, k, v, doc, scale, window)
        return dense_attention(q, k, v, doc, scale, window)

    def timed():
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    # The first call measures memory (the RSS high-water mark never falls); short cases are
    # timed again once warm.
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_bytes()
    seconds, out = timed()
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    if n <= 16384:
        seconds = min(timed()[0] for _ in range(2))
    return {"seconds": seconds, "peak_bytes": max(peak, 0), "out_sum": float(out.float().sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs=4, metavar=("KERNEL", "N", "WINDOW", "HEADS"), help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-n", type=int, default=262_144)
    parser.add_argument("--dense-limit-gb", type=float, default=8.0,
                        help="skip dense when its score matrix alone would exceed this")
    args = parser.parse_args()
    if args.case:
        kernel, n, window, heads = args.case
        print(json.dumps(case(kernel, int(n), int(window), int(heads))))
        return 0

    lines = [*header(),
             f"{'n':>8} {'swa s':>8} {'swa MiB':>9} {'dense s':>8} {'dense MiB':>10} {'time x':>7} {'mem x':>7}"]
    print("\n".join(lines), flush=True)
    swa_memory = {}
    n = 4096
    while n <= args.max_n:
        swa = run_case(__file__, "swa", str(n), str(args.window), str(args.heads))
        dense_scores_gb = args.heads * n * n * 4 / 1e9
        dense = (run_case(__file__, "dense", str(n), str(args.window), str(args.heads))
                 if dense_scores_gb <= args.dense_limit_gb else {"error": f"needs > {dense_scores_gb:.0f} GB"})
        swa_memory[n] = swa.get("peak_bytes")

        def fmt(result, key, scale=1.0, width=8, digits=2):
            return f"{result[key] / scale:>{width}.{digits}f}" if key in result else f"{'-':>{width}}"

        ratio_t = (f"{dense['seconds'] / swa['seconds']:>7.1f}" if "seconds" in dense and "seconds" in swa else f"{'-':>7}")
        ratio_m = (f"{dense['peak_bytes'] / max(swa['peak_bytes'], 1):>7.1f}"
                   if "peak_bytes" in dense and "peak_bytes" in swa else f"{'-':>7}")
        line = (f"{n:>8} {fmt(swa, 'seconds')} {fmt(swa, 'peak_bytes', 2**20, 9, 0)} {fmt(dense, 'seconds')} "
                f"{fmt(dense, 'peak_bytes', 2**20, 10, 0)} {ratio_t} {ratio_m}"
                + (f"   dense: {dense['error']}" if "error" in dense else "")
                + (f"   swa: {swa['error']}" if "error" in swa else ""))
        lines.append(line)
        print(line, flush=True)
        n *= 2
    if swa_memory.get(262_144) and swa_memory.get(32_768):
        headline = f"SWA memory ratio 256k/32k: {swa_memory[262_144] / swa_memory[32_768]:.2f} (linear = 8, goal <= 9)"
    else:
        headline = "SWA memory ratio 256k/32k: not measured"
    lines.append(headline)
    print(headline)
    save("attention", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
