"""The torch-free data contract: schema, writing, metadata and statistics, validation (library
and command line)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import datasets
import schema
from packing import SequenceLayout
from util import META, make_rows

ROOT = Path(__file__).resolve().parents[1]


def test_written_samples_read_back_exactly(tmp_path):
    rows = make_rows(7, np.random.default_rng(0))
    schema.write_samples(tmp_path / "s.parquet", rows, META, rows_per_group=3)
    parquet = pq.ParquetFile(tmp_path / "s.parquet")
    assert parquet.num_row_groups == 3
    assert parquet.schema_arrow.field("mel").type == pa.list_(pa.list_(pa.float16(), 80))
    table = parquet.read()
    assert table.schema.remove_metadata().equals(schema.SAMPLE_SCHEMA)
    for row, back in zip(rows, table.to_pylist()):
        np.testing.assert_array_equal(np.array(back["mel"], np.float16), row["mel"])
        assert back["token_ids"] == row["token_ids"].tolist()
        assert back["valence"] is None and back["arousal"] == 0.5
    meta = schema.read_metadata(parquet.schema_arrow, "s.parquet")
    assert meta["schema_version"] == schema.SCHEMA_VERSION and meta["stats"]["frames"] == sum(len(r["mel"]) for r in rows)


def test_validator_names_file_row_and_column_of_every_violation():
    rows = make_rows(6, np.random.default_rng(1))
    rows[1]["mel"][2, 5] = np.nan
    rows[2]["f0_hz"] = rows[2]["f0_hz"][:-1]
    rows[3]["token_ids"][0] = 999
    rows[4]["sentiment"] = 7
    rows[5]["sample_id"] = rows[0]["sample_id"]
    rows[0]["voicing"][0] = 1.5
    table = schema.samples_table(rows, META)
    problems = schema.validate_table(table, "bad.parquet", vocab_size=260)
    expected = [("row 1 ", "column mel: NaN or inf"), ("row 2 ", "column f0_hz: "),
                ("row 3 ", "column token_ids: token id outside [0, 260)"), ("row 4 ", "column sentiment"),
                ("row 5 ", "column sample_id: duplicate"), ("row 0 ", "column sample_id: duplicate"),
                ("row 0 ", "column voicing: voicing probability outside [0, 1]")]
    for row, column in expected:
        assert any(p.startswith("bad.parquet: " + row) and column in p for p in problems), (row, column, problems)
    assert len(problems) == len(expected)


def test_validator_reports_wrong_types_and_missing_columns():
    table = schema.samples_table(make_rows(2, np.random.default_rng(2)), META)
    table = table.set_column(table.schema.get_field_index("token_ids"), "token_ids",
                             pc.cast(table.column("token_ids"), pa.list_(pa.int64())))
    table = table.drop_columns(["energy"])
    problems = schema.validate_table(table, "f.parquet")
    assert "f.parquet: column token_ids: type list<item: int64>, expected list<item: int32>" in problems
    assert "f.parquet: column energy: missing" in problems


def test_validate_file_offsets_rows_by_row_group(tmp_path):
    rows = make_rows(6, np.random.default_rng(3))
    table = schema.samples_table(rows, META)
    energy = table.column("energy").to_pylist()
    energy[4][0] = float("inf")
    table = table.set_column(table.schema.get_field_index("energy"), "energy", pa.array(energy, pa.list_(pa.float32())))
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=2)
    problems = schema.validate_file(tmp_path / "x.parquet")
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'x.parquet'}: row 4 (sample_id doc1/1), column energy")


def test_corpus_info_equals_statistics_computed_directly(corpus):
    root, shards = corpus
    dataset = datasets.LocalParquetDataset(shards, SequenceLayout(400), batch_size=2)
    info = schema.corpus_info(dataset.metadata())
    tables = [pq.read_table(s) for s in shards]
    mel = np.concatenate([t.column("mel").combine_chunks().flatten().flatten().to_numpy().reshape(-1, 80)
                          for t in tables]).astype(np.float64)
    f0 = np.concatenate([t.column("f0_hz").combine_chunks().flatten().to_numpy() for t in tables]).astype(np.float64)
    np.testing.assert_allclose(info.mel_mean, mel.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(info.mel_std, mel.std(0), rtol=1e-4)
    np.testing.assert_allclose(info.log_f0_mean, np.log(f0[f0 > 0]).mean(), rtol=1e-9)
    assert info.vocab_size == 260 and info.n_speakers == 6


def test_corpus_info_refuses_files_with_different_features():
    meta = {"features": {"sample_rate": 16000}, "tokenizer": {"vocab_size": 260}, "stats": {}}
    with pytest.raises(ValueError, match="b.parquet: features"):
        schema.corpus_info({"a.parquet": meta, "b.parquet": {**meta, "features": {"sample_rate": 8000}}})


def test_the_validation_command_names_every_bad_value_and_fails(tmp_path):
    good_rows, bad_rows = make_rows(4, np.random.default_rng(5)), make_rows(4, np.random.default_rng(6))
    schema.write_samples(tmp_path / "good.parquet", good_rows, META)
    bad_rows[2]["energy"][1] = np.nan
    bad_rows[3]["token_ids"][0] = 5000
    (tmp_path / "sub").mkdir()
    pq.write_table(schema.samples_table(bad_rows, META), tmp_path / "sub" / "bad.parquet")
    proc = subprocess.run([sys.executable, "schema.py", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1, proc.stderr
    bad = tmp_path / "sub" / "bad.parquet"
    assert f"{bad}: row 2 (sample_id {bad_rows[2]['sample_id']}), column energy: NaN or inf" in proc.stdout
    assert f"{bad}: row 3 (sample_id {bad_rows[3]['sample_id']}), column token_ids: token id outside [0, 260)" in proc.stdout
    assert f"{tmp_path / 'good.parquet'}: ok (4 rows)" in proc.stdout and "1 of 2 files valid" in proc.stderr
    ok = subprocess.run([sys.executable, "schema.py", str(tmp_path / "good.parquet")], cwd=ROOT, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_a_shard_reaches_the_disk_before_it_takes_its_name(tmp_path, monkeypatch):
    """A power cut after the rename must not leave an empty shard that a rerun takes as finished."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    path = tmp_path / "s.parquet"
    schema.write_samples(path, make_rows(3, np.random.default_rng(7)), META)
    assert events == [("fsync", f"{path}.tmp"), ("replace", str(path)), ("fsync", str(tmp_path))]
