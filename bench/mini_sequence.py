"""The mini-sequence feed-forward (model.ffn_chunk): peak memory and time of one forward +
backward at a long context, the whole row at once against chunks, side by side.

    python bench/mini_sequence.py [--preset base] [--positions 16384] [--layers 2] [--chunks 0 4096 1024]

The preset's width (`base`: d_model 768, FFN 2560, activation checkpointing) with --layers
blocks, one document of synthetic segments (bench/long_context.py), each chunk size in a fresh
process. On CPU the peak is the process's peak RSS; "working set" is the peak above what was
held before the forward (weights, inputs). Headline: the working set per position with the
smallest chunk over the whole row's, and the time ratio.
"""
from __future__ import annotations

import argparse
import json
import sys

from common import header, run_case, save

from long_context import case  # noqa: E402 (path set by common)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--positions", type=int, default=16_384)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 4096, 1024])
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    if args.case:
        preset, positions, *overrides = args.case
        print(json.dumps(case(preset, int(positions), overrides)))
        return 0
    common = [*args.set, f"model.n_layers={args.layers}", "model.layer_pattern=L"]
    results = {chunk: run_case(__file__, args.preset, str(args.positions), *common, f"model.ffn_chunk={chunk}",
                               timeout=7200) for chunk in args.chunks}
    whole = results.get(0, {})
    first = next((r for r in results.values() if "seconds" in r), {})
    lines = [*header(), f"preset {args.preset} width, {args.layers} L layers, {args.positions:,} positions: "
             f"{first.get('description', '?')}, {first.get('precision', '?')}; forward+backward of one document",
             f"{'ffn_chunk':<10} {'seconds':>8} {'peak GiB':>9} {'working set GiB':>16} {'KB/position':>12} "
             f"{'memory x':>9} {'time x':>7}"]
    for chunk, r in results.items():
        if "seconds" not in r:
            lines.append(f"{chunk:<10} {r.get('error', 'failed')}")
            continue
        memory = r["above_inputs_gib"] / whole["above_inputs_gib"] if "seconds" in whole else float("nan")
        time_ratio = r["seconds"] / whole["seconds"] if "seconds" in whole else float("nan")
        lines.append(f"{chunk or 'whole':<10} {r['seconds']:>8.1f} {r['peak_gib']:>9.2f} {r['above_inputs_gib']:>16.2f} "
                     f"{r['above_inputs_gib'] * 2**30 / args.positions / 1e3:>12.1f} {memory:>9.2f} {time_ratio:>7.2f}")
    print("\n".join(lines))
    save(f"mini_sequence_{args.preset}_{first.get('device', 'cpu')}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
