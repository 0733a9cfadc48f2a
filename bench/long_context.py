"""Forward + backward of a preset at a long context: time and peak memory, for the preset's layer
pattern and for all-local layers side by side.

    python bench/long_context.py [--preset long] [--positions 262144] [--patterns LLLS L] [--set ...]

One document of synthetic segments (text tokens and audio frames with prosody) fills the
sequence exactly; masks hide text and audio spans as in training. Each pattern runs in a fresh
process. On CPU the peak is the process's peak RSS; on a GPU, torch's peak allocation (fp16/bf16
autocast as the trainer picks). Headline: the preset's time over all-local (goal <= 1.5 for
`long`, whose sparse global layers give every position reach over the whole document).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from common import ROOT, header, peak_rss_bytes, run_case, save

import config  # noqa: E402 (path set by common)
import packing  # noqa: E402 (path set by common)
import parallel  # noqa: E402 (path set by common)
import schema  # noqa: E402 (path set by common)
from custom_transformer import CustomTransformer, sample_masks  # noqa: E402


def synthetic_document(positions: int, k: int, seed: int = 0, audio: bool = True) -> packing.Batch:
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
        segments.append(packing.Segment(
            sample_id=f"long/{index}", doc_id="long", token_ids=rng.integers(4, 260, tokens).astype(np.int32),
            mel=rng.normal(size=(frames, schema.N_MELS)).astype(np.float16), f0_hz=f0,
            voicing=(f0 > 0).astype(np.float32), energy=rng.normal(size=frames).astype(np.float32),
            speaker_id=int(rng.integers(8)), sentiment=int(rng.integers(3))))
        used += need
        index += 1
    return packing.collate([segments], packing.SequenceLayout(positions, k))


def case(preset: str, positions: int, overrides: list[str]) -> dict:
    cfg = config.load_config(str(ROOT / "config.yaml"), overrides, preset)
    device, amp_dtype = parallel.choose_device(cfg.train.device, cfg.train.precision)
    torch.manual_seed(0)
    model = CustomTransformer(cfg.model).to(device)
    batch = synthetic_document(positions, cfg.model.frames_per_position)
    masks = sample_masks(batch, cfg.model, torch.Generator().manual_seed(0)).to(device)
    batch = batch.to(device)
    assert batch.n_positions(cfg.model.frames_per_position) == positions
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
    return {"seconds": seconds, "loss": loss.item(), "peak_gib": peak / 2**30, "above_inputs_gib": (peak - base) / 2**30,
            "parameters": sum(p.numel() for p in model.parameters()), "device": device.type,
            "precision": str(amp_dtype).removeprefix("torch."), "pattern": cfg.model.layer_pattern,
            "description": f"{cfg.model.n_layers} layers, window {cfg.model.window}, sparse block {cfg.model.sparse_block} "
                           f"top-{cfg.model.sparse_topk}, activation checkpointing {cfg.model.activation_checkpointing}"}


def table_rows(results: dict, reference: dict, row) -> list[str]:
    """One line per case, `row(name, result, ratio)` where ratio(key) is the result's value over
    the reference case's (nan without one); a failed case says why."""
    lines = []
    for name, result in results.items():
        if "seconds" not in result:
            lines.append(f"{name!s:<10} {result.get('error', 'failed')}")
            continue
        lines.append(row(name, result, lambda key: result[key] / reference[key] if key in reference
                         else float("nan")))
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="long")
    parser.add_argument("--positions", type=int, default=262_144)
    parser.add_argument("--patterns", nargs="+", help="layer patterns to compare (default: the preset's, then L)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    if args.case:
        preset, positions, *overrides = args.case
        print(json.dumps(case(preset, int(positions), overrides)))
        return 0
    preset_pattern = config.load_config(str(ROOT / "config.yaml"), args.set, args.preset).model.layer_pattern
    patterns = args.patterns or [preset_pattern, "L"]
    results = {pattern: run_case(__file__, args.preset, str(args.positions), *args.set,
                                 f"model.layer_pattern={pattern}", timeout=7200) for pattern in patterns}
    first = next((r for r in results.values() if "seconds" in r), {})
    lines = [*header(), f"preset {args.preset} at {args.positions:,} positions: {first.get('description', '?')}, "
             f"{first.get('precision', '?')}; forward+backward of one document",
             f"{'layers':<10} {'params':>8} {'seconds':>9} {'positions/s':>12} {'peak GiB':>9} {'loss':>8} {'time x':>7}"]
    local = results.get(patterns[-1], {})
    lines += table_rows(results, local, lambda pattern, r, ratio: (
        f"{pattern:<10} {r['parameters'] / 1e6:>7.2f}M {r['seconds']:>9.1f} {args.positions / r['seconds']:>12,.0f} "
        f"{r['peak_gib']:>9.2f} {r['loss']:>8.3f} {ratio('seconds'):>7.2f}"))
    if "seconds" in results.get(patterns[0], {}) and "seconds" in local and len(patterns) > 1:
        lines.append(f"{patterns[0]} / {patterns[-1]} time: {results[patterns[0]]['seconds'] / local['seconds']:.2f} "
                     f"(goal <= 1.5 for the long preset)")
    print("\n".join(lines))
    save(f"long_context_{args.preset}_{first.get('device', 'cpu')}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
