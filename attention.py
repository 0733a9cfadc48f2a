"""Attention: Multi-head Latent Attention (DeepSeek-V2/V3) over global or sliding-window masks.

Masks come from per-position document ids (B, L): a query sees a key only when both belong to
the same document (padding has its own id), and for sliding-window layers only within the
window: |i - j| <= w (bidirectional) or 0 <= i - j < w (causal).

Sliding-window attention is blocked: each block of queries attends to its own keys plus the
window on either side through one `scaled_dot_product_attention` call, so time and memory are
O(n * w) on every backend (CPU, Pascal, Turing, Hopper).

Sparse global attention (after DeepSeek's Native Sparse Attention) gives every position reach
over its whole document at O(n * (w + min(n/b, C) + k*b)): three branches mixed by learned
gates, a compressed one (every query attends to one pooled key per block of b positions of its
document; a document of more than C blocks is pooled in units of 2, 4, 8... blocks, so that a
query reads at most C), a selected one (each block of b queries attends at full resolution to
the k key blocks its queries weighted most in the compressed branch, ranked within the top
units where units hold several blocks; causal: its first query, which sees no later position)
and the sliding window. All documents of the rows go through each branch together:
a table of blocks built with tensor ops (two host transfers a forward, whatever the number of
documents), its blocks cut into tiles of bounded size (one long document's, or short ones').
A bidirectional document of at most k blocks, which the selected branch would read whole, is
attended densely instead, as a global layer would. The ranking weighs the compressed branch's
scores by that branch's log-sum-exp where the kernel returns it (no second softmax). The
selected branch runs as tiles of SDPA calls, or on an sm_80+ GPU as one compiled FlexAttention
call with a block mask of the picks where that measured faster at run time.
"""
from __future__ import annotations

import functools
import itertools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils._triton import has_triton

from context_parallel import OUT_OF_RANGE, SequenceSlices
from parallel import clock

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
    out = F.scaled_dot_product_attention(q, k, _widened(v, q.shape[-1]), attn_mask=mask, is_causal=causal, scale=scale)
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
# Sparse global attention: every document of the rows in one pass per branch

@dataclass(frozen=True)
class SparsePattern:
    block: int    # positions per compressed (and selectable) block
    topk: int     # key blocks each query block attends to at full resolution
    chunk: int = 1 << 24   # elements a tile's ranking scores or gathered keys may hold (64 MiB in fp32)
    # the most pooled keys a query reads: a document of more blocks is pooled in units of 2, 4,
    # 8... blocks, the top-k units are ranked first and the top-k blocks picked within them
    compressed_keys: int = 256


def chunked_from(heads: int, block: int, topk: int, head_dim: int, chunk: int) -> int:
    """The document length from which a sparse layer's tiles are cut by size, so that its
    memory grows as a straight line in the length: the block ranking (queries x heads x n /
    block scores) and the selected branch (query blocks x heads x k x b x head dim gathered keys)."""
    ranking = math.isqrt(chunk * block // heads) + 1
    selected = (chunk // (heads * topk * block * head_dim) + 1) * block
    return max(ranking, selected)


@dataclass(frozen=True)
class BlockTable:
    """The rows' documents cut into blocks of b positions from each document's start, numbered in
    order over the flattened rows (B x L positions): a block never straddles two documents, a
    document's last block may be partial, padding has none. A document's blocks are grouped in
    units of 1, 2, 4... blocks, as few as keep its units within the compressed keys a query
    reads; units are numbered in order too. Built with tensor ops on the device; what tiles are
    cut by comes to the host in one transfer."""
    block: int
    places: torch.Tensor    # (G, b) flat position of each place of a block (clamped into range)
    present: torch.Tensor   # (G, b) whether the place holds one of the document's positions
    number: torch.Tensor    # (G,) the block's place in its document: 0, 1, ...
    first: torch.Tensor     # (G,) its document's first block (a document's id among the blocks)
    middle: torch.Tensor    # (G,) flat position its pooled rotary key is turned to
    unit_of: torch.Tensor   # (G,) the unit it belongs to
    unit_doc: torch.Tensor      # (U,) the unit's document's first block
    unit_number: torch.Tensor   # (U,) its place in its document
    unit_size: torch.Tensor     # (U,) blocks a unit of its document holds (its last may hold fewer)
    unit_block: torch.Tensor    # (U,) its first block
    unit_blocks: torch.Tensor   # (U,) the blocks it holds
    unit_middle: torch.Tensor   # (U,) flat position its pooled rotary key is turned to
    host_first: list        # first, blocks in its document, first flat position and its
    host_count: list        # document's length, of each block
    host_start: list
    host_length: list
    host_unit_size: list    # blocks a unit of its document holds, its document's first unit
    host_unit_first: list   # and number of units, of each block
    host_units: list

    @property
    def coarse(self) -> bool:
        """Whether some document is pooled in units of more than one block."""
        return any(size > 1 for size in self.host_unit_size)


def block_table(doc: torch.Tensor, block: int, compressed_keys: int = SparsePattern.compressed_keys) -> BlockTable:
    """doc (B, L) -> the rows' blocks. Two host synchronisations (the number of blocks; the tile
    table), however many documents."""
    flat, length = doc.reshape(-1), doc.shape[1]
    n = flat.numel()
    index = torch.arange(n, device=doc.device)
    new_run = torch.ones(n, dtype=torch.bool, device=doc.device)
    new_run[1:] = (flat[1:] != flat[:-1]) | (index[1:] % length == 0)
    run_start = torch.cummax(torch.where(new_run, index, 0), 0).values
    next_start = torch.cat([torch.where(new_run, index, n)[1:], index.new_full((1,), n)])
    run_end = next_start.flip(0).cummin(0).values.flip(0)
    offset = index - run_start
    starts = ((offset % block) == 0) & (flat != PAD_DOC)
    begins = starts.nonzero().squeeze(1)
    doc_start, doc_length = run_start[begins], run_end[begins] - run_start[begins]
    number = offset[begins] // block
    count = -(-doc_length // block)
    first = torch.arange(len(begins), device=doc.device) - number
    place = torch.arange(block, device=doc.device)
    host_first, host_count, host_start, host_length = torch.stack([first, count, begins, doc_length]).tolist()
    units = _units(host_first, host_count, host_start, host_length, block, compressed_keys)
    unit_of, unit_doc, unit_number, unit_size, unit_block, unit_blocks, unit_middle = (
        torch.tensor(values, dtype=torch.long, device=doc.device).reshape(-1) for values in units[:7])
    return BlockTable(block, (begins[:, None] + place).clamp(max=n - 1),
                      (number * block)[:, None] + place < doc_length[:, None], number, first,
                      doc_start + torch.minimum(number * block + block // 2, doc_length - 1),
                      unit_of, unit_doc, unit_number, unit_size, unit_block, unit_blocks, unit_middle,
                      host_first, host_count, host_start, host_length, *units[7:])


def blocks_per_unit(blocks: int, compressed_keys: int) -> int:
    """The blocks a unit of a document of `blocks` blocks holds: the fewest of 1, 2, 4... that
    keep its units within `compressed_keys`."""
    size = 1
    while -(-blocks // size) > compressed_keys:
        size *= 2
    return size


def _units(host_first, host_count, host_start, host_length, block: int, compressed_keys: int) -> tuple[list, ...]:
    """Each document's blocks grouped in units (`blocks_per_unit`) -> per block: its unit; per
    unit: its document's first block, its number, the blocks a unit holds, its first block, the
    blocks it holds, its middle; per block: unit size, its document's first unit and number of
    units."""
    unit_of, unit_doc, unit_number, unit_size, unit_block, unit_blocks, unit_middle = [], [], [], [], [], [], []
    host_size, host_unit_first, host_units = [], [], []
    for g, (first, count) in enumerate(zip(host_first, host_count)):
        if g == first:   # a document's first block: its units
            size = blocks_per_unit(count, compressed_keys)
            doc_first_unit, doc_units = len(unit_doc), -(-count // size)
            doc_start, doc_length = host_start[g], host_length[g]
            for u in range(doc_units):
                unit_doc.append(first)
                unit_number.append(u)
                unit_size.append(size)
                unit_block.append(first + u * size)
                unit_blocks.append(min(size, count - u * size))
                unit_middle.append(doc_start + min(u * size * block + size * block // 2, doc_length - 1))
        unit_of.append(doc_first_unit + (g - first) // size)
        host_size.append(size)
        host_unit_first.append(doc_first_unit)
        host_units.append(doc_units)
    return (unit_of, unit_doc, unit_number, unit_size, unit_block, unit_blocks, unit_middle,
            host_size, host_unit_first, host_units)


def pool_blocks(x: torch.Tensor, table: BlockTable, logits: torch.Tensor) -> torch.Tensor:
    """(N, C) over the flattened rows -> (G, C): each block's positions averaged with learned
    weights (softmax of `logits` over the block's positions; a partial block's over those it has)."""
    weights = logits.expand(table.places.shape).masked_fill(~table.present, -math.inf).softmax(-1)
    return torch.einsum("gp,gpc->gc", weights.to(x.dtype), _rows(x, table.places, 0))


def pool_units(pooled: torch.Tensor, table: BlockTable) -> torch.Tensor:
    """Pooled blocks (G, C) -> pooled units (U, C): the mean of the blocks each holds."""
    summed = pooled.new_zeros(len(table.unit_doc), pooled.shape[1]).index_add(0, table.unit_of, pooled)
    return summed / table.unit_blocks[:, None].to(pooled.dtype)


def sparse_tiles(table: BlockTable, wanted: list[int], heads: int, topk: int, head_dim: int, chunk: int) -> list[tuple]:
    """Consecutive query blocks (of `wanted`, in order) cut into tiles -> (first, stop, key
    units from, key units to, the most blocks a document of the tile has, the blocks a unit
    holds). A tile's keys are its documents' units, a contiguous run. A tile holds one
    document's blocks, or several short documents whose units (blocks) come to at most top-k
    together (each would attend to every key of the tile: the waste stays small while the calls
    are few); its scores (heads x its positions x its keys, and x top-k units' blocks where units
    hold several) and its gathered keys (its blocks x heads x picks x b x head dim) stay within a
    chunk, one query block at least."""
    b, tiles, i = table.block, [], 0
    while i < len(wanted):
        g0 = g1 = wanted[i]
        keys_from, size = table.host_unit_first[g0], table.host_unit_size[g0]
        most = 0
        while True:
            keys_to = table.host_unit_first[g1] + table.host_units[g1]
            deeper = max(most, table.host_count[g1])
            blocks = g1 + 1 - g0
            if g1 > g0 and ((table.host_first[g1] != table.host_first[g1 - 1]
                             and (keys_to - keys_from > topk or table.host_unit_size[g1] != size))
                            or heads * blocks * b * (keys_to - keys_from + (topk * size if size > 1 else 0)) > chunk
                            or blocks * heads * min(topk, deeper) * b * head_dim > chunk):
                break
            most, stop, tile_keys_to = deeper, g1 + 1, keys_to
            i += 1
            if i == len(wanted) or wanted[i] != g1 + 1:
                break
            g1 += 1
        tiles.append((g0, stop, keys_from, tile_keys_to, most, size))
    return tiles


def sparse_branches(q, k, v, compressed_k, compressed_v, table: BlockTable, tiles: list[tuple], scale: float,
                    topk: int, causal: bool, query_places: torch.Tensor | None = None,
                    block_keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The compressed and the selected branch for the query blocks of `tiles`. q, k, v (H, N, D)
    over the flattened rows; compressed keys and values (H, U, D), one per unit (a block, or
    2, 4... blocks of a long document); `block_keys` (H, G, D) one per block, needed where units
    hold several. Compressed: each query over its document's units (causal: the units that have
    ended at or before it; a query that sees none outputs zeros). Selected: each block of b
    queries over the k blocks of its document its queries weighted most in the compressed
    branch (bidirectional: summed over its queries; causal: its first query's weights, and only
    earlier units, as a sum over later queries would let them choose what earlier ones read), at
    full resolution; where units hold several blocks, the top-k units' blocks are ranked again,
    by the same weights over their own pooled keys. The queries may be a part of the rows, M
    positions, each block's places in them given by `query_places` (G, b) (default: the rows'
    own). -> both (H, M, Dv), zeros outside the tiles."""
    b, heads = table.block, q.shape[0]
    if not tiles:   # no document in the rows (or in this process's slice of them) to rank blocks of
        return (v.new_zeros(heads, q.shape[1], v.shape[-1]),) * 2
    query_places = table.places if query_places is None else query_places
    first, last = tiles[0][0], tiles[-1][1]
    place = torch.arange(b, device=q.device)
    tile_queries = _pieces(_rows(q, query_places[first:last], 1),
                           [(g0 - first, g1 - first) for g0, g1, *_ in tiles], 1)   # (H, T, b, D) each
    # values padded to the key width once, not per tile (each tile's copy would be kept for backward)
    padded_compressed_v = _widened(compressed_v, q.shape[-1])
    where, compressed_out, picked = [], [], []
    for (g0, g1, k0, k1, most, size), queries in zip(tiles, tile_queries):
        places, present = query_places[g0:g1], table.present[g0:g1]         # (T, b)
        where.append(torch.where(present, places, -1).flatten())
        flat_queries = queries.flatten(1, 2)                                # (H, T b, D)
        same = table.first[g0:g1, None] == table.unit_doc[None, k0:k1]       # (T, nk): the query block's document
        unit_end = (table.unit_number[k0:k1] + 1) * table.unit_size[k0:k1]   # (nk,) the block after each unit
        if causal:
            seen = unit_end * b - 1 <= (table.number[g0:g1, None] * b + place)[..., None]
            visible = same[:, None] & seen                                  # (T, b, nk)
        else:
            visible = same[:, None].expand(-1, b, -1)
        one_document = table.host_first[g0] == table.host_first[g1 - 1]
        sees = visible.any(-1)                                              # (T, b)
        mask = None if one_document and not causal else (visible | ~sees[..., None]).flatten(0, 1)
        out, log_sum_exp = _compressed_attention(flat_queries, compressed_k[:, k0:k1], padded_compressed_v[:, k0:k1],
                                                 mask, scale)
        compressed_out.append(out[..., :v.shape[-1]] * sees.flatten()[:, None])
        with torch.no_grad():   # which blocks each query block reads: a ranking, no gradient
            ranking_queries = queries[:, :, :1] if causal else queries      # (H, T, 1 or b, D)
            if log_sum_exp is not None:
                log_sum_exp = log_sum_exp.unflatten(1, (-1, b))[:, :, :ranking_queries.shape[2]]
            allowed = same & (unit_end[None] <= table.number[g0:g1, None]) if causal else same
            importance = _importance(ranking_queries, compressed_k[:, None, k0:k1], scale, visible[:, :1] if causal
                                     else None if one_document else visible, None if causal else present, allowed,
                                     log_sum_exp)
            chosen = importance.topk(min(topk, most, k1 - k0), dim=-1).indices.sort(-1).values
            chosen_allowed = importance.gather(-1, chosen) > -math.inf
            units, chosen = chosen + k0, table.unit_block[chosen + k0]       # (T, picks), each unit's first block
            if size > 1:   # the chosen units' blocks, ranked by their own pooled keys
                within = torch.arange(size, device=q.device)
                candidates = (chosen[..., None] + within).flatten(1).clamp(max=len(table.host_first) - 1)
                allowed = (chosen_allowed[..., None] & (within < table.unit_blocks[units][..., None])).flatten(1)
                if causal:
                    allowed &= table.number[candidates] < table.number[g0:g1, None]
                importance = _importance(ranking_queries, block_keys[:, candidates], scale, allowed[:, None],
                                         None if causal else present, allowed)
                pick = importance.topk(min(topk, candidates.shape[1]), dim=-1).indices.sort(-1).values
                chosen_allowed = importance.gather(-1, pick) > -math.inf
                chosen = candidates.gather(-1, pick)
        key_mask = (table.present[chosen] & chosen_allowed[..., None]).flatten(1)[:, None, None]   # (T, 1, 1, picks b)
        # a query block with nothing allowed outputs zeros, as do the places past a document's end
        kept = present & chosen_allowed.any(-1, keepdim=True)
        picked.append((places, kept, chosen, key_mask))

    places = torch.cat(where)   # the compressed outputs at their positions (absent places add nothing)
    compressed = v.new_zeros(heads, q.shape[1], v.shape[-1]).index_add(
        1, places.clamp(min=0), torch.cat(compressed_out, 1) * (places >= 0)[:, None])
    if selected_kernel(q, v.shape[-1], b, topk) == "flex":
        return compressed, flex_selected(q, k, v, picked, scale, table.places, table.present)
    return compressed, _SelectedBranch.apply(q, k, v, picked, scale, table.places)


def whole_documents(q, k, v, table: BlockTable, wanted: list[int], scale: float,
                    query_places: torch.Tensor | None = None) -> torch.Tensor:
    """The documents of the `wanted` blocks read whole: each query over every key of its
    document, dense, as a global layer reads it (a sparse layer's documents of at most top-k
    blocks, bidirectional: its selected branch would pick every block, and the compressed and
    window branches read a part of what it reads). Documents of as many blocks go through one
    call, padded to the longest (the padding masked): at most top-k calls, each position's
    query, key and value gathered once; a document alone in its call is read in place. q, k, v
    (H, N, D) as in `sparse_branches`; outputs only at the wanted blocks' places. -> (H, M, Dv)."""
    heads, b = q.shape[0], table.block
    own_places = query_places is None   # then every block of a wanted block's document is wanted
    query_places = table.places if own_places else query_places
    out = v.new_zeros(heads, q.shape[1], v.shape[-1])
    by_count: dict[int, list[int]] = {}
    for g in wanted:
        documents = by_count.setdefault(table.host_count[g], [])
        if not documents or documents[-1] != table.host_first[g]:
            documents.append(table.host_first[g])
    is_wanted = torch.zeros(len(table.host_first), dtype=torch.bool, device=q.device)
    is_wanted[torch.tensor(wanted, device=q.device, dtype=torch.long)] = True
    for count, firsts in sorted(by_count.items()):
        if len(firsts) == 1 and own_places:   # one document: read in place, through views
            start, length = table.host_start[firsts[0]], table.host_length[firsts[0]]
            out[:, start:start + length] = _sdpa(*(t[None, :, start:start + length] for t in (q, k, v)), scale)[0]
            continue
        blocks = torch.tensor(firsts, device=q.device)[:, None] + torch.arange(count, device=q.device)   # (docs, c)
        longest = max(table.host_length[f] for f in firsts)   # each document's places, up to the longest's
        key_places, places, present, wanted_place = (t[blocks].flatten(1)[:, :longest] for t in (
            table.places, query_places, table.present, is_wanted[:, None].expand(-1, b)))   # (docs, longest)
        padded = any(table.host_length[f] < longest for f in firsts)
        attended = _sdpa(_rows(q, places, 1).transpose(0, 1), _rows(k, key_places, 1).transpose(0, 1),
                         _rows(v, key_places, 1).transpose(0, 1), scale, present[:, None, None] if padded else None)
        keep = (present & wanted_place).flatten()
        out.index_add_(1, places.flatten(), (attended.transpose(0, 1).flatten(1, 2) * keep[:, None]).to(out.dtype))
    return out


def _importance(queries, keys, scale: float, visible, counted, allowed, log_sum_exp=None) -> torch.Tensor:
    """How much each query block weighs each of its candidate keys: queries (H, T, Q, D) over
    keys (H, T or 1, K, D), softmax over those `visible` (T, Q or 1, K; None: all) to each query,
    summed over heads and over the queries `counted` (T, Q; None: all) that see any; -inf where
    not `allowed` (T, K). Given the softmax's `log_sum_exp` (H, T, Q), as the attention over
    these keys returned it, the weights are exp(score - log_sum_exp): no second softmax. In
    fp32; masked scores are the lowest finite value, so no row turns to NaN and needs cleaning."""
    scores = torch.matmul(queries.float() * scale, keys.float().transpose(-1, -2))   # (H, T, Q, K)
    if visible is not None:
        scores.masked_fill_(~visible, torch.finfo(scores.dtype).min)
        sees = visible.any(-1)
        counted = sees if counted is None else counted & sees
    if log_sum_exp is None:
        weights = scores.softmax(-1).sum(0)                                            # (T, Q, K)
    else:
        weights = scores.sub_(log_sum_exp.float()[..., None]).exp_().sum(0)
    importance = weights.sum(1) if counted is None else torch.einsum("tqk,tq->tk", weights, counted.float())
    return importance.masked_fill_(~allowed, -math.inf)


class _SelectedBranch(torch.autograd.Function):
    """The selected branch over the tiles that pick blocks: each query block over its picked key
    blocks (block ids into `block_places` (G, b), the blocks' positions in the keys and values
    (H, N, D)). Keeps its inputs, its output and, where the attention kernel is called directly
    (`_direct_kernel`), each tile's log-sum-exp: the gathered keys and values (k times the
    document's) are gathered again tile by tile in backward, and the kernel's backward is called
    on them (elsewhere the tile's forward runs again under autograd); every tile's gradients add
    into one buffer per input (per-tile autograd would zero a buffer the size of every key for
    each tile), the keys' and values' a block at a time (one index entry a block, not one a
    position; measured as fast as per position on a quiet CPU)."""

    @staticmethod
    def forward(ctx, q, k, v, picked, scale, block_places):
        direct = _direct_kernel(q)
        ctx.picked, ctx.scale, ctx.statistics = picked, scale, []
        ctx.autocast = (q.device.type, torch.is_autocast_enabled(q.device.type), torch.get_autocast_dtype(q.device.type))
        out = q.new_zeros(q.shape[1], q.shape[0], v.shape[-1])   # (N, H, Dv), as the query rows
        inputs = _block_major(q, k, _widened(v, q.shape[-1]), block_places)
        for places, kept, chosen, key_mask in picked:
            tile, log_sum_exp = _picked_attention(*inputs, places, chosen, key_mask, scale, direct)
            ctx.statistics.append(log_sum_exp)
            tile = tile[..., :v.shape[-1]] * kept[:, None, :, None]
            out.index_add_(0, places.flatten(), tile.transpose(1, 2).flatten(0, 1).to(out.dtype))
        # a tile's output is read back from the branch's: each kept query's place holds its own
        ctx.save_for_backward(q, k, v, block_places, out if direct else None)
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, block_places, out = ctx.saved_tensors
        device, autocast_on, autocast_dtype = ctx.autocast
        width, v_dim, heads = q.shape[-1], v.shape[-1], q.shape[0]
        inputs = _block_major(q, k, _widened(v, width), block_places)
        dq = q.new_zeros(q.shape[1], heads, width)                                       # (N, H, D)
        # the values' gradients added at the key width, as the kernel returns them: a slice to the
        # value width is a strided view, which index_add_ adds an element at a time (measured 14x slower)
        dk, dv = (q.new_zeros(*block_places.shape, heads, width) for _ in range(2))     # (G, b, H, D)
        for (places, kept, chosen, key_mask), log_sum_exp in zip(ctx.picked, ctx.statistics):
            upstream = _rows(grad, places, 1).transpose(0, 1) * kept[:, None, :, None]     # (T, H, b, Dv)
            tile_inputs = _tile_inputs(*inputs, places, chosen)
            if log_sum_exp is not None:   # a query not kept has no upstream gradient: its output may read 0
                tile_out = _widened(_rows(out, places, 0).transpose(1, 2), width)
                dq_tile, dk_tile, dv_tile = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    _widened(upstream, width), *tile_inputs, tile_out, log_sum_exp, 0.0, False,
                    attn_mask=_additive(key_mask, q.dtype), scale=ctx.scale)
            else:
                tile_inputs = [t.detach().requires_grad_() for t in tile_inputs]
                with torch.enable_grad(), torch.autocast(device, autocast_dtype, enabled=autocast_on):
                    tile_out = _sdpa(*tile_inputs, ctx.scale, key_mask)[..., :v_dim]
                dq_tile, dk_tile, dv_tile = torch.autograd.grad(tile_out, tile_inputs, upstream.to(tile_out.dtype))
            dq.index_add_(0, places.flatten(), dq_tile.transpose(1, 2).flatten(0, 1).to(dq.dtype))
            for grads, tile_grad in ((dk, dk_tile), (dv, dv_tile)):   # (T, H, k b, D) -> per block
                grads.index_add_(0, chosen.flatten(), tile_grad.transpose(1, 2).reshape(-1, *grads.shape[1:]).to(grads.dtype))
        # a block's places past its document's end were masked: their gradients are zeros, added anywhere
        dk, dv = (grads.new_zeros(k.shape[1], heads, width).index_add_(0, block_places.flatten(), grads.flatten(0, 1))
                  for grads in (dk, dv))
        return dq.transpose(0, 1), dk.transpose(0, 1), dv[..., :v_dim].transpose(0, 1), None, None, None


def _compressed_attention(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The compressed branch of a tile: q (H, M, D) over its units' keys and values (H, K, D; v
    widened), `mask` (M, K) or None -> the output (H, M, D) and, where the kernel is called
    directly (`_direct_kernel`), its log-sum-exp (H, M), from which the ranking weighs the same
    scores without a softmax of its own; else None."""
    if _direct_kernel(q):
        out, log_sum_exp = _cpu_flash_attention(q[None], k[None], v[None], None if mask is None else mask[None, None],
                                                scale)
        return out[0], log_sum_exp[0]
    return _sdpa(q[None], k[None], v[None], scale, mask)[0], None


def flex_selected(q, k, v, picked, scale: float, block_places, block_present, attention=None):
    """The selected branch as one block-sparse FlexAttention call (`attention`; default:
    `compiled_flex_attention`): the picked query blocks' queries laid out a block after another,
    every block's keys and values the same way (`block_places`, `block_present` (G, b) from the
    block table), and a block mask that lists each query block's allowed picks (the kernel
    visits only those: k blocks a query block) with a mask mod for the places past a document's
    end. Keeps the dense-sized copies for backward, not k times the keys. q, k, v (H, N, D or
    Dv) -> (H, N, Dv), zeros outside the picked query blocks."""
    heads, positions, b = q.shape[0], q.shape[1], block_places.shape[1]
    places, kept = (torch.cat([tile[i] for tile in picked]) for i in (0, 1))       # (R, b)
    allowed = torch.zeros(len(places), len(block_places), dtype=torch.int32, device=q.device)
    row = 0
    for tile_places, _, chosen, key_mask in picked:   # a pick is allowed where any of its places is
        allowed[row:row + len(tile_places)].scatter_add_(1, chosen, key_mask.view(*chosen.shape, b).any(-1).int())
        row += len(tile_places)
    allowed = allowed > 0                                                             # (R, G)
    order = torch.argsort((~allowed).to(torch.int8), dim=1, stable=True)               # the allowed first, in order
    present = block_present.flatten()

    def allowed_place(batch, head, query, key):
        return allowed[query // b, key // b] & present[key]

    block_mask = BlockMask.from_kv_blocks(allowed.sum(1, dtype=torch.int32)[None, None], order.int()[None, None],
                                          BLOCK_SIZE=(b, b), mask_mod=allowed_place,
                                          seq_lengths=(places.numel(), block_places.numel()))
    queries, keys, values = (_rows(t, index, 1).flatten(1, 2)[None]
                             for t, index in ((q, places), (k, block_places), (v, block_places)))
    attention = attention or compiled_flex_attention()
    out = attention(queries, keys, values, block_mask=block_mask, scale=scale)[0]      # (H, R b, Dv)
    out = torch.where(kept.flatten()[:, None], out, 0)
    return out.new_zeros(heads, positions, out.shape[-1]).index_add(1, places.flatten(), out)


def selected_kernel(q: torch.Tensor, v_dim: int, block: int, topk: int) -> str:
    """Which selected branch runs: "flex" (`flex_selected`, compiled) where it measured faster
    than the tiles of SDPA calls on this GPU (sm_80+, with Triton) for these head sizes, else
    "tiles" (`_SelectedBranch`; every CPU and older GPU). Measured once per process and shape."""
    if (q.device.type != "cuda" or torch.compiler.is_compiling() or not has_triton()
            or torch.cuda.get_device_capability(q.device) < (8, 0)):
        return "tiles"
    return measured_kernel(q.device, q.dtype, q.shape[0], q.shape[-1], v_dim, block, topk)


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled for this process, with dynamic shapes (the picked query blocks and
    the key blocks of a batch vary from step to step)."""
    return torch.compile(flex_attention, dynamic=True)


@functools.cache
def measured_kernel(device, dtype, heads: int, qk_dim: int, v_dim: int, block: int, topk: int,
                    flex=None) -> str:
    """Both selected branches forward and backward on a made-up document of 16 k blocks, each
    block picking k at random, after a first run that compiles; flex wins only where its output
    matches the tiles' and it is faster. A flex kernel that fails to build is reported and the
    tiles run. `flex`: the FlexAttention to measure (default: compiled)."""
    # with gradients whatever the caller's mode: the choice must not differ between a
    # checkpointed forward without them and its recomputation with them
    with torch.inference_mode(False), torch.enable_grad():
        generator = torch.Generator(device="cpu").manual_seed(0)
        blocks = 16 * topk
        block_places = torch.arange(blocks * block, device=device).view(blocks, block)
        present = torch.ones_like(block_places, dtype=torch.bool)
        chosen = torch.rand(blocks, blocks, generator=generator).argsort(1)[:, :topk].sort(1).values.to(device)
        picked = [(block_places, present, chosen, present[chosen].flatten(1)[:, None, None])]
        q, k = (torch.randn(heads, blocks * block, qk_dim, generator=generator).to(device, dtype) for _ in range(2))
        v = torch.randn(heads, blocks * block, v_dim, generator=generator).to(device, dtype)
        scale = qk_dim ** -0.5
        def measured(run) -> tuple[float, torch.Tensor]:
            inputs, times = [t.clone().requires_grad_() for t in (q, k, v)], []
            for _ in range(4):
                start = clock(device)
                out = run(*inputs)
                out.float().square().sum().backward()
                times.append(clock(device) - start)
            return min(times[1:]), out.detach().float()

        tiles_seconds, tiles_out = measured(lambda *inputs: _SelectedBranch.apply(*inputs, picked, scale, block_places))
        try:
            flex_seconds, flex_out = measured(
                lambda *inputs: flex_selected(*inputs, picked, scale, block_places, present, flex))
        except Exception as error:   # a kernel this GPU or this torch cannot build: the tiles run
            warnings.warn(f"sparse layers: the FlexAttention selected branch failed here ({error!r}); "
                          "the SDPA tiles run")
            return "tiles"
        agrees = torch.allclose(flex_out, tiles_out, atol=2e-2, rtol=2e-2)
        return "flex" if agrees and flex_seconds < tiles_seconds else "tiles"


def _direct_kernel(q: torch.Tensor) -> bool:
    """Whether the selected branch calls the CPU's flash attention kernel and its backward
    directly (on a CPU, full precision: what SDPA runs there), keeping each tile's log-sum-exp so
    that backward needs no second forward."""
    return q.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


def _cpu_flash_attention(q, k, v, mask, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The CPU's flash attention kernel, called directly (what SDPA runs there): q, k, v
    (B, H, L, D), a boolean `mask` broadcast to (B, H, L, S) or None -> the output and its
    log-sum-exp (B, H, L)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=None if mask is None else _additive(mask, q.dtype), scale=scale)


def _widened(v: torch.Tensor, width: int) -> torch.Tensor:
    """v zero-padded to the QK head dim `width` (see _sdpa); padded once before a gather, the
    gathered blocks need no padding each."""
    return F.pad(v, (0, width - v.shape[-1])) if v.shape[-1] < width else v


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: attend) as the additive one the kernels take."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def _block_major(q, k, v, block_places) -> tuple[torch.Tensor, ...]:
    """q (H, N, D) laid out (N, H, D), and k, v (H, N, D) as blocks (G, b, H, D): each position's
    heads one contiguous row, each block's rows contiguous, which a gather copies whole (along
    the middle dimension a gather copies D numbers at a time, several times slower)."""
    q_rows, k_rows, v_rows = (t.transpose(0, 1).contiguous() for t in (q, k, v))   # views where one row
    return q_rows, _rows(k_rows, block_places, 0), _rows(v_rows, block_places, 0)


def _tile_inputs(q, k, v, places, chosen) -> tuple[torch.Tensor, ...]:
    """A tile's query blocks (at `places` (T, b) of q (N, H, D)) and their chosen key blocks' keys
    and values (`chosen` (T, k) of k, v (G, b, H, D)) -> (T, H, b, D), (T, H, k b, D) x 2, views of
    the gathered copies (the kernels take strided inputs)."""
    keys, values = (_rows(t, chosen, 0).flatten(1, 2).transpose(1, 2) for t in (k, v))
    return _rows(q, places, 0).transpose(1, 2), keys, values


def _picked_attention(q, k, v, places, chosen, key_mask, scale: float, direct: bool):
    """A tile's query blocks over their chosen key blocks (q (N, H, D), k, v (G, b, H, D), v
    widened to the key width) -> the output (T, H, b, D) and, called `direct`ly, its log-sum-exp
    (T, H, b), else None."""
    tile_inputs = _tile_inputs(q, k, v, places, chosen)
    if direct:
        return _cpu_flash_attention(*tile_inputs, key_mask, scale)
    return _sdpa(*tile_inputs, scale, key_mask), None


def _pieces(t: torch.Tensor, spans: list[tuple[int, int]], dim: int) -> list[torch.Tensor]:
    """t[a:b] along `dim` for each of the disjoint, ordered spans, through one split: its
    backward puts the pieces' gradients together once, where each slice's would be t's size."""
    bounds = sorted({0, t.shape[dim], *(x for span in spans for x in span)})
    parts = dict(zip(itertools.pairwise(bounds), t.split([b - a for a, b in itertools.pairwise(bounds)], dim)))
    return [parts[span] for span in spans]


def _rows(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """t indexed along `dim` by an index tensor of any shape (index_select: its backward adds up
    with index_add, where advanced indexing's accumulating index_put is several times slower)."""
    return t.index_select(dim, index.flatten()).unflatten(dim, index.shape)


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
                window: int | None, causal: bool, slices: SequenceSlices | None = None,
                blocks: BlockTable | None = None) -> torch.Tensor:
        """The latent expanded into per-head keys and values. (DeepSeek's absorbed form, which
        attends in latent space, pays off only for token-by-token decoding with a cache; over
        whole sequences it measured 1.5-2.5x slower with 2.4-3x larger attention tensors.)
        With `slices` (context parallelism) x is this process's slice of the rows. A sparse
        layer cuts the (whole) rows into `blocks` (made here when not given)."""
        q_nope, q_pe = self._query(x, cos, sin)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        latent, k_pe = self._latent(x)
        if slices is not None:
            out = self._sliced(x, q, latent, k_pe, cos, sin, doc, window, causal, slices, blocks)
        else:
            k, value = self._heads(latent, apply_rope(k_pe[:, :, None], cos, sin)[:, :, 0])
            k, value = k.transpose(1, 2), value.transpose(1, 2)
            if self.sparse:
                out = self._sparse_attention(x, q, 0, 0, latent, k_pe, cos, sin, k, value, blocks or self.blocks(doc),
                                             causal, lambda: attend(q, k, value, doc, self.softmax_scale, window, causal))
            else:
                out = attend(q, k, value, doc, self.softmax_scale, window, causal)
        return self.wo(out.transpose(1, 2).flatten(2))

    def _sliced(self, x, q, latent, k_pe, cos, sin, doc, window, causal, slices: SequenceSlices, blocks):
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

        def window_branch():
            out = local_attention(F.pad(q, (0, 0, window, window)), _positions(k, around, 2),
                                  _positions(value, around, 2), _positions(whole_doc, around, 1, OUT_OF_RANGE),
                                  self.softmax_scale, window, causal)
            return out[:, :, window:window + length]
        # the query blocks that straddle the slice's ends rank key blocks with all their queries:
        # a block's halo of queries from the neighbours (not differentiated: only their ranking is used)
        block = self.sparse.block
        halo, _ = slices.with_halo(q.detach().transpose(1, 2).flatten(2), doc, block)
        halo = halo.unflatten(2, (q.shape[1], -1)).transpose(1, 2)
        queries = torch.cat([halo[:, :, :block], q, halo[:, :, -block:]], 2)   # positions [start - block, ...)
        return self._sparse_attention(x, queries, start, start - block, whole_latent, whole_pe, whole_cos, whole_sin,
                                      k, value, blocks or self.blocks(whole_doc), causal, window_branch)

    def blocks(self, doc: torch.Tensor) -> BlockTable:
        """A sparse layer's table of the rows' blocks and units."""
        return block_table(doc, self.sparse.block, self.sparse.compressed_keys)

    def _sparse_attention(self, x, q, start, first, latent, k_pe, cos, sin, k, v, blocks: BlockTable, causal,
                          window_branch):
        """The compressed and selected branches, and with them the window's (`window_branch()`),
        mixed per head by gates read from the input; a document the selected branch would read
        whole (bidirectional, at most top-k blocks) is attended densely instead, weighted by the
        three gates' sum: each branch would read (a part of) that, and a batch of such documents
        then costs what a global layer's does. Padding outputs zeros. The outputs are for
        positions [start, start + L) of the rows (L = x's length); q (B, H, M, D) for positions
        [first, first + M), which hold the query blocks of those; latent, rotary key, cos, sin,
        k, v and the blocks cover the whole rows."""
        pattern, length = self.sparse, x.shape[1]
        rows, span, whole = q.shape[0], q.shape[2], k.shape[2]
        wanted = list(range(len(blocks.host_start))) if length == whole else [
            g for g, begin in enumerate(blocks.host_start)
            if begin % whole < start + length and begin % whole + pattern.block > start]
        read_whole = [] if causal else [g for g in wanted if blocks.host_count[g] <= pattern.topk]
        ranked = [g for g in wanted if causal or blocks.host_count[g] > pattern.topk]
        query_places = None if span == whole else (   # the blocks' places among these queries
            (blocks.places // whole) * span + blocks.places % whole - first).clamp(0, rows * span - 1)
        q, k, v = (t.transpose(0, 1).flatten(1, 2) for t in (q, k, v))   # (H, rows x positions, D)

        def ours(t):   # (H, rows x M, ...) -> (B, H, L, ...), the positions [start, start + L)
            return t.unflatten(1, (rows, span)).transpose(0, 1)[:, :, start - first:start - first + length]

        gates = torch.sigmoid(self.gates(x)).view(*x.shape[:2], self.n_heads, 3).permute(3, 0, 2, 1)[..., None]
        mixed = v.new_zeros(rows, self.n_heads, length, v.shape[-1])
        if read_whole:
            mixed = gates.sum(0) * ours(whole_documents(q, k, v, blocks, read_whole, self.softmax_scale, query_places))
        if ranked:
            tiles = sparse_tiles(blocks, ranked, self.n_heads, pattern.topk, q.shape[-1], pattern.chunk)
            compressed_k, compressed_v, block_keys = self.compress(latent.flatten(0, 1), k_pe.flatten(0, 1),
                                                                   cos.flatten(0, 1), sin.flatten(0, 1), blocks)
            compressed, selected = sparse_branches(q, k, v, compressed_k, compressed_v, blocks, tiles,
                                                   self.softmax_scale, pattern.topk, causal, query_places, block_keys)
            ranked_blocks = torch.tensor(ranked, device=q.device)
            in_ranked = ours(blocks.present.new_zeros(rows * span, dtype=torch.int).index_add(
                0, (blocks.places if query_places is None else query_places)[ranked_blocks].flatten(),
                blocks.present[ranked_blocks].int().flatten())[None, :, None])
            mixed = mixed + gates[0] * ours(compressed) + gates[1] * ours(selected) + \
                (gates[2] * (in_ranked > 0)) * window_branch()   # the mask on the gate: no window-sized copy kept
        else:   # the pooling weights stay in the graph: DDP and the sharded reductions expect every parameter's gradient
            mixed = mixed + 0 * self.pool_logits.sum()
        return mixed

    def compress(self, latent, k_pe, cos, sin, blocks: BlockTable):
        """The flattened rows' latent (N, r) and unrotated rotary key (N, rope) -> every unit's
        compressed keys and values (H, U, D), its rotary key turned to the unit's middle, and
        where units hold several blocks every block's keys (H, G, D) to rank them by (no
        gradient: a ranking only), else None."""
        pooled = pool_blocks(torch.cat([latent, k_pe], -1), blocks, self.pool_logits)
        block_keys = None
        if blocks.coarse:
            with torch.no_grad():
                block_keys = self._pooled_heads(pooled, cos, sin, blocks.middle)[0]
            pooled = pool_units(pooled, blocks)
        return (*self._pooled_heads(pooled, cos, sin, blocks.unit_middle), block_keys)

    def _pooled_heads(self, pooled, cos, sin, middle):
        pooled_latent, pooled_pe = pooled.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        rotated_pe = apply_rope(pooled_pe[None, :, None], cos[None, middle], sin[None, middle])[0, :, 0]
        keys, values = self._heads(pooled_latent, rotated_pe)
        return keys.transpose(0, 1), values.transpose(0, 1)
