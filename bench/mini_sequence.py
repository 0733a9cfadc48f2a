"""The mini-sequence feed-forward (model.ffn_chunk): peak memory and time of one forward +
backward at a long context, the whole row at once against chunks, side by side.

    python bench/mini_sequence.py [--preset base] [--positions 16384] [--layers 2] [--chunks 0 4096 1024]

The preset's width (`base`: d_model 768, FFN 2560, activation checkpointing) with --layers
blocks. Time: one document of synthetic segments (bench/long_context.py) in a fresh process per
chunk size. Memory: the peak of tensor memory above the weights and inputs during a forward and
backward of one full sequence, gradients left out (memory_plan.py's probe: the profiler's
timeline on a CPU, whose RSS depends on its allocator; torch's peak allocation on a GPU).
Headline: the memory per position with each chunk over the whole row's, and the time ratio.
"""
from __future__ import annotations

import argparse
import sys

from common import ROOT, header, run_case, save

import memory_plan  # noqa: E402 (path set by common)
from long_context import table_rows  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--positions", type=int, default=16_384)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 4096, 1024])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    common = [*args.set, f"model.n_layers={args.layers}", "model.layer_pattern=L"]
    timed = str(ROOT / "bench" / "long_context.py")   # its --case: one forward+backward, timed
    results = {chunk: run_case(timed, args.preset, str(args.positions), *common, f"model.ffn_chunk={chunk}",
                               timeout=7200) for chunk in args.chunks}
    for chunk, result in results.items():
        shape = (args.layers, args.positions)
        result["tensor_bytes"] = memory_plan.probe(common, args.preset, str(ROOT / "config.yaml"),
                                                   [f"model.ffn_chunk={chunk}"], [shape])[shape][0]
    whole = results.get(0, {})
    first = next((r for r in results.values() if "seconds" in r), {})
    lines = [*header(), f"preset {args.preset} width, {args.layers} L layers, {args.positions:,} positions: "
             f"{first.get('description', '?')}, {first.get('precision', '?')}; forward+backward of one document",
             f"{'ffn_chunk':<10} {'seconds':>8} {'tensor GiB':>11} {'KB/position':>12} {'memory x':>9} {'time x':>7}"]
    lines += table_rows(results, whole, lambda chunk, r, ratio: (
        f"{chunk or 'whole':<10} {r['seconds']:>8.1f} {r['tensor_bytes'] / 2**30:>11.2f} "
        f"{r['tensor_bytes'] / args.positions / 1e3:>12.1f} {ratio('tensor_bytes'):>9.2f} {ratio('seconds'):>7.2f}"))
    print("\n".join(lines))
    save(f"mini_sequence_{args.preset}_{first.get('device', 'cpu')}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
