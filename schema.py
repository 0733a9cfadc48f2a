"""The data contract between the machines, free of torch: the Parquet sample schema, its
metadata and statistics, the validator, and the Flight ticket format.

The data machine (flight_server.py) needs only this module, pyarrow and numpy
(requirements-server.txt); datasets.py builds the training batches on top of it.

One Parquet row is one spoken segment. Segments of one document (a recording or conversation)
share a doc_id and are numbered by segment_index.

    python schema.py FILE.parquet ...     # validate: every problem with file, row and column
"""
from __future__ import annotations

import json
import os
import sys
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
N_MELS = 80
SENTIMENTS = ("negative", "neutral", "positive")   # sentiment ids 0, 1, 2
N_SENTIMENTS = len(SENTIMENTS)
UNKNOWN = -1       # speaker_id or sentiment not known: the modality is absent from the sample
METADATA_KEY = b"mmtrain"

SAMPLE_SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("segment_index", pa.int32(), nullable=False),
    pa.field("text", pa.string()),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("token_start_frame", pa.list_(pa.int32())),        # alignment, optional
    pa.field("mel", pa.list_(pa.list_(pa.float16(), N_MELS)), nullable=False),  # log-mel (T, 80)
    pa.field("f0_hz", pa.list_(pa.float32()), nullable=False),    # 0 where unvoiced
    pa.field("voicing", pa.list_(pa.float32()), nullable=False),  # probability in [0, 1]
    pa.field("energy", pa.list_(pa.float32()), nullable=False),   # log frame energy
    pa.field("speaker_id", pa.int32(), nullable=False),           # -1: unknown speaker
    pa.field("speaker_embedding", pa.list_(pa.float32())),        # optional external vector
    pa.field("sentiment", pa.int8(), nullable=False),             # 0 negative, 1 neutral, 2 positive, -1 unknown
    pa.field("valence", pa.float32()),
    pa.field("arousal", pa.float32()),
])
PER_FRAME_COLUMNS = ("f0_hz", "voicing", "energy")


class DataError(RuntimeError):
    """Data that cannot be read or served; the message names the server or file."""


# ---------------------------------------------------------------------------------------------
# Writing, with the statistics the model normalises by

def feature_sums(rows: list[dict]) -> dict:
    """Frame counts and sums (log-mel per bin, log-F0 of voiced frames, energy) from which the
    corpus means and standard deviations combine exactly across shards."""
    mel = np.concatenate([r["mel"] for r in rows]).astype(np.float64)
    f0 = np.concatenate([r["f0_hz"] for r in rows]).astype(np.float64)
    energy = np.concatenate([r["energy"] for r in rows]).astype(np.float64)
    log_f0 = np.log(f0[f0 > 0])
    return {"mel_sum": mel.sum(0).tolist(), "mel_sumsq": np.square(mel).sum(0).tolist(),
            "frames": int(energy.size), "voiced_frames": int(log_f0.size),
            "log_f0_sum": float(log_f0.sum()), "log_f0_sumsq": float(np.square(log_f0).sum()),
            "energy_sum": float(energy.sum()), "energy_sumsq": float(np.square(energy).sum())}


def _list_array(values: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = np.concatenate(values) if values else np.zeros(0)
    if pa.types.is_fixed_size_list(value_type):
        inner = pa.array(flat.reshape(-1), type=value_type.value_type)
        flat_array = pa.FixedSizeListArray.from_arrays(inner, value_type.list_size)
    else:
        flat_array = pa.array(flat, type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), flat_array)


def samples_table(rows: list[dict], metadata: dict) -> pa.Table:
    """Rows (dicts of scalars and numpy arrays) -> a table of SAMPLE_SCHEMA with its metadata."""
    arrays = []
    for field in SAMPLE_SCHEMA:
        column = [row.get(field.name) for row in rows]
        if pa.types.is_list(field.type):
            if field.nullable and any(v is None for v in column):
                arrays.append(pa.array([None if v is None else list(v) for v in column], field.type))
            else:
                value_type = field.type.value_type
                dtype = np.float16 if field.name == "mel" else value_type.to_pandas_dtype()
                arrays.append(_list_array([np.asarray(v, dtype) for v in column], value_type))
        else:
            arrays.append(pa.array(column, field.type))
    meta = {"schema_version": SCHEMA_VERSION, **metadata, "stats": feature_sums(rows)}
    schema = SAMPLE_SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


ROW_GROUP_BYTES = 32 << 20   # tens of MB: large sequential reads, bounded memory per endpoint


def write_samples(path: str | Path, rows: list[dict], metadata: dict, rows_per_group: int | None = None) -> None:
    """Write one shard atomically: a reader never sees a half-written file. Row groups hold
    `rows_per_group` rows, or by default about ROW_GROUP_BYTES of data."""
    table = samples_table(rows, metadata)
    problems = validate_table(table, str(path), metadata.get("tokenizer", {}).get("vocab_size"))
    if problems:
        raise ValueError("refusing to write invalid samples:\n" + "\n".join(problems))
    if rows_per_group is None:
        rows_per_group = max(1, int(ROW_GROUP_BYTES * table.num_rows / max(table.nbytes, 1)))
    tmp = Path(f"{path}.tmp")
    with open(tmp, "wb") as f:
        pq.write_table(table, f, row_group_size=rows_per_group)
        f.flush()
        os.fsync(f.fileno())   # on disk before the rename: a power cut cannot leave an empty shard
    os.replace(tmp, path)
    fsync_directory(Path(path).parent)


def fsync_directory(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metadata(schema: pa.Schema, source: str) -> dict:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{source}: no mmtrain metadata (was it written by features.py prepare?)")
    meta = json.loads(raw)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{source}: schema version {meta.get('schema_version')}, "
                         f"this build reads {SCHEMA_VERSION}")
    return meta


@dataclass
class CorpusInfo:
    """What the model needs to know of the data: vocabulary, speakers, normalisation."""
    vocab_size: int
    n_speakers: int
    mel_mean: list[float]
    mel_std: list[float]
    log_f0_mean: float
    log_f0_std: float
    energy_mean: float
    energy_std: float


def corpus_info(metas: dict[str, dict]) -> CorpusInfo:
    """Combine per-file metadata (source name -> metadata); files must agree on features."""
    if not metas:
        raise ValueError("no data files")
    (first_name, first), *rest = metas.items()
    for name, meta in rest:
        for key in ("features", "tokenizer"):
            if meta[key] != first[key]:
                raise ValueError(f"{name}: {key} {meta[key]} differ from {first_name}: {first[key]}")
    totals: dict = {}
    for meta in metas.values():
        for key, value in meta["stats"].items():
            totals[key] = np.asarray(value, np.float64) + totals.get(key, 0.0)

    def mean_std(prefix, count):
        mean = totals[f"{prefix}_sum"] / max(count, 1)
        var = totals[f"{prefix}_sumsq"] / max(count, 1) - mean ** 2
        return mean, np.sqrt(np.maximum(var, 1e-6))

    mel_mean, mel_std = mean_std("mel", totals["frames"])
    f0_mean, f0_std = mean_std("log_f0", totals["voiced_frames"])
    energy_mean, energy_std = mean_std("energy", totals["frames"])
    return CorpusInfo(vocab_size=first["tokenizer"]["vocab_size"], n_speakers=len(speaker_names(metas)),
                      mel_mean=mel_mean.tolist(), mel_std=mel_std.tolist(),
                      log_f0_mean=float(f0_mean), log_f0_std=float(f0_std),
                      energy_mean=float(energy_mean), energy_std=float(energy_std))


def speaker_names(metas: dict[str, dict]) -> list[str]:
    """Every speaker the files name, sorted: the ids a run gives them. Each file numbers its own
    speakers (metadata "speakers": name -> id); files are mapped onto this list by name."""
    return sorted({name for meta in metas.values() for name in meta.get("speakers", {})})


@dataclass
class Labels:
    """What the model's class ids mean, kept in every checkpoint and export: speaker names by
    id (from the training files), sentiment names by id."""
    speakers: list[str]
    sentiments: list[str] = dataclasses.field(default_factory=lambda: list(SENTIMENTS))

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.speakers, self.sentiments = list(state["speakers"]), list(state["sentiments"])

    def extended(self, names) -> "Labels":
        """These labels, with names not yet known appended (their ids follow the known ones)."""
        return Labels(self.speakers + sorted(set(names) - set(self.speakers)), list(self.sentiments))


# ---------------------------------------------------------------------------------------------
# Validation: every violation, with file, row and column

MAX_ROWS_LISTED = 20


class _Report:
    def __init__(self, source: str, sample_ids: np.ndarray | None, row_offset: int):
        self.source, self.sample_ids, self.row_offset = source, sample_ids, row_offset
        self.lines: list[str] = []

    def column(self, name: str, message: str):
        self.lines.append(f"{self.source}: column {name}: {message}")

    def rows(self, name: str, bad_rows: np.ndarray, message: str):
        bad_rows = np.unique(bad_rows)
        for row in bad_rows[:MAX_ROWS_LISTED]:
            sid = f" (sample_id {self.sample_ids[row]})" if self.sample_ids is not None else ""
            self.lines.append(f"{self.source}: row {row + self.row_offset}{sid}, column {name}: {message}")
        if len(bad_rows) > MAX_ROWS_LISTED:
            self.lines.append(f"{self.source}: column {name}: {message} in "
                              f"{len(bad_rows) - MAX_ROWS_LISTED} more rows")


def _value_rows(column: pa.ListArray) -> np.ndarray:
    """For each flattened list value, the row it belongs to."""
    lengths = pc.list_value_length(column).fill_null(0).to_numpy()
    return np.repeat(np.arange(len(column)), lengths)


def schema_problems(schema: pa.Schema) -> dict[str, str]:
    """Column -> what is wrong with it: a required column missing, or a column of the wrong type."""
    problems = {}
    for field in SAMPLE_SCHEMA:
        if field.name not in schema.names:
            if not field.nullable:
                problems[field.name] = "missing"
        elif schema.field(field.name).type != field.type:
            problems[field.name] = f"type {schema.field(field.name).type}, expected {field.type}"
    return problems


def validate_table(table: pa.Table | pa.RecordBatch, source: str, vocab_size: int | None = None,
                   row_offset: int = 0) -> list[str]:
    """All violations of SAMPLE_SCHEMA in `table`, one line each: file, row, column, problem."""
    names = set(table.schema.names)
    sample_ids = (table.column("sample_id").to_numpy(zero_copy_only=False)
                  if "sample_id" in names and table.schema.field("sample_id").type == pa.string() else None)
    report = _Report(source, sample_ids, row_offset)
    problems = schema_problems(table.schema)
    for name, message in problems.items():
        report.column(name, message)
    usable = {f.name for f in SAMPLE_SCHEMA if f.name in names and f.name not in problems}
    for field in SAMPLE_SCHEMA:
        if field.name not in usable:
            continue
        column = table.column(field.name)
        if not field.nullable and column.null_count:
            report.rows(field.name, np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False)),
                        "null in a required column")
    for name in sorted(names - set(SAMPLE_SCHEMA.names)):
        report.column(name, "not part of the sample schema")

    def col(name):  # one contiguous array per column
        column = table.column(name)
        return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column

    if sample_ids is not None:
        values, first, counts = np.unique(sample_ids.astype(str), return_index=True, return_counts=True)
        dup_rows = np.flatnonzero(np.isin(sample_ids.astype(str), values[counts > 1]))
        report.rows("sample_id", dup_rows, "duplicate sample_id")
    n_frames = None
    if "mel" in usable:   # zero frames is allowed: a text-only sample
        mel = col("mel")
        n_frames = pc.list_value_length(mel).fill_null(0).to_numpy()
        values = mel.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, N_MELS)
        report.rows("mel", _value_rows(mel)[~np.isfinite(values).all(1)], "NaN or inf")
    for name in PER_FRAME_COLUMNS:
        if name not in usable:
            continue
        column = col(name)
        if n_frames is not None:
            lengths = pc.list_value_length(column).fill_null(0).to_numpy()
            bad = np.flatnonzero(lengths != n_frames)
            for row in bad[:MAX_ROWS_LISTED]:
                report.rows(name, np.array([row]), f"{lengths[row]} values for {n_frames[row]} frames")
            if len(bad) > MAX_ROWS_LISTED:
                report.column(name, f"length differs from the frame count in {len(bad) - MAX_ROWS_LISTED} more rows")
        values = column.flatten().to_numpy(zero_copy_only=False)
        rows = _value_rows(column)
        report.rows(name, rows[~np.isfinite(values)], "NaN or inf")
        if name == "f0_hz":
            report.rows(name, rows[values < 0], "negative F0 (use 0 for unvoiced)")
        if name == "voicing":
            report.rows(name, rows[(values < 0) | (values > 1)], "voicing probability outside [0, 1]")
    if "token_ids" in usable:
        column = col("token_ids")
        values = column.flatten().to_numpy(zero_copy_only=False)
        limit = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
        report.rows("token_ids", _value_rows(column)[(values < 0) | (values >= limit)],
                    f"token id outside [0, {limit})")
        if "token_start_frame" in usable and n_frames is not None:
            starts = col("token_start_frame")
            present = ~starts.is_null().to_numpy(zero_copy_only=False)
            n_starts = pc.list_value_length(starts).fill_null(0).to_numpy()
            n_tokens = pc.list_value_length(column).fill_null(0).to_numpy()
            report.rows("token_start_frame", np.flatnonzero(present & (n_starts != n_tokens)),
                        "length differs from the number of tokens")
            start_values = starts.flatten().to_numpy(zero_copy_only=False)
            start_rows = _value_rows(starts)
            report.rows("token_start_frame",
                        start_rows[(start_values < 0) | (start_values >= n_frames[start_rows])],
                        "start frame outside the segment")
    if "sentiment" in usable:
        values = col("sentiment").to_numpy(zero_copy_only=False)
        report.rows("sentiment", np.flatnonzero((values < UNKNOWN) | (values >= N_SENTIMENTS)),
                    "sentiment not 0 (negative), 1 (neutral), 2 (positive) or -1 (unknown)")
    if "speaker_id" in usable:
        values = col("speaker_id").to_numpy(zero_copy_only=False)
        report.rows("speaker_id", np.flatnonzero(values < UNKNOWN), "speaker id below -1 (unknown)")
    for name in ("valence", "arousal"):
        if name in usable:
            values = col(name).to_numpy(zero_copy_only=False).astype(np.float64)
            report.rows(name, np.flatnonzero(np.isinf(values)), "inf")
    if "speaker_embedding" in usable:
        column = col("speaker_embedding")
        values = column.flatten().to_numpy(zero_copy_only=False)
        report.rows("speaker_embedding", _value_rows(column)[~np.isfinite(values)], "NaN or inf")
    return report.lines


def validate_file(path: str | Path, source: str | None = None) -> list[str]:
    """Validate metadata and every row group of a Parquet file, holding one group at a time.
    Problems name the file as `source` (default: the path)."""
    source = source or str(path)
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        return [f"{source}: not a readable Parquet file: {err}"]
    try:
        meta = read_metadata(parquet.schema_arrow, source)
    except ValueError as err:
        return [str(err)]
    vocab_size = meta.get("tokenizer", {}).get("vocab_size")
    problems, offset = [], 0
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group)
        problems += validate_table(table, source, vocab_size, row_offset=offset)
        offset += table.num_rows
    return problems


def summarise_problems(problems: list[str], shown: int = 5) -> str:
    """The first few of a file's problems, for an error message that stays readable."""
    more = len(problems) - shown
    return (f"{len(problems)} problem(s) in its content:\n" + "\n".join(problems[:shown])
            + (f"\n... and {more} more (python schema.py FILE lists them all)" if more > 0 else ""))


# ---------------------------------------------------------------------------------------------
# Flight tickets: the protocol between flight_server.py and ArrowFlightDataset

TICKET_VERSION = 1


@dataclass(frozen=True)
class Ticket:
    file: str                  # relative to the server root
    first_row_group: int
    end_row_group: int         # exclusive
    columns: tuple[str, ...] | None = None
    skip_rows: int = 0         # rows of the range already delivered: a resumed read starts after them

    def encode(self) -> bytes:
        return json.dumps({"v": TICKET_VERSION, "file": self.file,
                           "row_groups": [self.first_row_group, self.end_row_group],
                           "columns": list(self.columns) if self.columns else None,
                           "skip_rows": self.skip_rows}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "Ticket":
        """Raises ValueError saying what is wrong."""
        try:
            data = json.loads(raw)
            if data.get("v") != TICKET_VERSION:
                raise ValueError(f"version {data.get('v')}, expected {TICKET_VERSION}")
            first, end = (int(x) for x in data["row_groups"])
            columns = data.get("columns")
            if columns is not None and not all(isinstance(c, str) for c in columns):
                raise ValueError("columns must be names")
            skip = int(data.get("skip_rows", 0))
            if skip < 0:
                raise ValueError("skip_rows must be >= 0")
            return cls(str(data["file"]), first, end, tuple(columns) if columns else None, skip)
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# Row skipping: a resumed read starts at the first row not yet delivered

def skip_rows_of(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The batches without their first `rows` rows."""
    for batch in batches:
        if rows >= batch.num_rows:
            rows -= batch.num_rows
            continue
        yield batch.slice(rows) if rows else batch
        rows = 0




# ---------------------------------------------------------------------------------------------
# Command line: validate files before serving or training on them

def parquet_files(paths: list[str]) -> list[Path]:
    """Files as given, and every *.parquet under a given folder."""
    found = []
    for path in map(Path, paths):
        found += sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    return found


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(
        prog="schema.py", description="Validate mmtrain Parquet shards: every problem is printed with its "
        "file, row, sample_id and column. Exit status 0: all valid, 1: problems found.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="Parquet files, or folders to search for them")
    args = parser.parse_args(argv)
    files = parquet_files(args.paths)
    if not files:
        print(f"no Parquet files in {' '.join(args.paths)}", file=sys.stderr)
        return 1
    bad = 0
    for path in files:
        problems = validate_file(path)
        bad += bool(problems)
        for line in problems:
            print(line)
        if not problems:
            print(f"{path}: ok ({pq.ParquetFile(path).metadata.num_rows} rows)")
    print(f"{len(files) - bad} of {len(files)} files valid", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
