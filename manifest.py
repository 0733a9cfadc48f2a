"""The manifest a user writes: CSV or JSON lines, one row per recording or spoken segment, read
into typed entries with every problem named by entry and field. Standard library only.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import schema

MANIFEST_HELP = """\
The manifest: CSV with a header, or JSON lines; one row per recording or spoken segment.
  audio           (required) audio file, relative to the manifest's folder: WAV (any sample
                  format), FLAC, OGG, MP3, AIFF...; any rate, any channel count
  text            what is said (absent: unlabelled speech, still trains the autoencoder)
  speaker         a name (absent: unknown speaker)
  sentiment       negative / neutral / positive or 0 / 1 / 2 (absent: unknown)
  doc_id          the recording or conversation the segment belongs to (default: the audio path)
  segment_index   the segment's place in its document (default: manifest order within doc_id)
  start_s, end_s  a part of the audio file only (default: all of it)
  token_ids       token ids instead of the byte tokenizer's (a list, or space-separated in CSV)
  char_start_s    alignment: the start time of each character of text (seconds, in the file)
  token_start_s   alignment with token_ids: the start time of each token
  valence, arousal  continuous affect, optional
Rows longer than --max-positions are split at silences; with an alignment the text follows its
characters into the pieces, without one it is spread over them in proportion to voiced time
(whole words; kept without an alignment). Other column names: --columns audio=path,text=transcript.
"""
REQUIRED_FIELDS = ("audio",)
OPTIONAL_FIELDS = ("text", "speaker", "sentiment", "doc_id", "segment_index", "start_s", "end_s", "token_ids",
                   "char_start_s", "token_start_s", "valence", "arousal")
SENTIMENT_IDS = {name: i for i, name in enumerate(schema.SENTIMENTS)}


def _present(value) -> bool:
    return value not in ("", None)


def _optional_float(value) -> float | None:
    return float(value) if _present(value) else None


def _numbers(value, kind) -> list | None:
    """A list, or space-separated in CSV."""
    if not _present(value):
        return None
    return [kind(t) for t in (value.split() if isinstance(value, str) else value)]


def _sentiment(value) -> int:
    if not _present(value):
        return schema.UNKNOWN
    text = str(value).strip().lower()
    if text in SENTIMENT_IDS:
        return SENTIMENT_IDS[text]
    if text in ("0", "1", "2"):
        return int(text)
    raise ValueError(f"sentiment {value!r} is not one of {', '.join(SENTIMENT_IDS)} or 0/1/2 (or leave it out)")


def parse_columns(spec: str | None) -> dict[str, str]:
    """'audio=path,text=transcript' -> {"path": "audio", "transcript": "text"} (manifest -> ours)."""
    renames = {}
    for item in filter(None, (spec or "").split(",")):
        ours, sep, theirs = item.partition("=")
        if not sep or ours.strip() not in REQUIRED_FIELDS + OPTIONAL_FIELDS:
            raise ValueError(f"--columns {item!r}: use FIELD=COLUMN with FIELD one of "
                             f"{', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)}")
        renames[theirs.strip()] = ours.strip()
    return renames


def read_manifest(path: str | Path, columns: dict[str, str] | None = None, log=print) -> list[dict]:
    """CSV or JSONL -> entries with typed fields (see MANIFEST_HELP); audio paths relative to the
    manifest's folder. `columns` renames the manifest's columns to ours."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            raw = list(csv.DictReader(f))
    else:
        raw = []
        with open(path) as f:
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        raw.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}: line {line_no}: not JSON: {err}") from err
    columns = columns or {}
    raw = [{columns.get(key, key): value for key, value in row.items()} for row in raw]
    ignored = sorted({key for row in raw for key in row} - set(REQUIRED_FIELDS + OPTIONAL_FIELDS))
    if ignored:
        log(f"{path}: ignoring column(s) {', '.join(ignored)} (map them with --columns FIELD=COLUMN)")
    entries, seen, next_index = [], {}, {}
    for number, row in enumerate(raw, 1):
        where = f"{path}: entry {number}"
        missing = [k for k in REQUIRED_FIELDS if not _present(row.get(k))]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        try:
            doc_id = str(row["doc_id"]) if _present(row.get("doc_id")) else str(row["audio"])
            index = int(row["segment_index"]) if _present(row.get("segment_index")) else next_index.get(doc_id, 0)
            entry = {"audio": str(path.parent / row["audio"]),
                     "text": str(row["text"]) if _present(row.get("text")) else None,
                     "speaker": str(row["speaker"]) if _present(row.get("speaker")) else None,
                     "doc_id": doc_id, "segment_index": index, "sentiment": _sentiment(row.get("sentiment")),
                     "start_s": _optional_float(row.get("start_s")), "end_s": _optional_float(row.get("end_s")),
                     "token_ids": _numbers(row.get("token_ids"), int),
                     "char_start_s": _numbers(row.get("char_start_s"), float),
                     "token_start_s": _numbers(row.get("token_start_s"), float),
                     "valence": _optional_float(row.get("valence")), "arousal": _optional_float(row.get("arousal"))}
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from err
        next_index[doc_id] = index + 1
        for name, against, what in (("char_start_s", len(entry["text"] or ""), "characters of text"),
                                    ("token_start_s", len(entry["token_ids"] or []), "token_ids")):
            if entry[name] is not None and len(entry[name]) != against:
                raise ValueError(f"{where}: {name} has {len(entry[name])} values for {against} {what}")
        if entry["char_start_s"] is not None and entry["token_ids"] is not None:
            raise ValueError(f"{where}: with token_ids, give the alignment as token_start_s")
        if entry["start_s"] is not None and entry["end_s"] is not None and entry["end_s"] <= entry["start_s"]:
            raise ValueError(f"{where}: end_s {entry['end_s']} is not after start_s {entry['start_s']}")
        key = (entry["doc_id"], entry["segment_index"])
        if key in seen:
            raise ValueError(f"{where}: doc_id {key[0]!r} segment_index {key[1]} repeats entry {seen[key]}")
        seen[key] = number
        entries.append(entry)
    with_ids = sum(e["token_ids"] is not None for e in entries)
    if 0 < with_ids < len(entries):
        raise ValueError(f"{path}: {with_ids} of {len(entries)} entries give token_ids; give them for all or none")
    return entries
