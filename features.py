"""Feature extraction: recordings and transcripts -> the Parquet sample schema.

Audio: WAV (stdlib `wave`, no torchcodec) -> mono float -> resample -> 80-bin log-mel at
100 frames/s, a YIN pitch track (F0 in Hz, 0 when unvoiced, plus a voicing probability) and
log energy, all on the same frame grid. Text: UTF-8 bytes plus special tokens, unless the
manifest gives token ids.

    python features.py prepare --manifest recordings.jsonl --out data/mycorpus
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import math
import multiprocessing
import os
import sys
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torchaudio
from tqdm import tqdm

import schema


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


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """PCM WAV -> (mono float32 in [-1, 1], sample rate)."""
    try:
        with wave.open(str(path), "rb") as wav:
            n_channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError, OSError) as err:
        raise AudioError(f"{path}: cannot read WAV: {err}") from err
    if width == 1:
        samples = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        samples = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16))
        ints = np.where(ints >= 1 << 23, ints - (1 << 24), ints)
        samples = ints.astype(np.float32) / float(1 << 23)
    elif width == 4:
        samples = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise AudioError(f"{path}: unsupported sample width {width} bytes")
    samples = samples[: len(samples) // n_channels * n_channels].reshape(-1, n_channels).mean(axis=1)
    if samples.size == 0:
        raise AudioError(f"{path}: no audio samples")
    return samples.astype(np.float32), rate


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Mono float in [-1, 1] -> 16-bit PCM WAV."""
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())


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

MANIFEST_FIELDS = ("audio", "text", "speaker", "sentiment", "doc_id", "segment_index")
SENTIMENT_NAMES = {"negative": 0, "neutral": 1, "positive": 2}


def _optional_float(value) -> float | None:
    return None if value in ("", None) else float(value)


def _numbers(value, kind) -> list | None:
    """A list, or space-separated in CSV."""
    if value in ("", None):
        return None
    return [kind(t) for t in (value.split() if isinstance(value, str) else value)]


def read_manifest(path: str | Path) -> list[dict]:
    """CSV or JSONL -> entries with typed fields; audio paths relative to the manifest's folder.

    Optional fields: token_ids (a list, or space-separated in CSV), valence, arousal, and an
    alignment: char_start_s (one start time per character of text) or, with token_ids,
    token_start_s (one per token).
    """
    path = Path(path)
    if path.suffix == ".csv":
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
    entries, seen = [], {}
    for number, row in enumerate(raw, 1):
        where = f"{path}: entry {number}"
        missing = [k for k in MANIFEST_FIELDS if row.get(k) in ("", None)]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        sentiment = str(row["sentiment"])
        if sentiment not in SENTIMENT_NAMES and sentiment not in ("0", "1", "2"):
            raise ValueError(f"{where}: sentiment {row['sentiment']!r} is not one of "
                             f"{', '.join(SENTIMENT_NAMES)} or 0/1/2")
        try:
            entry = {"audio": str(path.parent / row["audio"]), "text": str(row["text"]),
                     "speaker": str(row["speaker"]), "doc_id": str(row["doc_id"]),
                     "segment_index": int(row["segment_index"]),
                     "sentiment": SENTIMENT_NAMES[sentiment] if sentiment in SENTIMENT_NAMES else int(sentiment),
                     "token_ids": _numbers(row.get("token_ids"), int),
                     "char_start_s": _numbers(row.get("char_start_s"), float),
                     "token_start_s": _numbers(row.get("token_start_s"), float),
                     "valence": _optional_float(row.get("valence")), "arousal": _optional_float(row.get("arousal"))}
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {err}") from err
        for name, against, what in (("char_start_s", len(entry["text"]), "characters of text"),
                                    ("token_start_s", len(entry["token_ids"] or []), "token_ids")):
            if entry[name] is not None and len(entry[name]) != against:
                raise ValueError(f"{where}: {name} has {len(entry[name])} values for {against} {what}")
        if entry["char_start_s"] is not None and entry["token_ids"] is not None:
            raise ValueError(f"{where}: with token_ids, give the alignment as token_start_s")
        key = (entry["doc_id"], entry["segment_index"])
        if key in seen:
            raise ValueError(f"{where}: doc_id {key[0]!r} segment_index {key[1]} repeats entry {seen[key]}")
        seen[key] = number
        entries.append(entry)
    with_ids = sum(e["token_ids"] is not None for e in entries)
    if 0 < with_ids < len(entries):
        raise ValueError(f"{path}: {with_ids} of {len(entries)} entries give token_ids; give them for all or none")
    return entries


_EXTRACTORS: dict[FeatureConfig, FeatureExtractor] = {}   # one per process and configuration


def sample_row(entry: dict, cfg: FeatureConfig, speaker_ids: dict[str, int]) -> dict | str:
    """One manifest entry -> a row of the sample schema, or why its audio cannot be used."""
    try:
        samples, rate = read_wav(entry["audio"])
    except AudioError as err:
        return str(err)
    extractor = _EXTRACTORS.setdefault(cfg, FeatureExtractor(cfg))
    tokenizer = ByteTokenizer()
    feats = extractor(samples, rate)
    last_frame = len(feats["mel"]) - 1

    def frame(seconds):
        return min(last_frame, max(0, round(seconds * cfg.sample_rate / cfg.hop_length)))

    if entry["token_start_s"] is not None:
        token_starts = [frame(t) for t in entry["token_start_s"]]
    elif entry["char_start_s"] is not None:
        token_starts = tokenizer.token_starts(entry["text"], [frame(t) for t in entry["char_start_s"]], last_frame)
    else:
        token_starts = None
    token_ids = entry["token_ids"] if entry["token_ids"] is not None else tokenizer.encode(entry["text"])
    return {"sample_id": f"{entry['doc_id']}/{entry['segment_index']:05d}",
            "doc_id": entry["doc_id"], "segment_index": entry["segment_index"], "text": entry["text"],
            "token_ids": np.asarray(token_ids, dtype=np.int32),
            "speaker_id": speaker_ids[entry["speaker"]], "sentiment": entry["sentiment"],
            "valence": entry["valence"], "arousal": entry["arousal"], "token_start_frame": token_starts,
            **feats}


def prepare(manifest: str | Path, out_dir: str | Path, rows_per_shard: int = 4096,
            rows_per_group: int | None = None, cfg: FeatureConfig = FeatureConfig(),
            speaker_ids: dict[str, int] | None = None, workers: int = 1, log=print) -> list[Path]:
    """Extract features for every manifest entry and write Parquet shards; returns their paths.

    Entries whose audio cannot be used are reported by path and skipped; the rest is written.
    Shards hold fixed runs of the sorted manifest and record a fingerprint of their inputs, so a
    rerun skips the shards that are already finished. `workers` > 1 extracts in parallel.
    """
    entries = read_manifest(manifest)
    if speaker_ids is None:
        speaker_ids = {name: i for i, name in enumerate(sorted({e["speaker"] for e in entries}))}
    unknown = sorted({e["speaker"] for e in entries} - set(speaker_ids))
    if unknown:
        raise ValueError(f"{manifest}: speakers {unknown} have no id")
    if entries and entries[0]["token_ids"] is not None:
        tokenizer_info = {"name": "manifest-token-ids",
                          "vocab_size": 1 + max((max(e["token_ids"], default=0) for e in entries), default=0)}
    else:
        tokenizer_info = ByteTokenizer().describe()
    entries.sort(key=lambda e: (e["doc_id"], e["segment_index"]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"features": asdict(cfg), "tokenizer": tokenizer_info, "speakers": speaker_ids}
    extract = functools.partial(sample_row, cfg=cfg, speaker_ids=speaker_ids)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    shards, skipped = [], 0
    try:
        with tqdm(total=len(entries), desc="features", unit="seg", disable=None) as progress:
            for index in range(0, len(entries), rows_per_shard):
                chunk = entries[index:index + rows_per_shard]
                path = out_dir / f"shard-{index // rows_per_shard:05d}.parquet"
                recipe = hashlib.sha256(json.dumps([chunk, metadata], sort_keys=True).encode()).hexdigest()
                if _finished(path, recipe):
                    shards.append(path)
                    progress.update(len(chunk))
                    continue
                rows = []
                for result in (pool.imap(extract, chunk) if pool else map(extract, chunk)):
                    progress.update(1)
                    if isinstance(result, str):
                        log(f"skipped: {result}")
                        skipped += 1
                    else:
                        rows.append(result)
                if rows:
                    schema.write_samples(path, rows, {**metadata, "recipe": recipe}, rows_per_group=rows_per_group)
                    shards.append(path)
    finally:
        if pool:
            pool.terminate()
    if skipped:
        log(f"{skipped} of {len(entries)} recordings skipped (see above)")
    return shards


def _finished(path: Path, recipe: str) -> bool:
    """A shard written from exactly these inputs by an earlier run."""
    try:
        return schema.read_metadata(pq.read_schema(path), str(path)).get("recipe") == recipe
    except (OSError, ValueError, pa.ArrowException):
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="manifest (CSV/JSONL) of recordings -> Parquet shards")
    prep.add_argument("--manifest", required=True)
    prep.add_argument("--out", required=True)
    prep.add_argument("--rows-per-shard", type=int, default=4096, help="segments per Parquet file")
    prep.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) - 1),
                      help="parallel feature-extraction processes")
    prep.add_argument("--rows-per-group", type=int,
                      help=f"segments per row group (default: about {schema.ROW_GROUP_BYTES >> 20} MB each)")
    args = parser.parse_args(argv)
    try:
        shards = prepare(args.manifest, args.out, args.rows_per_shard, args.rows_per_group,
                         workers=args.workers, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(shards)} shard(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
