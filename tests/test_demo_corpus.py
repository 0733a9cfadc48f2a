"""The synthesizer: deterministic, and its speakers and sentiments are audible in the features."""
import hashlib

import numpy as np
import pyarrow.parquet as pq

import demo_corpus
import features


def test_same_seed_same_corpus(tmp_path):
    a = demo_corpus.write_recordings(tmp_path / "a", 2, seed=7)
    b = demo_corpus.write_recordings(tmp_path / "b", 2, seed=7)
    c = demo_corpus.write_recordings(tmp_path / "c", 2, seed=8)
    assert a.read_text() == b.read_text() != c.read_text()

    def digest(folder):
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "wav").glob("*.wav"))]

    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_corpus_has_conversations_in_several_files_and_row_groups(corpus):
    root, shards = corpus
    assert len(shards) >= 2
    assert all(pq.ParquetFile(s).num_row_groups >= 2 for s in shards[:-1])
    table = pq.read_table(root)
    docs = table.column("doc_id").to_pylist()
    segments = table.column("segment_index").to_pylist()
    assert len(set(docs)) == 8 and len(docs) >= 32
    # Within a conversation the segments are in order and two speakers alternate.
    speakers = table.column("speaker_id").to_pylist()
    for doc in set(docs):
        rows = [i for i, d in enumerate(docs) if d == doc]
        assert [segments[i] for i in rows] == list(range(len(rows)))
        assert len({speakers[i] for i in rows}) == 2


def test_speaker_and_sentiment_shape_the_measured_pitch(tmp_path):
    """Median F0 follows the speaker's pitch, and positive speech sits above negative."""
    rng = np.random.default_rng(0)
    extractor = features.FeatureExtractor()

    def median_f0(speaker, sentiment):
        audio, _ = demo_corpus.synthesize("a really long vowel sound", speaker, sentiment, rng)
        f0 = extractor(audio, demo_corpus.SAMPLE_RATE)["f0_hz"]
        return np.median(f0[f0 > 0])

    low, high = demo_corpus.SPEAKERS[1], demo_corpus.SPEAKERS[2]   # bob 105 Hz, cat 240 Hz
    assert abs(1200 * np.log2(median_f0(low, 1) / low.f0)) < 150
    assert abs(1200 * np.log2(median_f0(high, 1) / high.f0)) < 150
    assert median_f0(low, 2) > 1.15 * median_f0(low, 0)
