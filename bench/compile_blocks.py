"""torch.compile of each transformer block against eager: speed and identical losses.

    python bench/compile_blocks.py [--preset small] [--steps 30]

Both runs train the same model from the same seed on the same batches of the demo corpus (read
locally; packed sequences vary in length, so blocks are compiled with dynamic shapes); the
first steps of the compiled run include compilation and are reported apart. Losses are
compared step by step. Headline: steady-state step time eager / compiled.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from common import ROOT, header, run_case, save

import config  # noqa: E402 (path set by common)
import datasets  # noqa: E402 (path set by common)
import demo_corpus  # noqa: E402
import model_trainer  # noqa: E402
import packing  # noqa: E402 (path set by common)
import schema  # noqa: E402 (path set by common)
import step_feed  # noqa: E402
from custom_transformer import CustomTransformer, sample_masks  # noqa: E402

WARMUP = 5


def case(mode: str, preset: str, steps: int) -> dict:
    cfg = config.load_config(str(ROOT / "config.yaml"), [], preset)
    files = sorted((ROOT / "data" / "demo" / "parquet").glob("*.parquet"))
    layout = packing.SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
    dataset = datasets.LocalParquetDataset(files, layout, cfg.data.batch_size, seed=0)
    stream = step_feed.batches(dataset, 0)
    torch.manual_seed(0)
    model = CustomTransformer(cfg.model)
    model.set_corpus_stats(schema.corpus_info(dataset.metadata()))
    if mode == "compiled":
        model.compile_blocks()
    optimizer, scheduler = model_trainer.make_optimizer(model, cfg.train, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses, times = [], []
    for step in range(steps):
        batch = next(stream)
        masks = sample_masks(batch, cfg.model, torch.Generator().manual_seed(step))
        start = time.perf_counter()
        result = model_trainer.train_step(model, [(batch, masks)], optimizer, scheduler, scaler,
                                          torch.device("cpu"), torch.float32, cfg.train.grad_clip)
        times.append(time.perf_counter() - start)
        losses.append(result.loss)
    return {"losses": losses, "warmup_s": sum(times[:WARMUP]), "step_s": sum(times[WARMUP:]) / (steps - WARMUP)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs=3, metavar=("MODE", "PRESET", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.case:
        mode, preset, steps = args.case
        print(json.dumps(case(mode, preset, int(steps))))
        return 0
    demo_corpus.build(ROOT / "data" / "demo")
    eager = run_case(__file__, "eager", args.preset, str(args.steps))
    compiled = run_case(__file__, "compiled", args.preset, str(args.steps))
    lines = [*header(),
             f"{'mode':<10} {'first ' + str(WARMUP) + ' steps s':>18} {'step s (after)':>15}"]
    for name, result in (("eager", eager), ("compiled", compiled)):
        lines.append(f"{name:<10} {result['warmup_s']:>18.2f} {result['step_s']:>15.3f}" if "losses" in result
                     else f"{name:<10} {result.get('error')}")
    if "losses" in eager and "losses" in compiled:
        diffs = [abs(a - b) / abs(a) for a, b in zip(eager["losses"], compiled["losses"])]
        lines.append(f"loss difference, compiled vs eager: max {max(diffs):.2e} relative over {len(diffs)} steps "
                     f"(first step {diffs[0]:.2e})")
        headline = f"torch.compile speed-up per step (CPU, after warm-up): {eager['step_s'] / compiled['step_s']:.2f}x"
    else:
        headline = "torch.compile speed-up: not measured"
    lines.append(headline)
    print("\n".join(lines))
    save(f"compile_blocks_{args.preset}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
