"""Context parallelism: a sequence split over 2 and 4 processes (gloo) gives what one process
gives on the whole sequence, in float64: outputs and every gradient."""
import socket

import pytest
import torch
import torch.multiprocessing as mp

from attention import MultiHeadLatentAttention, SparsePattern, rope_tables
from context_parallel import SequenceSlices

ROWS, LENGTH, D_MODEL, WINDOW = 2, 48, 32, 5


def attention_module(sparse=None):
    torch.manual_seed(0)
    return MultiHeadLatentAttention(D_MODEL, n_heads=2, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
                                    qk_rope_head_dim=4, v_head_dim=8, norm_eps=1e-5, sparse=sparse).double()


def inputs():
    """x, the upstream gradient, positions and document ids: documents straddle every slice
    boundary of 2 and 4 processes (12 or 24 positions each), one ends inside the halo."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, LENGTH, D_MODEL, generator=generator, dtype=torch.float64)
    upstream = torch.randn(ROWS, LENGTH, D_MODEL, generator=generator, dtype=torch.float64)
    doc = torch.tensor([[0] * 10 + [1] * 17 + [2] * 3 + [3] * 18,
                        [4] * 26 + [5] * 20 + [-1] * 2])      # the second row ends in padding
    positions = torch.zeros_like(doc)
    for row in range(ROWS):
        first = 0
        for i in range(1, LENGTH + 1):
            if i == LENGTH or doc[row, i] != doc[row, i - 1]:
                positions[row, first:i] = torch.arange(i - first)
                first = i
    return x, upstream, positions, doc


def whole(causal, window, sparse):
    module = attention_module(sparse)
    x, upstream, positions, doc = inputs()
    x.requires_grad_(True)
    cos, sin = rope_tables(positions, 4, 10000.0)
    out = module(x, cos.double(), sin.double(), doc, window, causal)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in module.named_parameters()}


def _sliced(rank, world, shares, port, window, sparse, results):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    import attention
    queried = []   # the query positions the sparse branches are given
    sparse_branches = attention.sparse_branches

    def counting(q, k, v, compressed_k, compressed_v, table, tiles, *args):
        queried.extend(int(table.present[g0:g1].sum()) for g0, g1, *_ in tiles)
        return sparse_branches(q, k, v, compressed_k, compressed_v, table, tiles, *args)

    attention.sparse_branches = counting
    try:
        for causal in (False, True):
            queried.clear()
            module = attention_module(sparse)
            x, upstream, positions, doc = inputs()
            slices = SequenceSlices(None, rank, world, shares).over(LENGTH)
            x_slice = slices.mine(x).clone().requires_grad_(True)
            cos, sin = rope_tables(slices.mine(positions), 4, 10000.0)
            out = module(x_slice, cos.double(), sin.double(), slices.mine(doc), window, causal, slices)
            (out * slices.mine(upstream)).sum().backward()
            grads = {n: p.grad.clone() for n, p in module.named_parameters()}
            for grad in grads.values():   # each process's share of the parameters' gradient, summed
                torch.distributed.all_reduce(grad)
            results[(rank, causal)] = (out.detach(), x_slice.grad, grads, sum(queried))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world,shares", [(2, ()), (4, ()), (4, (1, 2, 3, 2))], ids=["2", "4", "4-unequal"])
@pytest.mark.parametrize("window,sparse", [(WINDOW, None), (None, None), (WINDOW, SparsePattern(4, 2)),
                                           (WINDOW, SparsePattern(4, 2, compressed_keys=2))],
                         ids=["window", "global", "sparse", "sparse-units"])
def test_attention_split_over_processes_equals_one_process(world, shares, window, sparse):
    """Bidirectional and causal; equal slices, and slices of 6, 12, 18 and 12 positions; sparse
    layers with pooled keys of blocks, and of units of 2 and 4 blocks (2 compressed keys at most:
    documents of 3 to 7 blocks). A sparse layer's process works on its own slice's queries and at most a block either side
    (those of the blocks that straddle its ends)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_sliced, args=(world, shares, port, window, sparse, results), nprocs=world)
    for causal in (False, True):
        out, x_grad, grads = whole(causal, window, sparse)
        got = [results[(r, causal)] for r in range(world)]
        torch.testing.assert_close(torch.cat([g[0] for g in got], 1), out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.cat([g[1] for g in got], 1), x_grad, rtol=1e-12, atol=1e-12)
        for name, grad in grads.items():
            torch.testing.assert_close(got[0][2][name], grad, rtol=1e-10, atol=1e-12, msg=f"{name}, causal {causal}")
        if sparse:
            for rank, g in enumerate(got):
                slices = SequenceSlices(None, rank, world, shares).over(LENGTH)
                assert 0 < g[3] <= ROWS * (slices.bounds[rank + 1] - slices.start + 2 * sparse.block)


def test_a_slice_shorter_than_the_window_is_refused():
    slices = SequenceSlices(None, 0, 2).over(6)
    with pytest.raises(ValueError, match="shorter than the window's reach"):
        slices.with_halo(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), 5)


MODEL = dict(d_model=32, n_layers=3, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, ffn_hidden=64, layer_pattern="LGS", window=6, sparse_block=4, sparse_topk=2,
             vocab_size=40, n_speakers=5,
             speaker_embedding_dim=3)


def model_step(slices=None, checkpointed=False):
    """A float64 forward and backward of the whole model on packed documents (rows of 30 and 32
    positions); -> loss, parameter gradients (summed over the group)."""
    import dataclasses

    from config import ModelConfig
    from custom_transformer import CustomTransformer, sample_masks
    from test_custom_transformer import make_batch
    cfg = ModelConfig(**MODEL, activation_checkpointing=checkpointed)
    torch.manual_seed(0)
    model = CustomTransformer(cfg).double()
    _, batch = make_batch()
    masks = sample_masks(batch, cfg, torch.Generator().manual_seed(1))
    batch = dataclasses.replace(batch, **{f.name: getattr(batch, f.name).double() for f in dataclasses.fields(batch)
                                          if torch.is_tensor(getattr(batch, f.name))
                                          and getattr(batch, f.name).is_floating_point()})
    loss, _ = model(batch, masks, slices=slices)
    (loss / (slices.world if slices else 1)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    if slices:
        for grad in grads.values():
            torch.distributed.all_reduce(grad)
    return loss.detach(), grads


def _sliced_model(rank, world, shares, port, checkpointed, results):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results[rank] = model_step(SequenceSlices(None, rank, world, shares), checkpointed)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world,shares,checkpointed", [(2, (), False), (4, (), True), (2, (1, 3), True)])
def test_the_model_split_over_processes_equals_one_process(world, shares, checkpointed):
    """Window, global and sparse layers, documents across slice boundaries, the loss's every term
    and the label heads' segment statistics over the whole rows."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_sliced_model, args=(world, shares, port, checkpointed, results), nprocs=world)
    loss, grads = model_step()
    for rank in range(world):
        torch.testing.assert_close(results[rank][0], loss, rtol=1e-12, atol=1e-12)
    missing = [name for name, grad in grads.items() if name.startswith("blocks.") and not grad.abs().sum() > 0]
    assert not missing, missing   # every block's weights take part (the comparison below is not vacuous)
    for name, grad in grads.items():
        torch.testing.assert_close(results[0][1][name], grad, rtol=1e-10, atol=1e-12, msg=name)
