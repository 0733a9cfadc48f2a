"""Attention kernels and MLA against naive references written out element by element."""
import math
import time

import pytest
import torch
from torch.nn.attention.flex_attention import flex_attention

from attention import (PAD_DOC, MultiHeadLatentAttention, SparsePattern, apply_rope, dense_attention,
                       document_attention, local_attention, rope_tables)


def naive_attention(q, k, v, doc, scale, window=None, causal=False):
    """Softmax over an explicitly enumerated allowed set, one query at a time."""
    batch, heads, length, _ = q.shape
    out = torch.zeros(batch, heads, length, v.shape[-1], dtype=q.dtype)
    for b in range(batch):
        for i in range(length):
            allowed = []
            for j in range(length):
                if doc[b, i] != doc[b, j]:
                    continue
                d = i - j
                if causal and not (0 <= d and (window is None or d < window)):
                    continue
                if not causal and window is not None and abs(d) > window:
                    continue
                allowed.append(j)
            scores = torch.einsum("hd,hjd->hj", q[b, :, i], k[b, :, allowed]) * scale
            out[b, :, i] = torch.einsum("hj,hjd->hd", scores.softmax(-1), v[b, :, allowed])
    return out


def random_docs(batch, length, generator):
    """Several documents per row, then padding."""
    doc = torch.full((batch, length), PAD_DOC)
    next_id = 0
    for b in range(batch):
        used = length - int(torch.randint(0, length // 4, (1,), generator=generator))
        cuts = sorted(torch.randint(1, used, (2,), generator=generator).tolist())
        for start, end in zip([0, *cuts], [*cuts, used]):
            doc[b, start:end] = next_id
            next_id += 1
    return doc


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,window,block", [(37, 5, None), (64, 8, 4), (50, 16, 32), (9, 20, None)])
def test_local_attention_matches_naive(causal, length, window, block):
    g = torch.Generator().manual_seed(length * 31 + window)
    q, k = (torch.randn(2, 3, length, 12, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, length, 7, generator=g, dtype=torch.float64)   # V dim differs from QK, as in MLA
    doc = random_docs(2, length, g)
    expected = naive_attention(q, k, v, doc, 0.3, window, causal)
    got = local_attention(q, k, v, doc, 0.3, window, causal, block)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_kernels_have_the_naive_gradients(causal, window):
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(2, 2, 29, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 2, 29, 4, generator=g, dtype=torch.float64, requires_grad=True)
    doc = random_docs(2, 29, g)
    real = (doc != PAD_DOC)[:, None, :, None]   # padding outputs are never used
    weights = torch.randn(2, 2, 29, 4, generator=g, dtype=torch.float64) * real

    def grads(fn):
        (fn(q, k, v) * weights).sum().backward()
        result = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        return result

    kernel = ((lambda q, k, v: document_attention(q, k, v, doc, 0.4, causal)) if window is None else
              (lambda q, k, v: local_attention(q, k, v, doc, 0.4, window, causal, block=4)))
    for got, expected in zip(grads(kernel), grads(lambda q, k, v: naive_attention(q, k, v, doc, 0.4, window, causal))):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_document_attention_matches_naive_outside_padding(causal):
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(3, 2, 40, 8, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(3, 2, 40, 5, generator=g, dtype=torch.float64)
    doc = random_docs(3, 40, g)
    real = (doc != PAD_DOC)[:, None, :, None]
    got = document_attention(q, k, v, doc, 0.5, causal)
    expected = naive_attention(q, k, v, doc, 0.5, causal=causal)
    torch.testing.assert_close(got * real, expected * real, rtol=1e-10, atol=1e-10)
    assert (got[~real.expand_as(got)] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_dense_attention_matches_naive(causal):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 2, 23, 8, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 2, 23, 5, generator=g, dtype=torch.float64)
    doc = random_docs(2, 23, g)
    torch.testing.assert_close(dense_attention(q, k, v, doc, 0.5, causal=causal),
                               naive_attention(q, k, v, doc, 0.5, causal=causal), rtol=1e-10, atol=1e-10)


def test_local_attention_memory_is_linear_in_length(monkeypatch):
    """The score tensor the blocked kernel builds grows with n * (block + 2w), not n^2."""
    window, block = 8, 8
    original = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append(attn_mask.numel())
        return original(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    for length in (64, 256):
        doc = torch.zeros(1, length, dtype=torch.long)
        q = torch.randn(1, 1, length, 4)
        local_attention(q, q, q, doc, 1.0, window, block=block)
    assert seen == [length * (block + 2 * window) for length in (64, 256)]


def test_rope_is_deepseek_interleaved_complex_rotation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g)
    positions = torch.randint(0, 1000, (2, 5), generator=g)
    cos, sin = rope_tables(positions, 8, 10000.0)
    # DeepSeek-V3: view the last dim as complex pairs (interleaved) and multiply by e^{i m theta}.
    freqs = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    rotation = torch.polar(torch.ones(2, 5, 4, dtype=torch.float64), positions[..., None] * freqs)
    expected = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (4, 2))) * rotation[:, :, None])
    torch.testing.assert_close(apply_rope(x, cos, sin), expected.flatten(-2).float(), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m, n):
        cq, sq = rope_tables(torch.tensor([[m]]), 16, 500000.0)
        ck, sk = rope_tables(torch.tensor([[n]]), 16, 500000.0)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(7, 3), score(104, 100), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(7, 3), score(3, 7), atol=1e-3)


@pytest.mark.parametrize("q_lora_rank", [0, 24])
@pytest.mark.parametrize("window", [None, 4])
def test_mla_matches_naive_per_head_computation(q_lora_rank, window):
    torch.manual_seed(0)
    d, heads, kv_rank, nope, rope, v_dim = 32, 4, 16, 8, 6, 10
    mla = MultiHeadLatentAttention(d, heads, q_lora_rank, kv_rank, nope, rope, v_dim, 1e-6).double()
    x = torch.randn(2, 13, d, dtype=torch.float64)
    positions = torch.arange(13).repeat(2, 1)
    doc = torch.zeros(2, 13, dtype=torch.long)
    cos, sin = rope_tables(positions, rope, 500000.0)
    got = mla(x, cos, sin, doc, window, causal=False)

    def rms(t, weight):
        return t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    q = (mla.wq_b(rms(mla.wq_a(x), mla.q_norm.weight)) if q_lora_rank else mla.wq(x)).view(2, 13, heads, nope + rope)
    latent_and_rope = mla.wkv_a(x)
    latent, k_rope = latent_and_rope[..., :kv_rank], latent_and_rope[..., kv_rank:]
    kv = (rms(latent, mla.kv_norm.weight) @ mla.wkv_b.weight.T).view(2, 13, heads, nope + v_dim)
    out = torch.zeros(2, 13, heads, v_dim, dtype=torch.float64)
    for h in range(heads):
        qh = torch.cat([q[:, :, h, :nope], apply_rope(q[:, :, h:h + 1, nope:], cos, sin)[:, :, 0]], -1)
        kh = torch.cat([kv[:, :, h, :nope], apply_rope(k_rope[:, :, None], cos, sin)[:, :, 0]], -1)
        scores = qh @ kh.transpose(1, 2) / math.sqrt(nope + rope)   # DeepSeek's scale: (nope+rope)^-0.5
        if window is not None:
            i = torch.arange(13)
            scores = scores.masked_fill((i[:, None] - i[None, :]).abs() > window, float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ kv[:, :, h, nope:]
    torch.testing.assert_close(got, mla.wo(out.flatten(2)), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# Sparse global attention against a reference that writes its pattern out as explicit masks

def sparse_reference(m: MultiHeadLatentAttention, x, cos, sin, doc, causal):
    """The S layer's output with every branch an explicit masked softmax, one query at a time:
    pooled keys built block by block; each query's key blocks picked with plain sorting, from
    the weights its query block gives them (bidirectional: summed over the block's queries;
    causal: those of the block's first query, recomputed for every query); the window as a
    band; bidirectional, a document of at most top-k blocks attended densely, weighted by the
    three gates' sum. -> (output, the picks of each query block per document run)."""
    pattern, scale, b_len = m.sparse, m.softmax_scale, m.sparse.block
    batch, length, _ = x.shape
    q_nope, q_pe = m._query(x, cos, sin)
    latent, k_pe = m._latent(x)
    k, v = m._heads(latent, apply_rope(k_pe[:, :, None], cos, sin)[:, :, 0])
    q = torch.cat([q_nope, q_pe], -1)                                        # (B, L, H, D)
    heads = q.shape[2]
    compressed = torch.zeros(batch, length, heads, v.shape[-1], dtype=x.dtype)
    selected, dense = torch.zeros_like(compressed), torch.zeros_like(compressed)
    ranked = torch.zeros(batch, length, 1, 1, dtype=x.dtype)   # positions of documents whose blocks are ranked
    picks = []
    for b in range(batch):
        ids, counts = torch.unique_consecutive(doc[b], return_counts=True)
        start = 0
        for doc_id, n in zip(ids.tolist(), counts.tolist()):
            if doc_id == PAD_DOC:
                start += n
                continue
            blocks = [list(range(j, min(j + b_len, n))) for j in range(0, n, b_len)]
            if not causal and len(blocks) <= pattern.topk:   # read whole: dense attention over the document
                keys = list(range(start, start + n))
                for i in range(n):
                    scores = torch.einsum("hd,jhd->hj", q[b, start + i], k[b, keys]) * scale
                    dense[b, start + i] = torch.einsum("hj,jhd->hd", scores.softmax(-1), v[b, keys])
                picks.append([list(range(len(blocks)))] * len(blocks))
                start += n
                continue
            ranked[b, start:start + n] = 1
            size = 1   # blocks a unit holds: the fewest that keep the units within compressed_keys
            while -(-len(blocks) // size) > pattern.compressed_keys:
                size *= 2
            units = [list(range(u, min(u + size, len(blocks)))) for u in range(0, len(blocks), size)]

            def pooled_heads(lat, pe, middle):
                pe = apply_rope(pe[None, None, None], cos[b:b + 1, middle:middle + 1], sin[b:b + 1, middle:middle + 1])
                return m._heads(lat, pe[0, 0, 0])

            pooled = []   # each block's latent and rotary key, pooled with the learned weights
            for members in blocks:
                w = m.pool_logits[:len(members)].softmax(0)
                pooled.append((sum(w[i] * latent[b, start + p] for i, p in enumerate(members)),
                               sum(w[i] * k_pe[b, start + p] for i, p in enumerate(members))))
            block_keys = torch.stack([pooled_heads(lat, pe, start + min(j * b_len + b_len // 2, n - 1))[0]
                                      for j, (lat, pe) in enumerate(pooled)])   # (blocks, H, D)
            unit_kv = [pooled_heads(sum(pooled[j][0] for j in unit) / len(unit), sum(pooled[j][1] for j in unit) / len(unit),
                                    start + min(u * size * b_len + size * b_len // 2, n - 1))
                       for u, unit in enumerate(units)]
            ck, cv = torch.stack([kv[0] for kv in unit_kv]), torch.stack([kv[1] for kv in unit_kv])   # (units, H, D)

            def seen_by(i):   # causal: units whose positions all lie at or before i (nominally: a whole unit's)
                return [u for u in range(len(units)) if not causal or (u + 1) * size * b_len - 1 <= i]

            def weights(i, keys, among):   # query i's attention weights over keys[among], summed over heads
                full = torch.zeros(len(keys), dtype=torch.float64)
                if among:
                    full[among] = (torch.einsum("hd,jhd->hj", q[b, start + i], keys[among]) * scale).softmax(-1).sum(0)
                return full.detach()

            for i in range(n):
                seen = seen_by(i)
                if seen:
                    scores = torch.einsum("hd,jhd->hj", q[b, start + i], ck[seen]) * scale
                    compressed[b, start + i] = torch.einsum("hj,jhd->hd", scores.softmax(-1), cv[seen])
            doc_picks = []
            for i in range(n):
                qb = i // b_len
                rankers = [qb * b_len] if causal else blocks[qb]
                importance = sum(weights(r, ck, seen_by(r)) for r in rankers)
                candidates = [u for u in range(len(units)) if not causal or (u + 1) * size <= qb]
                chosen = sorted(sorted(candidates, key=lambda u: -importance[u])[:pattern.topk])
                if size > 1:   # the chosen units' blocks ranked again by their own pooled keys
                    candidates = [j for u in chosen for j in units[u] if not causal or j < qb]
                    importance = sum(weights(r, block_keys, candidates) for r in rankers)
                    chosen = sorted(sorted(candidates, key=lambda j: -importance[j])[:pattern.topk])
                if i == qb * b_len:
                    doc_picks.append(chosen)
                keys = [start + p for j in chosen for p in blocks[j]]
                if keys:
                    scores = torch.einsum("hd,jhd->hj", q[b, start + i], k[b, keys]) * scale
                    selected[b, start + i] = torch.einsum("hj,jhd->hd", scores.softmax(-1), v[b, keys])
            picks.append(doc_picks)
            start += n
    local = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), doc, scale, WINDOW,
                            causal).transpose(1, 2)
    gates = torch.sigmoid(m.gates(x)).view(batch, length, heads, 3)
    mixed = (gates[..., 0:1] * compressed + gates[..., 1:2] * selected + gates[..., 2:3] * local * ranked
             + gates.sum(-1, keepdim=True) * dense)
    return m.wo(mixed.flatten(2)), picks


WINDOW = 3


def sparse_layer(causal, block=4, topk=2, chunk=1 << 24, compressed_keys=256):
    torch.manual_seed(0)
    m = MultiHeadLatentAttention(24, 2, 0, 12, 6, 4, 5, 1e-5, SparsePattern(block, topk, chunk, compressed_keys)).double()
    with torch.no_grad():
        m.pool_logits.normal_()   # unequal pooling weights, so a wrong one shows
        m.gates.weight.normal_(std=0.3)
    return m


def sparse_inputs(generator):
    doc = torch.tensor([[0] * 29 + [1] * 3 + [2] * 9 + [PAD_DOC] * 3, [3] * 44])   # lengths 29, 3 (< block), 9, 44
    positions = torch.zeros_like(doc)
    for b in range(2):
        ids, counts = torch.unique_consecutive(doc[b], return_counts=True)
        positions[b] = torch.cat([torch.arange(n) for n in counts.tolist()])
    cos, sin = rope_tables(positions, 4, 10000.0)
    x = torch.randn(2, doc.shape[1], 24, generator=generator, dtype=torch.float64)
    return x, cos.double(), sin.double(), doc


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk,compressed_keys", [(1 << 26, 256), (64, 256), (1 << 26, 4), (64, 4)],
                         ids=["blocks", "blocks-chunked", "units", "units-chunked"])
@pytest.mark.parametrize("kernel", ["direct", "sdpa", "flex"],
                         ids=["kernel-called-directly", "through-sdpa", "flex-attention"])
def test_sparse_layer_matches_its_pattern_written_out(causal, chunk, compressed_keys, kernel, monkeypatch):
    """64: every chunked loop takes several turns; 4 compressed keys: the documents of 8 and 11
    blocks are pooled in units of 2 and 4 blocks (4 and 3 units), that of 3 blocks in blocks.
    The compressed and selected branches three ways: the CPU kernel and its backward called
    directly (the ranking from the compressed branch's log-sum-exp, backward from the selected
    tiles' saved one); through SDPA (backward runs each tile again), as on a GPU; and the
    selected branch as one FlexAttention call with a block mask (here uncompiled)."""
    import attention
    assert attention._direct_kernel(torch.zeros(1))   # a CPU in full precision calls it directly
    assert attention.selected_kernel(torch.zeros(2, 8, 4), 4, 4, 2) == "tiles"   # and runs the tiles
    direct = kernel == "direct"
    monkeypatch.setattr(attention, "_direct_kernel", lambda q: direct)
    monkeypatch.setattr(attention, "selected_kernel", lambda *args: "flex" if kernel == "flex" else "tiles")
    m = sparse_layer(causal, chunk=chunk, compressed_keys=compressed_keys)
    x, cos, sin, doc = sparse_inputs(torch.Generator().manual_seed(1))
    x_ref = x.clone().requires_grad_()
    x.requires_grad_()
    expected, picks = sparse_reference(m, x_ref, cos, sin, doc, causal)
    real = doc != PAD_DOC
    recorded = []   # the key blocks each query block was given, and which of them it may read
    picked_attention, flex_selected = attention._picked_attention, attention.flex_selected

    def recording(q, k, v, places, chosen, mask, scale, called_directly):
        assert called_directly == direct
        recorded.append((chosen, mask.view(*chosen.shape, -1).any(-1)))
        return picked_attention(q, k, v, places, chosen, mask, scale, called_directly)

    def recording_flex(q, k, v, picked, *args):
        recorded.extend((chosen, mask.view(*chosen.shape, -1).any(-1)) for _, _, chosen, mask in picked)
        return flex_selected(q, k, v, picked, *args, attention=flex_attention)   # uncompiled on a CPU

    monkeypatch.setattr(attention, "_picked_attention", recording)
    monkeypatch.setattr(attention, "flex_selected", recording_flex)
    got = m(x, cos, sin, doc, window=WINDOW, causal=causal)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-10, atol=1e-10)
    # the picks: the same blocks of each document as the reference's (bidirectional, a document
    # of at most top-k blocks is read whole, no blocks picked)
    table = attention.block_table(doc, 4)
    lengths = [n for _, _, n, d in attention.document_runs(doc) if d != PAD_DOC]
    whole = [not causal and -(-n // 4) <= 2 for n in lengths]
    assert all(p == list(range(-(-n // 4))) for run, n, w in zip(picks, lengths, whole) if w for p in run)
    assert [sorted(table.number[c[a]].tolist()) for tile in recorded for c, a in zip(*tile)] == [
        p for run, w in zip(picks, whole) if not w for p in run]
    # gradients of the input and of every parameter
    weights = torch.randn_like(got)
    (got[real] * weights[real]).sum().backward()
    grads = {name: p.grad.clone() for name, p in m.named_parameters()}
    m.zero_grad()
    (expected[real] * weights[real]).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    for name, p in m.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-10, msg=name)


def _measure_selected_kernels(**kwargs) -> str:
    """The run-time choice of selected branch, measured here on the CPU (uncached): 2 heads,
    head dims 8 and 4, blocks of 4, top-2, fp64."""
    import attention
    return attention.measured_kernel.__wrapped__(torch.device("cpu"), torch.float64, 2, 8, 4, 4, 2, **kwargs)


def test_the_flex_selected_branch_is_chosen_only_where_it_agrees_and_is_faster(monkeypatch):
    import attention

    tiles = attention._SelectedBranch

    class SlowTiles(tiles):   # the tiles 0.5 s a call: flex (milliseconds here) is faster
        @staticmethod
        def forward(ctx, *args):
            time.sleep(0.5)
            return tiles.forward(ctx, *args)

    monkeypatch.setattr(attention, "_SelectedBranch", SlowTiles)
    assert _measure_selected_kernels(flex=flex_attention) == "flex"   # uncompiled on a CPU
    with torch.inference_mode():   # measured with gradients in any mode: the same choice
        assert _measure_selected_kernels(flex=flex_attention) == "flex"
    flex_selected = attention.flex_selected
    monkeypatch.setattr(attention, "flex_selected", lambda *args: flex_selected(*args) * 1.1)   # faster but wrong
    assert _measure_selected_kernels(flex=flex_attention) == "tiles"


def test_a_flex_kernel_that_fails_to_build_leaves_the_tiles_with_a_warning():
    def failing(*args, **kwargs):
        raise RuntimeError("no kernel for this card")
    with pytest.warns(UserWarning, match="FlexAttention selected branch failed.*no kernel for this card"):
        assert _measure_selected_kernels(flex=failing) == "tiles"


def test_short_documents_are_read_whole_as_a_global_layer_reads_them(monkeypatch):
    """Bidirectional, documents of at most top-k blocks (1, 2, 2, 2 and 3 blocks, two ending
    in a partial block) are attended densely, those of as many blocks together: outputs and
    gradients equal the reference's, and neither blocks nor the window are computed."""
    import attention
    for unused in ("sparse_branches", "local_attention"):
        monkeypatch.setattr(attention, unused, lambda *args, name=unused, **kwargs: pytest.fail(f"{name} called"))
    torch.manual_seed(0)
    m = sparse_layer(False, block=4, topk=3, chunk=400)
    lengths = [4, 8, 5, 7, 12]   # 1, 2, 2, 2 and 3 blocks
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    cos, sin = rope_tables(torch.cat([torch.arange(n) for n in lengths])[None], 4, 10000.0)
    cos, sin = cos.double(), sin.double()
    x = torch.randn(1, doc.shape[1], 24, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    got = m(x, cos, sin, doc, window=WINDOW, causal=False)
    expected, _ = sparse_reference(m, x_ref, cos, sin, doc, False)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(got)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)


def test_a_sparse_layer_reaches_across_the_document_and_a_local_one_does_not():
    torch.manual_seed(0)
    length = 400
    doc = torch.zeros(1, length, dtype=torch.long)
    cos, sin = rope_tables(torch.arange(length)[None], 4, 10000.0)
    for kind in ("L", "S"):
        sparse = SparsePattern(16, 2) if kind == "S" else None
        m = MultiHeadLatentAttention(24, 2, 0, 12, 6, 4, 5, 1e-5, sparse)
        x = torch.randn(1, length, 24, requires_grad=True)
        m(x, cos, sin, doc, window=8, causal=False)[0, 0].sum().backward()
        far = x.grad[0, 100:].abs().sum().item()   # 100 positions away, twelve windows
        assert (far > 0) == (kind == "S"), kind


@pytest.mark.parametrize("kinds", ["S", "L", "G", "SGL"])
def test_causal_layers_never_see_a_later_position(kinds):
    """Perturb each position of four documents (29 and 9 positions end in a partial block, 3 is
    shorter than a block, 44 is whole blocks) in turn: nothing before it in its document and
    nothing in another document may change, not even in the last bit."""
    layers = []
    for kind in kinds:
        m = sparse_layer(causal=True) if kind == "S" else MultiHeadLatentAttention(24, 2, 0, 12, 6, 4, 5, 1e-5).double()
        layers.append((m, None if kind == "G" else WINDOW))
    x, cos, sin, doc = sparse_inputs(torch.Generator().manual_seed(3))

    def run(inputs):
        h = inputs
        with torch.no_grad():
            for m, window in layers:
                h = h + m(h, cos, sin, doc, window=window, causal=True)
        return h

    base = run(x)
    generator = torch.Generator().manual_seed(4)
    checked = 0
    for b in range(doc.shape[0]):
        for p in range(doc.shape[1]):
            if doc[b, p] == PAD_DOC:
                continue
            moved = x.clone()
            moved[b, p] += torch.randn(24, generator=generator, dtype=torch.float64)
            out = run(moved)
            changed = (out != base).any(-1)
            earlier_or_elsewhere = torch.ones_like(changed)
            same_doc_from_p = (doc[b] == doc[b, p]) & (torch.arange(doc.shape[1]) >= p)
            earlier_or_elsewhere[b] &= ~same_doc_from_p
            assert not changed[earlier_or_elsewhere].any(), (kinds, b, p, changed.nonzero().tolist())
            assert changed[b, p], "the perturbed position itself must change"
            checked += 1
    assert checked == int((doc != PAD_DOC).sum())


SYNCING = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "argwhere", "unique",
           "unique_consecutive", "masked_select", "repeat_interleave"}


class HostSyncs(torch.overrides.TorchFunctionMode):
    """Counts the calls that need a device's values on the host (on a GPU each waits for the
    device), boolean-mask indexing included."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        index = args[1] if name in ("__getitem__", "__setitem__") and len(args) > 1 else None
        masks = index if isinstance(index, tuple) else (index,)
        if name in SYNCING or any(torch.is_tensor(i) and i.dtype == torch.bool for i in masks):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("causal", [False, True])
def test_a_sparse_layer_syncs_with_the_host_a_few_times_however_many_documents(causal):
    """Forward and backward of a sparse layer over a row of 2 documents and of 32 (lengths that
    end in partial blocks): at most 4 host synchronisations, the same number for both."""
    m = sparse_layer(causal, block=8, topk=2)
    counts = []
    for n_docs in (2, 32):
        doc = (torch.arange(512) * n_docs // 512 + torch.arange(512) % 5 // 4)[None].clamp(max=n_docs - 1)
        positions = torch.cat([torch.arange(int(n)) for n in torch.unique_consecutive(doc, return_counts=True)[1]])
        cos, sin = rope_tables(positions[None], 4, 10000.0)
        x = torch.randn(1, 512, 24, dtype=torch.float64, requires_grad=True)
        with HostSyncs() as syncs:
            m(x, cos.double(), sin.double(), doc, window=WINDOW, causal=causal).sum().backward()
        counts.append(len(syncs.calls))
        assert len(syncs.calls) <= 4, syncs.calls
    assert counts[0] == counts[1]
