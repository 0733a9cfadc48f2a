"""The memory plan's cost model against measurement at full width: fitted as `plan` fits it
(one and two layers of each kind at the plan's probe lengths; under sharing, one layer of each
kind split over 2 and over 4 processes at its split lengths), then checked on the preset's
pattern with more layers at a longer sequence, on one process and on the largest of N
processes sharing it (context parallelism, gloo; N = 8 is planned from the splits over 2 and 4).

    python bench/memory_plan_check.py [--preset base] [--layers 6] [--positions 32768] [--sharing 8]

Memory: tensor memory above the weights and inputs of a forward + backward of one full
sequence, gradients left out (memory_plan.py's probe: on a CPU the profiler's record of every
allocation; on a GPU torch's peak). Headline: predicted / measured for each row (the plan adds
weights and optimizer state, 16 bytes a parameter, to these).
"""
from __future__ import annotations

import argparse
import sys

from common import ROOT, header, save

import memory_plan  # noqa: E402 (path set by common)
from config import load_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--positions", type=int, default=32_768)
    parser.add_argument("--sharing", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    config = str(ROOT / "config.yaml")
    overrides = [*args.set, "data.batch_size=1", "model.activation_checkpointing=true"]
    cfg = load_config(config, overrides, args.preset)
    short, long_ = memory_plan.probe_lengths(cfg)
    split_short, split_long = memory_plan.probe_lengths(cfg, max(memory_plan.SPLITS))
    model = memory_plan.fitted_model(overrides, args.preset, config, cfg, [], args.sharing)
    shape = (args.layers, args.positions)
    lines = [*header(), f"preset {args.preset} width, pattern {cfg.model.layer_pattern}, {args.layers} layers, "
             f"{args.positions:,} positions, batch 1, activation checkpointing; fitted on probes at {short:,} and "
             f"{long_:,} positions, split over {' and '.join(map(str, memory_plan.SPLITS))} processes at "
             f"{split_short:,} and {split_long:,} ({memory_plan.describe_probe_device(cfg)})",
             f"kept {model.kept_per_layer / 1e3:.1f} KB a position and layer; working set a position + fixed: "
             + ", ".join(f"{kind} {a / 1e3:.1f} KB + {c / 2**20:.0f} MiB" for kind, (a, c) in model.working.items())
             + "; sharing over N, a position of the slice + of the rows + fixed / N + fixed: "
             + ", ".join(f"{kind} {a / 1e3:.1f} KB + {r / 1e3:.1f} KB + {c / 2**20:.0f} MiB + {d / 2**20:.0f} MiB"
                         for kind, (a, r, c, d) in model.shared.items()),
             f"{'processes':<10} {'predicted GiB':>14} {'measured GiB':>13} {'KB/position':>12} {'predicted x':>12}"]
    for sharing in (1, args.sharing):
        measured = memory_plan.probe(overrides, args.preset, config, [], [shape], sharing=sharing)[shape][0]
        predicted = model.activations(args.layers, args.positions, sharing=sharing)
        lines.append(f"{sharing:<10} {predicted / 2**30:>14.2f} {measured / 2**30:>13.2f} "
                     f"{measured / -(-args.positions // sharing) / 1e3:>12.1f} {predicted / measured:>12.2f}")
    print("\n".join(lines))
    save(f"memory_plan_check_{args.preset}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
