"""Does data ever stall the step? The trainer itself, fed over loopback Flight by its embedded
server from the demo corpus, and the fraction of each step's time it spent waiting for data.

    python bench/data_stall.py [--preset small] [--steps 60]

The trainer logs `data_wait_frac` for every step (time in next(batches) over the whole step);
the first step, which opens the connection and fills the prefetch queue, is reported apart.
Headline: mean fraction over the other steps (goal < 2%).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import header, save

import model_trainer  # noqa: E402 (path set by common)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        flags = [arg for item in args.set for arg in ("--set", item)]
        code = model_trainer.main(["--preset", args.preset, "--steps", str(args.steps), "--out", out,
                                   "--ws-port", "-1", "--set", f"train.checkpoint_every={args.steps}", *flags])
        if code != 0:
            print(f"the trainer failed (exit {code})", file=sys.stderr)
            return code
        steps = [m for m in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
                 if m["type"] == "step"]
    waits = [m["data_wait_frac"] for m in steps[1:]]
    lines = [*header(),
             f"step 1 (connect, fill the prefetch queue): {steps[0]['data_wait_frac']:.1%} of "
             f"{steps[0]['step_time_s']:.2f} s",
             f"steps 2-{len(steps)}: mean step {statistics.mean(m['step_time_s'] for m in steps[1:]):.3f} s, "
             f"{statistics.mean(m['tokens_per_s'] for m in steps[1:]):,.0f} positions/s",
             f"waiting for data: median {statistics.median(waits):.2%}, max {max(waits):.2%}",
             f"fraction of step time waiting for data (steps 2-{len(steps)}): {statistics.mean(waits):.2%} (goal < 2%)"]
    print("\n".join(lines))
    save(f"data_stall_{args.preset}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
