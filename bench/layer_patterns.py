"""The demo's training step with sparse global (`LLS`), dense global (`LLG`) and all-local (`L`)
layers, side by side in one process.

    python bench/layer_patterns.py [--preset small] [--steps 40] [--rounds 4]

Each pattern trains its own model (same seed) on the same batches of the demo corpus (read
locally); the patterns take turns, `--steps` / `--rounds` steps at a time, so a busy machine
slows them alike. The first round is warm-up and not counted. Headline: LLS positions/s over
LLG's (the demo's documents fit in top-k blocks, so an S layer reads them whole, as G does).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from common import ROOT, header, save

import config  # noqa: E402 (path set by common)
import datasets  # noqa: E402 (path set by common)
import demo_corpus  # noqa: E402
import model_trainer  # noqa: E402
import packing  # noqa: E402 (path set by common)
import schema  # noqa: E402 (path set by common)
import step_feed  # noqa: E402
from custom_transformer import CustomTransformer, sample_masks  # noqa: E402

PATTERNS = ("LLS", "LLG", "L")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=40, help="measured steps of each pattern")
    parser.add_argument("--rounds", type=int, default=4, help="turns the measured steps are taken in")
    args = parser.parse_args()
    demo_corpus.build(ROOT / "data" / "demo")
    files = sorted((ROOT / "data" / "demo" / "parquet").glob("*.parquet"))
    per_round = max(1, args.steps // args.rounds)
    runs = {}
    for pattern in PATTERNS:
        cfg = config.load_config(str(ROOT / "config.yaml"), [f"model.layer_pattern={pattern}"], args.preset)
        layout = packing.SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
        dataset = datasets.LocalParquetDataset(files, layout, cfg.data.batch_size, seed=0)
        torch.manual_seed(0)
        model = CustomTransformer(cfg.model)
        model.set_corpus_stats(schema.corpus_info(dataset.metadata()))
        optimizer, scheduler = model_trainer.make_optimizer(model, cfg.train, torch.device("cpu"))
        runs[pattern] = dict(cfg=cfg, model=model, optimizer=optimizer, scheduler=scheduler, step=0,
                             stream=step_feed.batches(dataset, 0), seconds=0.0, positions=0, loss=float("nan"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for round_ in range(args.rounds + 1):
        for pattern, run in runs.items():
            for _ in range(per_round):
                batch = next(run["stream"])
                masks = sample_masks(batch, run["cfg"].model, torch.Generator().manual_seed(run["step"]))
                start = time.perf_counter()
                result = model_trainer.train_step(run["model"], [(batch, masks)], run["optimizer"], run["scheduler"],
                                                  scaler, torch.device("cpu"), torch.float32,
                                                  run["cfg"].train.grad_clip)
                if round_ > 0:   # the first round warms up
                    run["seconds"] += time.perf_counter() - start
                    run["positions"] += batch.n_rows * layout.max_seq_len
                run["step"] += 1
                run["loss"] = result.loss
    cfg = runs["LLS"]["cfg"].model
    lines = [*header(),
             f"# preset {args.preset}: {per_round * args.rounds} steps of each pattern after {per_round} of warm-up, "
             f"in {args.rounds} turns; window {cfg.window}, sparse block {cfg.sparse_block}, top-{cfg.sparse_topk}",
             f"{'pattern':<8} {'s/step':>8} {'positions/s':>12} {'loss':>8} {'x LLG':>7}"]
    speed = {p: r["positions"] / r["seconds"] for p, r in runs.items()}
    for pattern, run in runs.items():
        lines.append(f"{pattern:<8} {run['seconds'] / (run['step'] - per_round):>8.3f} {speed[pattern]:>12,.0f} "
                     f"{run['loss']:>8.3f} {speed[pattern] / speed['LLG']:>7.2f}")
    lines.append(f"LLS / LLG positions/s on the demo: {speed['LLS'] / speed['LLG']:.2f} (goal >= 1.0)")
    print("\n".join(lines))
    save(f"layer_patterns_{args.preset}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
