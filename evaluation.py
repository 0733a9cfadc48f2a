"""Evaluation on held-out files: the trainer's metrics (loss, per-modality losses, accuracies),
the same masks every time, weighted by positions over every rank's share; speakers training never
saw are counted apart. Used by the trainer (--eval-files) and `model_trainer.py evaluate`.
"""
from __future__ import annotations

import collections
import math

import torch

from config import Config
from custom_transformer import sample_masks
from parallel import all_ranks, autocast


@torch.no_grad()
def evaluate(model, dataset, cfg: Config, device, amp_dtype, sharing: int = 1) -> dict[str, float]:
    """Mean metrics over the evaluation files (every rank's share), weighted by positions; the
    same masks every time. With `sharing` > 1 (context parallelism) each group of that many
    consecutive ranks read the same share, taken once."""
    model.eval()
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    dataset.unseen_speakers.clear()
    for index, batch in enumerate(dataset):
        masks = sample_masks(batch, cfg.model, torch.Generator().manual_seed(cfg.train.seed + index)).to(device)
        batch = batch.to(device)
        with autocast(device, amp_dtype):
            loss, metrics = model(batch, masks)   # padding batches too: FSDP ranks gather weights together
        weight = 0 if batch.padding else batch.n_positions(cfg.model.frames_per_position)
        for name, value in {"loss": loss, **metrics}.items():
            totals[name] = totals.get(name, 0.0) + float(value) * weight
            weights[name] = weights.get(name, 0.0) + weight
    model.train()
    shares = all_ranks((totals, weights, collections.Counter(dataset.unseen_speakers)))[::sharing]
    totals, weights, unseen = {}, {}, collections.Counter()
    for share_totals, share_weights, share_unseen in shares:
        unseen.update(share_unseen)
        for name in share_totals:
            totals[name] = totals.get(name, 0.0) + share_totals[name]
            weights[name] = weights.get(name, 0.0) + share_weights[name]
    result = {name: totals[name] / weights[name] for name in totals if weights[name] > 0}
    if "loss_text" in result:
        result["text_perplexity"] = math.exp(min(result["loss_text"], 50.0))
    # Speakers the training files never named cannot be scored: counted apart, by name.
    result["unseen_speakers"] = dict(sorted(unseen.items()))
    return result
