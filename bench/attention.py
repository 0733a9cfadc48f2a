"""Blocked sliding-window attention and sparse global attention against dense masked SDPA,
n = 4k .. 256k positions.

    python bench/attention.py [--window 512] [--heads 4] [--max-n 262144] [--block 128 --topk 8]
                              [--compressed-keys 256]

The sparse kernel is an S layer's attention as the `long` preset has it (compressed branch over
pooled blocks of `--block`, the `--topk` blocks ranked highest at full resolution, and the
window), with pooled keys and values made from the per-head ones (the layer pools its latent).
It runs twice side by side: as configured (a document of more than `--compressed-keys` blocks
pooled in units of 2, 4... blocks, its units ranked, then the top units' blocks) and with one
pooled key per block at every length (`blocks` columns: the kernel before units). Each
(kernel, n) runs forward in a fresh process; peak memory is the growth of the process's peak
RSS over its size after the inputs were made (CPU) or torch's peak allocation (GPU). Dense runs
until its predicted score memory no longer fits. Headlines: SWA and sparse memory ratios 256k /
32k (linear growth is 8; the goal is <= 9), sparse time over SWA at 256k (goal <= 3).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import header, peak_rss_bytes, run_case, save

import attention  # noqa: E402
from attention import dense_attention, local_attention  # noqa: E402

QK_DIM, V_DIM = 48, 32   # the small preset's MLA head: nope 32 + rope 16, value 32
EVERY_BLOCK = 1 << 30    # compressed keys: one per block at any length


def sparse_attention(q, k, v, doc, scale, window, block, topk, compressed_keys):
    """An S layer's three branches (bidirectional), summed with equal gates."""
    blocks = attention.block_table(doc, block, compressed_keys)
    queries, keys, values = q[0], k[0], v[0]
    zeros = torch.zeros(block, device=q.device)
    pooled = attention.pool_blocks(torch.cat([keys, values], -1).transpose(0, 1).flatten(1), blocks, zeros)
    block_keys = None
    if blocks.coarse:
        block_keys = pooled.unflatten(1, (keys.shape[0], -1))[..., :keys.shape[-1]].transpose(0, 1)
        pooled = attention.pool_units(pooled, blocks)
    compressed_k, compressed_v = pooled.unflatten(1, (keys.shape[0], -1)).transpose(0, 1).split(
        [keys.shape[-1], values.shape[-1]], -1)
    tiles = attention.sparse_tiles(blocks, list(range(len(blocks.host_start))), keys.shape[0], topk, keys.shape[-1],
                                   attention.SparsePattern(block, topk).chunk)
    compressed, selected = attention.sparse_branches(queries, keys, values, compressed_k, compressed_v, blocks, tiles,
                                                     scale, topk, False, None, block_keys)
    return (compressed + selected)[None] + local_attention(q, k, v, doc, scale, window)


def case(kernel: str, n: int, window: int, heads: int, block: int = 128, topk: int = 8,
         compressed_keys: int = 256) -> dict:
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
        if kernel in ("sparse", "blocks"):
            return sparse_attention(q, k, v, doc, scale, window, block, topk,
                                    compressed_keys if kernel == "sparse" else EVERY_BLOCK)
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
    parser.add_argument("--case", nargs=7, metavar=("KERNEL", "N", "WINDOW", "HEADS", "BLOCK", "TOPK", "KEYS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-n", type=int, default=262_144)
    parser.add_argument("--block", type=int, default=128, help="sparse layers' block (the long preset's)")
    parser.add_argument("--topk", type=int, default=8, help="sparse layers' selected blocks (the long preset's)")
    parser.add_argument("--compressed-keys", type=int, default=256, help="sparse layers' most pooled keys a query reads")
    parser.add_argument("--dense-limit-gb", type=float, default=8.0,
                        help="skip dense when its score matrix alone would exceed this")
    args = parser.parse_args()
    if args.case:
        kernel, *numbers = args.case
        print(json.dumps(case(kernel, *map(int, numbers))))
        return 0

    lines = [*header(), f"# window {args.window}, {args.heads} heads; sparse: block {args.block}, top-{args.topk}, "
                        f"at most {args.compressed_keys} pooled keys a query (blocks: one a block)",
             f"{'n':>8} {'swa s':>8} {'swa MiB':>9} {'dense s':>8} {'dense MiB':>10} {'time x':>7} {'mem x':>7} "
             f"{'sparse s':>9} {'sparse MiB':>11} {'/swa s':>7} {'blocks s':>9} {'/swa s':>7}"]
    print("\n".join(lines), flush=True)
    swa_memory, sparse_memory, sparse_time, blocks_time = {}, {}, {}, {}
    n = 4096
    while n <= args.max_n:
        shape = (str(n), str(args.window), str(args.heads), str(args.block), str(args.topk), str(args.compressed_keys))
        swa = run_case(__file__, "swa", *shape)
        sparse = run_case(__file__, "sparse", *shape)
        blocks = run_case(__file__, "blocks", *shape)
        dense_scores_gb = args.heads * n * n * 4 / 1e9
        dense = (run_case(__file__, "dense", *shape)
                 if dense_scores_gb <= args.dense_limit_gb else {"error": f"needs > {dense_scores_gb:.0f} GB"})
        swa_memory[n], sparse_memory[n] = swa.get("peak_bytes"), sparse.get("peak_bytes")
        for result, ratios in ((sparse, sparse_time), (blocks, blocks_time)):
            if "seconds" in result and "seconds" in swa:
                ratios[n] = result["seconds"] / swa["seconds"]

        def fmt(result, key, scale=1.0, width=8, digits=2):
            return f"{result[key] / scale:>{width}.{digits}f}" if key in result else f"{'-':>{width}}"

        ratio_t = (f"{dense['seconds'] / swa['seconds']:>7.1f}" if "seconds" in dense and "seconds" in swa else f"{'-':>7}")
        ratio_m = (f"{dense['peak_bytes'] / max(swa['peak_bytes'], 1):>7.1f}"
                   if "peak_bytes" in dense and "peak_bytes" in swa else f"{'-':>7}")
        line = (f"{n:>8} {fmt(swa, 'seconds')} {fmt(swa, 'peak_bytes', 2**20, 9, 0)} {fmt(dense, 'seconds')} "
                f"{fmt(dense, 'peak_bytes', 2**20, 10, 0)} {ratio_t} {ratio_m} {fmt(sparse, 'seconds', 1.0, 9)} "
                f"{fmt(sparse, 'peak_bytes', 2**20, 11, 0)} {sparse_time.get(n, float('nan')):>7.2f} "
                f"{fmt(blocks, 'seconds', 1.0, 9)} {blocks_time.get(n, float('nan')):>7.2f}"
                + "".join(f"   {name}: {result['error']}" for name, result in
                          (("dense", dense), ("swa", swa), ("sparse", sparse), ("blocks", blocks)) if "error" in result))
        lines.append(line)
        print(line, flush=True)
        n *= 2
    if all(memory.get(n) for memory in (swa_memory, sparse_memory) for n in (32_768, 262_144)):
        headline = (f"memory ratio 256k/32k: SWA {swa_memory[262_144] / swa_memory[32_768]:.2f}, sparse "
                    f"{sparse_memory[262_144] / sparse_memory[32_768]:.2f} (linear = 8, goal <= 9); sparse / SWA time "
                    f"at 256k: {sparse_time.get(262_144, float('nan')):.2f} (goal <= 3; one pooled key a block: "
                    f"{blocks_time.get(262_144, float('nan')):.2f})")
    else:
        headline = "memory ratio 256k/32k: not measured"
    lines.append(headline)
    print(headline)
    save("attention", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
