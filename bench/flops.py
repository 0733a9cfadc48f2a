"""FLOPs per position: the formula the trainer uses for MFU against torch.utils.flop_counter.

    python bench/flops.py [--positions 2048]

CustomTransformer.flops_per_position counts 6 per weight of the blocks' matrix products and
6 * heads * (qk + v head dims) per key a query sees: the whole sequence on a global layer,
2 * window + 1 keys on a bidirectional local one (nanochat's way). The counter sees what the
kernels compute instead, so the attention term differs by three known factors: V is
zero-padded to the QK head dim (for the fused SDPA kernels), the flash backward recomputes the
scores (2 * qk per query and key), and a local layer's query block attends to block + 2 * window
keys, masking the ones outside each query's window. The check: the blocks' matrix products agree
exactly, and counted attention / formula attention equals the product of those factors.
Embeddings and output heads, left out of the formula, are shown apart. Headline: counted /
formula for the blocks' matrix products and counted / expected for attention (1.000 = exact).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from common import ROOT, flop_counter, header, save

import model_trainer  # noqa: E402 (path set by common)
from custom_transformer import CustomTransformer, sample_masks  # noqa: E402
from long_context import synthetic_document  # noqa: E402



def is_attention(op) -> bool:
    return "_scaled_dot_product" in str(op)


def counted(model: CustomTransformer, batch, masks) -> dict[str, float]:
    """FLOPs of one forward + backward, split into the blocks' matrix products, their attention,
    and everything else (embeddings, heads)."""
    with flop_counter() as counter:
        loss, _ = model(batch, masks)
        loss.backward()
    counts = counter.get_flop_counts()
    split = {"attention": sum(flops for op, flops in counts["Global"].items() if is_attention(op)),
             "all matmul": sum(flops for op, flops in counts["Global"].items() if not is_attention(op))}
    split["block matmul"] = sum(flops for module, ops in counts.items()
                                if module.startswith("CustomTransformer.blocks.") and module.count(".") == 2
                                for op, flops in ops.items() if not is_attention(op))
    split["other matmul"] = split.pop("all matmul") - split["block matmul"]
    return split


def formula(model: CustomTransformer, n: int) -> dict[str, float]:
    matmul, attention = model.flops_per_position_parts(n)
    return {"block matmul": matmul * n, "attention": attention * n}


def expected_attention_overhead(m, n: int) -> float:
    """counted / formula attention: V padding, the scores the flash backward recomputes, and
    local blocks' masked keys."""
    qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    padding = (6 * 2 * qk + 2 * qk) / (6 * (qk + v))   # per key: 6 (qk + v padded to qk) + 2 qk recompute
    keys_formula = keys_counted = 0
    block = max(16, m.window)
    for layer in range(m.n_layers):
        if m.is_global(layer):
            keys_formula += n
            keys_counted += n
        else:
            keys_formula += min(n, 2 * m.window + 1)
            keys_counted += (block + 2 * m.window) * (-(-n // block) * block) / n
    return padding * keys_counted / keys_formula


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=2048)
    args = parser.parse_args()
    n = args.positions
    lines = [*header(),
             f"{'preset / layers':<22} {'part':<14} {'formula GF':>11} {'counted GF':>11} {'ratio':>7} {'expected':>9}"]
    base = model_trainer.load_config(str(ROOT / "config.yaml"), [], "tiny").model
    matmul_ratios, attention_ratios = [], []
    for pattern in ("G", "L", base.layer_pattern):
        m = dataclasses.replace(base, layer_pattern=pattern)
        torch.manual_seed(0)
        model = CustomTransformer(m)
        batch = synthetic_document(n, m.frames_per_position)   # one document: global layers see all n
        masks = sample_masks(batch, m, torch.Generator().manual_seed(0))
        got, want = counted(model, batch, masks), formula(model, n)
        expected = {"block matmul": 1.0, "attention": expected_attention_overhead(m, n)}
        matmul_ratios.append(got["block matmul"] / want["block matmul"])
        attention_ratios.append(got["attention"] / want["attention"] / expected["attention"])
        for part in ("block matmul", "attention"):
            lines.append(f"{'tiny / ' + pattern:<22} {part:<14} {want[part] / 1e9:>11.3f} {got[part] / 1e9:>11.3f} "
                         f"{got[part] / want[part]:>7.3f} {expected[part]:>9.3f}")
        lines.append(f"{'tiny / ' + pattern:<22} {'other matmul':<14} {'-':>11} {got['other matmul'] / 1e9:>11.3f} "
                     f"{'-':>7} {'-':>9}   (embeddings, heads: not in the formula)")
        print("\n".join(lines[-3:]) if len(lines) > 7 else "\n".join(lines), flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = model_trainer.peak_flops(torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32)
    lines.append(f"MFU peak for this device: {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (no listed peak: no MFU is reported)'}")
    headline = (f"FLOPs counted / formula, block matmuls: {min(matmul_ratios):.3f}..{max(matmul_ratios):.3f}; "
                f"attention counted / expected: {min(attention_ratios):.3f}..{max(attention_ratios):.3f} (1.000 = exact)")
    lines.append(headline)
    print("\n".join(lines[-2:]))
    save("flops", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
