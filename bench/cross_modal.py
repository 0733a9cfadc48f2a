"""Does the model learn across modalities? Two models of the same size, trained alike on the demo
corpus with most text hidden: one sees every modality, the other text alone. Evaluated on a
held-out file with identical text masks.

    python bench/cross_modal.py [--steps 300] [--text-mask 0.6] [--preset small]

Prints masked-text accuracy of both, and the multimodal model's accuracy on fully hidden
sentiment and speaker slots against chance (the most frequent class). Headline: the text
accuracy ratio, multimodal / text-only.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import sys
import time

import pyarrow.parquet as pq
import torch

from common import ROOT, machine, save

import config  # noqa: E402 (path set by common)
import datasets  # noqa: E402 (path set by common)
import demo_corpus  # noqa: E402
import model_trainer  # noqa: E402
import packing  # noqa: E402 (path set by common)
import schema  # noqa: E402 (path set by common)
import step_feed  # noqa: E402
from custom_transformer import CustomTransformer, Masks, sample_masks  # noqa: E402


def text_only(batch: packing.Batch) -> packing.Batch:
    """The same segments with audio, prosody, speaker and sentiment removed."""
    n = len(batch.n_tokens)
    no_frames = batch.mel[:0]
    return dataclasses.replace(
        batch, mel=no_frames, f0_hz=batch.f0_hz[:0], voicing=batch.voicing[:0], energy=batch.energy[:0],
        frame_valid=batch.frame_valid[:0], n_frames=torch.zeros_like(batch.n_frames),
        speaker_id=torch.full((n,), schema.UNKNOWN), sentiment=torch.full((n,), schema.UNKNOWN),
        speaker_embedding=batch.speaker_embedding[:, :0], has_speaker_embedding=torch.zeros(n, dtype=torch.bool),
        affect=torch.full((n, 2), math.nan), token_audio_position=torch.full_like(batch.token_audio_position, -1))


def without_audio(masks: Masks) -> Masks:
    return dataclasses.replace(masks, audio=masks.audio[:0])


def train(cfg, files, info, steps: int, transform) -> CustomTransformer:
    torch.manual_seed(cfg.train.seed)
    model = CustomTransformer(cfg.model)
    model.set_corpus_stats(info)
    optimizer, scheduler = model_trainer.make_optimizer(model, cfg.train, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    layout = packing.SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
    dataset = datasets.LocalParquetDataset(files, layout, cfg.data.batch_size, seed=cfg.data.seed)
    stream = step_feed.batches(dataset, 0)
    generator = torch.Generator()
    model.train()
    for step in range(steps):
        batch = next(stream)
        generator.manual_seed(step)
        masks = sample_masks(batch, cfg.model, generator)
        if transform is not None:
            batch, masks = transform(batch), without_audio(masks)
        model_trainer.train_step(model, [(batch, masks)], optimizer, scheduler, scaler, torch.device("cpu"),
                                 torch.float32, cfg.train.grad_clip)
    return model.eval()


@torch.no_grad()
def evaluate(model, cfg, files, transform, hide_slots: bool) -> dict[str, float]:
    """Accuracies weighted by the number of hidden items, over every batch of `files`."""
    layout = packing.SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
    dataset = datasets.LocalParquetDataset(files, layout, cfg.data.batch_size, shuffle=False)
    eval_cfg = dataclasses.replace(cfg.model, speaker_drop=1.0 if hide_slots else 0.0, document_drop=0.0,
                                   sentiment_drop=1.0 if hide_slots else 0.0)
    totals, counts = collections.Counter(), collections.Counter()
    for i, batch in enumerate(dataset):
        masks = sample_masks(batch, eval_cfg, torch.Generator().manual_seed(10_000 + i))
        weights = {"text_acc": int(masks.text.sum()), "sentiment_acc": int(masks.sentiment.sum()),
                   "speaker_acc": int(masks.speaker.sum())}
        if transform is not None:
            batch, masks = transform(batch), without_audio(masks)
        _, metrics = model(batch, masks)
        for name, weight in weights.items():
            if name in metrics:
                totals[name] += metrics[name].item() * weight
                counts[name] += weight
    return {name: totals[name] / counts[name] for name in counts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--text-mask", type=float, default=0.6)
    parser.add_argument("--preset", default="small")
    args = parser.parse_args()
    shards = demo_corpus.build(ROOT / "data" / "demo")
    train_files, eval_files = shards[:-1], shards[-1:]
    cfg = config.load_config(str(ROOT / "config.yaml"),
                                    [f"model.text_mask_ratio={args.text_mask}", f"train.steps={args.steps}"], args.preset)
    info = schema.corpus_info({str(f): schema.read_metadata(pq.read_schema(f), str(f)) for f in shards})

    start = time.perf_counter()
    multimodal = train(cfg, train_files, info, args.steps, None)
    text_model = train(cfg, train_files, info, args.steps, text_only)
    train_seconds = time.perf_counter() - start
    mm = evaluate(multimodal, cfg, eval_files, None, hide_slots=True)
    text = evaluate(text_model, cfg, eval_files, text_only, hide_slots=True)

    table = pq.read_table(eval_files, columns=["sentiment", "speaker_id"])
    chance = {name: max(collections.Counter(table.column(name).to_pylist()).values()) / table.num_rows
              for name in ("sentiment", "speaker_id")}
    lines = [f"# bench/cross_modal.py --steps {args.steps} --text-mask {args.text_mask} --preset {args.preset}",
             f"# {machine()}", f"# {time.strftime('%Y-%m-%d %H:%M')}; training both models took {train_seconds:.0f} s",
             f"# train {len(train_files)} files, evaluate on held-out {eval_files[0].name} ({table.num_rows} segments)",
             f"{'model':<12} {'masked text acc':>16} {'sentiment acc':>14} {'speaker acc':>12}",
             f"{'multimodal':<12} {mm['text_acc']:>16.3f} {mm['sentiment_acc']:>14.3f} {mm['speaker_acc']:>12.3f}",
             f"{'text only':<12} {text['text_acc']:>16.3f} {'-':>14} {'-':>12}",
             f"{'chance':<12} {'-':>16} {chance['sentiment']:>14.3f} {chance['speaker_id']:>12.3f}",
             f"masked text accuracy, multimodal / text-only: {mm['text_acc'] / text['text_acc']:.2f}x"]
    print("\n".join(lines))
    save("cross_modal", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
