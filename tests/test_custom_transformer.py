"""The model: layout of packed segments, document isolation, masking, and that it learns."""
import dataclasses

import numpy as np
import pytest
import torch

import packing
import schema
from attention import PAD_DOC
from config import ModelConfig
from custom_transformer import CustomTransformer, Held, Masks, layout, sample_masks
from packing import segment_positions

TINY = ModelConfig(d_model=32, n_layers=3, n_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
                   qk_rope_head_dim=4, v_head_dim=8, ffn_hidden=64, layer_pattern="LG", window=6,
                   vocab_size=40, n_speakers=5, speaker_embedding_dim=3)


def make_segment(rng, doc, index, n_tokens, n_frames):
    f0 = rng.uniform(80, 300, n_frames).astype(np.float32)
    f0[rng.uniform(size=n_frames) < 0.3] = 0
    return packing.Segment(
        sample_id=f"{doc}/{index}", doc_id=doc, token_ids=rng.integers(4, 40, n_tokens).astype(np.int32),
        mel=rng.normal(size=(n_frames, schema.N_MELS)).astype(np.float16), f0_hz=f0,
        voicing=(f0 > 0).astype(np.float32), energy=rng.normal(size=n_frames).astype(np.float32),
        speaker_id=int(rng.integers(5)), sentiment=int(rng.integers(3)),
        speaker_embedding=rng.normal(size=3).astype(np.float32) if index % 2 == 0 else None,
        token_start_frame=(np.sort(rng.integers(0, n_frames, n_tokens)).astype(np.int32)
                           if n_frames and index % 2 == 0 else None),
        valence=float(rng.uniform(-1, 1)), arousal=float(rng.uniform(0, 1)) if index else float("nan"))


def make_batch(seed=0, k=4):
    rng = np.random.default_rng(seed)
    rows = [[make_segment(rng, "a", 0, 5, 9), make_segment(rng, "a", 1, 3, 8), make_segment(rng, "b", 0, 4, 5)],
            [make_segment(rng, "c", 0, 6, 13)]]
    return rows, packing.collate(rows, packing.SequenceLayout(10_000, k))


def no_masks(batch, k=4):
    return Masks(text=torch.zeros(len(batch.token_ids), dtype=torch.bool),
                 audio=torch.zeros(len(batch.mel) // k, dtype=torch.bool),
                 speaker=torch.zeros(len(batch.n_tokens), dtype=torch.bool),
                 sentiment=torch.zeros(len(batch.n_tokens), dtype=torch.bool))


def test_layout_matches_a_hand_built_grid():
    rows, batch = make_batch()
    grid = layout(batch, 4)
    # Build the expected grid directly from the segments.
    kinds, docs, positions = [], [], []
    for row in rows:
        row_kinds, row_docs, row_pos, doc_start, current, doc_number = [], [], [], 0, None, None
        for seg in row:
            if seg.doc_id != current:
                current, doc_start = seg.doc_id, len(row_kinds)
                doc_number = (docs[-1][-1] + 1 if docs else 0) if not row_docs else row_docs[-1] + 1
            n = 2 + len(seg.token_ids) + -(-len(seg.mel) // 4)
            row_kinds += ["spk", "sent"] + ["tok"] * len(seg.token_ids) + ["aud"] * (n - 2 - len(seg.token_ids))
            row_docs += [doc_number] * n
            row_pos += list(range(len(row_pos) - doc_start, len(row_pos) - doc_start + n))
        kinds.append(row_kinds), docs.append(row_docs), positions.append(row_pos)
    length = max(map(len, kinds))
    assert grid.length == length
    for r in range(2):
        n = len(kinds[r])
        assert grid.doc[r, :n].tolist() == docs[r]
        assert (grid.doc[r, n:] == PAD_DOC).all()
        assert grid.positions[r, :n].tolist() == positions[r]
    flat_kinds = {i: kind for r in range(2) for i, kind in ((r * length + j, kinds[r][j]) for j in range(len(kinds[r])))}
    for index, kind in [(grid.speaker_index, "spk"), (grid.sentiment_index, "sent"), (grid.text_index, "tok"),
                        (grid.audio_index, "aud")]:
        assert all(flat_kinds[i] == kind for i in index.tolist())
    every = torch.cat([grid.speaker_index, grid.sentiment_index, grid.text_index, grid.audio_index])
    assert len(set(every.tolist())) == len(every) == len(flat_kinds)


def test_alignment_maps_tokens_to_the_audio_position_of_their_start_frame():
    rows, batch = make_batch()
    segments = [s for row in rows for s in row]
    audio_start = 0
    expected = []
    for s in segments:
        if s.token_start_frame is None:
            expected += [-1] * len(s.token_ids)
        else:
            expected += [audio_start + int(f) // 4 for f in s.token_start_frame]
        audio_start += -(-len(s.mel) // 4)
    assert batch.token_audio_position.tolist() == expected
    assert (batch.token_audio_position >= 0).any() and (batch.token_audio_position < 0).any()


def test_documents_do_not_see_each_other():
    """Changing document b leaves document a's outputs unchanged, in local and global layers."""
    torch.manual_seed(0)
    model = CustomTransformer(TINY).eval()
    rows, batch = make_batch()
    grid = layout(batch, 4)
    x = model.embed(batch, grid, no_masks(batch), *model.normalised_features(batch))
    h1 = model.encode(x, grid).hidden.view(2, grid.length, -1)
    x2 = x.clone()
    doc_b = grid.doc[0] == grid.doc[0].max()
    x2[0, doc_b] += torch.randn_like(x2[0, doc_b])
    h2 = model.encode(x2, grid).hidden.view(2, grid.length, -1)
    doc_a = grid.doc[0] == 0
    torch.testing.assert_close(h1[0, doc_a], h2[0, doc_a])
    assert not torch.allclose(h1[0, doc_b], h2[0, doc_b])
    torch.testing.assert_close(h1[1], h2[1])


def test_hidden_inputs_do_not_leak():
    """What is masked cannot influence the output: swapping hidden tokens changes nothing."""
    torch.manual_seed(0)
    model = CustomTransformer(TINY).eval()
    _, batch = make_batch()
    masks = sample_masks(batch, dataclasses.replace(TINY, text_mask_ratio=0.5, audio_mask_ratio=0.5,
                                                    speaker_drop=0.5, sentiment_drop=0.5),
                         torch.Generator().manual_seed(0))
    position = batch.token_audio_position
    # A visible token aligned to hidden audio: the hidden audio must not reach it either.
    assert (~masks.text & (position >= 0) & masks.audio[position.clamp_min(0)]).any()
    altered = dataclasses.replace(batch, token_ids=torch.where(masks.text, 4 + (batch.token_ids + 7) % 30, batch.token_ids))
    hidden_frames = masks.audio.repeat_interleave(4)
    altered.mel = torch.where(hidden_frames[:, None], batch.mel + 1.0, batch.mel)
    altered.speaker_id = torch.where(masks.speaker, (batch.speaker_id + 1) % 5, batch.speaker_id)
    altered.speaker_embedding = torch.where(masks.speaker[:, None], -batch.speaker_embedding, batch.speaker_embedding)
    altered.sentiment = torch.where(masks.sentiment, (batch.sentiment + 1) % 3, batch.sentiment)
    altered.affect = torch.where(masks.sentiment[:, None], batch.affect + 0.5, batch.affect)
    assert masks.speaker.any() and masks.sentiment.any()
    grid = layout(batch, 4)
    h1 = model.encode(model.embed(batch, grid, masks, *model.normalised_features(batch)), grid).hidden
    h2 = model.encode(model.embed(altered, grid, masks, *model.normalised_features(altered)), grid).hidden
    torch.testing.assert_close(h1, h2)
    # ...while an unmasked change does reach the output.
    visible = dataclasses.replace(batch, token_ids=torch.where(~masks.text, 4 + (batch.token_ids + 7) % 30, batch.token_ids))
    h3 = model.encode(model.embed(visible, grid, masks, *model.normalised_features(visible)), grid).hidden
    assert not torch.allclose(h1, h3)


def test_span_masks_hit_their_ratio():
    cfg = dataclasses.replace(TINY, text_mask_ratio=0.3, text_span=3)
    rng = np.random.default_rng(0)
    rows = [[make_segment(rng, str(i), 0, 400, 4) for i in range(20)]]
    batch = packing.collate(rows, packing.SequenceLayout(100_000, 4))
    masks = sample_masks(batch, cfg, torch.Generator().manual_seed(0))
    assert 0.25 < masks.text.float().mean() < 0.32
    runs = np.diff(np.flatnonzero(np.diff(np.r_[0, masks.text.numpy().astype(int), 0])))[::2]
    assert (runs[:-1] >= 3).all()   # spans, not scattered tokens (the last may be cut by the end)


def test_every_parameter_gets_a_gradient_and_the_model_overfits_a_batch():
    torch.manual_seed(0)
    model = CustomTransformer(TINY)
    _, batch = make_batch()
    cfg = dataclasses.replace(TINY, speaker_drop=0.5, sentiment_drop=0.5)
    masks = sample_masks(batch, cfg, torch.Generator().manual_seed(4))
    for hidden in (masks.speaker, masks.sentiment):   # some hidden (a loss), some shown (an input)
        assert hidden.any() and not hidden.all()
    loss, metrics = model(batch, masks)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
    assert set(metrics) >= {"loss_text", "loss_mel", "loss_f0", "loss_voicing", "loss_energy",
                            "loss_speaker", "loss_sentiment", "accuracy"}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(60):
        optimizer.zero_grad()
        loss, _ = model(batch, masks)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="layer_pattern"):
        ModelConfig(layer_pattern="LXG")
    with pytest.raises(ValueError, match="text_mask_ratio"):
        ModelConfig(text_mask_ratio=1.5)


def test_absent_modalities_are_inputs_never_targets():
    """A text-only segment, an audio-only one, unknown speaker and sentiment: all train."""
    rng = np.random.default_rng(7)
    text_only = make_segment(rng, "a", 0, 6, 0)
    audio_only = make_segment(rng, "a", 1, 0, 9)
    audio_only.speaker_id, audio_only.speaker_embedding = schema.UNKNOWN, None
    audio_only.sentiment, audio_only.valence, audio_only.arousal = schema.UNKNOWN, float("nan"), float("nan")
    batch = packing.collate([[text_only, audio_only]], packing.SequenceLayout(1000, 4))
    assert batch.n_frames.tolist() == [0, 12] and batch.n_tokens.tolist() == [6, 0]
    masks = Masks(text=torch.ones(6, dtype=torch.bool), audio=torch.ones(3, dtype=torch.bool),
                  speaker=torch.tensor([False, True]), sentiment=torch.tensor([False, True]))
    model = CustomTransformer(TINY)
    loss, metrics = model(batch, masks)
    assert torch.isfinite(loss)
    # The unknown speaker and sentiment were hidden, but there is nothing to reconstruct.
    assert metrics["loss_speaker"] == 0 and metrics["loss_sentiment"] == 0 and metrics["loss_speaker_embedding"] == 0
    assert metrics["loss_text"] > 0 and metrics["loss_mel"] > 0


def test_total_loss_is_the_configured_weighted_sum():
    _, batch = make_batch()
    weights = {"text": 0.5, "mel": 2.0, "f0": 0.0, "voicing": 1.5, "energy": 0.25, "speaker": 3.0,
               "speaker_embedding": 0.7, "sentiment": 1.2}
    cfg = dataclasses.replace(TINY, speaker_drop=0.5, sentiment_drop=0.5,
                              **{f"weight_{name}": value for name, value in weights.items()})
    torch.manual_seed(0)
    model = CustomTransformer(cfg)
    masks = sample_masks(batch, cfg, torch.Generator().manual_seed(4))
    loss, metrics = model(batch, masks)
    expected = sum(w * metrics[f"loss_{name}"] for name, w in weights.items())
    torch.testing.assert_close(loss.detach(), expected)
    assert all(metrics[f"loss_{name}"] > 0 for name in weights)   # every term was really computed
    # 1 - cosine for the speaker vectors, recomputed from the head directly.
    grid = layout(batch, 4)
    held = model.encode(model.embed(batch, grid, masks, *model.normalised_features(batch)), grid)
    targets = masks.speaker & batch.has_speaker_embedding
    speaker_in, _ = model.label_inputs(grid, held, model.segment_moments(grid, held))
    predicted = model.speaker_vector_head(speaker_in[targets])
    manual = (1 - torch.nn.functional.cosine_similarity(predicted, batch.speaker_embedding[targets], dim=-1)).mean()
    torch.testing.assert_close(metrics["loss_speaker_embedding"], manual.detach())
    assert {"f0_cents", "voicing_acc", "speaker_acc", "sentiment_acc", "accuracy"} <= set(metrics)


def test_label_heads_read_their_slot_and_the_statistics_of_the_whole_segment():
    """Against a loop over segments: the slot's output plus the projected mean and standard
    deviation of the segment's text and audio positions (its two label slots left out)."""
    _, batch = make_batch()
    torch.manual_seed(0)
    model = CustomTransformer(TINY).double()
    masks = sample_masks(batch, TINY, torch.Generator().manual_seed(1))
    grid = layout(batch, 4)
    hidden = torch.randn(grid.n_rows * grid.length, TINY.d_model, dtype=torch.float64)
    held = Held(hidden, torch.arange(len(hidden)))
    speaker_in, sentiment_in = model.label_inputs(grid, held, model.segment_moments(grid, held))
    lengths = segment_positions(batch.n_tokens, batch.n_frames, 4).tolist()
    for i, (start, n) in enumerate(zip(grid.speaker_index.tolist(), lengths)):
        content = hidden[start + 2:start + n]
        stats = torch.cat([content.mean(0), content.std(0, unbiased=False)])
        pooled = model.segment_pool(stats)
        torch.testing.assert_close(speaker_in[i], hidden[start] + pooled)
        torch.testing.assert_close(sentiment_in[i], hidden[start + 1] + pooled)
    assert len(lengths) == len(speaker_in) > 3 and masks.speaker.numel() == len(lengths)


def test_speaker_embedding_size_mismatch_names_the_setting():
    _, batch = make_batch()
    model = CustomTransformer(dataclasses.replace(TINY, speaker_embedding_dim=5))
    with pytest.raises(ValueError, match="set model.speaker_embedding_dim=3"):
        model(batch, no_masks(batch))


def test_a_padding_batch_runs_and_carries_no_sample():
    batch = packing.padding_batch(packing.SequenceLayout(100, 4), (0, 0, 0, 0))
    assert batch.padding and batch.sample_ids == []
    loss, _ = CustomTransformer(TINY)(batch, sample_masks(batch, TINY, torch.Generator().manual_seed(0)))
    assert torch.isfinite(loss)
    (loss * 0.0).backward()


def test_every_parameter_takes_part_even_when_a_batch_hides_nothing_of_its_kind():
    """DDP (without its costly unused-parameter search) needs a gradient for every parameter on
    every step: heads with nothing to reconstruct get an exact zero one."""
    _, batch = make_batch()
    for has_vectors in (True, False):
        if not has_vectors:   # a batch in which no segment has a speaker vector
            batch = dataclasses.replace(batch, speaker_embedding=batch.speaker_embedding[:, :0],
                                        has_speaker_embedding=torch.zeros_like(batch.has_speaker_embedding))
        masks = dataclasses.replace(no_masks(batch), text=torch.arange(len(batch.token_ids)) % 3 == 0)
        model = CustomTransformer(TINY)
        loss, metrics = model(batch, masks)
        loss.backward()
        assert [name for name, p in model.named_parameters() if p.grad is None] == []
        for head in (model.speaker_head, model.sentiment_head, model.mel_head, model.prosody_head,
                     model.speaker_vector_head):
            assert head.weight.grad.abs().sum() == 0
        assert metrics["loss_mel"] == 0 and "speaker_acc" not in metrics and model.text_head.weight.grad.abs().sum() > 0


def test_document_drop_hides_every_label_slot_of_a_document_together():
    _, batch = make_batch(seed=5)
    cfg = dataclasses.replace(TINY, speaker_drop=0.0, sentiment_drop=0.0, document_drop=0.5)
    seen = set()
    for seed in range(20):
        masks = sample_masks(batch, cfg, torch.Generator().manual_seed(seed))
        assert torch.equal(masks.speaker, masks.sentiment)
        for doc in batch.segment_doc.unique():
            in_doc = masks.speaker[batch.segment_doc == doc]
            assert in_doc.all() or not in_doc.any()            # all of a document's slots, or none
            seen.add(bool(in_doc.all()))
    assert seen == {True, False}
    everything = sample_masks(batch, dataclasses.replace(cfg, document_drop=1.0), torch.Generator().manual_seed(0))
    assert everything.speaker.all() and everything.sentiment.all()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_mini_sequence_feed_forward_is_exact_in_outputs_and_every_gradient(checkpointed):
    """float64: the feed-forward over chunks of 7 positions (rows of 30 and 32: a short last
    chunk) against the whole row at once, with and without activation checkpointing."""
    _, batch = make_batch()
    masks = sample_masks(batch, TINY, torch.Generator().manual_seed(1))
    batch = dataclasses.replace(batch, **{f.name: getattr(batch, f.name).double() for f in dataclasses.fields(batch)
                                          if torch.is_tensor(getattr(batch, f.name))
                                          and getattr(batch, f.name).is_floating_point()})
    results = []
    for chunk in (0, 7):
        torch.manual_seed(0)
        cfg = dataclasses.replace(TINY, ffn_chunk=chunk, activation_checkpointing=checkpointed)
        model = CustomTransformer(cfg).double()
        loss, _ = model(batch, masks)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (chunked_loss, chunked_grads) = results
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-12, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def kept_for_backward(module, *inputs) -> int:
    """Bytes of the tensors autograd keeps from this forward for backward (storage counted once)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(*inputs)
    return sum(storages.values())


def test_mini_sequence_feed_forward_keeps_only_its_input_for_backward():
    from custom_transformer import FeedForward
    torch.manual_seed(0)
    whole, chunked = FeedForward(32, 256), FeedForward(32, 256, chunk=16)
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, 128, 32, requires_grad=True)
    # whole row: the two projections' outputs, the activation and the product, 4 x 256 numbers a
    # position, beside the input; chunked: the input alone (each chunk's checkpoint keeps its view)
    assert kept_for_backward(whole, x) >= 4 * 256 * 2 * 128 * 4
    assert kept_for_backward(chunked, x) == x.numel() * 4
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), whole(x))


def test_offloaded_checkpoints_are_the_blocks_inputs_and_change_no_gradient(monkeypatch):
    """On a CPU nothing moves; what would move is each block's input, not the rotary tables or
    document ids every block also keeps."""
    import parallel
    monkeypatch.setattr(parallel.HostCheckpoints, "MIN_BYTES", 1)
    _, batch = make_batch()
    masks = sample_masks(batch, TINY, torch.Generator().manual_seed(1))
    grads = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = CustomTransformer(dataclasses.replace(TINY, activation_checkpointing=True,
                                                      offload_checkpoints=offload))
        loss, _ = model(batch, masks)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        grid = layout(batch, TINY.frames_per_position)
        block_input = (grid.n_rows, grid.length, TINY.d_model)
        assert model.offloaded == ([(block_input, 4 * grid.n_rows * grid.length * TINY.d_model)] * TINY.n_layers
                                   if offload else [])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="needs model.activation_checkpointing"):
        ModelConfig(offload_checkpoints=True)
