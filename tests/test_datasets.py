"""Arrow -> segments, packing, collation, the local dataset, sharding and exact resume."""
import collections

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import datasets
import packing
import schema
from packing import SequenceLayout
from util import META, make_rows


def test_segments_are_zero_copy_views_equal_to_a_direct_read(tmp_path):
    rows = make_rows(5, np.random.default_rng(4))
    schema.write_samples(tmp_path / "s.parquet", rows, META, rows_per_group=5)
    table = pq.read_table(tmp_path / "s.parquet")
    batch = table.slice(1, 3).to_batches()[0]     # a sliced batch: offsets do not start at 0
    segments = packing.segments_from_batch(batch)
    direct = table.slice(1, 3).to_pylist()
    for segment, row in zip(segments, direct):
        assert segment.sample_id == row["sample_id"]
        np.testing.assert_array_equal(segment.mel, np.array(row["mel"], np.float16))
        np.testing.assert_array_equal(segment.f0_hz, np.array(row["f0_hz"], np.float32))
        assert segment.token_ids.tolist() == row["token_ids"]


def test_packing_fills_sequences_in_order_and_skips_oversized_segments():
    rng = np.random.default_rng(5)
    rows = make_rows(20, rng)
    rows[7]["mel"] = np.zeros((400, 80), np.float16)     # 100 positions: more than fits
    table = schema.samples_table([{**r, "f0_hz": np.zeros(len(r["mel"]), np.float32),
                                     "voicing": np.zeros(len(r["mel"]), np.float32),
                                     "energy": np.zeros(len(r["mel"]), np.float32)} for r in rows], META)
    segments = packing.segments_from_batch(table.to_batches()[0])
    layout = SequenceLayout(max_seq_len=24, frames_per_position=4)
    need = 2 + len(rows[7]["token_ids"]) + 400 // 4
    skipped = packing.Skipped()
    packed = list(packing.pack_sequences(enumerate(segments), layout, skipped))
    assert (skipped.segments, skipped.positions, skipped.example) == (1, need, f"doc2/1: {need} positions")
    assert skipped.positions_read == sum(layout.positions(s) for s in segments)
    sequences = [seq for _, seq in packed]
    starts = [start for start, _ in packed]
    flat = [s.sample_id for seq in sequences for s in seq]
    assert [segments[i].sample_id for i in starts] == [seq[0].sample_id for seq in sequences]
    assert flat == [r["sample_id"] for i, r in enumerate(rows) if i != 7]
    for seq, following in zip(sequences, sequences[1:] + [None]):
        used = sum(layout.positions(s) for s in seq)
        assert used <= 24
        if following:   # greedy: the next segment would not have fitted
            assert used + layout.positions(following[0]) > 24


def test_collate_pads_frames_per_segment_and_numbers_documents():
    rng = np.random.default_rng(6)
    table = schema.samples_table(make_rows(6, rng), META)
    segs = packing.segments_from_batch(table.to_batches()[0])
    batch = packing.collate([segs[:4], segs[4:]], SequenceLayout(1000, 4))
    frames = [len(s.mel) for s in segs]
    assert batch.n_frames.tolist() == [-(-f // 4) * 4 for f in frames]
    assert int(batch.frame_valid.sum()) == sum(frames)
    assert batch.segment_row.tolist() == [0, 0, 0, 0, 1, 1]
    # docs: doc0 x3, doc1 (row 0) | doc1 again in row 1 is a new run, then doc1
    assert batch.segment_doc.tolist() == [0, 0, 0, 1, 2, 2]
    start = sum(batch.n_frames[:2].tolist())
    np.testing.assert_array_equal(batch.mel[start:start + frames[2]].numpy(), segs[2].mel.astype(np.float32))


def test_local_dataset_delivers_every_sample_once(corpus):
    root, shards = corpus
    layout = SequenceLayout(max_seq_len=400, frames_per_position=4)
    dataset = datasets.LocalParquetDataset(shards, layout, batch_size=3, seed=5)
    expected = [sid for s in shards for sid in pq.read_table(s, columns=["sample_id"]).column(0).to_pylist()]
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        seen = [sid for batch in dataset for sid in batch.sample_ids]
        assert collections.Counter(seen) == collections.Counter(expected)
    dataset.set_epoch(0)
    first = [sid for batch in dataset for sid in batch.sample_ids]
    dataset.set_epoch(1)
    assert first != [sid for batch in dataset for sid in batch.sample_ids]   # reshuffled per epoch


def _ids(batches):
    return [b.sample_ids for b in batches]


@pytest.mark.parametrize("stop_after", [1, 3, 5])
@pytest.mark.parametrize("window", [1, 2, 16])
def test_resuming_from_a_state_dict_reproduces_the_remaining_order(corpus, stop_after, window):
    _, shards = corpus
    layout = SequenceLayout(max_seq_len=300, frames_per_position=4)

    def fresh():
        dataset = datasets.LocalParquetDataset(shards, layout, batch_size=2, seed=9, shuffle_window=window)
        dataset.set_epoch(2)
        return dataset

    full = _ids(fresh())
    assert len(full) > stop_after + 1
    first = fresh()
    for batch, _ in zip(first, range(stop_after)):
        first.record(batch)
    state = first.state_dict()
    resumed = fresh()
    resumed.load_state_dict(state)
    assert _ids(resumed) == full[stop_after:]


@pytest.mark.parametrize("max_seq_len", [24, 40, 97])
def test_the_batch_count_from_row_lengths_equals_the_batches_packing_yields(tmp_path, max_seq_len):
    """Ranks count their batches from row lengths alone; if that count ever drifted from what the
    packer yields, ranks would disagree on the epoch's length and DDP would hang."""
    rng = np.random.default_rng(max_seq_len)
    rows = make_rows(60, rng)
    for i, row in enumerate(rows):   # lengths around the limit: exact fits, one over, far over, tiny
        frames = int(rng.choice([1, 4, 5, 4 * max_seq_len, 4 * (max_seq_len - 2 - len(row["token_ids"]))]))
        frames = max(frames, 1)
        row.update(mel=np.zeros((frames, 80), np.float16), f0_hz=np.zeros(frames, np.float32),
                   voicing=np.zeros(frames, np.float32), energy=np.zeros(frames, np.float32))
    schema.write_samples(tmp_path / "s.parquet", rows, META, rows_per_group=7)
    for batch_size in (1, 3):
        dataset = datasets.LocalParquetDataset([tmp_path / "s.parquet"], SequenceLayout(max_seq_len, 4),
                                               batch_size=batch_size, shuffle=False)
        with pytest.warns(UserWarning, match=r"epoch 0, shard 0: \d+ segment\(s\) longer than max_seq_len .* "
                                             r"--max-positions"):
            yielded = list(dataset)
        assert dataset._batch_count(dataset.endpoints(), batch_size) == len(yielded)
        assert all(b.n_positions(4) <= max_seq_len * b.n_rows for b in yielded)


def batches_by_rank(dataset, monkeypatch, world: int, workers: int) -> list[list]:
    """Every rank's batches of one epoch, its DataLoader workers' in turn, as each process of a
    `world`-process run would read them."""
    ranks = []
    for rank in range(world):
        batches = []
        for worker in range(workers):
            monkeypatch.setattr(dataset, "_ranks", lambda rank=rank, worker=worker: (rank, world, worker, workers))
            batches += list(dataset)
        ranks.append(batches)
    return ranks


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_shards_cover_the_dataset_exactly_once_with_equal_batch_counts_per_rank(corpus, monkeypatch, world, workers):
    _, shards = corpus
    dataset = datasets.LocalParquetDataset(shards, SequenceLayout(300, 4), batch_size=2, seed=4)
    seen, per_rank, real_per_rank = [], [], []
    for batches in batches_by_rank(dataset, monkeypatch, world, workers):
        seen += [sid for batch in batches for sid in batch.sample_ids]
        per_rank.append(len(batches))
        real_per_rank.append(sum(not b.padding for b in batches))
        assert all(not b.sample_ids for b in batches if b.padding)
    expected = [sid for s in shards for sid in pq.read_table(s, columns=["sample_id"]).column(0).to_pylist()]
    assert collections.Counter(seen) == collections.Counter(expected)
    assert len(set(per_rank)) == 1                                  # DDP never waits on a missing batch
    assert per_rank[0] == max(real_per_rank)                        # padding only up to the longest rank
    if world > 1 and len(set(real_per_rank)) > 1:
        assert any(b < per_rank[0] for b in real_per_rank)


def test_sequences_are_shuffled_within_windows_but_documents_stay_packed(corpus):
    _, shards = corpus
    layout = SequenceLayout(max_seq_len=300, frames_per_position=4)
    ordered = datasets.LocalParquetDataset(shards, layout, batch_size=2, shuffle=False)
    endpoint_order_only = datasets.LocalParquetDataset(shards, layout, batch_size=2, seed=3, shuffle_window=1)
    windowed = datasets.LocalParquetDataset(shards, layout, batch_size=2, seed=3, shuffle_window=8)
    flat = [[sid for b in d for sid in b.sample_ids] for d in (ordered, endpoint_order_only, windowed)]
    assert sorted(flat[0]) == sorted(flat[1]) == sorted(flat[2])
    assert flat[1] != flat[2]          # the window reorders sequences
    for batch in windowed:             # ...but within a sequence a document's segments stay in order
        rows = batch.segment_row.tolist()
        for i in range(1, len(rows)):
            (doc_a, seg_a), (doc_b, seg_b) = (batch.sample_ids[j].split("/") for j in (i - 1, i))
            if rows[i] == rows[i - 1] and doc_a == doc_b:
                assert int(seg_b) == int(seg_a) + 1


@pytest.mark.parametrize("stop_after", [3, 4])
def test_resume_with_dataloader_workers_reproduces_the_interleaved_order(corpus, stop_after):
    _, shards = corpus
    layout = SequenceLayout(max_seq_len=200, frames_per_position=4)

    def loader(dataset):
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="spawn")

    full = _ids(loader(datasets.LocalParquetDataset(shards, layout, batch_size=1, seed=5, shuffle_window=2)))
    first = datasets.LocalParquetDataset(shards, layout, batch_size=1, seed=5, shuffle_window=2)
    for index, batch in enumerate(loader(first)):   # run to the end so the workers exit cleanly
        if index < stop_after:
            first.record(batch)
    resumed = datasets.LocalParquetDataset(shards, layout, batch_size=1, seed=5, shuffle_window=2)
    resumed.load_state_dict(first.state_dict())
    assert _ids(loader(resumed)) == full[stop_after:]


def test_resume_in_the_padding_phase_keeps_batch_counts_equal(corpus, monkeypatch):
    _, shards = corpus
    layout = SequenceLayout(300, 4)
    counts = []
    for rank in range(3):
        dataset = datasets.LocalParquetDataset(shards, layout, batch_size=2, seed=4)
        monkeypatch.setattr(dataset, "_ranks", lambda rank=rank: (rank, 3, 0, 1))
        batches = list(dataset)
        cut = len(batches) - 1   # stop just before the last batch, then resume
        for batch in batches[:cut]:
            dataset.record(batch)
        resumed = datasets.LocalParquetDataset(shards, layout, batch_size=2, seed=4)
        monkeypatch.setattr(resumed, "_ranks", lambda rank=rank: (rank, 3, 0, 1))
        resumed.load_state_dict(dataset.state_dict())
        rest = list(resumed)
        assert [b.sample_ids for b in rest] == [b.sample_ids for b in batches[cut:]]
        assert [b.padding for b in rest] == [b.padding for b in batches[cut:]]
        counts.append(cut + len(rest))
    assert len(set(counts)) == 1


def test_speakers_are_mapped_by_name_across_separately_prepared_files(tmp_path):
    """Two shards number their speakers differently; the run numbers them by name, and a speaker
    the run does not know reads as unknown and is counted, never scored as someone else."""
    rows_a, rows_b = make_rows(9, np.random.default_rng(31)), make_rows(9, np.random.default_rng(32))
    for i, row in enumerate(rows_a):
        row["speaker_id"] = i % 2                      # ann 0, bob 1
    for i, row in enumerate(rows_b):
        row["speaker_id"], row["sample_id"] = i % 2, "b" + row["sample_id"]   # bob 0, cid 1
    schema.write_samples(tmp_path / "a.parquet", rows_a, {**META, "speakers": {"ann": 0, "bob": 1}})
    schema.write_samples(tmp_path / "b.parquet", rows_b, {**META, "speakers": {"bob": 0, "cid": 1}})
    dataset = datasets.LocalParquetDataset([tmp_path / "a.parquet", tmp_path / "b.parquet"], SequenceLayout(400),
                                           batch_size=2, shuffle=False)
    assert schema.speaker_names(dataset.metadata()) == ["ann", "bob", "cid"]
    dataset.use_speakers(["bob", "ann"])               # e.g. a checkpoint's order
    got = {sid: int(spk) for b in dataset for sid, spk in zip(b.sample_ids, b.speaker_id.tolist())}
    names_a, names_b = {0: "ann", 1: "bob"}, {0: "bob", 1: "cid"}
    expected = {r["sample_id"]: {"bob": 0, "ann": 1}.get(names_a[r["speaker_id"]], -1) for r in rows_a}
    expected |= {r["sample_id"]: {"bob": 0, "ann": 1}.get(names_b[r["speaker_id"]], -1) for r in rows_b}
    assert got == expected
    assert dataset.unseen_speakers == {"cid": sum(r["speaker_id"] == 1 for r in rows_b)}


def test_segments_too_long_are_summarised_once_per_epoch_with_their_share(tmp_path):
    rows = make_rows(12, np.random.default_rng(41))
    for row in rows[:5]:                                  # five segments of 100+ positions
        row.update(mel=np.zeros((400, 80), np.float16), f0_hz=np.zeros(400, np.float32),
                   voicing=np.zeros(400, np.float32), energy=np.zeros(400, np.float32))
    schema.write_samples(tmp_path / "s.parquet", rows, META)
    layout = SequenceLayout(40, 4)
    dataset = datasets.LocalParquetDataset([tmp_path / "s.parquet"], layout, batch_size=2)
    needs = [2 + len(r["token_ids"]) + -(-len(r["mel"]) // 4) for r in rows]
    for epoch in (0, 1):
        dataset.set_epoch(epoch)
        with pytest.warns(UserWarning) as caught:
            list(dataset)
        summaries = [str(w.message) for w in caught if "longer than max_seq_len" in str(w.message)]
        share = sum(needs[:5]) / sum(needs)
        assert summaries == [summaries[0]] and summaries[0].startswith(
            f"epoch {epoch}, shard 0: 5 segment(s) longer than max_seq_len 40 were skipped, {share:.1%} of the positions")


@pytest.mark.parametrize("per_step, batch_sizes", [([3, 1, 1], [2, 2, 2]), ([1, 1, 1], [4, 2, 1])])
def test_uneven_work_deals_the_data_in_proportion_and_ends_every_rank_at_the_same_step(corpus, monkeypatch,
                                                                                        per_step, batch_sizes):
    _, shards = corpus
    world, workers = 3, 2
    dataset = datasets.LocalParquetDataset(shards, SequenceLayout(200, 4), batch_size=2, seed=4, shuffle_window=2)
    dataset.work_plan = {0: (per_step, batch_sizes)}   # as set_work does on each rank
    seen, sequences, steps = [], [], []
    for rank, batches in enumerate(batches_by_rank(dataset, monkeypatch, world, workers)):
        assert all(b.n_rows <= batch_sizes[rank] for b in batches)
        assert len(batches) % per_step[rank] == 0
        steps.append(len(batches) // per_step[rank])
        seen += [sid for b in batches for sid in b.sample_ids]
        sequences.append(sum(b.n_rows for b in batches if not b.padding))
    expected = [sid for s in shards for sid in pq.read_table(s, columns=["sample_id"]).column(0).to_pylist()]
    assert collections.Counter(seen) == collections.Counter(expected)       # every sample once
    assert len(set(steps)) == 1                                              # the same steps on every rank
    work = [p * b for p, b in zip(per_step, batch_sizes)]
    assert sequences[0] > sequences[2] * 1.5 and sequences.index(max(sequences)) == work.index(max(work))
