"""Attention kernels and MLA against naive references written out element by element."""
import math

import pytest
import torch

from attention import (PAD_DOC, MultiHeadLatentAttention, apply_rope, dense_attention,
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
