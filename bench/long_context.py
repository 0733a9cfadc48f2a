"""Forward + backward of a preset at a long context: time and peak memory.

    python bench/long_context.py [--preset long] [--positions 262144] [--set model.window=256 ...]

One document of synthetic segments (text tokens and audio frames with prosody) fills the
sequence exactly; masks hide text and audio spans as in training. On CPU the peak is the
process's peak RSS; on a GPU, torch's peak allocation (fp16/bf16 autocast as the trainer picks).
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from common import ROOT, header, peak_rss_bytes, save

import datasets  # noqa: E402 (path set by common)
import model_trainer  # noqa: E402
from custom_transformer import CustomTransformer, sample_masks  # noqa: E402


def synthetic_document(positions: int, k: int, seed: int = 0, audio: bool = True) -> datasets.Batch:
    """Segments of 20-60 tokens and 2-6 s of audio (or, without audio, 100-300 tokens), the last
    one sized to fill `positions`."""
    rng = np.random.default_rng(seed)
    segments, used, index = [], 0, 0
    while used < positions:
        tokens, frames = (int(rng.integers(20, 60)), int(rng.integers(200, 600))) if audio else (int(rng.integers(100, 300)), 0)
        need = 2 + tokens + -(-frames // k)
        if used + need > positions:
            tokens, frames = positions - used - 2, 0
            need = positions - used
        f0 = np.where(rng.uniform(size=frames) < 0.7, rng.uniform(80, 300, frames), 0).astype(np.float32)
        segments.append(datasets.Segment(
            sample_id=f"long/{index}", doc_id="long", token_ids=rng.integers(4, 260, tokens).astype(np.int32),
            mel=rng.normal(size=(frames, datasets.N_MELS)).astype(np.float16), f0_hz=f0,
            voicing=(f0 > 0).astype(np.float32), energy=rng.normal(size=frames).astype(np.float32),
            speaker_id=int(rng.integers(8)), sentiment=int(rng.integers(3))))
        used += need
        index += 1
    return datasets.collate([segments], datasets.SequenceLayout(positions, k))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="long")
    parser.add_argument("--positions", type=int, default=262_144)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    cfg = model_trainer.load_config(str(ROOT / "config.yaml"), args.set, args.preset)
    device, amp_dtype = model_trainer.choose_device(cfg.train.device, cfg.train.precision)
    torch.manual_seed(0)
    model = CustomTransformer(cfg.model).to(device)
    batch = synthetic_document(args.positions, cfg.model.frames_per_position)
    masks = sample_masks(batch, cfg.model, torch.Generator().manual_seed(0)).to(device)
    batch = batch.to(device)
    assert batch.n_positions(cfg.model.frames_per_position) == args.positions
    n_params = sum(p.numel() for p in model.parameters())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = peak_rss_bytes()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
        loss, _ = model(batch, masks)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    lines = [*header(),
             f"preset {args.preset}: {n_params / 1e6:.1f}M parameters, layers {cfg.model.layer_pattern} x{cfg.model.n_layers}, "
             f"window {cfg.model.window}, activation checkpointing {cfg.model.activation_checkpointing}, "
             f"{str(amp_dtype).removeprefix('torch.')}",
             f"positions {args.positions:,}: forward+backward {seconds:.1f} s, loss {loss.item():.3f}",
             f"peak memory {peak / 2**30:.2f} GiB ("
             + ("GPU allocated)" if device.type == "cuda" else f"process RSS; {(peak - base) / 2**30:.2f} GiB above the inputs)"),
             f"throughput {args.positions / seconds:,.0f} positions/s"]
    print("\n".join(lines))
    save(f"long_context_{args.preset}_{device.type}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
