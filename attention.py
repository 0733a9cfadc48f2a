"""Attention: Multi-head Latent Attention (DeepSeek-V2/V3) over global or sliding-window masks.

Masks come from per-position document ids (B, L): a query sees a key only when both belong to
the same document (padding has its own id), and for sliding-window layers only within the
window: |i - j| <= w (bidirectional) or 0 <= i - j < w (causal).

Sliding-window attention is blocked: each block of queries attends to its own keys plus the
window on either side through one `scaled_dot_product_attention` call, so time and memory are
O(n * w) on every backend (CPU, Pascal, Turing, Hopper).
"""
from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

PAD_DOC = -1         # padding positions of a row
_OUT_OF_RANGE = -2   # positions added only to fill the last block; never equal to a real doc id


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (DeepSeek's interleaved pair layout: (x0, x1), (x2, x3), ...)

def rope_tables(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, L) -> cos, sin of shape (B, L, dim // 2), in float32."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the last dim of x (B, L, H, dim) by the position's angles."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, :, None], sin[:, :, None]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


# ---------------------------------------------------------------------------------------------
# Masked attention kernels on (B, H, L, D) tensors

def _sdpa(q, k, v, scale: float, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """SDPA with V zero-padded to the QK head dim: the flash kernels (CPU, sm_80+) need equal dims,
    and with them memory stays O(n) instead of the math path's O(n^2)."""
    v_dim = v.shape[-1]
    if v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return out[..., :v_dim]


def _band(query_offset: torch.Tensor, key_offset: torch.Tensor, window: int | None, causal: bool) -> torch.Tensor:
    distance = query_offset[:, None] - key_offset[None, :]
    if window is None:
        return distance >= 0 if causal else torch.ones_like(distance, dtype=torch.bool)
    return ((distance >= 0) & (distance < window)) if causal else distance.abs() <= window


def dense_attention(q, k, v, doc: torch.Tensor, scale: float, window: int | None = None,
                    causal: bool = False) -> torch.Tensor:
    """Attention with an explicit (B, 1, L, L) mask: O(n^2) memory. The reference the fast
    kernels are checked and benchmarked against."""
    positions = torch.arange(q.shape[2], device=q.device)
    mask = _band(positions, positions, window, causal) & (doc[:, :, None] == doc[:, None, :])
    return _sdpa(q, k, v, scale, mask[:, None])


def document_attention(q, k, v, doc: torch.Tensor, scale: float, causal: bool = False) -> torch.Tensor:
    """Global attention within each document: one unmasked SDPA call per document run, so the
    fused kernels keep memory O(n) even for a 256k-position document. Padding outputs zeros."""
    rows = []
    for row in range(q.shape[0]):
        ids, counts = torch.unique_consecutive(doc[row], return_counts=True)
        pieces, start = [], 0
        for doc_id, count in zip(ids.tolist(), counts.tolist()):
            span = slice(start, start + count)
            if doc_id == PAD_DOC:
                pieces.append(v.new_zeros(1, v.shape[1], count, v.shape[3]))
            else:
                pieces.append(_sdpa(q[row:row + 1, :, span], k[row:row + 1, :, span],
                                    v[row:row + 1, :, span], scale, causal=causal))
            start += count
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0)


def local_attention(q, k, v, doc: torch.Tensor, scale: float, window: int, causal: bool = False,
                    block: int | None = None) -> torch.Tensor:
    """Sliding-window attention in query blocks of `block` (default: the window) positions.

    Each query block attends to a key span of block + left + right positions, where left and
    right are the window's reach; memory and time grow with n * (block + 2 * window).
    """
    batch, heads, length, _ = q.shape
    block = block or max(16, window)
    left, right = (window - 1, 0) if causal else (window, window)
    n_blocks = math.ceil(length / block)
    tail = n_blocks * block - length
    span = block + left + right

    def keys(t):  # (B, H, L, D) -> (B * n_blocks, H, span, D)
        padded = F.pad(t, (0, 0, left, tail + right))
        return padded.unfold(2, span, block).permute(0, 2, 1, 4, 3).flatten(0, 1)

    def queries(t):  # (B, H, L, D) -> (B * n_blocks, H, block, D)
        return F.pad(t, (0, 0, 0, tail)).unflatten(2, (n_blocks, block)).transpose(1, 2).flatten(0, 1)

    query_doc = F.pad(doc, (0, tail), value=_OUT_OF_RANGE).view(batch, n_blocks, block)
    key_doc = F.pad(doc, (left, tail + right), value=_OUT_OF_RANGE).unfold(1, span, block)
    band = _band(torch.arange(block, device=q.device) + left, torch.arange(span, device=q.device),
                 window, causal)
    mask = band & (query_doc[..., :, None] == key_doc[..., None, :])      # (B, n_blocks, block, span)
    out = _sdpa(queries(q), keys(k), keys(v), scale, mask.flatten(0, 1)[:, None])
    out = out.unflatten(0, (batch, n_blocks)).transpose(1, 2).flatten(2, 3)
    return out[:, :, :length]


# ---------------------------------------------------------------------------------------------
# Multi-head Latent Attention

def attend(q, k, v, doc: torch.Tensor, scale: float, window: int | None, causal: bool) -> torch.Tensor:
    """The kernel for a layer: blocked sliding window for local layers, per-document for global."""
    if window is None:
        return document_attention(q, k, v, doc, scale, causal)
    return local_attention(q, k, v, doc, scale, window, causal)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V3's MLA: low-rank query (optional), compressed KV latent, and a decoupled rotary
    key shared by all heads. Names follow DeepSeek's so their weights map one to one."""

    def __init__(self, d_model: int, n_heads: int, q_lora_rank: int, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, norm_eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank:
            self.wq_a = nn.Linear(d_model, q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(q_lora_rank, eps=norm_eps)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(d_model, n_heads * qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(d_model, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = nn.RMSNorm(kv_lora_rank, eps=norm_eps)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_head_dim, d_model, bias=False)
        self.softmax_scale = qk_head_dim ** -0.5

    def _query(self, x, cos, sin):
        batch, length, _ = x.shape
        query = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q_nope, q_pe = query.view(batch, length, self.n_heads, -1).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def _latent(self, x, cos, sin):
        """-> normalised KV latent (B, L, r) and the rotary key shared by all heads (B, L, rope)."""
        latent, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_norm(latent), apply_rope(k_pe[:, :, None], cos, sin)[:, :, 0]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc: torch.Tensor,
                window: int | None, causal: bool) -> torch.Tensor:
        """The latent expanded into per-head keys and values. (DeepSeek's absorbed form, which
        attends in latent space, pays off only for token-by-token decoding with a cache; over
        whole sequences it measured 1.5-2.5x slower with 2.4-3x larger attention tensors.)"""
        batch, length, _ = x.shape
        q_nope, q_pe = self._query(x, cos, sin)
        latent, k_pe = self._latent(x, cos, sin)
        kv = self.wkv_b(latent).view(batch, length, self.n_heads, -1)
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        out = attend(q, k, value.transpose(1, 2), doc, self.softmax_scale, window, causal)
        return self.wo(out.transpose(1, 2).flatten(2))
