"""Feature extraction: WAV reading, frame alignment, the YIN pitch tracker, manifest -> Parquet."""
import json
import wave

import numpy as np
import pytest
import torch

import datasets
import features
from features import ByteTokenizer, FeatureConfig, FeatureExtractor, read_wav, write_wav, yin_pitch

SR = 16000


def harmonic_tone(f0_track, rng, noise=0.01, rate=SR):
    """A voice-like tone: 10 harmonics with falling amplitude following f0_track (Hz per sample)."""
    phase = 2 * np.pi * np.cumsum(f0_track) / rate
    x = sum(0.7 ** h * np.sin(h * phase) for h in range(1, 11))
    return (0.5 * x / np.abs(x).max() + noise * rng.standard_normal(len(x))).astype(np.float32)


def test_yin_tracks_known_f0_within_10_cents_and_few_gross_errors():
    rng = np.random.default_rng(0)
    cfg = FeatureConfig()
    errors, gross, frames = [], 0, 0
    for f0 in (65, 90, 120, 160, 210, 270, 350, 450):
        t = np.arange(SR) / SR
        track = f0 * (1 + 0.04 * np.sin(2 * np.pi * 3 * t))      # vibrato: a moving target
        est, prob = yin_pitch(torch.from_numpy(harmonic_tone(track, rng)), cfg)
        est = est.numpy()[3:-3]                                  # edge frames see the zero padding
        truth = track[np.arange(3, 3 + len(est)) * cfg.hop_length]
        voiced = est > 0
        cents = 1200 * np.log2(est[voiced] / truth[voiced])
        errors.append(np.abs(cents))
        gross += int((~voiced).sum() + (np.abs(cents) > 200).sum())
        frames += len(est)
    assert np.median(np.concatenate(errors)) < 10
    assert gross / frames < 0.02


def test_yin_calls_noise_and_silence_unvoiced():
    rng = np.random.default_rng(1)
    cfg = FeatureConfig()
    noise = torch.from_numpy((0.3 * rng.standard_normal(SR)).astype(np.float32))
    f0, prob = yin_pitch(noise, cfg)
    assert (f0 == 0).float().mean() > 0.9
    f0, prob = yin_pitch(torch.zeros(SR // 2), cfg)
    assert (f0 == 0).all()


def test_every_feature_is_on_the_mel_frame_grid():
    rng = np.random.default_rng(2)
    extractor = FeatureExtractor()
    for n in (SR // 3, SR + 77, 400):
        feats = extractor(harmonic_tone(np.full(n, 150.0), rng), SR)
        expected = 1 + n // 160
        assert feats["mel"].shape == (expected, 80) and feats["mel"].dtype == np.float16
        assert [len(feats[k]) for k in ("f0_hz", "voicing", "energy")] == [expected] * 3


def test_other_sample_rates_are_resampled():
    rng = np.random.default_rng(3)
    extractor = FeatureExtractor()
    feats = extractor(harmonic_tone(np.full(8000, 300.0), rng, rate=8000), 8000)
    assert len(feats["mel"]) == 1 + 16000 // 160
    voiced = feats["f0_hz"][feats["f0_hz"] > 0]
    assert abs(1200 * np.log2(np.median(voiced) / 300.0)) < 20


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_read_wav_decodes_pcm_widths_and_mixes_channels(tmp_path, width):
    t = np.arange(800) / SR
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 220 * t)
    scale = float(2 ** (8 * width - 1) - 1)
    ints = np.round(np.stack([left, right], 1) * scale).astype(np.int64)
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()
    else:
        raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in ints.reshape(-1))
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2), w.setsampwidth(width), w.setframerate(SR), w.writeframes(raw)
    samples, rate = read_wav(path)
    assert rate == SR
    np.testing.assert_allclose(samples, (left + right) / 2, atol=2.0 / 2 ** (8 * width - 1) + 1e-6)


def test_write_then_read_wav_round_trips(tmp_path):
    x = (0.3 * np.sin(np.linspace(0, 100, 5000))).astype(np.float32)
    write_wav(tmp_path / "a.wav", x, SR)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == SR
    np.testing.assert_allclose(y, x, atol=1 / 32767)


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "Grüße, 世界! ok"
    ids = tok.encode(text)
    assert ids[0] == tok.BOS and ids[-1] == tok.EOS
    assert all(tok.N_SPECIAL <= i < tok.vocab_size for i in ids[1:-1])
    assert tok.decode(ids) == text


def test_prepare_reports_bad_audio_by_path_and_writes_the_rest(tmp_path):
    rng = np.random.default_rng(4)
    entries = []
    for i in range(5):
        write_wav(tmp_path / f"ok{i}.wav", harmonic_tone(np.full(SR // 2, 120.0 + 10 * i), rng), SR)
        entries.append({"audio": f"ok{i}.wav", "text": f"hello {i}", "speaker": "s1" if i % 2 else "s2",
                        "sentiment": ["negative", "neutral", "positive"][i % 3], "doc_id": "d", "segment_index": i})
    (tmp_path / "garbage.wav").write_bytes(b"this is not a wav file")
    write_wav(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    entries += [{"audio": "garbage.wav", "text": "x", "speaker": "s1", "sentiment": 1, "doc_id": "e", "segment_index": 0},
                {"audio": "empty.wav", "text": "y", "speaker": "s1", "sentiment": 1, "doc_id": "e", "segment_index": 1}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    logged = []
    shards = features.prepare(manifest, tmp_path / "out", rows_per_shard=3, rows_per_group=2, log=logged.append)
    assert any("garbage.wav" in line for line in logged) and any("empty.wav" in line for line in logged)
    assert len(shards) == 2
    rows = [r for s in shards for r in datasets.pq.read_table(s).to_pylist()]
    assert [r["text"] for r in rows] == [f"hello {i}" for i in range(5)]
    assert [r["sentiment"] for r in rows] == [0, 1, 2, 0, 1]
    assert rows[1]["token_ids"] == ByteTokenizer().encode("hello 1")
    for shard in shards:
        assert datasets.validate_file(shard) == []


def test_manifest_errors_name_the_entry(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "t", "speaker": "s", "sentiment": "happy",
                                    "doc_id": "d", "segment_index": 0}) + "\n")
    with pytest.raises(ValueError, match="entry 1: sentiment 'happy'"):
        features.read_manifest(manifest)
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "t"}) + "\n")
    with pytest.raises(ValueError, match="entry 1: missing field"):
        features.read_manifest(manifest)


def test_csv_manifest_with_token_ids_and_optional_fields(tmp_path):
    rng = np.random.default_rng(5)
    for i in range(2):
        write_wav(tmp_path / f"a{i}.wav", harmonic_tone(np.full(SR // 4, 140.0), rng), SR)
    (tmp_path / "m.csv").write_text("audio,text,speaker,sentiment,doc_id,segment_index,token_ids,valence,arousal\n"
                                    "a1.wav,second,bob,neutral,d,1,5 6 7,,0.25\n"
                                    "a0.wav,first,ann,2,d,0,9 10,0.5,\n")
    shards = features.prepare(tmp_path / "m.csv", tmp_path / "out")
    rows = datasets.pq.read_table(shards[0]).to_pylist()
    assert [(r["text"], r["token_ids"], r["speaker_id"], r["sentiment"], r["valence"], r["arousal"]) for r in rows] == [
        ("first", [9, 10], 0, 2, 0.5, None), ("second", [5, 6, 7], 1, 1, None, 0.25)]
    meta = datasets.read_metadata(datasets.pq.read_schema(shards[0]), "x")
    assert meta["tokenizer"] == {"name": "manifest-token-ids", "vocab_size": 11}


def test_manifest_repeats_and_partial_token_ids_are_refused(tmp_path):
    base = {"audio": "a.wav", "text": "t", "speaker": "s", "sentiment": 1, "doc_id": "d"}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({**base, "segment_index": 0}) + "\n" + json.dumps({**base, "segment_index": 0}) + "\n")
    with pytest.raises(ValueError, match="entry 2: doc_id 'd' segment_index 0 repeats entry 1"):
        features.read_manifest(manifest)
    manifest.write_text(json.dumps({**base, "segment_index": 0, "token_ids": [5]}) + "\n"
                        + json.dumps({**base, "segment_index": 1}) + "\n")
    with pytest.raises(ValueError, match="1 of 2 entries give token_ids"):
        features.read_manifest(manifest)


def test_character_times_become_token_start_frames(tmp_path):
    rng = np.random.default_rng(6)
    write_wav(tmp_path / "a.wav", harmonic_tone(np.full(SR, 150.0), rng), SR)   # 1 s: 101 frames
    entry = {"audio": "a.wav", "text": "hé!", "speaker": "s", "sentiment": 1, "doc_id": "d",
             "segment_index": 0, "char_start_s": [0.1, 0.254, 2.0]}
    (tmp_path / "m.jsonl").write_text(json.dumps(entry) + "\n")
    shard, = features.prepare(tmp_path / "m.jsonl", tmp_path / "out")
    row = datasets.pq.read_table(shard).to_pylist()[0]
    # BOS at 0; 'h' at frame 10; 'é' is two bytes, both at frame 25; '!' past the end -> last frame; EOS last.
    assert row["token_ids"] == ByteTokenizer().encode("hé!")
    assert row["token_start_frame"] == [0, 10, 25, 25, 100, 100]
    entry["char_start_s"] = [0.1]
    (tmp_path / "m.jsonl").write_text(json.dumps(entry) + "\n")
    with pytest.raises(ValueError, match="char_start_s has 1 values for 3 characters"):
        features.read_manifest(tmp_path / "m.jsonl")


def test_prepare_resumes_finished_shards_and_parallel_output_equals_serial(tmp_path, monkeypatch):
    rng = np.random.default_rng(8)
    entries = []
    for i in range(6):
        write_wav(tmp_path / f"s{i}.wav", harmonic_tone(np.full(SR // 4, 100.0 + 20 * i), rng), SR)
        entries.append({"audio": f"s{i}.wav", "text": f"seg {i}", "speaker": f"spk{i % 2}", "sentiment": i % 3,
                        "doc_id": "d", "segment_index": i})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    serial = features.prepare(manifest, tmp_path / "serial", rows_per_shard=2)
    parallel = features.prepare(manifest, tmp_path / "parallel", rows_per_shard=2, workers=2)
    for a, b in zip(serial, parallel):
        assert datasets.pq.read_table(a).equals(datasets.pq.read_table(b))

    # A rerun extracts nothing for finished shards, and redoes a shard whose file was damaged.
    calls = []
    original = features.sample_row
    monkeypatch.setattr(features, "sample_row", lambda entry, **kw: calls.append(entry["audio"]) or original(entry, **kw))
    serial[1].write_bytes(b"damaged")
    again = features.prepare(manifest, tmp_path / "serial", rows_per_shard=2)
    assert again == serial and sorted(calls) == [str(tmp_path / "s2.wav"), str(tmp_path / "s3.wav")]
    assert datasets.validate_file(serial[1]) == []
