"""Feature extraction: recordings and transcripts -> the Parquet sample schema.

Audio: any format libsndfile reads (WAV of every sample format, FLAC, OGG, MP3; torchaudio 2.9
reads no files itself) -> mono float -> resample -> 80-bin log-mel at
100 frames/s, a YIN pitch track (F0 in Hz, 0 when unvoiced, plus a voicing probability) and
log energy, all on the same frame grid. Text: UTF-8 bytes plus special tokens, unless the
manifest gives token ids.

    python features.py prepare --manifest recordings.jsonl --out data/mycorpus
"""
from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import math
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import soundfile
import torch
import torchaudio
from tqdm import tqdm

import schema
from manifest import MANIFEST_HELP, parse_columns, read_manifest


@dataclass(frozen=True)
class FeatureConfig:
    sample_rate: int = 16000
    n_fft: int = 400          # 25 ms analysis window
    hop_length: int = 160     # 10 ms -> 100 frames/s
    n_mels: int = field(default=schema.N_MELS, init=False)   # the schema's; recorded in shard metadata
    f0_min: float = 50.0
    f0_max: float = 550.0
    f0_method: str = "yin"
    yin_threshold: float = 0.15   # CMNDF dip below this counts as a period (de Cheveigne & Kawahara)
    voicing_threshold: float = 0.5

    def n_frames(self, n_samples: int) -> int:
        return 1 + n_samples // self.hop_length


# ---------------------------------------------------------------------------------------------
# Text

class ByteTokenizer:
    """UTF-8 bytes shifted past a few special tokens: needs no vocabulary file, covers any text."""

    PAD, BOS, EOS, MASK = 0, 1, 2, 3
    N_SPECIAL = 4
    vocab_size = 256 + N_SPECIAL
    name = "bytes-v1"

    def encode(self, text: str) -> list[int]:
        return [self.BOS] + [b + self.N_SPECIAL for b in text.encode("utf-8")] + [self.EOS]

    def token_starts(self, text: str, char_starts: list[int], last_frame: int) -> list[int]:
        """Per-token start frames from per-character ones: a character's bytes share its start;
        BOS starts the segment, EOS its last frame."""
        starts = [0]
        for ch, start in zip(text, char_starts):
            starts += [start] * len(ch.encode("utf-8"))
        return starts + [last_frame]

    def decode(self, ids) -> str:
        data = bytes(i - self.N_SPECIAL for i in ids if i >= self.N_SPECIAL)
        return data.decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {"name": self.name, "vocab_size": self.vocab_size, "pad": self.PAD, "bos": self.BOS,
                "eos": self.EOS, "mask": self.MASK}


# ---------------------------------------------------------------------------------------------
# Audio

class AudioError(ValueError):
    """A recording that cannot be used (unreadable, unsupported encoding, empty)."""


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64", ".rf64")


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """An audio file -> (mono float32 in [-1, 1], sample rate). libsndfile (soundfile) decodes
    WAV in every sample format (8-32 bit integer, float, WAVE_FORMAT_EXTENSIBLE), FLAC, OGG/Vorbis,
    Opus, MP3, AIFF and more; channels are averaged."""
    if not Path(path).is_file():
        raise AudioError(f"{path}: no such file")
    try:
        samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, RuntimeError, OSError) as err:
        # libsndfile says "does not exist ... (possibly a pipe?)" of files it cannot parse
        raise AudioError(f"{path}: cannot read audio: not a format libsndfile decodes, or damaged "
                         f"({type(err).__name__})") from err
    if samples.size == 0:
        raise AudioError(f"{path}: no audio samples")
    mono = samples.mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioError(f"{path}: NaN or infinite samples")
    return np.ascontiguousarray(mono, dtype=np.float32), int(rate)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Mono float in [-1, 1] -> 16-bit PCM WAV."""
    soundfile.write(str(path), np.clip(samples, -1.0, 1.0), sample_rate, subtype="PCM_16")


def _frames(signal: torch.Tensor, frame_length: int, hop: int, lead: int) -> torch.Tensor:
    """Frames starting `lead` samples before t*hop (zero padded), one per mel frame:
    (1 + n//hop, frame_length)."""
    padded = torch.nn.functional.pad(signal, (lead, frame_length))
    return padded.unfold(0, frame_length, hop)[: 1 + signal.numel() // hop]


def yin_pitch(signal: torch.Tensor, cfg: FeatureConfig, chunk_frames: int = 4096
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """YIN F0 on the mel frame grid -> (f0_hz with 0 where unvoiced, voicing probability).

    Difference function via FFT correlation, cumulative-mean normalisation, absolute threshold
    with descent to the local minimum, parabolic interpolation for sub-sample lags.
    """
    sr = cfg.sample_rate
    min_lag = max(2, int(sr / cfg.f0_max))
    max_lag = int(math.ceil(sr / cfg.f0_min))
    window = cfg.n_fft
    # The analysis window is centred on the frame time; the lags reach past it.
    frames = _frames(signal.double(), window + max_lag + 1, cfg.hop_length, lead=window // 2)
    f0_out, prob_out = [], []
    for chunk in frames.split(chunk_frames):
        head = chunk[:, :window]
        n = 1 << (window + chunk.shape[1] - 1).bit_length()
        corr = torch.fft.irfft(torch.fft.rfft(chunk, n) * torch.fft.rfft(head, n).conj(), n)
        corr = corr[:, : max_lag + 2]
        energy = torch.nn.functional.pad(chunk.square().cumsum(1), (1, 0))
        lags = torch.arange(max_lag + 2)
        shifted_energy = energy[:, lags + window] - energy[:, lags]
        diff = (energy[:, window:window + 1] + shifted_energy - 2.0 * corr).clamp_min(0.0)
        cumulative = diff[:, 1:].cumsum(1)
        cmndf = torch.ones_like(diff)
        cmndf[:, 1:] = diff[:, 1:] * lags[1:] / cumulative.clamp_min(1e-12)

        search = cmndf[:, min_lag:max_lag + 1]
        below = search < cfg.yin_threshold
        first = torch.where(below.any(1), below.float().argmax(1), search.argmin(1))
        # Descend from the first dip to the bottom of its valley.
        idx = torch.arange(search.shape[1])
        rising = torch.zeros_like(below)
        rising[:, :-1] = search[:, 1:] >= search[:, :-1]
        rising[:, -1] = True
        bottom = (rising & (idx[None] >= first[:, None])).float().argmax(1)
        lag = bottom + min_lag

        rows = torch.arange(chunk.shape[0])
        left, mid, right = cmndf[rows, lag - 1], cmndf[rows, lag], cmndf[rows, lag + 1]
        curvature = left - 2.0 * mid + right
        offset = torch.where(curvature > 1e-9, 0.5 * (left - right) / curvature, torch.zeros_like(mid))
        refined = lag.double() + offset.clamp(-1.0, 1.0)
        silent = energy[:, window] < 1e-10 * window       # below -100 dBFS: nothing to track
        prob = torch.where(silent, 0.0, (1.0 - mid).clamp(0.0, 1.0))
        voiced = prob >= cfg.voicing_threshold
        f0_out.append(torch.where(voiced, sr / refined, torch.zeros_like(refined)))
        prob_out.append(prob)
    return torch.cat(f0_out).float(), torch.cat(prob_out).float()


class FeatureExtractor:
    def __init__(self, cfg: FeatureConfig = FeatureConfig()):
        self.cfg = cfg
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
            n_mels=cfg.n_mels, center=True, power=2.0)

    @torch.no_grad()
    def __call__(self, samples: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        cfg = self.cfg
        signal = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        if sample_rate != cfg.sample_rate:
            signal = torchaudio.functional.resample(signal, sample_rate, cfg.sample_rate)
        n_frames = cfg.n_frames(signal.numel())
        log_mel = torch.log(self.mel(signal) + 1e-6).T[:n_frames]
        frames = _frames(signal, cfg.n_fft, cfg.hop_length, lead=cfg.n_fft // 2)
        log_energy = torch.log(frames.square().mean(1) + 1e-8)
        f0, voicing = yin_pitch(signal, cfg)
        return {"mel": log_mel.numpy().astype(np.float16), "f0_hz": f0.numpy(),
                "voicing": voicing.numpy(), "energy": log_energy.numpy().astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# Manifest -> Parquet

def silence_cuts(energy: np.ndarray, token_frames: np.ndarray, tokens_per_piece: int, max_positions: int,
                 frames_per_position: int) -> list[int] | None:
    """Frames at which to cut a recording so that every piece fits `max_positions`: each cut at
    the quietest moment (energy smoothed over 0.1 s) in the second half of the longest piece that
    still fits. Tokens belong to the piece their start frame falls in. None: even one frame and
    its tokens do not fit."""
    n = len(energy)
    smooth = np.convolve(energy, np.ones(11) / 11, mode="same")
    cuts, start = [], 0
    while True:
        ends = np.arange(start + 1, n + 1)
        tokens = (np.searchsorted(token_frames, ends, side="left") - np.searchsorted(token_frames, start, side="left"))
        need = 2 + tokens + (tokens > 0) * tokens_per_piece + -(-(ends - start) // frames_per_position)
        fitting = ends[need <= max_positions]
        if not len(fitting):
            return None
        longest = int(fitting[-1])
        if longest == n:
            return cuts
        low = start + max(1, (longest - start) // 2)
        cut = low + int(np.argmin(smooth[low:longest + 1]))
        cuts.append(cut)
        start = cut


_EXTRACTORS: dict[FeatureConfig, FeatureExtractor] = {}   # one per process and configuration


def sample_rows(entry: dict, cfg: FeatureConfig, speaker_ids: dict[str, int], max_positions: int,
                frames_per_position: int) -> list[dict] | str:
    """One manifest entry -> rows of the sample schema (several when it is split at silences to
    fit `max_positions`), or why its audio cannot be used."""
    try:
        samples, rate = read_audio(entry["audio"])
    except AudioError as err:
        return str(err)
    offset_s = entry["start_s"] or 0.0
    if entry["start_s"] is not None or entry["end_s"] is not None:
        samples = samples[int(offset_s * rate):int(entry["end_s"] * rate) if entry["end_s"] is not None else None]
        if samples.size == 0:
            return f"{entry['audio']}: no audio between start_s {entry['start_s']} and end_s {entry['end_s']}"
    extractor = _EXTRACTORS.setdefault(cfg, FeatureExtractor(cfg))
    tokenizer = ByteTokenizer()
    feats = extractor(samples, rate)
    n_frames = len(feats["mel"])

    def frame(seconds):
        return min(n_frames - 1, max(0, round((seconds - offset_s) * cfg.sample_rate / cfg.hop_length)))

    text, token_ids = entry["text"], entry["token_ids"]
    if token_ids is not None:    # the manifest's own tokens, aligned or not
        units, starts = list(token_ids), [frame(t) for t in entry["token_start_s"]] if entry["token_start_s"] else None
        tokens_per_piece = 0
    elif text is not None:       # characters, each encoded with BOS/EOS around the piece
        units = list(text)
        starts = [frame(t) for t in entry["char_start_s"]] if entry["char_start_s"] else None
        tokens_per_piece = 2
    else:
        units, starts, tokens_per_piece = [], None, 0
    unit_tokens = (np.ones(len(units), np.int64) if token_ids is not None
                   else np.array([len(ch.encode("utf-8")) for ch in units], np.int64))
    total = 2 + int(unit_tokens.sum()) + tokens_per_piece + -(-n_frames // frames_per_position)
    cuts, spread = [], False
    if total > max_positions:
        if units and starts is None:   # no alignment: the text is spread over the voiced time, words whole
            starts, spread = spread_over_voice(units, feats["voicing"], token_ids is None), True
        token_frames = np.repeat(np.asarray(starts or [], np.int64), unit_tokens) if units else np.zeros(0, np.int64)
        cuts = silence_cuts(feats["energy"], np.sort(token_frames), tokens_per_piece, max_positions,
                            frames_per_position)
        if cuts is None:
            return f"{entry['audio']}: cannot be split to fit --max-positions {max_positions}"
    bounds = [0, *cuts, n_frames]
    rows = []
    for piece, (first, end) in enumerate(zip(bounds, bounds[1:])):
        chosen = ([i for i, start in enumerate(starts) if first <= start < end] if starts is not None
                  else list(range(len(units))))
        aligned = starts is not None and not spread   # a spread is no alignment: only the text's share
        if token_ids is not None:
            piece_tokens = [token_ids[i] for i in chosen]
            piece_starts = [starts[i] - first for i in chosen] if aligned else None
            piece_text = text
        elif text is not None:
            piece_text = "".join(units[i] for i in chosen)
            piece_text = piece_text.strip() if spread else piece_text
            piece_tokens = tokenizer.encode(piece_text)
            piece_starts = (tokenizer.token_starts(piece_text, [starts[i] - first for i in chosen], end - first - 1)
                            if aligned else None)
        else:
            piece_text, piece_tokens, piece_starts = None, [], None
        suffix = f".{piece:03d}" if len(bounds) > 2 else ""
        rows.append({"sample_id": f"{entry['doc_id']}/{entry['segment_index']:05d}{suffix}",
                     "doc_id": entry["doc_id"], "segment_index": entry["segment_index"], "text": piece_text,
                     "token_ids": np.asarray(piece_tokens, dtype=np.int32),
                     "speaker_id": speaker_ids[entry["speaker"]] if entry["speaker"] is not None else schema.UNKNOWN,
                     "sentiment": entry["sentiment"], "valence": entry["valence"], "arousal": entry["arousal"],
                     "token_start_frame": piece_starts, "text_spread": spread,
                     **{name: values[first:end] for name, values in feats.items()}})
    return rows


def spread_over_voice(units: list, voicing: np.ndarray, words: bool) -> list[int]:
    """Approximate start frames for text without an alignment: the units (characters, or tokens)
    laid over the voiced frames in order, each word starting where its first character falls
    (so a cut at a silence never splits a word)."""
    voiced = np.flatnonzero(voicing >= 0.5)
    if len(voiced) == 0:
        voiced = np.arange(len(voicing))
    starts = [int(voiced[min(len(voiced) - 1, i * len(voiced) // max(1, len(units)))]) for i in range(len(units))]
    if words:
        for i in range(1, len(units)):
            if not units[i - 1].isspace() and not units[i].isspace():
                starts[i] = starts[i - 1]
    return starts


class Progress:
    """Progress of a long job: a bar on a terminal, else a line every `every` of the work with
    rate and time left (logs and CI show something)."""

    def __init__(self, total: int, what: str, log=print, every: float = 0.05):
        self.total, self.what, self.log, self.every = total, what, log, every
        self.done, self.started, self.next_report = 0, time.monotonic(), every
        self.bar = tqdm(total=total, desc=what, unit="seg") if sys.stderr.isatty() else None

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar:
            self.bar.update(count)
            return
        share = self.done / max(self.total, 1)
        if share >= self.next_report or self.done == self.total:
            rate = self.done / max(time.monotonic() - self.started, 1e-9)
            left = (self.total - self.done) / rate if rate else float("inf")
            self.log(f"{self.what}: {self.done}/{self.total} ({100 * share:.0f}%), {rate:.1f}/s, about {left:.0f} s left")
            self.next_report = (int(share / self.every) + 1) * self.every

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def prepare(manifest: str | Path, out_dir: str | Path, rows_per_shard: int = 4096,
            rows_per_group: int | None = None, cfg: FeatureConfig = FeatureConfig(),
            speaker_ids: dict[str, int] | None = None, workers: int = 1, log=print,
            columns: dict[str, str] | None = None, max_positions: int = 768,
            frames_per_position: int = 4, mix_documents: bool = True) -> list[Path]:
    """Extract features for every manifest entry and write Parquet shards; returns their paths.

    Entries whose audio cannot be used are reported by path and skipped; the rest is written.
    Entries longer than `max_positions` (the data.max_seq_len to train with) are split at
    silences. Shards hold fixed runs of the manifest's documents in a hashed order (with
    `mix_documents`; else in the manifest's order), each document whole with its segments in
    order, and record a fingerprint of their inputs, so a rerun skips the shards that are already finished. `workers` > 1 extracts in
    parallel. Raises ValueError when nothing could be written."""
    entries = read_manifest(manifest, columns, log)
    named = sorted({e["speaker"] for e in entries if e["speaker"] is not None})
    if speaker_ids is None:
        speaker_ids = {name: i for i, name in enumerate(named)}
    unknown = sorted(set(named) - set(speaker_ids))
    if unknown:
        raise ValueError(f"{manifest}: speakers {unknown} have no id")
    if entries and entries[0]["token_ids"] is not None:
        tokenizer_info = {"name": "manifest-token-ids",
                          "vocab_size": 1 + max((max(e["token_ids"], default=0) for e in entries), default=0)}
    else:
        tokenizer_info = ByteTokenizer().describe()
    # For training, documents in an order of their own (a hash of doc_id), each kept whole: a
    # manifest sorted by speaker or date must not give row groups of one speaker, which the
    # training-time shuffle (row groups per epoch, sequences within windows) could not mix. For
    # prediction, the manifest's order.
    first_seen = {}
    for number, entry in enumerate(entries):
        first_seen.setdefault(entry["doc_id"], number)
    entries.sort(key=lambda e: (hashlib.sha256(e["doc_id"].encode()).hexdigest() if mix_documents
                                else first_seen[e["doc_id"]], e["segment_index"]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"features": asdict(cfg), "tokenizer": tokenizer_info, "speakers": speaker_ids}
    extract = functools.partial(sample_rows, cfg=cfg, speaker_ids=speaker_ids, max_positions=max_positions,
                                frames_per_position=frames_per_position)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    shards, skipped, split, spread = [], 0, 0, 0
    summary = Summary()
    started = time.monotonic()
    # Named after the manifest, so that two prepare calls never write files of the same name
    # (one server root may hold both), and a rerun of one finds its own shards.
    stem = f"{Path(manifest).stem}-{hashlib.sha256(str(Path(manifest).resolve()).encode()).hexdigest()[:6]}"
    progress = Progress(len(entries), "features", log)
    try:
        for index in range(0, len(entries), rows_per_shard):
            chunk = entries[index:index + rows_per_shard]
            path = out_dir / f"{stem}-{index // rows_per_shard:05d}.parquet"
            recipe = hashlib.sha256(json.dumps([chunk, metadata, max_positions, frames_per_position],
                                               sort_keys=True).encode()).hexdigest()
            if _finished(path, recipe):
                shards.append(path)
                summary.add_file(path)
                progress.update(len(chunk))
                continue
            rows = []
            for result in (pool.imap(extract, chunk) if pool else map(extract, chunk)):
                progress.update(1)
                if isinstance(result, str):
                    log(f"skipped: {result}")
                    skipped += 1
                else:
                    split += len(result) > 1
                    spread += any(row.pop("text_spread") for row in result)
                    rows += result
            summary.add_rows(rows, speaker_ids)
            if rows:
                schema.write_samples(path, rows, {**metadata, "recipe": recipe}, rows_per_group=rows_per_group)
                shards.append(path)
    finally:
        progress.close()
        if pool:
            pool.terminate()
    if split:
        log(f"{split} recording(s) longer than {max_positions} positions were split at silences"
            + (f"; {spread} of them had text without an alignment, spread over the pieces in proportion to voiced "
               "time at word boundaries (approximate, so kept without an alignment)" if spread else ""))
    if skipped:
        log(f"{skipped} of {len(entries)} entries skipped (see above)")
    if not shards:
        raise ValueError(f"{manifest}: nothing written: none of its {len(entries)} entries could be used")
    log(summary.describe(len(shards), out_dir, skipped, time.monotonic() - started))
    return shards


class Summary:
    """What prepare wrote, in a user's terms: segments, hours, speakers, labels missing."""

    def __init__(self):
        self.segments, self.frames, self.no_text, self.no_speaker, self.no_sentiment = 0, 0, 0, 0, 0
        self.speakers: collections.Counter = collections.Counter()

    def add_rows(self, rows: list[dict], speaker_ids: dict[str, int]) -> None:
        names = {i: name for name, i in speaker_ids.items()}
        for row in rows:
            self._add(len(row["mel"]), len(row["token_ids"]) > 0, names.get(row["speaker_id"]), row["sentiment"])

    def add_file(self, path: Path) -> None:   # a shard an earlier run finished
        names = {i: n for n, i in schema.read_metadata(pq.read_schema(path), str(path)).get("speakers", {}).items()}
        table = pq.read_table(path, columns=["mel", "token_ids", "speaker_id", "sentiment"])
        frames = pc.list_value_length(table.column("mel")).to_pylist()
        tokens = pc.list_value_length(table.column("token_ids")).to_pylist()
        for n, t, speaker, sentiment in zip(frames, tokens, table.column("speaker_id").to_pylist(),
                                            table.column("sentiment").to_pylist()):
            self._add(n, t > 0, names.get(speaker), sentiment)

    def _add(self, frames: int, has_text: bool, speaker: str | None, sentiment: int) -> None:
        self.segments += 1
        self.frames += frames
        self.no_text += not has_text
        self.no_speaker += speaker is None
        self.no_sentiment += sentiment == schema.UNKNOWN
        if speaker is not None:
            self.speakers[speaker] += 1

    def describe(self, shards: int, out_dir: Path, skipped: int, seconds: float) -> str:
        hours = self.frames / 100 / 3600
        listed = ", ".join(f"{name} {count}" for name, count in self.speakers.most_common(12))
        more = f" and {len(self.speakers) - 12} more" if len(self.speakers) > 12 else ""
        return (f"wrote {self.segments} segment(s), {hours:.2f} h of audio, in {shards} shard(s) to {out_dir} in "
                f"{seconds:.0f} s; {len(self.speakers)} speaker(s): {listed or 'none named'}{more}; without text "
                f"{self.no_text}, without speaker {self.no_speaker}, without sentiment {self.no_sentiment}; "
                f"skipped {skipped} entr{'y' if skipped == 1 else 'ies'}")


def _finished(path: Path, recipe: str) -> bool:
    """A shard written from exactly these inputs by an earlier run."""
    try:
        return schema.read_metadata(pq.read_schema(path), str(path)).get("recipe") == recipe
    except (OSError, ValueError, pa.ArrowException):
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="manifest (CSV/JSONL) of recordings -> Parquet shards",
                          description="Extract features from the recordings a manifest lists into Parquet shards.",
                          epilog=MANIFEST_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    prep.add_argument("--manifest", required=True, help="CSV or JSON-lines file (see below)")
    prep.add_argument("--out", required=True, help="folder for the shards")
    prep.add_argument("--columns", help="the manifest's column names, e.g. audio=audio_path,segment_index=segment")
    prep.add_argument("--max-positions", type=int, default=768,
                      help="the data.max_seq_len you will train with: longer rows are split at silences (default 768)")
    prep.add_argument("--frames-per-position", type=int, default=4, help="model.frames_per_position (default 4)")
    prep.add_argument("--rows-per-shard", type=int, default=4096, help="segments per Parquet file")
    prep.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                      help="parallel feature-extraction processes")
    prep.add_argument("--rows-per-group", type=int,
                      help=f"segments per row group (default: about {schema.ROW_GROUP_BYTES >> 20} MB each)")
    check = sub.add_parser("validate", help="check Parquet shards: every problem with file, row and column",
                           description="The checks the Flight server and the trainer apply (also `python "
                                       "schema.py PATH...` on a data machine without torch).")
    check.add_argument("paths", nargs="+", metavar="PATH", help="Parquet files, or folders to search for them")
    args = parser.parse_args(argv)
    if args.command == "validate":
        return schema.main(args.paths)
    log = functools.partial(print, file=sys.stderr, flush=True)
    try:
        shards = prepare(args.manifest, args.out, args.rows_per_shard, args.rows_per_group, workers=args.workers,
                         log=log, columns=parse_columns(args.columns), max_positions=args.max_positions,
                         frames_per_position=args.frames_per_position)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(str(path) for path in shards))   # the summary went to stderr; stdout lists the shards
    return 0


if __name__ == "__main__":
    sys.exit(main())
