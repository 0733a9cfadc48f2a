"""Attention: Multi-head Latent Attention (DeepSeek-V2/V3) over global or sliding-window masks.

Masks come from per-position document ids (B, L): a query sees a key only when both belong to
the same document (padding has its own id), and for sliding-window layers only within the
window: |i - j| <= w (bidirectional) or 0 <= i - j < w (causal).

Sliding-window attention is blocked: each block of queries attends to its own keys plus the
window on either side through one `scaled_dot_product_attention` call, so time and memory are
O(n * w) on every backend (CPU, Pascal, Turing, Hopper).

Sparse global attention (after DeepSeek's Native Sparse Attention) gives every position reach
over its whole document at O(n * (w + n/b + k*b)): three branches mixed by learned gates, a
compressed one (every query attends to one pooled key per block of b positions of its document),
a selected one (each block of b queries attends at full resolution to the k key blocks its
queries weighted most in the compressed branch; causal: its first query, which sees no later
position) and the sliding window.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from context_parallel import OUT_OF_RANGE, SequenceSlices

PAD_DOC = -1         # padding positions of a row


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (DeepSeek's interleaved pair layout: (x0, x1), (x2, x3), ...)

def rope_tables(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B, L) -> cos, sin of shape (B, L, dim // 2), in float32."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of the last dim of x (B, L, H, dim) by the position's angles."""
    pairs = (x.float() if x.element_size() < 4 else x).unflatten(-1, (-1, 2))   # half precision: rotate in fp32
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


def document_runs(doc: torch.Tensor):
    """(row, start, length, doc id) of every run of one document in each row of doc (B, L)."""
    for row in range(doc.shape[0]):
        ids, counts = torch.unique_consecutive(doc[row], return_counts=True)
        start = 0
        for doc_id, count in zip(ids.tolist(), counts.tolist()):
            yield row, start, count, doc_id
            start += count


def document_attention(q, k, v, doc: torch.Tensor, scale: float, causal: bool = False, offset: int = 0
                       ) -> torch.Tensor:
    """Global attention within each document: one unmasked SDPA call per document run, so the
    fused kernels keep memory O(n) even for a 256k-position document. Padding outputs zeros.
    The queries may cover a part of the rows, positions [offset, offset + their length) (a
    slice under context parallelism); keys, values and doc cover the whole rows."""
    out = v.new_zeros(q.shape[:3] + (v.shape[3],))
    end = offset + q.shape[2]
    for row, start, count, doc_id in document_runs(doc):
        first, last = max(start, offset), min(start + count, end)
        if doc_id == PAD_DOC or first >= last:
            continue
        keys = slice(start, start + count)
        # causal with queries that start inside the run: SDPA's is_causal aligns the first query
        # with the first key, so the offset goes into an explicit mask
        mask = (torch.arange(first, last, device=q.device)[:, None] >= torch.arange(start, start + count, device=q.device)
                if causal and first > start else None)
        out[row, :, first - offset:last - offset] = _sdpa(
            q[row:row + 1, :, first - offset:last - offset], k[row:row + 1, :, keys], v[row:row + 1, :, keys],
            scale, mask, causal=causal and mask is None)[0]
    return out


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

    query_doc = F.pad(doc, (0, tail), value=OUT_OF_RANGE).view(batch, n_blocks, block)
    key_doc = F.pad(doc, (left, tail + right), value=OUT_OF_RANGE).unfold(1, span, block)
    band = _band(torch.arange(block, device=q.device) + left, torch.arange(span, device=q.device),
                 window, causal)
    mask = band & (query_doc[..., :, None] == key_doc[..., None, :])      # (B, n_blocks, block, span)
    out = _sdpa(queries(q), keys(k), keys(v), scale, mask.flatten(0, 1)[:, None])
    out = out.unflatten(0, (batch, n_blocks)).transpose(1, 2).flatten(2, 3)
    return out[:, :, :length]


# ---------------------------------------------------------------------------------------------
# Sparse global attention: the kernels work on one document's (H, n, D) tensors

@dataclass(frozen=True)
class SparsePattern:
    block: int    # positions per compressed (and selectable) block
    topk: int     # key blocks each query block attends to at full resolution


# Elements a chunk of work may hold (~256 MiB in fp32): long documents are processed in chunks.
_CHUNK_ELEMENTS = 1 << 24


def chunked_from(heads: int, block: int, topk: int, head_dim: int) -> int:
    """The document length from which each of a sparse layer's chunked computations works in
    whole chunks, so that its memory grows as a straight line in the length: the block ranking
    (queries x heads x n / block scores) and the selected branch (query blocks x heads x k x b
    x head dim gathered keys). (The causal compressed branch's chunks, n / block keys a query,
    fill from sqrt(elements x block).)"""
    ranking = math.isqrt(_CHUNK_ELEMENTS * block // heads) + 1
    selected = (_CHUNK_ELEMENTS // (heads * topk * block * head_dim) + 1) * block
    return max(ranking, selected)


def pool_blocks(x: torch.Tensor, block: int, logits: torch.Tensor) -> torch.Tensor:
    """(n, C) -> (ceil(n / block), C): each block's positions averaged with learned weights
    (softmax of `logits` over the block's positions; the last block's over those it has)."""
    n = x.shape[0]
    n_blocks = -(-n // block)
    padded = F.pad(x, (0, 0, 0, n_blocks * block - n)).view(n_blocks, block, -1)
    present = (torch.arange(n_blocks * block, device=x.device) < n).view(n_blocks, block)
    weights = logits.expand(n_blocks, block).masked_fill(~present, -math.inf).softmax(-1)
    return torch.einsum("bp,bpc->bc", weights.to(x.dtype), padded)


def _visible_blocks(query_positions: torch.Tensor, n_blocks: int, block: int, causal: bool) -> torch.Tensor | None:
    """Causal: a query sees a compressed block once the block has ended, all b of its positions
    at or before the query. A document's last, partial block is never seen: were it, the query
    at the document's last position would learn that nothing follows. Bidirectional: every
    block (None)."""
    if not causal:
        return None
    ends = (torch.arange(n_blocks, device=query_positions.device) + 1) * block - 1
    return ends[None, :] <= query_positions[:, None]


def block_importance(q: torch.Tensor, compressed_k: torch.Tensor, scale: float, block: int,
                     causal: bool, first: int = 0) -> torch.Tensor:
    """(n_query_blocks, n_blocks): the attention weight each block of b queries gives each key
    block in the compressed branch, summed over the heads. Bidirectional: summed over the
    block's queries. Causal: the block's first query alone, as a sum over later queries would
    let them choose what earlier ones read. No gradient: it only ranks the blocks. The queries
    are the document's positions [first, first + n), `first` a multiple of b."""
    heads, n, _ = q.shape
    n_blocks = compressed_k.shape[1]
    keys = compressed_k.float().transpose(1, 2)
    rows = max(1, _CHUNK_ELEMENTS // max(1, heads * n_blocks))   # queries a chunk scores
    parts = []
    with torch.no_grad():
        if causal:
            firsts = torch.arange(0, n, block, device=q.device)
            for chunk in firsts.split(rows):
                scores = torch.matmul(q[:, chunk].float(), keys) * scale
                visible = _visible_blocks(first + chunk, n_blocks, block, True)
                # a query that sees no block yet gives no weight
                parts.append(scores.masked_fill_(~visible, -math.inf).softmax(-1).nan_to_num_(0.0).sum(0))
            return torch.cat(parts)
        rows = max(block, rows // block * block)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            weights = (torch.matmul(q[:, start:stop].float(), keys) * scale).softmax(-1)
            weights = F.pad(weights, (0, 0, 0, -(stop - start) % block))   # whole query blocks
            parts.append(weights.view(heads, -1, block, n_blocks).sum((0, 2)))
        return torch.cat(parts)


def choose_blocks(importance: torch.Tensor, topk: int, causal: bool, first_block: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (n_query_blocks, k) key-block indices and whether each pick is allowed: the k blocks a
    query block weighted most. Causal: only blocks before the query block (its own block and
    the recent past are the window's); the query blocks are the document's from `first_block`."""
    n_query_blocks, n_blocks = importance.shape
    k = min(topk, n_blocks)
    if causal:
        earlier = torch.arange(n_blocks, device=importance.device)[None, :] < torch.arange(
            first_block, first_block + n_query_blocks, device=importance.device)[:, None]
        importance = importance.masked_fill(~earlier, -math.inf)
    chosen = importance.topk(k, dim=-1).indices.sort(-1).values
    allowed = importance.gather(-1, chosen) > -math.inf
    return chosen, allowed


def compressed_attention(q, compressed_k, compressed_v, scale: float, block: int, causal: bool, first: int = 0
                         ) -> torch.Tensor:
    """(H, n, D) queries, the document's positions [first, first + n), over its (H, n_blocks, D)
    pooled keys and values. Causal: queries before the end of the first whole block see none
    and output zeros."""
    heads, n, _ = q.shape
    if not causal:
        return _sdpa(q[None], compressed_k[None], compressed_v[None], scale)[0]
    out = q.new_zeros(heads, n, compressed_v.shape[-1])
    n_blocks = compressed_k.shape[1]
    rows = max(block, _CHUNK_ELEMENTS // max(1, n_blocks) // block * block)
    for start in range(max(0, block - 1 - first), n, rows):   # the queries before that see no block yet
        stop = min(n, start + rows)
        visible = _visible_blocks(torch.arange(first + start, first + stop, device=q.device), n_blocks, block, True)
        out[:, start:stop] = _sdpa(q[None, :, start:stop], compressed_k[None], compressed_v[None], scale,
                                   visible[None, None])[0]
    return out


def selected_attention(q, k, v, chosen: torch.Tensor, allowed: torch.Tensor, block: int, scale: float
                       ) -> torch.Tensor:
    """Each block of b queries attends at full resolution to its chosen key blocks of the
    document's keys and values (one SDPA call per chunk of query blocks, the chosen keys
    gathered); picks not allowed and the positions past the document's end are masked; a query
    block with nothing allowed outputs zeros. The queries (H, m, D) may be some of the
    document's blocks, `chosen` one row each."""
    heads, m, qk_dim = q.shape
    n = k.shape[1]
    n_query_blocks, n_blocks, picks = -(-m // block), -(-n // block), chosen.shape[1]

    def blocks(t, count):   # (H, length, D) -> (count, H, block, D)
        return F.pad(t, (0, 0, 0, count * block - t.shape[1])).view(heads, count, block, -1).transpose(0, 1)

    q_blocks, k_blocks, v_blocks = blocks(q, n_query_blocks), blocks(k, n_blocks), blocks(v, n_blocks)
    present = (torch.arange(n_blocks * block, device=q.device) < n).view(n_blocks, block)
    out = q.new_zeros(n_query_blocks, heads, block, v.shape[-1])
    some = allowed.any(-1)
    full = n % block == 0 and bool(allowed.all())   # no key to mask: the unmasked kernel
    chunk = max(1, _CHUNK_ELEMENTS // (heads * picks * block * max(qk_dim, v.shape[-1])))
    for start in range(0, n_query_blocks, chunk):
        rows = torch.arange(start, min(n_query_blocks, start + chunk), device=q.device)
        rows = rows[some[rows]]
        if len(rows) == 0:
            continue
        picked = chosen[rows]                                                    # (r, k)
        mask = None if full else (present[picked] & allowed[rows][..., None]).flatten(1)[:, None, None]
        args = (q_blocks[rows], k_blocks, v_blocks, picked, mask, scale)
        # the gathered keys and values (k times the document's) are gathered again in backward, not kept
        out[rows] = checkpoint(_attend_picked, *args, use_reentrant=False) if torch.is_grad_enabled() else \
            _attend_picked(*args)
    return out.transpose(0, 1).flatten(1, 2)[:, :m]


def _attend_picked(q_blocks, k_blocks, v_blocks, picked, mask, scale: float) -> torch.Tensor:
    """Query blocks (r, H, b, D) over their picked key blocks (r, k) of k_blocks (n_blocks, H, b, D)."""
    keys = k_blocks[picked].permute(0, 2, 1, 3, 4).flatten(2, 3)              # (r, H, k * b, D)
    values = v_blocks[picked].permute(0, 2, 1, 3, 4).flatten(2, 3)
    return _sdpa(q_blocks, keys, values, scale, mask)


def _positions(t: torch.Tensor, span: slice, dim: int, fill=0) -> torch.Tensor:
    """Positions span.start..span.stop of t along `dim`, those outside t filled with `fill`."""
    before, after = max(0, -span.start), max(0, span.stop - t.shape[dim])
    inside = t.narrow(dim, span.start + before, span.stop - span.start - before - after)
    pad = [0, 0] * (t.dim() - 1 - dim) + [before, after]
    return F.pad(inside, pad, value=fill)


# ---------------------------------------------------------------------------------------------
# Multi-head Latent Attention

def attend(q, k, v, doc: torch.Tensor, scale: float, window: int | None, causal: bool) -> torch.Tensor:
    """The kernel for a layer: blocked sliding window for local layers, per-document for global."""
    if window is None:
        return document_attention(q, k, v, doc, scale, causal)
    return local_attention(q, k, v, doc, scale, window, causal)


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V3's MLA: low-rank query (optional), compressed KV latent, and a decoupled rotary
    key shared by all heads. Names follow DeepSeek's so their weights map one to one. With a
    `sparse` pattern it is a sparse global layer: the latent, pooled per block, gives the
    compressed branch its keys and values."""

    def __init__(self, d_model: int, n_heads: int, q_lora_rank: int, kv_lora_rank: int,
                 qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int, norm_eps: float,
                 sparse: SparsePattern | None = None):
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
        self.sparse = sparse
        if sparse:
            self.pool_logits = nn.Parameter(torch.zeros(sparse.block))   # how a block's positions are pooled
            self.gates = nn.Linear(d_model, 3 * n_heads)                  # per head: compressed, selected, window

    def _query(self, x, cos, sin):
        batch, length, _ = x.shape
        query = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q_nope, q_pe = query.view(batch, length, self.n_heads, -1).split(
            [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def _latent(self, x):
        """-> normalised KV latent (B, L, r) and the rotary key shared by all heads (B, L, rope),
        not yet rotated."""
        latent, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_norm(latent), k_pe

    def _heads(self, latent, k_pe):
        """Latent (..., r) and rotated rotary key (..., rope) -> per-head keys and values (..., H, D)."""
        k_nope, value = self.wkv_b(latent).unflatten(-1, (self.n_heads, -1)).split(
            [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = k_pe.unsqueeze(-2).expand(*k_nope.shape[:-1], -1)
        return torch.cat([k_nope, k_pe], dim=-1), value

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc: torch.Tensor,
                window: int | None, causal: bool, slices: SequenceSlices | None = None) -> torch.Tensor:
        """The latent expanded into per-head keys and values. (DeepSeek's absorbed form, which
        attends in latent space, pays off only for token-by-token decoding with a cache; over
        whole sequences it measured 1.5-2.5x slower with 2.4-3x larger attention tensors.)
        With `slices` (context parallelism) x is this process's slice of the rows."""
        q_nope, q_pe = self._query(x, cos, sin)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        latent, k_pe = self._latent(x)
        if slices is not None:
            out = self._sliced(x, q, latent, k_pe, cos, sin, doc, window, causal, slices)
        else:
            k, value = self._heads(latent, apply_rope(k_pe[:, :, None], cos, sin)[:, :, 0])
            k, value = k.transpose(1, 2), value.transpose(1, 2)
            out = attend(q, k, value, doc, self.softmax_scale, window, causal)   # the sparse layer's window branch
            if self.sparse:
                out = self._sparse_attention(x, q, 0, 0, latent, k_pe, cos, sin, k, value, doc, causal, out)
        return self.wo(out.transpose(1, 2).flatten(2))

    def _sliced(self, x, q, latent, k_pe, cos, sin, doc, window, causal, slices: SequenceSlices):
        """Attention over a slice of the rows, (B, H, L, D) before the output projection. What
        keys and values are made from (the latent and the rotary key) comes from the other
        slices: a window's reach either side for a window layer (the queries padded over that
        halo, whose outputs are dropped), every slice for a global or sparse layer (a sparse
        layer pools whole documents into blocks and may pick any block of them)."""
        length, start = q.shape[2], slices.start
        if window is not None and not self.sparse:
            keys_from, doc = slices.with_halo(torch.cat([latent, apply_rope(k_pe[:, :, None], cos, sin)[:, :, 0]], -1),
                                              doc, window)
            k, value = self._heads(*keys_from.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1))
            out = local_attention(F.pad(q, (0, 0, window, window)), k.transpose(1, 2), value.transpose(1, 2), doc,
                                  self.softmax_scale, window, causal)
            return out[:, :, window:window + length]
        whole_latent, whole_pe = slices.whole(torch.cat([latent, k_pe], -1)).split(
            [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        whole_cos, whole_sin, whole_doc = (slices.whole_ids(t) for t in (cos, sin, doc))
        k, value = self._heads(whole_latent, apply_rope(whole_pe[:, :, None], whole_cos, whole_sin)[:, :, 0])
        k, value = k.transpose(1, 2), value.transpose(1, 2)
        if window is None:
            return document_attention(q, k, value, whole_doc, self.softmax_scale, causal, start)
        around = slice(start - window, start + length + window)   # the window branch's keys
        out = local_attention(F.pad(q, (0, 0, window, window)), _positions(k, around, 2), _positions(value, around, 2),
                              _positions(whole_doc, around, 1, OUT_OF_RANGE), self.softmax_scale, window, causal)
        local = out[:, :, window:window + length]
        # the query blocks that straddle the slice's ends rank key blocks with all their queries:
        # a block's halo of queries from the neighbours (not differentiated: only their ranking is used)
        block = self.sparse.block
        halo, _ = slices.with_halo(q.detach().transpose(1, 2).flatten(2), doc, block)
        halo = halo.unflatten(2, (q.shape[1], -1)).transpose(1, 2)
        queries = torch.cat([halo[:, :, :block], q, halo[:, :, -block:]], 2)
        return self._sparse_attention(x, queries, start - block, start, whole_latent, whole_pe, whole_cos, whole_sin,
                                      k, value, whole_doc, causal, local)

    def _sparse_attention(self, x, queries, queries_from, start, latent, k_pe, cos, sin, k, v, doc, causal, local):
        """The compressed and selected branches, and with them `local` (the window's output),
        mixed per head by gates read from the input. The outputs are for positions [start,
        start + L) of the rows (L = x's length); `queries` (B, H, M, D) are for positions
        [queries_from, queries_from + M), reaching past the output's ends to whole blocks of
        each document; latent, rotary key, cos, sin, k, v and doc cover the whole rows."""
        pattern, scale, length = self.sparse, self.softmax_scale, x.shape[1]
        compressed, selected = local.new_zeros(local.shape), local.new_zeros(local.shape)
        for row, run_start, count, doc_id in document_runs(doc):
            first, last = max(run_start, start), min(run_start + count, start + length)
            if doc_id == PAD_DOC or first >= last:
                continue
            # the document's whole query blocks that hold this output's positions
            block_from = (first - run_start) // pattern.block * pattern.block
            block_to = min(count, -(-(last - run_start) // pattern.block) * pattern.block)
            span = slice(run_start, run_start + count)
            compressed_k, compressed_v = self.compress(latent[row, span], k_pe[row, span], cos[row, span],
                                                       sin[row, span])
            q = queries[row, :, run_start + block_from - queries_from:run_start + block_to - queries_from]
            keys, values = k[row, :, span], v[row, :, span]
            out_c = compressed_attention(q, compressed_k, compressed_v, scale, pattern.block, causal, block_from)
            if not causal and compressed_k.shape[1] <= pattern.topk:   # every block is chosen: the whole document
                out_s = _sdpa(q[None], keys[None], values[None], scale)[0]
            else:
                importance = block_importance(q, compressed_k, scale, pattern.block, causal, block_from)
                chosen, allowed = choose_blocks(importance, pattern.topk, causal, block_from // pattern.block)
                out_s = selected_attention(q, keys, values, chosen, allowed, pattern.block, scale)
            kept, out = slice(first - run_start - block_from, last - run_start - block_from), slice(first - start, last - start)
            compressed[row, :, out], selected[row, :, out] = out_c[:, kept], out_s[:, kept]
        gates = torch.sigmoid(self.gates(x)).view(*x.shape[:2], self.n_heads, 3).permute(3, 0, 2, 1)[..., None]
        return gates[0] * compressed + gates[1] * selected + gates[2] * local

    def compress(self, latent, k_pe, cos, sin):
        """One document's latent (n, r) and unrotated rotary key (n, rope) -> its compressed keys
        and values (H, n_blocks, D), each block's rotary key turned to the block's middle."""
        block, n = self.sparse.block, latent.shape[0]
        middles = ((torch.arange(-(-n // block), device=latent.device) * block) + block // 2).clamp(max=n - 1)
        pooled_pe = pool_blocks(k_pe, block, self.pool_logits)
        rotated_pe = apply_rope(pooled_pe[None, :, None], cos[None, middles], sin[None, middles])[0, :, 0]
        keys, values = self._heads(pool_blocks(latent, block, self.pool_logits), rotated_pe)
        return keys.transpose(0, 1), values.transpose(0, 1)
