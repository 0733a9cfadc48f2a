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

import config  # noqa: E402
import parallel  # noqa: E402
from custom_transformer import CustomTransformer, sample_masks  # noqa: E402
from long_context import synthetic_document  # noqa: E402



def is_attention(op) -> bool:
    """SDPA, and the batched products of sparse layers (block ranking, pooling): attention's part."""
    return "_scaled_dot_product" in str(op) or "bmm" in str(op)


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


def expected_ratios(m, n: int) -> dict[str, float]:
    """counted / formula for each part. Attention: V padding and the scores the flash backward
    recomputes (14 * qk per key against the formula's 6 * (qk + v)), local blocks' masked keys,
    and on sparse layers the gathered blocks' full size, their forward run again in backward and
    the pooling of the latent. Block
    matmuls: a sparse layer also expands its pooled latents (wkv_b on n / block rows)."""
    qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
    per_key_formula, per_key_counted = 6 * m.n_heads * (qk + v), 14 * m.n_heads * qk
    block = max(16, m.window)
    window_formula = min(n, 2 * m.window + 1)
    window_counted = (block + 2 * m.window) * (-(-n // block) * block) / n
    n_blocks = -(-n // m.sparse_block)
    formula = counted = extra_matmul = 0.0
    for layer in range(m.n_layers):
        kind = m.layer_kind(layer)
        if kind == "G":
            formula += per_key_formula * n
            counted += per_key_counted * n
        elif kind == "L":
            formula += per_key_formula * window_formula
            counted += per_key_counted * window_counted
        else:
            whole = n_blocks <= m.sparse_topk
            ranking = 0 if whole else 2 * m.n_heads * qk * n_blocks
            selected = n if whole else m.sparse_topk * m.sparse_block * n_blocks * m.sparse_block / n
            formula += per_key_formula * (window_formula + n_blocks + min(n, m.sparse_topk * m.sparse_block)) \
                + 2 * m.n_heads * qk * n_blocks
            pooling = 6 * (m.kv_lora_rank + m.qk_rope_head_dim) * n_blocks * m.sparse_block / n
            # backward runs the selected branch's forward again (its gathered keys are not kept):
            # 4 x qk per query and key, QK and PV with V padded to qk
            recompute = 0 if whole else 4 * m.n_heads * qk * selected
            counted += per_key_counted * (window_counted + n_blocks + selected) + ranking + pooling + recompute
            extra_matmul += 6 * m.kv_lora_rank * m.n_heads * (m.qk_nope_head_dim + v) * n_blocks / n
    return {"attention": counted / formula, "block matmul extra": extra_matmul}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=2048)
    args = parser.parse_args()
    n = args.positions
    lines = [*header(),
             f"{'preset / layers':<22} {'part':<14} {'formula GF':>11} {'counted GF':>11} {'ratio':>7} {'expected':>9}"]
    base = config.load_config(str(ROOT / "config.yaml"), [], "tiny").model
    matmul_ratios, attention_ratios = [], []
    for pattern in ("G", "L", "S", base.layer_pattern):
        m = dataclasses.replace(base, layer_pattern=pattern)
        torch.manual_seed(0)
        model = CustomTransformer(m)
        batch = synthetic_document(n, m.frames_per_position)   # one document: global layers see all n
        masks = sample_masks(batch, m, torch.Generator().manual_seed(0))
        got, want = counted(model, batch, masks), formula(model, n)
        ratios = expected_ratios(m, n)
        expected = {"block matmul": 1.0 + ratios["block matmul extra"] * n / want["block matmul"],
                    "attention": ratios["attention"]}
        matmul_ratios.append(got["block matmul"] / want["block matmul"] / expected["block matmul"])
        attention_ratios.append(got["attention"] / want["attention"] / expected["attention"])
        for part in ("block matmul", "attention"):
            lines.append(f"{'tiny / ' + pattern:<22} {part:<14} {want[part] / 1e9:>11.3f} {got[part] / 1e9:>11.3f} "
                         f"{got[part] / want[part]:>7.3f} {expected[part]:>9.3f}")
        lines.append(f"{'tiny / ' + pattern:<22} {'other matmul':<14} {'-':>11} {got['other matmul'] / 1e9:>11.3f} "
                     f"{'-':>7} {'-':>9}   (embeddings, heads: not in the formula)")
        print("\n".join(lines[-3:]) if len(lines) > 7 else "\n".join(lines), flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak = parallel.peak_flops(torch.device(device), torch.bfloat16 if device == "cuda" else torch.float32)
    lines.append(f"MFU peak for this device: {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown (no listed peak: no MFU is reported)'}")
    headline = (f"FLOPs counted / expected, block matmuls: {min(matmul_ratios):.3f}..{max(matmul_ratios):.3f}; "
                f"attention counted / expected: {min(attention_ratios):.3f}..{max(attention_ratios):.3f} (1.000 = exact)")
    lines.append(headline)
    print("\n".join(lines[-2:]))
    save("flops", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
