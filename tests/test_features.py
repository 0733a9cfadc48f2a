"""Feature extraction: WAV reading, frame alignment, the YIN pitch tracker, manifest -> Parquet."""
import json
import re
import wave

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch

import datasets
import features
import packing
import schema
from manifest import parse_columns, read_manifest
from features import AudioError, ByteTokenizer, FeatureConfig, FeatureExtractor, read_audio, write_wav, yin_pitch

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
def test_read_audio_decodes_stdlib_pcm_widths_and_mixes_channels(tmp_path, width):
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
    samples, rate = read_audio(path)
    assert rate == SR
    np.testing.assert_allclose(samples, (left + right) / 2, atol=2.0 / 2 ** (8 * width - 1) + 1e-6)


def test_write_then_read_wav_round_trips(tmp_path):
    x = (0.3 * np.sin(np.linspace(0, 100, 5000))).astype(np.float32)
    write_wav(tmp_path / "a.wav", x, SR)
    y, rate = read_audio(tmp_path / "a.wav")
    assert rate == SR
    np.testing.assert_allclose(y, x, atol=1 / 32767)


@pytest.mark.parametrize("suffix, fmt, subtype, lossy", [
    (".wav", "WAV", "PCM_24", False),        # 24-bit: WAVE_FORMAT_EXTENSIBLE, which the stdlib refuses
    (".wav", "WAVEX", "PCM_32", False),
    (".wav", "WAV", "FLOAT", False),         # 32-bit float: format 3
    (".flac", "FLAC", "PCM_16", False),
    (".ogg", "OGG", "VORBIS", True),
    (".mp3", "MP3", "MPEG_LAYER_III", True),
])
def test_every_common_format_gives_the_features_of_the_16_bit_wav(tmp_path, suffix, fmt, subtype, lossy):
    rng = np.random.default_rng(11)
    rate = 22050
    signal = harmonic_tone(np.linspace(120.0, 180.0, rate), rng, rate=rate) * 0.5
    stereo = np.stack([signal, signal], 1)
    soundfile.write(tmp_path / "ref.wav", stereo, rate, subtype="PCM_16")
    soundfile.write(tmp_path / f"x{suffix}", stereo, rate, format=fmt, subtype=subtype)
    extractor = FeatureExtractor()
    ref = extractor(*read_audio(tmp_path / "ref.wav"))
    got = extractor(*read_audio(tmp_path / f"x{suffix}"))
    if not lossy:
        assert len(got["mel"]) == len(ref["mel"])
        mel_got, mel_ref = got["mel"].astype(np.float32), ref["mel"].astype(np.float32)
        loud = mel_ref > np.median(mel_ref)   # quiet bins differ by the 16-bit file's own quantisation noise
        assert np.abs(mel_got - mel_ref)[loud].max() < 0.05 and np.abs(mel_got - mel_ref).mean() < 0.02
        np.testing.assert_allclose(got["f0_hz"], ref["f0_hz"], rtol=2e-3, atol=0.5)
    else:   # lossy codecs add encoder delay and drop faint detail: compare what the model learns from
        assert abs(len(got["mel"]) - len(ref["mel"])) <= 10
        n = min(len(got["mel"]), len(ref["mel"]))
        spectrum = lambda f: f["mel"][:n].astype(np.float32).mean(0)   # noqa: E731
        loud = spectrum(ref) > np.median(spectrum(ref))
        assert np.abs(spectrum(got) - spectrum(ref))[loud].mean() < 0.5
        voiced = lambda f: np.median(f["f0_hz"][f["f0_hz"] > 0])        # noqa: E731
        assert abs(1200 * np.log2(voiced(got) / voiced(ref))) < 10


def test_unreadable_audio_names_the_file(tmp_path):
    (tmp_path / "bad.flac").write_bytes(b"fLaC but not really")
    with pytest.raises(AudioError, match=r"bad\.flac: cannot read audio"):
        read_audio(tmp_path / "bad.flac")


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
    rows = [r for s in shards for r in pq.read_table(s).to_pylist()]
    assert [r["text"] for r in rows] == [f"hello {i}" for i in range(5)]
    assert [r["sentiment"] for r in rows] == [0, 1, 2, 0, 1]
    assert rows[1]["token_ids"] == ByteTokenizer().encode("hello 1")
    for shard in shards:
        assert schema.validate_file(shard) == []


def test_manifest_errors_name_the_entry(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "t", "speaker": "s", "sentiment": "happy",
                                    "doc_id": "d", "segment_index": 0}) + "\n")
    with pytest.raises(ValueError, match="entry 1: sentiment 'happy'"):
        read_manifest(manifest)
    manifest.write_text(json.dumps({"text": "t", "speaker": "s"}) + "\n")
    with pytest.raises(ValueError, match="entry 1: missing field.s. audio"):
        read_manifest(manifest)


def test_csv_manifest_with_token_ids_and_optional_fields(tmp_path):
    rng = np.random.default_rng(5)
    for i in range(2):
        write_wav(tmp_path / f"a{i}.wav", harmonic_tone(np.full(SR // 4, 140.0), rng), SR)
    (tmp_path / "m.csv").write_text("audio,text,speaker,sentiment,doc_id,segment_index,token_ids,valence,arousal\n"
                                    "a1.wav,second,bob,neutral,d,1,5 6 7,,0.25\n"
                                    "a0.wav,first,ann,2,d,0,9 10,0.5,\n")
    shards = features.prepare(tmp_path / "m.csv", tmp_path / "out")
    rows = pq.read_table(shards[0]).to_pylist()
    assert [(r["text"], r["token_ids"], r["speaker_id"], r["sentiment"], r["valence"], r["arousal"]) for r in rows] == [
        ("first", [9, 10], 0, 2, 0.5, None), ("second", [5, 6, 7], 1, 1, None, 0.25)]
    meta = schema.read_metadata(pq.read_schema(shards[0]), "x")
    assert meta["tokenizer"] == {"name": "manifest-token-ids", "vocab_size": 11}


def test_manifest_repeats_and_partial_token_ids_are_refused(tmp_path):
    base = {"audio": "a.wav", "text": "t", "speaker": "s", "sentiment": 1, "doc_id": "d"}
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({**base, "segment_index": 0}) + "\n" + json.dumps({**base, "segment_index": 0}) + "\n")
    with pytest.raises(ValueError, match="entry 2: doc_id 'd' segment_index 0 repeats entry 1"):
        read_manifest(manifest)
    manifest.write_text(json.dumps({**base, "segment_index": 0, "token_ids": [5]}) + "\n"
                        + json.dumps({**base, "segment_index": 1}) + "\n")
    with pytest.raises(ValueError, match="1 of 2 entries give token_ids"):
        read_manifest(manifest)


def test_character_times_become_token_start_frames(tmp_path):
    rng = np.random.default_rng(6)
    write_wav(tmp_path / "a.wav", harmonic_tone(np.full(SR, 150.0), rng), SR)   # 1 s: 101 frames
    entry = {"audio": "a.wav", "text": "hé!", "speaker": "s", "sentiment": 1, "doc_id": "d",
             "segment_index": 0, "char_start_s": [0.1, 0.254, 2.0]}
    (tmp_path / "m.jsonl").write_text(json.dumps(entry) + "\n")
    shard, = features.prepare(tmp_path / "m.jsonl", tmp_path / "out")
    row = pq.read_table(shard).to_pylist()[0]
    # BOS at 0; 'h' at frame 10; 'é' is two bytes, both at frame 25; '!' past the end -> last frame; EOS last.
    assert row["token_ids"] == ByteTokenizer().encode("hé!")
    assert row["token_start_frame"] == [0, 10, 25, 25, 100, 100]
    entry["char_start_s"] = [0.1]
    (tmp_path / "m.jsonl").write_text(json.dumps(entry) + "\n")
    with pytest.raises(ValueError, match="char_start_s has 1 values for 3 characters"):
        read_manifest(tmp_path / "m.jsonl")


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
        assert pq.read_table(a).equals(pq.read_table(b))

    # A rerun extracts nothing for finished shards, and redoes a shard whose file was damaged.
    calls = []
    original = features.sample_rows
    monkeypatch.setattr(features, "sample_rows", lambda entry, **kw: calls.append(entry["audio"]) or original(entry, **kw))
    serial[1].write_bytes(b"damaged")
    again = features.prepare(manifest, tmp_path / "serial", rows_per_shard=2)
    assert again == serial and sorted(calls) == [str(tmp_path / "s2.wav"), str(tmp_path / "s3.wav")]
    assert schema.validate_file(serial[1]) == []


def test_labels_are_optional_and_columns_can_be_mapped(tmp_path, capsys):
    rng = np.random.default_rng(21)
    for i in range(3):
        write_wav(tmp_path / f"u{i}.wav", harmonic_tone(np.full(SR // 4, 130.0 + 10 * i), rng), SR)
    (tmp_path / "m.csv").write_text("path,transcript,who,mood,duration\n"
                                    "u0.wav,hi there,ann,positive,0.25\n"
                                    "u1.wav,,,,0.25\n"             # unlabelled speech: audio only
                                    "u2.wav,bye,,negative,0.25\n")
    logged = []
    shards = features.prepare(tmp_path / "m.csv", tmp_path / "out", log=logged.append,
                              columns=parse_columns("audio=path,text=transcript,speaker=who,sentiment=mood"))
    assert any("ignoring column(s) duration" in line for line in logged)
    rows = {r["doc_id"]: r for r in pq.read_table(shards).to_pylist()}
    assert rows["u0.wav"]["speaker_id"] == 0 and rows["u0.wav"]["sentiment"] == 2
    assert rows["u1.wav"]["speaker_id"] == -1 and rows["u1.wav"]["sentiment"] == -1
    assert rows["u1.wav"]["text"] is None and rows["u1.wav"]["token_ids"] == []
    assert rows["u2.wav"]["speaker_id"] == -1 and rows["u2.wav"]["sentiment"] == 0
    assert schema.read_metadata(pq.read_schema(shards[0]), "x")["speakers"] == {"ann": 0}
    assert schema.validate_file(shards[0]) == []
    with pytest.raises(ValueError, match="--columns 'colour=x'"):
        parse_columns("colour=x")


def test_prepare_fails_when_nothing_could_be_written_and_documents_the_manifest(tmp_path, capsys):
    (tmp_path / "bad.wav").write_bytes(b"RIFF nonsense")
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "bad.wav", "text": "x"}) + "\n")
    assert features.main(["prepare", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "out"),
                          "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "bad.wav: cannot read audio" in err and "nothing written: none of its 1 entries could be used" in err
    with pytest.raises(SystemExit):
        features.main(["prepare", "--help"])
    help_text = capsys.readouterr().out
    assert "char_start_s" in help_text and "start_s, end_s" in help_text and "--columns" in help_text


def test_prepare_reports_progress_when_not_on_a_terminal(tmp_path):
    rng = np.random.default_rng(22)
    entries = []
    for i in range(4):
        write_wav(tmp_path / f"p{i}.wav", harmonic_tone(np.full(SR // 8, 140.0), rng), SR)
        entries.append({"audio": f"p{i}.wav", "text": "x"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    logged = []
    features.prepare(tmp_path / "m.jsonl", tmp_path / "out", log=logged.append)   # pytest's stderr is no terminal
    progress = [line for line in logged if line.startswith("features: ")]
    assert [line.split(" (")[0] for line in progress] == ["features: 1/4", "features: 2/4", "features: 3/4",
                                                          "features: 4/4"]
    assert all(re.search(r"\(\d+%\), [\d.]+/s, about \d+ s left", line) for line in progress)


def speech_with_pauses(rng, words, rate=SR):
    """Voiced 'words' of 0.6 s separated by 0.4 s of near silence; -> signal, each word's start (s)."""
    pieces, starts, t = [], [], 0.0
    for i, _ in enumerate(words):
        starts.append(t)
        pieces.append(harmonic_tone(np.full(int(0.6 * rate), 120.0 + 15 * (i % 4)), rng, rate=rate))
        pieces.append(rng.normal(0, 1e-4, int(0.4 * rate)))
        t += 1.0
    return np.concatenate(pieces).astype(np.float32), starts


def test_long_recordings_are_split_at_silences_keeping_the_alignment(tmp_path):
    rng = np.random.default_rng(23)
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    signal, starts = speech_with_pauses(rng, words)
    write_wav(tmp_path / "long.wav", signal, SR)
    text = " ".join(words)
    char_starts, at = [], 0
    for word, start in zip(words, starts):   # each character of a word (and its following space) at the word's start
        char_starts += [start + 0.01 * j for j in range(len(word) + (at < len(words) - 1))]
        at += 1
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "long.wav", "text": text, "char_start_s": char_starts,
                                                  "speaker": "ann", "doc_id": "talk"}) + "\n")
    max_positions = 120   # 10 s of speech is ~250 audio positions: it needs several pieces
    shards = features.prepare(tmp_path / "m.jsonl", tmp_path / "out", max_positions=max_positions)
    rows = pq.read_table(shards).to_pylist()
    assert len(rows) >= 3 and [r["sample_id"] for r in rows] == [f"talk/00000.{i:03d}" for i in range(len(rows))]
    layout = packing.SequenceLayout(max_positions, 4)
    assert all(layout.positions(s) <= max_positions
               for s in packing.segments_from_batch(pq.read_table(shards).to_batches()[0]))
    assert "".join(r["text"] for r in rows) == text                     # no character lost or repeated
    assert sum(len(r["f0_hz"]) for r in rows) == 1 + len(signal) // 160  # no frame lost or repeated
    frame = 0
    for row in rows[:-1]:                                                # every cut falls in a pause
        frame += len(row["f0_hz"])
        assert (frame / 100.0) % 1.0 > 0.6 - 0.03, frame
    for row in rows:   # the alignment is relative to the piece, and each word starts where it is spoken
        starts_in_piece = row["token_start_frame"][1:-1]
        assert min(starts_in_piece) >= 0 and max(starts_in_piece) < len(row["f0_hz"])
    assert schema.validate_file(shards[0]) == []


def test_a_long_transcribed_recording_without_alignment_is_kept_with_its_words_spread_over_the_pieces(tmp_path):
    """A recorded call with its transcript (no timings): split at silences, every word in one
    piece, in order, the pieces' text in proportion to their voiced time; no alignment claimed."""
    rng = np.random.default_rng(24)
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    signal, _ = speech_with_pauses(rng, words)
    write_wav(tmp_path / "long.wav", signal, SR)
    write_wav(tmp_path / "short.wav", signal[:SR // 2], SR)
    text = " ".join(words)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "long.wav", "text": text}) + "\n"
                                      + json.dumps({"audio": "short.wav"}) + "\n"
                                      + json.dumps({"audio": "long.wav", "doc_id": "audio-only"}) + "\n")
    logged = []
    shards = features.prepare(tmp_path / "m.jsonl", tmp_path / "out", max_positions=100, log=logged.append)
    assert any("had text without an alignment, spread over the pieces in proportion to voiced time" in line
               for line in logged), logged
    rows = pq.read_table(shards).to_pylist()
    talk = [r for r in rows if r["doc_id"] == "long.wav"]
    assert len(talk) >= 2 and " ".join(r["text"] for r in talk).split() == words   # whole words, in order
    assert all(r["token_start_frame"] is None for r in talk)                        # approximate: no alignment
    assert sum(len(r["f0_hz"]) for r in talk) == 1 + len(signal) // 160
    for row in talk:   # about 1 word per second of speech in each piece
        seconds = len(row["f0_hz"]) / 100
        assert abs(len(row["text"].split()) - seconds) <= 1.5, (row["text"], seconds)
    assert sum(r["doc_id"] == "audio-only" for r in rows) >= 2         # unlabelled audio splits freely
    assert schema.validate_file(shards[0]) == []


def test_prepare_sums_up_what_it_wrote_and_two_manifests_never_share_a_shard_name(tmp_path):
    rng = np.random.default_rng(25)
    signal, _ = speech_with_pauses(rng, ["a", "b"])
    write_wav(tmp_path / "a.wav", signal, SR)
    entries = [{"audio": "a.wav", "text": "hi", "speaker": "ann", "sentiment": "positive"},
               {"audio": "a.wav", "speaker": "bob", "doc_id": "d2"}, {"audio": "a.wav", "doc_id": "d3"},
               {"audio": "missing.wav"}]
    (tmp_path / "first.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    (tmp_path / "second.jsonl").write_text(json.dumps(entries[0]) + "\n")
    logged = []
    first = features.prepare(tmp_path / "first.jsonl", tmp_path / "one", log=logged.append)
    second = features.prepare(tmp_path / "second.jsonl", tmp_path / "two", log=logged.append)
    assert not {p.name for p in first} & {p.name for p in second}
    summary = [line for line in logged if line.startswith("wrote 3 segment(s)")][0]
    hours = 3 * (1 + len(signal) // 160) / 100 / 3600
    assert f"{hours:.2f} h of audio, in 1 shard(s)" in summary and "2 speaker(s): ann 1, bob 1" in summary
    assert "without text 2, without speaker 1, without sentiment 2; skipped 1 entry" in summary
    logged.clear()
    assert features.prepare(tmp_path / "first.jsonl", tmp_path / "one", log=logged.append) == first   # a rerun
    assert any(line.startswith("wrote 3 segment(s)") and "ann 1, bob 1" in line for line in logged)


def test_a_manifest_sorted_by_speaker_does_not_give_batches_of_one_speaker(tmp_path):
    rng = np.random.default_rng(25)
    entries = []
    for doc in range(24):                       # ann's documents, then bob's, then cid's
        for seg in range(2):
            write_wav(tmp_path / f"d{doc}_{seg}.wav", harmonic_tone(np.full(SR // 10, 150.0), rng), SR)
            entries.append({"audio": f"d{doc}_{seg}.wav", "text": "hi", "doc_id": f"doc{doc:02d}",
                            "segment_index": seg, "speaker": ["ann", "bob", "cid"][doc // 8]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    shards = features.prepare(tmp_path / "m.jsonl", tmp_path / "out")
    assert len(shards) == 1 and pq.ParquetFile(shards[0]).num_row_groups == 1   # one row group
    order = pq.read_table(shards[0], columns=["doc_id", "segment_index"]).to_pylist()
    docs = [r["doc_id"] for r in order]
    assert docs[::2] == docs[1::2] and [r["segment_index"] for r in order] == [0, 1] * 24   # documents stay whole
    # The smallest shuffle window (one batch): only the file's own order mixes the speakers.
    dataset = datasets.LocalParquetDataset(shards, packing.SequenceLayout(64, 4), batch_size=2, shuffle_window=1)
    first = [sid.split("/")[0] for batch in list(dataset)[:3] for sid in batch.sample_ids]
    assert first != sorted(first)
    speakers = {["ann", "bob", "cid"][int(doc[3:]) // 8] for doc in first}
    assert len(speakers) >= 2, first


def test_the_validate_command_runs_the_servers_checks(tmp_path, capsys):
    rng = np.random.default_rng(26)
    write_wav(tmp_path / "a.wav", harmonic_tone(np.full(SR // 4, 140.0), rng), SR)
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "ok"}) + "\n")
    shard = features.prepare(tmp_path / "m.jsonl", tmp_path / "out")[0]
    assert features.main(["validate", str(tmp_path / "out")]) == 0
    table = pq.read_table(shard)
    energy = table.column("energy").to_pylist()
    energy[0][3] = float("nan")
    pq.write_table(table.set_column(table.schema.get_field_index("energy"), "energy",
                                             pa.array(energy, table.schema.field("energy").type)), shard)
    capsys.readouterr()
    assert features.main(["validate", str(shard)]) == 1
    assert f"{shard}: row 0 (sample_id a.wav/00000), column energy: NaN or inf" in capsys.readouterr().out
