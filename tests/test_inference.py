"""A trained model's uses: predict, embed, evaluate, export, from a checkpoint of a real run."""
import contextlib
import json
import shutil
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import checkpoint
import datasets
import evaluation
import features
import inference
import model_trainer
import packing
import refit
import schema
import training_run
from custom_transformer import CustomTransformer, sample_masks
from flight_server import SampleFlightServer
from util import self_signed_certificate


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """A tiny model trained on all but the last demo shard, and that held-out shard."""
    root, shards = corpus
    out = tmp_path_factory.mktemp("trained")
    data = out / "data"
    data.mkdir()
    for shard in shards[:-1]:
        shutil.copy(shard, data)
    assert model_trainer.main(["--data-dir", str(data), "--out", str(out / "run"), "--ws-port", "-1", "--steps", "12",
                               "--preset", "tiny"]) == 0
    return out / "run" / "ckpt-00000012.pt", shards[-1]


def manifest_of(corpus_root, tmp_path, count, drop_text=(), drop_speaker=()):
    """The first demo recordings as a user's new manifest, some without text or speaker."""
    rows = [json.loads(line) for line in (corpus_root.parent / "manifest.jsonl").read_text().splitlines()][:count]
    entries = []
    for i, row in enumerate(rows):
        entry = {"audio": str(corpus_root.parent / row["audio"]), "doc_id": row["doc_id"],
                 "segment_index": row["segment_index"], "sentiment": row["sentiment"]}
        if i not in drop_text:
            entry.update(text=row["text"], char_start_s=row["char_start_s"])
        if i not in drop_speaker:
            entry["speaker"] = row["speaker"]
        entries.append(entry)
    path = tmp_path / "new.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path, rows


def test_predict_reads_labels_by_name_and_text_from_audio(corpus, trained, tmp_path):
    ckpt, _ = trained
    manifest, rows = manifest_of(corpus[0], tmp_path, 6, drop_text={1, 4}, drop_speaker={0, 1})
    out = tmp_path / "predictions.jsonl"
    assert model_trainer.main(["predict", "--checkpoint", str(ckpt), "--manifest", str(manifest),
                               "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sample_id"] for r in records] == [f"{r['doc_id']}/{r['segment_index']:05d}" for r in rows]
    names = checkpoint.load_checkpoint(ckpt)["labels"]["speakers"]
    for record, row, i in zip(records, rows, range(6)):
        probabilities = record["sentiment"]["probabilities"]
        assert set(probabilities) == {"negative", "neutral", "positive"} and abs(sum(probabilities.values()) - 1) < 1e-3
        assert record["sentiment"]["label"] == max(probabilities, key=probabilities.get)
        assert record["sentiment"]["given"] == ["negative", "neutral", "positive"][row["sentiment"]]
        assert record["speaker"]["best_match"] in names   # the run enrolled its training speakers at its end
        assert record["speaker"]["label"] in names + ["unknown"]
        assert (record["speaker"]["label"] == "unknown") == (record["speaker"]["score"] < record["speaker"]["threshold"])
        assert record["speaker"]["given"] == (None if i in (0, 1) else row["speaker"])
        assert ("text" in record) == (i in (1, 4))             # read where the input lacks it, by default
        if i in (1, 4):
            assert record["text"]["given"] is None and isinstance(record["text"]["read"], str)
    hidden = tmp_path / "hidden.jsonl"
    assert model_trainer.main(["predict", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--out", str(hidden),
                               "--hide", "text", "audio"]) == 0
    record = json.loads(hidden.read_text().splitlines()[0])
    assert record["text"]["given"] == rows[0]["text"]
    frames = {r["sample_id"]: len(r["f0_hz"]) for r in pq.read_table(corpus[1], columns=["sample_id", "f0_hz"])
              .to_pylist()}[record["sample_id"]]
    assert len(record["audio"]["f0_hz"]) == len(record["audio"]["voicing"]) == frames
    assert all(f == 0.0 or 30 < f < 1000 for f in record["audio"]["f0_hz"])


def test_predict_answers_the_same_whatever_the_input_path_and_keeps_a_given_name(corpus, trained, tmp_path):
    """The same recordings through --manifest (prepared in manifest order) and through --data-dir
    (prepared by the user, documents in hashed order, other row groups): the same answers. A
    speaker name training never saw is still reported as given."""
    ckpt, _ = trained
    manifest, rows = manifest_of(corpus[0], tmp_path, 24)
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    entries[3]["speaker"] = "someone-new"
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    features.prepare(manifest, tmp_path / "prepared", max_positions=256, rows_per_group=3)
    answers = {}
    for name, source in (("manifest", ["--manifest", str(manifest)]),
                         ("data-dir", ["--data-dir", str(tmp_path / "prepared")])):
        out = tmp_path / f"{name}.jsonl"
        assert model_trainer.main(["predict", "--checkpoint", str(ckpt), *source, "--out", str(out)]) == 0
        answers[name] = {r["sample_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(answers["manifest"]) == set(answers["data-dir"]) and len(answers["manifest"]) == 24
    assert [r["sample_id"] for r in answers["manifest"].values()] != list(answers["data-dir"])   # another order
    for sample_id, ours in answers["manifest"].items():
        theirs = answers["data-dir"][sample_id]
        for task in ("speaker", "sentiment"):
            assert ours[task]["label"] == theirs[task]["label"], sample_id
        for label, p in ours["sentiment"]["probabilities"].items():
            assert p == pytest.approx(theirs["sentiment"]["probabilities"][label], abs=2e-4)
    new = f"{entries[3]['doc_id']}/{entries[3]['segment_index']:05d}"
    assert answers["manifest"][new]["speaker"]["given"] == answers["data-dir"][new]["speaker"]["given"] == "someone-new"


def refit_on(loaded, folder, per_label=None):
    """An independent refit of the checkpoint's sentiment head on the files of `folder`."""
    args = types.SimpleNamespace(manifest=None, data_dir=str(folder), flight_host=None, files=None, columns=None,
                                 batch_size=None)
    with contextlib.ExitStack() as cleanup:
        readings = inference.read_segments(loaded.model, inference.open_inputs(args, loaded, cleanup),
                                           torch.device("cpu"), per_label=per_label)
    labelled = [i for i, s in enumerate(readings.segments) if s.sentiment != schema.UNKNOWN]
    labels = np.array([readings.segments[i].sentiment for i in labelled])
    return refit.fit_linear(readings.sentiment_inputs[labelled], labels, 3)


def test_a_finished_run_keeps_its_sentiment_head_refit_and_enroll_refits_any_checkpoint(trained, tmp_path):
    ckpt, _ = trained
    data = ckpt.parent.parent / "data"
    loaded = inference.load_trained(ckpt, torch.device("cpu"))
    weight, bias = refit_on(loaded, data, per_label=training_run.FINISH_PER_LABEL)
    head = loaded.model.sentiment_head
    np.testing.assert_allclose(head.weight.detach().numpy(), weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(head.bias.detach().numpy(), bias, rtol=1e-4, atol=1e-5)

    # A checkpoint whose head is not refit (here: zeroed) gets it from enroll --refit-sentiment.
    state = checkpoint.load_checkpoint(ckpt)
    state["model"] = {**state["model"], "sentiment_head.weight": torch.zeros_like(head.weight),
                      "sentiment_head.bias": torch.zeros_like(head.bias)}
    unfinished, finished = tmp_path / "unfinished.pt", tmp_path / "finished.pt"
    checkpoint.write_atomically(unfinished, state)
    assert model_trainer.main(["enroll", "--refit-sentiment", "--checkpoint", str(unfinished), "--data-dir",
                               str(data), "--out", str(finished)]) == 0
    weight, bias = refit_on(loaded, data)
    refit_state = checkpoint.load_checkpoint(finished)["model"]
    np.testing.assert_allclose(refit_state["sentiment_head.weight"].numpy(), weight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(refit_state["sentiment_head.bias"].numpy(), bias, rtol=1e-4, atol=1e-5)


def test_embed_vectors_come_from_audio_and_text_unless_labels_are_asked_for(trained, tmp_path):
    ckpt, held_out = trained
    labelled, unlabelled = tmp_path / "labelled", tmp_path / "unlabelled"
    for folder in (labelled, unlabelled):
        folder.mkdir()
    shutil.copy(held_out, labelled)
    table = pq.read_table(held_out)
    blank = table.set_column(table.schema.get_field_index("speaker_id"), "speaker_id",
                             pa.array([-1] * table.num_rows, pa.int32()))
    blank = blank.set_column(blank.schema.get_field_index("sentiment"), "sentiment",
                             pa.array([-1] * table.num_rows, pa.int8()))
    pq.write_table(blank, unlabelled / held_out.name)

    def vectors(folder, *flags):
        out = tmp_path / f"{folder.name}{''.join(flags)}.parquet"
        assert model_trainer.main(["embed", "--checkpoint", str(ckpt), "--data-dir", str(folder), "--out", str(out),
                                   *flags]) == 0
        return np.stack(pq.read_table(out).column("vector").to_pylist())

    np.testing.assert_array_equal(vectors(labelled), vectors(unlabelled))   # the labels do not reach the vectors
    assert not np.allclose(vectors(labelled, "--with-labels"), vectors(unlabelled, "--with-labels"))


def test_enroll_names_speakers_by_cosine_score_and_adds_new_ones(corpus, trained, tmp_path, capsys):
    ckpt, held_out = trained
    root, shards = corpus
    enrolled = tmp_path / "enrolled.pt"
    data = tmp_path / "train"
    data.mkdir()
    for shard in shards[:-1]:
        shutil.copy(shard, data)
    assert model_trainer.main(["enroll", "--checkpoint", str(ckpt), "--data-dir", str(data), "--out", str(enrolled)]) == 0
    assert "unknown below a score of" in capsys.readouterr().err
    state = checkpoint.load_checkpoint(enrolled)["enrolment"]
    assert sorted(state["speakers"]) == sorted(checkpoint.load_checkpoint(ckpt)["labels"]["speakers"])
    # A newcomer, from a few labelled recordings, without retraining.
    manifest, rows = manifest_of(root, tmp_path, 4)
    entries = [{**json.loads(line), "speaker": "newcomer"} for line in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps(e) + "\n" for e in entries))
    again = tmp_path / "again.pt"
    assert model_trainer.main(["enroll", "--checkpoint", str(enrolled), "--manifest", str(manifest),
                               "--out", str(again)]) == 0
    grown = checkpoint.load_checkpoint(again)["enrolment"]
    assert grown["speakers"][0] == "newcomer" and set(grown["speakers"][1:]) == set(state["speakers"])
    assert grown["threshold"] == state["threshold"] and grown["centroids"][1:] == state["centroids"]
    out = tmp_path / "p.jsonl"
    assert model_trainer.main(["predict", "--checkpoint", str(again), "--manifest", str(manifest), "--out",
                               str(out)]) == 0
    for record in map(json.loads, out.read_text().splitlines()):
        speaker = record["speaker"]
        assert speaker["best_match"] in grown["speakers"] and speaker["given"] == "newcomer"
        assert speaker["threshold"] == round(grown["threshold"], 4)
        assert (speaker["label"] == "unknown") == (speaker["score"] < speaker["threshold"])
    # The same answers from the exported model.
    assert model_trainer.main(["export", "--checkpoint", str(again), "--out", str(tmp_path / "export")]) == 0
    exported = tmp_path / "exported.jsonl"
    assert model_trainer.main(["predict", "--checkpoint", str(tmp_path / "export"), "--manifest", str(manifest),
                               "--out", str(exported)]) == 0
    assert [r["speaker"] for r in map(json.loads, exported.read_text().splitlines())] == \
        [r["speaker"] for r in map(json.loads, out.read_text().splitlines())]


def test_predict_reports_what_a_user_gets_wrong(trained, tmp_path, capsys):
    ckpt, _ = trained
    assert model_trainer.main(["predict", "--checkpoint", str(tmp_path / "nope.pt"), "--data-dir", str(tmp_path),
                               "--out", str(tmp_path / "p.jsonl")]) == 1
    err = capsys.readouterr().err
    assert f"--checkpoint {tmp_path / 'nope.pt'}: no such file" in err
    assert model_trainer.main(["predict", "--checkpoint", str(ckpt), "--out", str(tmp_path / "p.jsonl")]) == 1
    assert "give one input: --manifest, --data-dir or --flight-host" in capsys.readouterr().err


def test_export_round_trips_the_outputs_exactly(trained, tmp_path):
    ckpt, held_out = trained
    assert model_trainer.main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "export")]) == 0
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"model.safetensors", "config.json", "labels.json",
                                                                "data.json", "enrolment.json"}   # enrolled at the end
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in (tmp_path / "export").iterdir())   # others may read them
    exported = CustomTransformer.from_pretrained(tmp_path / "export")
    original = inference.load_trained(ckpt, torch.device("cpu")).model
    batch = next(iter(datasets.LocalParquetDataset([held_out], packing.SequenceLayout(256, 4), 2, shuffle=False)))
    masks = sample_masks(batch, original.cfg, torch.Generator().manual_seed(0))
    a, b = original.infer(batch, masks), exported.infer(batch, masks)
    for name in ("hidden", "speaker_logits", "sentiment_logits", "text_logits", "mel", "f0_hz", "voicing"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    labels = json.loads((tmp_path / "export" / "labels.json").read_text())
    assert labels == checkpoint.load_checkpoint(ckpt)["labels"]


def test_embed_writes_one_vector_per_segment_and_per_position_on_request(trained, tmp_path):
    ckpt, held_out = trained
    out = tmp_path / "vectors.parquet"
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(held_out, data)
    assert model_trainer.main(["embed", "--checkpoint", str(ckpt), "--data-dir", str(data), "--out", str(out),
                               "--per-position"]) == 0
    table = pq.read_table(out)
    direct = pq.read_table(held_out, columns=["sample_id", "doc_id", "token_ids", "f0_hz"])
    assert table.column("sample_id").to_pylist() == direct.column("sample_id").to_pylist()
    assert table.column("doc_id").to_pylist() == direct.column("doc_id").to_pylist()
    vectors = np.stack(table.column("vector").to_pylist())
    model = inference.load_trained(ckpt, torch.device("cpu")).model
    assert vectors.shape == (direct.num_rows, model.cfg.d_model) and np.isfinite(vectors).all()
    positions = pq.read_table(tmp_path / "vectors.positions.parquet")
    lengths = [2 + len(t) + -(-len(f) // 4) for t, f in zip(direct.column("token_ids").to_pylist(),
                                                            direct.column("f0_hz").to_pylist())]
    assert positions.num_rows == sum(lengths)
    first = np.stack(positions.column("vector").to_pylist()[:lengths[0]])
    # a segment's vector: the mean over its text and audio positions (the two label slots first left out)
    np.testing.assert_allclose(first[2:].mean(0), vectors[0], rtol=1e-5, atol=1e-6)


def test_evaluate_gives_the_trainers_metrics_as_json(trained, tmp_path, capsys):
    ckpt, held_out = trained
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(held_out, data)
    capsys.readouterr()
    assert model_trainer.main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(data)]) == 0
    report = json.loads(capsys.readouterr().out)
    loaded = inference.load_trained(ckpt, torch.device("cpu"))
    dataset = datasets.LocalParquetDataset([data / held_out.name], packing.SequenceLayout(
        loaded.cfg.data.max_seq_len, 4), loaded.cfg.data.batch_size, shuffle=False)
    dataset.use_speakers(loaded.labels.speakers)
    expected = evaluation.evaluate(loaded.model, dataset, loaded.cfg, torch.device("cpu"), torch.float32)
    assert report["files"] == 1 and report["loss"] == pytest.approx(expected["loss"], rel=1e-9)
    assert {"speaker_acc", "sentiment_acc", "text_acc", "f0_cents", "unseen_speakers"} <= set(report)


def test_evaluate_reads_a_tls_data_box_with_a_token_as_training_does(trained, tmp_path, capsys):
    """The same flags as the trainer (token, TLS root certificate): the report equals --data-dir's."""
    ckpt, held_out = trained
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(held_out, data)
    (cert, key), token = self_signed_certificate(tmp_path), tmp_path / "token"
    token.write_text("s3cret\n")
    server = SampleFlightServer(data, "127.0.0.1", 0, token="s3cret", tls_cert=cert.read_bytes(),
                                tls_key=key.read_bytes())
    try:
        remote = ["--flight-host", f"localhost:{server.port}", "--flight-tls-root-cert", str(cert)]
        capsys.readouterr()
        assert model_trainer.main(["evaluate", "--checkpoint", str(ckpt), *remote, "--flight-token-file",
                                   str(token)]) == 0
        over_tls = json.loads(capsys.readouterr().out)
        assert model_trainer.main(["evaluate", "--checkpoint", str(ckpt), "--data-dir", str(data)]) == 0
        local = json.loads(capsys.readouterr().out)
        assert over_tls["loss"] == pytest.approx(local["loss"], rel=1e-9) and over_tls["files"] == 1
        assert model_trainer.main(["evaluate", "--checkpoint", str(ckpt), *remote]) != 0
        assert "refused the connection: no token was given" in capsys.readouterr().err
    finally:
        server.shutdown()


def test_a_checkpoint_from_before_label_maps_loads_with_a_note(trained, tmp_path, capsys):
    ckpt, _ = trained
    state = checkpoint.load_checkpoint(ckpt)
    del state["labels"]
    old = checkpoint.write_atomically(tmp_path / "old.pt", state)
    loaded = inference.load_trained(old, torch.device("cpu"))
    assert loaded.labels.speakers[:2] == ["speaker-0", "speaker-1"]
    assert "written before speaker names were kept" in capsys.readouterr().err
