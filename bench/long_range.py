"""Whole-document reach, proven by a task that nothing else solves: a key spoken once at the
start of a document must be filled in at hidden slots far later.

    python bench/long_range.py [--positions 32768] [--steps 150]

Each synthetic document is text only: one of 8 key tokens held for its first KEY_SPAN positions
(a word spoken for a few seconds), filler tokens drawn at random from 4 (no cue) and, at several
distances from the key, a query marker followed by a hidden slot whose answer is the key. Two
models of the same size (the tiny preset's widths, two layers) train for the same steps on
fresh documents: all-local (`LL`) and local + sparse global (`LS`). Training documents double
in length from --start-positions to --positions (a key that is a large share of a short
document is found by the first gradients; longer ones then teach the search), as many a step as
fill --positions-per-step. Accuracy on new --positions documents is reported per distance;
chance is 1/8. Goal: all-local at chance, sparse global >= 90% at 32k positions.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import torch

from common import ROOT, header, save

import config  # noqa: E402
import model_trainer  # noqa: E402
import packing  # noqa: E402 (path set by common)
import schema  # noqa: E402 (path set by common)
from config import TrainConfig  # noqa: E402
from custom_transformer import CustomTransformer, Masks  # noqa: E402

KEYS = np.arange(10, 18)            # 8 keys: chance is 1/8
FILLER = np.arange(40, 44)
QUERY_MARK = 6
KEY_SPAN = 128                      # positions the key is held for (~5 s at 25 positions/s)
SEGMENT_TOKENS = 254                # + speaker and sentiment slots = 256 positions a segment


def documents(count: int, positions: int, distances: list[int], rng: np.random.Generator
              ) -> tuple[packing.Batch, Masks, torch.Tensor, torch.Tensor]:
    """-> a batch of `count` documents (one a row), masks hiding their query slots, the slots'
    token indices and each slot's answer."""
    n_segments = positions // (SEGMENT_TOKENS + 2)
    empty = np.zeros((0, schema.N_MELS), np.float16)
    rows, slots, answers = [], [], []
    for d in range(count):
        tokens = rng.choice(FILLER, size=(n_segments, SEGMENT_TOKENS)).astype(np.int32)
        key = int(rng.choice(KEYS))
        tokens[0, :KEY_SPAN] = key               # from position 2 of the document
        for distance in distances:
            segment, offset = divmod(2 + KEY_SPAN + distance, SEGMENT_TOKENS + 2)   # from the key's end
            offset = max(offset - 2, 1)          # a token, with the marker before it in the same segment
            tokens[segment, offset - 1:offset + 1] = QUERY_MARK, key
            slots.append((d * n_segments + segment) * SEGMENT_TOKENS + offset)
            answers.append(key)
        rows.append([packing.Segment(sample_id=f"{d}/{i}", doc_id=str(d), token_ids=row, mel=empty,
                                      f0_hz=np.zeros(0, np.float32), voicing=np.zeros(0, np.float32),
                                      energy=np.zeros(0, np.float32), speaker_id=schema.UNKNOWN,
                                      sentiment=schema.UNKNOWN) for i, row in enumerate(tokens)])
    batch = packing.collate(rows, packing.SequenceLayout(positions, 4))
    text = torch.zeros(len(batch.token_ids), dtype=torch.bool)
    slots = torch.tensor(slots)
    text[slots] = True
    none = torch.zeros(count * n_segments, dtype=torch.bool)
    masks = Masks(text=text, audio=torch.zeros(0, dtype=torch.bool), speaker=none, sentiment=none)
    return batch, masks, slots, torch.tensor(answers)


def train_and_test(pattern: str, args, distances: list[int]) -> dict:
    cfg = config.load_config(str(ROOT / "config.yaml"), [
        f"model.layer_pattern={pattern}", "model.n_layers=2", f"model.window={args.window}",
        f"model.sparse_block={args.block}", f"model.sparse_topk={args.topk}", "model.speaker_drop=0",
        "model.sentiment_drop=0", "model.document_drop=0"], "tiny").model
    torch.manual_seed(0)
    model = CustomTransformer(cfg)
    # the trainer's optimizer and schedule (AdamW, warmup, cosine decay) and its gradient clipping
    train = TrainConfig(lr=args.lr, steps=args.steps, warmup_steps=20, weight_decay=0.0)
    optimizer, scheduler = model_trainer.make_optimizer(model, train, torch.device("cpu"))
    rng = np.random.default_rng(1)
    started, curve = time.perf_counter(), []
    stages = max(1, round(math.log2(args.positions / args.start_positions)) + 1)
    for step in range(args.steps):
        # Documents double in length from --start-positions to --positions over the run (where the
        # key is a larger share of a document, the first gradients find it); the queries sit at
        # every distance, so no model is taught a fixed offset.
        positions = min(args.positions, args.start_positions * 2 ** (step * stages // args.steps))
        far = positions - KEY_SPAN - (SEGMENT_TOKENS + 2) - 8
        # as many documents a step as fill --positions-per-step: each step costs about the same
        batch, masks, _, _ = documents(max(1, args.positions_per_step // positions), positions,
                                       sorted(rng.integers(16, far, 32).tolist()), rng)
        loss, _ = model(batch, masks)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        scheduler.step()
        curve.append(loss.item())
        if (step + 1) % 25 == 0:
            print(f"  {pattern} step {step + 1}: loss {np.mean(curve[-25:]):.3f}", flush=True)
    seconds = (time.perf_counter() - started) / args.steps
    hits = np.zeros(len(distances))
    test = np.random.default_rng(1234)
    model.eval()
    for _ in range(args.test_documents):
        batch, masks, slots, answers = documents(1, args.positions, distances, test)
        logits = model.infer(batch, masks).text_logits[slots]
        hits += (logits.argmax(-1) == answers).numpy()
    return {"accuracy": hits / args.test_documents, "seconds_per_step": seconds,
            "parameters": sum(p.numel() for p in model.parameters()), "last_loss": float(np.mean(curve[-25:]))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--start-positions", type=int, default=1024, help="the first training documents' length")
    parser.add_argument("--positions-per-step", type=int, default=32768)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--test-documents", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    longest = args.positions - KEY_SPAN - (SEGMENT_TOKENS + 2) - 8
    distances = [d for d in (256, 1024, 4096, 16384) if d < longest] + [longest]
    lines = [*header(), f"# tested on {args.positions:,}-position documents, 8 keys (chance 0.125); trained {args.steps} "
             f"steps of {args.positions_per_step:,} positions, documents of {args.start_positions:,} doubling to "
             f"{args.positions:,}; window {args.window}, sparse block {args.block}, top-{args.topk}",
             f"{'layers':<8} {'params':>8} {'s/step':>7} {'loss':>6} " + " ".join(f"{f'@{d:,}':>8}" for d in distances)]
    print("\n".join(lines), flush=True)
    results = {}
    for pattern in ("LL", "LS"):
        result = results[pattern] = train_and_test(pattern, args, distances)
        lines.append(f"{pattern:<8} {result['parameters']:>8,} {result['seconds_per_step']:>7.2f} {result['last_loss']:>6.3f} "
                     + " ".join(f"{a:>8.2f}" for a in result["accuracy"]))
        print(lines[-1], flush=True)
    far = distances[-1]
    lines.append(f"at {far:,} positions: all-local {results['LL']['accuracy'][-1]:.2f} (chance 0.125), sparse global "
                 f"{results['LS']['accuracy'][-1]:.2f} (goal >= 0.90)")
    print(lines[-1])
    save("long_range", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
