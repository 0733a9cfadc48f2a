"""Arrow rows -> segments -> packed sequences -> batches: the one packing rule, and the Batch
the model reads.

A batch holds `batch_size` sequences, each a run of consecutive segments packed up to
`max_seq_len` positions; the model lays every segment out as [speaker][sentiment][text tokens]
[audio frames stacked by k]. datasets.py streams files through these; inference.py packs its
inputs with them too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from schema import N_MELS, UNKNOWN, DataError

@dataclass
class Segment:
    sample_id: str
    doc_id: str
    token_ids: np.ndarray   # (n_tokens,) int
    mel: np.ndarray         # (n_frames, 80) float16
    f0_hz: np.ndarray       # (n_frames,)
    voicing: np.ndarray
    energy: np.ndarray
    speaker_id: int                          # UNKNOWN when absent
    sentiment: int                           # UNKNOWN when absent
    speaker_embedding: np.ndarray | None = None
    token_start_frame: np.ndarray | None = None   # alignment: each token's first audio frame
    valence: float = math.nan                # NaN when absent
    arousal: float = math.nan
    speaker_name: str | None = None          # the file's name for the speaker, once mapped to a run's ids


def _offsets(column: pa.Array) -> np.ndarray:
    offsets = column.offsets.to_numpy()
    return offsets - offsets[0]


def segments_from_batch(batch: pa.RecordBatch) -> list[Segment]:
    """Zero-copy views into the batch's buffers; one Python object per row, none per value."""
    flat = {}
    for name in ("token_ids", "f0_hz", "voicing", "energy"):
        column = batch.column(name)
        flat[name] = (column.flatten().to_numpy(), _offsets(column))
    mel = batch.column("mel")
    mel_values = mel.flatten().flatten().to_numpy().reshape(-1, N_MELS)
    mel_offsets = _offsets(mel)
    sample_ids = batch.column("sample_id").to_pylist()
    doc_ids = batch.column("doc_id").to_pylist()
    speakers = batch.column("speaker_id").to_numpy()
    sentiments = batch.column("sentiment").to_numpy()
    valence, arousal = (batch.column(name).to_numpy(zero_copy_only=False).astype(np.float32)
                        for name in ("valence", "arousal"))   # nulls become NaN
    optional = {}
    for name in ("speaker_embedding", "token_start_frame"):
        column = batch.column(name)
        optional[name] = (~column.is_null().to_numpy(zero_copy_only=False), column.flatten().to_numpy(),
                          _offsets(column))

    def cut_optional(name, row):
        present, values, offsets = optional[name]
        return values[offsets[row]:offsets[row + 1]] if present[row] else None

    segments = []
    for row in range(batch.num_rows):
        def cut(name):
            values, offsets = flat[name]
            return values[offsets[row]:offsets[row + 1]]
        segments.append(Segment(
            sample_id=sample_ids[row], doc_id=doc_ids[row], token_ids=cut("token_ids"),
            mel=mel_values[mel_offsets[row]:mel_offsets[row + 1]], f0_hz=cut("f0_hz"),
            voicing=cut("voicing"), energy=cut("energy"), speaker_id=int(speakers[row]),
            sentiment=int(sentiments[row]), valence=float(valence[row]), arousal=float(arousal[row]),
            speaker_embedding=cut_optional("speaker_embedding", row),
            token_start_frame=cut_optional("token_start_frame", row)))
    return segments


def segment_positions(n_tokens, n_frames, frames_per_position: int):
    """The positions a segment takes: speaker + sentiment + text tokens + audio frames stacked by
    k (the last stack zero-padded). Counts may be ints, numpy arrays or tensors."""
    return 2 + n_tokens + -(-n_frames // frames_per_position)


@dataclass(frozen=True)
class SequenceLayout:
    """Sequences of `max_seq_len` positions, audio frames stacked by `frames_per_position`."""
    max_seq_len: int
    frames_per_position: int = 4

    def positions(self, segment: Segment) -> int:
        return segment_positions(len(segment.token_ids), len(segment.mel), self.frames_per_position)


class GreedyPacker:
    """The packing rule, one for the packer and for the batch count (if the two drifted apart,
    ranks would count different batch numbers and DDP would hang): segments in arrival order
    fill a sequence until the next one would overflow it; a segment longer than a whole
    sequence is skipped."""

    def __init__(self, max_seq_len: int):
        self.max_seq_len, self.used = max_seq_len, 0

    def place(self, need: int) -> bool | None:
        """-> True: the segment starts a new sequence, False: it joins the current one, None: skipped."""
        if need > self.max_seq_len:
            return None
        starts = self.used == 0 or self.used + need > self.max_seq_len
        self.used = need if starts else self.used + need
        return starts


@dataclass
class Skipped:
    """Segments longer than a whole sequence, which packing passes over, counted for a summary."""
    segments: int = 0
    positions: int = 0          # theirs
    positions_read: int = 0     # of every segment read
    example: str = ""           # the first one: sample_id and its positions

    def summary(self, layout: SequenceLayout, where: str) -> str:
        return (f"{where}: {self.segments} segment(s) longer than max_seq_len {layout.max_seq_len} were skipped, "
                f"{self.positions / max(self.positions_read, 1):.1%} of the positions read (e.g. {self.example}); "
                f"split them with `features.py prepare --max-positions {layout.max_seq_len}` or raise data.max_seq_len")


def pack_sequences(items: Iterable[tuple[object, Segment]], layout: SequenceLayout, skipped: Skipped | None = None
                   ) -> Iterator[tuple[object, list[Segment]]]:
    """Greedy packing in arrival order, so consecutive segments of a document stay together
    (several documents may share a sequence; the attention masks keep them apart). Segments too
    long for a sequence are passed over and counted in `skipped`.

    Items are (stream position, segment); each sequence comes with its first segment's position.
    """
    skipped = skipped if skipped is not None else Skipped()
    packer, sequence, start = GreedyPacker(layout.max_seq_len), [], None
    for position, segment in items:
        need = layout.positions(segment)
        skipped.positions_read += need
        starts = packer.place(need)
        if starts is None:
            skipped.segments += 1
            skipped.positions += need
            skipped.example = skipped.example or f"{segment.sample_id}: {need} positions"
            continue
        if starts:
            if sequence:
                yield start, sequence
            sequence, start = [], position
        sequence.append(segment)
    if sequence:
        yield start, sequence


class StreamPosition(NamedTuple):
    """Where a shard's next batch starts: the first (endpoint, row) of its shuffle window and the
    batches of that window already done."""
    epoch: int
    shard: int
    endpoint: int
    row: int
    batches_done: int


@dataclass
class Batch:
    """Flat per-modality tensors plus per-segment bookkeeping; the model lays them out.

    Frames of each segment are zero-padded to a multiple of frames_per_position (frame_valid
    marks real ones). Segments are ordered by row; segment_doc numbers each run of one
    document within a row, so attention never crosses documents.
    """
    token_ids: torch.Tensor      # (n_tokens_total,) long
    mel: torch.Tensor            # (n_frames_total, 80) float
    f0_hz: torch.Tensor          # (n_frames_total,)
    voicing: torch.Tensor
    energy: torch.Tensor
    frame_valid: torch.Tensor    # (n_frames_total,) bool
    n_tokens: torch.Tensor       # (n_segments,) long
    n_frames: torch.Tensor       # (n_segments,) long, padded counts
    segment_row: torch.Tensor    # (n_segments,) long
    segment_doc: torch.Tensor    # (n_segments,) long
    speaker_id: torch.Tensor     # (n_segments,) long, UNKNOWN when absent
    sentiment: torch.Tensor      # (n_segments,) long, UNKNOWN when absent
    speaker_embedding: torch.Tensor  # (n_segments, E) float, zeros where absent; E = 0 if none has one
    has_speaker_embedding: torch.Tensor  # (n_segments,) bool
    affect: torch.Tensor         # (n_segments, 2) valence, arousal; NaN where absent
    token_audio_position: torch.Tensor  # (n_tokens_total,) the stacked audio position (flat over
                                        # the batch) where each token starts; -1 without alignment
    n_rows: int
    sample_ids: list[str]
    resume_from: StreamPosition | None = None   # where this batch's shard continues
    padding: bool = False        # no samples: only keeps this rank's batch count equal to the others'

    def n_positions(self, frames_per_position: int) -> int:
        """Sequence positions the batch fills (speaker, sentiment, tokens, stacked frames)."""
        return int(segment_positions(self.n_tokens, self.n_frames, frames_per_position).sum())

    def to(self, device) -> "Batch":
        return Batch(**{f.name: (getattr(self, f.name).to(device, non_blocking=True)
                                 if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name))
                        for f in fields(self)})


def collate(sequences: list[list[Segment]], layout: SequenceLayout,
            resume_from: StreamPosition | None = None) -> Batch:
    k = layout.frames_per_position
    segments = [s for seq in sequences for s in seq]
    rows = np.repeat(np.arange(len(sequences)), [len(seq) for seq in sequences])
    doc_starts = np.ones(len(segments), bool)
    for i in range(1, len(segments)):
        doc_starts[i] = rows[i] != rows[i - 1] or segments[i].doc_id != segments[i - 1].doc_id
    n_frames = np.array([len(s.mel) for s in segments])
    padded = -(-n_frames // k) * k
    frame_starts = np.cumsum(padded) - padded

    def frames(name, dtype, width=()):
        out = np.zeros((padded.sum(), *width), dtype)
        for s, start, n in zip(segments, frame_starts, n_frames):
            out[start:start + n] = getattr(s, name)
        return torch.from_numpy(out)

    valid = np.zeros(padded.sum(), bool)
    for start, n in zip(frame_starts, n_frames):
        valid[start:start + n] = True

    embedding_dims = {len(s.speaker_embedding) for s in segments if s.speaker_embedding is not None}
    if len(embedding_dims) > 1:
        raise DataError(f"speaker embeddings of different sizes {sorted(embedding_dims)} in one batch: "
                        + ", ".join(f"{s.sample_id} ({len(s.speaker_embedding)})"
                                    for s in segments if s.speaker_embedding is not None))
    speaker_embedding = np.zeros((len(segments), embedding_dims.pop() if embedding_dims else 0), np.float32)
    for i, s in enumerate(segments):
        if s.speaker_embedding is not None:
            speaker_embedding[i] = s.speaker_embedding

    # Alignment: a token's start frame -> the stacked audio position that holds it.
    audio_starts = frame_starts // k
    token_audio_position = np.concatenate([
        audio_starts[i] + np.asarray(s.token_start_frame, np.int64) // k if s.token_start_frame is not None
        else np.full(len(s.token_ids), -1, np.int64) for i, s in enumerate(segments)])

    return Batch(
        token_ids=torch.from_numpy(np.concatenate([s.token_ids for s in segments]).astype(np.int64)),
        mel=frames("mel", np.float32, (N_MELS,)), f0_hz=frames("f0_hz", np.float32),
        voicing=frames("voicing", np.float32), energy=frames("energy", np.float32),
        frame_valid=torch.from_numpy(valid),
        n_tokens=torch.tensor([len(s.token_ids) for s in segments]),
        n_frames=torch.from_numpy(padded.astype(np.int64)),
        segment_row=torch.from_numpy(rows.astype(np.int64)),
        segment_doc=torch.from_numpy(np.cumsum(doc_starts).astype(np.int64) - 1),
        speaker_id=torch.tensor([s.speaker_id for s in segments]),
        sentiment=torch.tensor([s.sentiment for s in segments]),
        speaker_embedding=torch.from_numpy(speaker_embedding),
        has_speaker_embedding=torch.tensor([s.speaker_embedding is not None for s in segments]),
        affect=torch.tensor([[s.valence, s.arousal] for s in segments], dtype=torch.float32),
        token_audio_position=torch.from_numpy(token_audio_position),
        n_rows=len(sequences), sample_ids=[s.sample_id for s in segments], resume_from=resume_from)


def padding_batch(layout: SequenceLayout, resume_from: StreamPosition) -> Batch:
    """A batch that carries no sample: it keeps a rank in step with the others."""
    k = layout.frames_per_position
    filler = Segment(sample_id="", doc_id="", token_ids=np.zeros(1, np.int32), mel=np.zeros((k, N_MELS), np.float16),
                     f0_hz=np.zeros(k, np.float32), voicing=np.zeros(k, np.float32), energy=np.zeros(k, np.float32),
                     speaker_id=UNKNOWN, sentiment=UNKNOWN)
    return replace(collate([[filler]], layout, resume_from), sample_ids=[], padding=True)


def full_batch(layout: SequenceLayout, batch_size: int) -> Batch:
    """`batch_size` sequences filled to max_seq_len, half text and half audio: the shapes a
    training step meets, for probing a card's speed."""
    k = layout.frames_per_position
    audio = (layout.max_seq_len - 2) // 2
    frames = audio * k
    segment = Segment(sample_id="probe", doc_id="probe", token_ids=np.full(layout.max_seq_len - 2 - audio, 4, np.int32),
                      mel=np.zeros((frames, N_MELS), np.float16), f0_hz=np.full(frames, 120.0, np.float32),
                      voicing=np.ones(frames, np.float32), energy=np.zeros(frames, np.float32),
                      speaker_id=UNKNOWN, sentiment=UNKNOWN)
    return collate([[segment]] * batch_size, layout)
