"""Answers out: what a trained checkpoint (or an exported model) does for a user.

    python model_trainer.py predict  --checkpoint runs/X/best.pt --manifest new.jsonl --out predictions.jsonl
    python model_trainer.py embed    --checkpoint C --data-dir D --out vectors.parquet [--per-position]
    python model_trainer.py evaluate --checkpoint C --data-dir D [--files a.parquet ...]
    python model_trainer.py enroll   --checkpoint C --manifest speakers.jsonl --out C2   # speakers by name
    python model_trainer.py export   --checkpoint C --out DIR

Inputs: --manifest (recordings, prepared here with the model's own feature settings and split
to its context), --data-dir with optional --files (Parquet shards on this machine), or
--flight-host/--port/--files (a data machine). Speakers are matched to the training run's by name.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import itertools
import json
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

import datasets
import features
import flight_client
import packing
import refit
import schema
from checkpoint import CheckpointCorrupt, load_checkpoint, write_atomically
from config import Config, DataConfig, build_config
from custom_transformer import CustomTransformer, Masks
from enrolment import Enrolment, enrol
from evaluation import evaluate
from flight_client import Connection
from live_metrics import json_ready
from manifest import parse_columns
from parallel import choose_device
from schema import N_SENTIMENTS, SENTIMENTS, UNKNOWN, Labels

HIDEABLE = ("text", "audio")   # speaker and sentiment are always read with their own slot hidden


@dataclass
class Trained:
    """A trained model with what its ids mean."""
    model: CustomTransformer
    cfg: Config
    labels: Labels
    source: str
    enrolment: Enrolment | None = None   # speakers named by enrolment score (model_trainer.py enroll)


def load_trained(path: str | Path, device: torch.device) -> Trained:
    """A checkpoint (ckpt-*.pt, best.pt) or an exported folder -> the model in eval mode."""
    path = Path(path)
    if path.is_dir():
        model = CustomTransformer.from_pretrained(path)
        # The run's data settings (its sequence length: how long documents are cut), where exported with them.
        data = json.loads((path / "data.json").read_text()) if (path / "data.json").exists() else None
        cfg = replace(Config(), model=model.cfg, **({"data": DataConfig(**data)} if data else {}))
        labels = Labels(**json.loads((path / "labels.json").read_text()))
        enrolled = json.loads((path / "enrolment.json").read_text()) if (path / "enrolment.json").exists() else None
    else:
        try:
            state = load_checkpoint(path)
        except FileNotFoundError:
            raise ValueError(f"--checkpoint {path}: no such file") from None
        lacking = [key for key in ("model", "config") if key not in state]
        if lacking:
            raise CheckpointCorrupt(f"{path}: not a training checkpoint (it lacks {', '.join(lacking)})")
        cfg = build_config(state["config"])
        model = CustomTransformer(cfg.model)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:
            raise ValueError(f"{path}: its weights do not fit this version's model (written by an earlier version "
                             f"of mmtrain?): {str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}"
                             ) from None
        if "labels" not in state:
            print(f"note: {path} was written before speaker names were kept in checkpoints: speakers are "
                  f"reported by id (speaker-0, speaker-1, ...) in the numbering of the run's training files",
                  file=sys.stderr)
        labels = (Labels(**state["labels"]) if "labels" in state
                  else Labels([f"speaker-{i}" for i in range(cfg.model.n_speakers)]))
        enrolled = state.get("enrolment")
    enrolment = None
    if enrolled:
        try:
            enrolment = Enrolment.from_state(enrolled)
        except ValueError as err:
            print(f"note: {path}: {err}; until then speakers are named by the speaker head", file=sys.stderr)
    return Trained(model.to(device).eval(), cfg, labels, str(path), enrolment)


# ---------------------------------------------------------------------------------------------
# Inputs

def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="ckpt-*.pt or best.pt of a run, or an exported folder")
    source = parser.add_argument_group("input (one of)")
    source.add_argument("--manifest", help="recordings (CSV/JSONL, as for features.py prepare)")
    source.add_argument("--data-dir", help="folder of Parquet shards on this machine")
    flight_client.add_arguments(parser, hosts_group=source)
    parser.add_argument("--files", nargs="+", help="files under --data-dir or on the server (default: all)")
    parser.add_argument("--columns", help="with --manifest: its column names, e.g. audio=path,text=transcript")
    parser.add_argument("--batch-size", type=int, help="sequences per batch (default: the run's data.batch_size)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def open_inputs(args, trained: Trained, cleanup: contextlib.ExitStack) -> datasets._PackedStream:
    """The input files as a dataset in file order, speakers mapped onto the run's by name."""
    cfg = trained.cfg
    layout = packing.SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
    batch_size = args.batch_size or cfg.data.batch_size
    chosen = [bool(args.manifest), bool(args.data_dir), bool(args.flight_host)]
    if sum(chosen) != 1:
        raise ValueError("give one input: --manifest, --data-dir or --flight-host")
    if args.flight_host:
        dataset = datasets.ArrowFlightDataset.configured(Connection.from_args(args), args.files, layout, cfg.data,
                                                         shuffle=False, batch_size=batch_size)
    else:
        if args.manifest:
            folder = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="mmtrain-inputs-")))
            features.prepare(args.manifest, folder, columns=parse_columns(args.columns),
                             max_positions=cfg.data.max_seq_len, frames_per_position=cfg.model.frames_per_position,
                             mix_documents=False, log=lambda line: print(line, file=sys.stderr))
            files = sorted(folder.glob("*.parquet"))
        else:
            root = Path(args.data_dir)
            files = [root / f for f in args.files] if args.files else sorted(root.rglob("*.parquet"))
        if not files:
            raise ValueError("no input files")
        dataset = datasets.LocalParquetDataset(files, layout, batch_size, shuffle=False)
    dataset.use_speakers(trained.labels.speakers)
    return dataset


def input_segments(dataset, filled: set[str] | None = None, chars_per_second: float = 14.0):
    """(position, segment) in file order. With a `filled` set, a segment without text gets
    placeholder tokens spread evenly over its audio (about `chars_per_second`), to be read; its
    sample_id goes into the set."""
    for position, segment in dataset.segments(dataset.endpoints()):
        if filled is not None and len(segment.token_ids) == 0 and len(segment.mel):
            n = 2 + max(1, round(len(segment.mel) / 100.0 * chars_per_second))
            segment = replace(segment, token_ids=np.zeros(n, np.int32),
                              token_start_frame=np.linspace(0, len(segment.mel) - 1, n).astype(np.int32))
            filled.add(segment.sample_id)
        yield position, segment


def document_sequences(items, layout: packing.SequenceLayout):
    """Sequences to read answers from: each document is packed on its own (a long one cut at the
    same places whatever came before it), and its pieces share a sequence with other documents
    only whole. Attention never crosses documents, so a segment's answer depends on its own
    document alone, not on the input's order or path (--manifest, --data-dir, a server)."""
    row, used = [], 0
    for _, document in itertools.groupby(items, key=lambda item: item[1].doc_id):
        for _, piece in packing.pack_sequences(document, layout):
            need = sum(layout.positions(segment) for segment in piece)
            if row and used + need > layout.max_seq_len:
                yield row
                row, used = [], 0
            row, used = row + piece, used + need
    if row:
        yield row


def input_batches(dataset, segments):
    layout = dataset.layout
    group = []
    for sequence in document_sequences(segments, layout):
        group.append(sequence)
        if len(group) == dataset.batch_size:
            yield packing.collate(group, layout), [s for seq in group for s in seq]
            group = []
    if group:
        yield packing.collate(group, layout), [s for seq in group for s in seq]


def hiding(batch: packing.Batch, hide: set[str], k: int) -> Masks:
    n_segments = len(batch.n_tokens)
    return Masks(*(torch.full((n,), name in hide) for name, n in (
        ("text", len(batch.token_ids)), ("audio", len(batch.mel) // k),
        ("speaker", n_segments), ("sentiment", n_segments))))


# ---------------------------------------------------------------------------------------------
# Commands

def predict(args) -> int:
    device, _ = choose_device(args.device)
    trained = load_trained(args.checkpoint, device)
    hide = set(args.hide)
    tokenizer = features.ByteTokenizer()
    k = trained.cfg.model.frames_per_position
    labels = trained.labels
    written = 0
    with contextlib.ExitStack() as cleanup:
        dataset = open_inputs(args, trained, cleanup)
        byte_tokens = all(m["tokenizer"].get("name") == tokenizer.name for m in dataset.metadata().values())
        filled: set[str] = set()   # segments without text whose text is read from their audio
        out = cleanup.enter_context(open(args.out, "w"))
        progress = cleanup.enter_context(tqdm(desc="predict", unit="seg", disable=None))
        segments_in = input_segments(dataset, filled if byte_tokens else None, args.chars_per_second)
        for batch, segments in input_batches(dataset, segments_in):
            # The labels are read from the rest: a slot the input fills would only be copied back.
            masks = hiding(batch, hide | {"speaker", "sentiment"}, k)
            outputs = trained.model.infer(batch.to(device), masks.to(device))
            sentiment = outputs.sentiment_logits.softmax(-1).cpu()
            speaker = outputs.speaker_logits.softmax(-1).cpu()
            if trained.enrolment:
                nearest, scores = trained.enrolment.score(outputs.segment_vectors.cpu().numpy())
            text_ids = outputs.text_logits.argmax(-1).cpu()
            token_end = np.cumsum(batch.n_tokens.numpy())
            frame_end = np.cumsum(batch.n_frames.numpy())
            for i, segment in enumerate(segments):
                record = {"sample_id": segment.sample_id, "doc_id": segment.doc_id}
                probabilities = {name: round(float(p), 4) for name, p in zip(labels.sentiments, sentiment[i])}
                record["sentiment"] = {"label": max(probabilities, key=probabilities.get),
                                       "probabilities": probabilities,
                                       "given": labels.sentiments[segment.sentiment] if segment.sentiment != UNKNOWN else None}
                given = segment.speaker_name or (labels.speakers[segment.speaker_id]
                                                 if segment.speaker_id != UNKNOWN else None)
                if trained.enrolment:   # the best-scoring enrolled speaker, unknown below the threshold
                    match = trained.enrolment.speakers[nearest[i]]
                    threshold = (trained.enrolment.threshold if args.speaker_threshold is None
                                 else args.speaker_threshold)
                    record["speaker"] = {"label": match if scores[i] >= threshold else "unknown",
                                         "score": round(float(scores[i]), 4), "threshold": round(threshold, 4),
                                         "best_match": match, "given": given}
                else:   # not enrolled: the speaker head's probability
                    best = int(speaker[i].argmax())
                    threshold = 0.5 if args.speaker_threshold is None else args.speaker_threshold
                    confident = float(speaker[i, best]) >= threshold and best < len(labels.speakers)
                    record["speaker"] = {"label": labels.speakers[best] if confident else "unknown",
                                         "probability": round(float(speaker[i, best]), 4),
                                         "best_match": labels.speakers[best] if best < len(labels.speakers) else None,
                                         "given": given}
                if byte_tokens and ("text" in hide or segment.sample_id in filled):
                    tokens = text_ids[token_end[i] - len(segment.token_ids):token_end[i]]
                    record["text"] = {"read": tokenizer.decode(tokens.tolist()),
                                      "given": None if segment.sample_id in filled
                                      else tokenizer.decode(segment.token_ids.tolist())}
                if "audio" in hide and len(segment.mel):
                    frames = slice(frame_end[i] - batch.n_frames[i].item(), frame_end[i] - batch.n_frames[i].item()
                                   + len(segment.mel))
                    voicing = outputs.voicing[frames].cpu()
                    record["audio"] = {"f0_hz": [round(float(f), 1) if v >= 0.5 else 0.0
                                                 for f, v in zip(outputs.f0_hz[frames].cpu(), voicing)],
                                       "voicing": [round(float(v), 3) for v in voicing]}
                out.write(json.dumps(record) + "\n")
                written += 1
            progress.update(len(segments))
    print(f"wrote {written} prediction(s) to {args.out}", file=sys.stderr)
    return 0


def embed(args) -> int:
    device, _ = choose_device(args.device)
    trained = load_trained(args.checkpoint, device)
    k = trained.cfg.model.frames_per_position
    rows: dict[str, list] = {"sample_id": [], "doc_id": [], "vector": []}
    positions: dict[str, list] = {"sample_id": [], "position": [], "vector": []}
    with contextlib.ExitStack() as cleanup:
        dataset = open_inputs(args, trained, cleanup)
        for batch, segments in tqdm(input_batches(dataset, input_segments(dataset)), desc="embed",
                                    unit="batch", disable=None):
            # Labels the input gives would be read back from the vector: hidden unless asked for.
            hidden_slots = set() if args.with_labels else {"speaker", "sentiment"}
            outputs = trained.model.infer(batch.to(device), hiding(batch, hidden_slots, k).to(device))
            lengths = packing.segment_positions(batch.n_tokens, batch.n_frames, k).tolist()
            starts = outputs.grid.speaker_index.cpu().tolist()   # each segment's first position
            hidden = outputs.hidden.float().cpu()
            means = outputs.segment_vectors.cpu().numpy()
            for i, (segment, start, length) in enumerate(zip(segments, starts, lengths)):
                rows["sample_id"].append(segment.sample_id)
                rows["doc_id"].append(segment.doc_id)
                rows["vector"].append(means[i])
                if args.per_position:
                    positions["sample_id"] += [segment.sample_id] * length
                    positions["position"] += list(range(length))
                    positions["vector"] += list(hidden[start:start + length].numpy())
    width = trained.cfg.model.d_model

    def table(columns):
        flat = np.stack(columns["vector"]).astype(np.float32).reshape(-1) if columns["vector"] else np.zeros(0, np.float32)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(flat), width)
        return pa.table({**{k: v for k, v in columns.items() if k != "vector"}, "vector": vectors})

    pq.write_table(table(rows), args.out)
    if args.per_position:
        per_position = Path(args.out).with_suffix(".positions.parquet")
        pq.write_table(table(positions), per_position)
        print(f"per-position vectors: {per_position}", file=sys.stderr)
    print(f"wrote {len(rows['sample_id'])} segment vector(s) of {width} values to {args.out}", file=sys.stderr)
    return 0


@dataclass
class Readings:
    """Segments read with every label hidden, as `predict` reads them."""
    vectors: np.ndarray            # (segments, d): each segment's mean encoder output (enrolment's vectors)
    sentiment_inputs: np.ndarray   # (segments, d): what the sentiment head reads
    segments: list


def read_segments(model: CustomTransformer, dataset, device, per_label: int | None = None) -> Readings:
    """The input's segments in order; with `per_label`, reading stops once every speaker the
    input names has that many and at least that many per sentiment were read (a long corpus is
    not read whole to enrol its speakers)."""
    k = model.cfg.frames_per_position
    vectors, sentiment_inputs, segments_out = [], [], []
    named = collections.Counter()
    wanted = {name for names in dataset.file_speakers().values() for name in (names or {})}
    was_training = model.training
    model.eval()
    try:
        for batch, segments in tqdm(input_batches(dataset, input_segments(dataset)), desc="reading segments",
                                    unit="batch", disable=None):
            outputs = model.infer(batch.to(device), hiding(batch, {"speaker", "sentiment"}, k).to(device))
            vectors.append(outputs.segment_vectors.cpu().numpy())
            sentiment_inputs.append(outputs.sentiment_inputs.cpu().numpy())
            segments_out += segments
            named.update(segment.speaker_name for segment in segments if segment.speaker_name)
            if (per_label and all(named[name] >= per_label for name in wanted)
                    and len(segments_out) >= per_label * N_SENTIMENTS):
                break
    finally:
        model.train(was_training)
    empty = np.zeros((0, model.cfg.d_model), np.float32)
    return Readings(np.concatenate(vectors) if vectors else empty,
                    np.concatenate(sentiment_inputs) if sentiment_inputs else empty, segments_out)


def enrol_speakers(readings: Readings, previous: Enrolment | None = None) -> tuple[Enrolment, collections.Counter]:
    """The speakers the readings name, enrolled (added to `previous`); -> it and the segments per speaker."""
    named = [i for i, segment in enumerate(readings.segments) if segment.speaker_name]
    if not named:
        raise ValueError("no segment of the input names its speaker: enrolment needs labelled recordings")
    names = [readings.segments[i].speaker_name for i in named]
    return enrol(readings.vectors[named], names, previous), collections.Counter(names)


def refit_sentiment_head(model: CustomTransformer, readings: Readings) -> str:
    """The sentiment head refit on the readings' labelled segments (refit.py); -> what was done."""
    labelled = [i for i, segment in enumerate(readings.segments) if segment.sentiment != UNKNOWN]
    labels = np.array([readings.segments[i].sentiment for i in labelled], np.int64)
    if not refit.enough_labels(labels):
        return "sentiment head kept as trained (fewer than two sentiments labelled in the segments read)"
    weight, bias = refit.fit_linear(readings.sentiment_inputs[labelled], labels, N_SENTIMENTS)
    head = model.sentiment_head
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(weight, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(bias, dtype=head.bias.dtype))
    return (f"sentiment head refit on {len(labelled)} labelled segment(s) as predict reads them "
            f"({', '.join(f'{n} {c}' for n, c in zip(SENTIMENTS, np.bincount(labels, minlength=N_SENTIMENTS)))})")


def describe_enrolment(enrolment: Enrolment, counts: collections.Counter) -> str:
    calibration = enrolment.calibration
    return (f"enrolled {len(counts)} speaker(s) from {sum(counts.values())} segment(s) "
            f"({', '.join(f'{n} {c}' for n, c in counts.most_common(12))}{' ...' if len(counts) > 12 else ''}); "
            f"{len(enrolment.speakers)} in all; unknown below a score of {enrolment.threshold:.3f} (a segment's "
            f"cosine to a speaker, in spreads from that speaker's typical one)"
            + (f" (equal error rate {calibration['equal_error_rate']:.3f} on {calibration['trials']} held-out "
               f"segment(s))" if calibration else ""))


def enroll(args) -> int:
    """Speakers by enrolment: the checkpoint gains each named speaker's centroid (added to those
    it has), and `predict` names speakers by cosine score. With --refit-sentiment the sentiment
    head is refit on the input too: what a run does with its training files at its end, for a
    checkpoint written before it (best.pt, ckpt-N.pt) or by an FSDP run."""
    device, _ = choose_device(args.device)
    trained = load_trained(args.checkpoint, device)
    if Path(args.checkpoint).is_dir():
        raise ValueError(f"--checkpoint {args.checkpoint}: enroll into a checkpoint file (ckpt-*.pt, best.pt), "
                         "then export it")
    with contextlib.ExitStack() as cleanup:
        readings = read_segments(trained.model, open_inputs(args, trained, cleanup), device)
    enrolment, counts = enrol_speakers(readings, trained.enrolment)
    state = load_checkpoint(Path(args.checkpoint))
    if args.refit_sentiment:
        print(refit_sentiment_head(trained.model, readings), file=sys.stderr)
        state["model"] = {**state["model"], **{f"sentiment_head.{name}": value.detach().cpu() for name, value
                                                in trained.model.sentiment_head.state_dict().items()}}
    write_atomically(Path(args.out), {**state, "enrolment": enrolment.state_dict()})
    print(f"{describe_enrolment(enrolment, counts)}: {args.out}", file=sys.stderr)
    return 0


def evaluate_command(args) -> int:
    device, _ = choose_device(args.device)
    trained = load_trained(args.checkpoint, device)
    with contextlib.ExitStack() as cleanup:
        dataset = open_inputs(args, trained, cleanup)
        results = evaluate(trained.model, dataset, trained.cfg, device, torch.float32)
    print(json.dumps({"checkpoint": trained.source, "files": len(dataset.files), **json_ready(results)}, indent=2))
    return 0


def export(args) -> int:
    trained = load_trained(args.checkpoint, torch.device("cpu"))
    trained.model.export(args.out, {"labels": trained.labels.state_dict(), "data": asdict(trained.cfg.data),
                                    **({"enrolment": trained.enrolment.state_dict()} if trained.enrolment else {})})
    print(f"exported {trained.source} to {args.out}: model.safetensors, config.json, labels.json, data.json "
          f"(CustomTransformer.from_pretrained({str(args.out)!r}))", file=sys.stderr)
    return 0


def main(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"model_trainer.py {command}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if command == "export":
        parser.add_argument("--checkpoint", required=True)
        parser.add_argument("--out", required=True, help="folder for model.safetensors, config.json, labels.json")
    else:
        add_input_arguments(parser)
    if command == "predict":
        parser.add_argument("--out", required=True, help="JSON lines, one per segment")
        parser.add_argument("--hide", nargs="+", choices=HIDEABLE, default=[],
                            help="also read these from the rest where the input has them (default: text is read "
                                 "where the input lacks it; speaker and sentiment are always read)")
        parser.add_argument("--speaker-threshold", type=float,
                            help="below this the speaker is reported as unknown: an enrolment score (a cosine in units "
                                 "of the speaker's spread; default: the enrolment's calibrated threshold), else a "
                                 "probability of the speaker head (default 0.5)")
        parser.add_argument("--chars-per-second", type=float, default=14.0,
                            help="for a segment without text: how many characters to read from its audio")
    elif command == "enroll":
        parser.add_argument("--out", required=True, help="the checkpoint with the speakers enrolled (may be --checkpoint)")
        parser.add_argument("--refit-sentiment", action="store_true",
                            help="also refit the sentiment head on the input's labelled segments, as a run does with "
                                 "its training files at its end (for best.pt, an earlier ckpt-N.pt or an FSDP run: "
                                 "give the training files)")
    elif command == "embed":
        parser.add_argument("--out", required=True, help="Parquet: sample_id, doc_id, vector")
        parser.add_argument("--per-position", action="store_true", help="also every position's vector (OUT.positions.parquet)")
        parser.add_argument("--with-labels", action="store_true",
                            help="let the input's speaker and sentiment labels into the vectors (default: vectors "
                                 "from the audio and text alone)")
    args = parser.parse_args(argv)
    try:
        return COMMANDS[command](args)
    except (ValueError, OSError, schema.DataError, features.AudioError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


COMMANDS = {"predict": predict, "embed": embed, "enroll": enroll, "evaluate": evaluate_command, "export": export}
