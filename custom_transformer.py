"""CustomTransformer: five modalities fused into one sequence, trained as a masked multimodal
autoencoder.

Each segment becomes [speaker][sentiment][text tokens][audio frames stacked by k], with
prosody (log-F0, voicing, energy) added to its audio frame. Consecutive segments packed into a
row keep their document's running positions; attention never crosses documents. Per modality
some inputs are hidden (spans of text and audio, whole speaker or sentiment slots) behind
learned mask embeddings, and per-modality heads reconstruct them.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from attention import (PAD_DOC, BlockTable, MultiHeadLatentAttention, SparsePattern, block_table, rope_tables,
                       blocks_per_unit)
from config import ModelConfig
from context_parallel import SequenceSlices
from parallel import HostCheckpoints
from packing import Batch, segment_positions
from schema import N_MELS, N_SENTIMENTS, UNKNOWN, CorpusInfo

SPEAKER, SENTIMENT, TEXT, AUDIO = range(4)   # position kinds, each with a modality embedding
PROSODY_FEATURES = 3                         # normalised log-F0, voicing, normalised energy


class FeedForward(nn.Module):
    """SwiGLU. With `chunk`, over chunks of that many positions of a row at a time, as the
    Mini-Sequence Transformer does: a chunk's hidden activations (four of ffn_hidden numbers per
    position) exist for one chunk at a time, and in training backward recomputes them from the
    chunk's input instead of keeping them for the whole row."""

    def __init__(self, d_model: int, hidden: int, chunk: int = 0):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.chunk = chunk

    def swiglu(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward(self, x):   # (rows, length, d_model)
        if not self.chunk or x.shape[1] <= self.chunk:
            return self.swiglu(x)
        parts = x.split(self.chunk, dim=1)
        if torch.is_grad_enabled():
            return torch.cat([checkpoint(self.swiglu, part, use_reentrant=False) for part in parts], 1)
        return torch.cat([self.swiglu(part) for part in parts], 1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.kind = kind
        self.window = None if kind == "G" else cfg.window
        self.causal = cfg.causal
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        sparse = (SparsePattern(cfg.sparse_block, cfg.sparse_topk, cfg.sparse_chunk, cfg.sparse_compressed_keys)
                  if kind == "S" else None)
        self.attn = MultiHeadLatentAttention(cfg.d_model, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank,
                                             cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                                             cfg.norm_eps, sparse)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_hidden, cfg.ffn_chunk)

    def forward(self, x, cos, sin, doc, slices: SequenceSlices | None = None, blocks: BlockTable | None = None):
        x = x + self.attn(self.attn_norm(x), cos, sin, doc, self.window, self.causal, slices,
                          blocks if self.kind == "S" else None)
        return x + self.ffn(self.ffn_norm(x))


@dataclass
class Layout:
    """Where every input lands in the (rows, length) grid, as flat indices into rows * length."""
    n_rows: int
    length: int
    speaker_index: torch.Tensor     # (segments,)
    sentiment_index: torch.Tensor   # (segments,)
    text_index: torch.Tensor        # (tokens,)
    audio_index: torch.Tensor       # (frames / k,)
    content_index: torch.Tensor     # (text + audio positions,): every segment's content, in order
    content_segment: torch.Tensor   # (text + audio positions,): the segment each belongs to
    positions: torch.Tensor         # (rows, length) running through each document
    doc: torch.Tensor               # (rows, length), PAD_DOC on padding


def _ranges(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For items grouped in runs of `counts`: each item's run and its offset within the run."""
    run = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    return run, torch.arange(len(run), device=counts.device) - starts[run]


def layout(batch: Batch, frames_per_position: int) -> Layout:
    audio_count = batch.n_frames // frames_per_position   # frames are padded to whole stacks
    seg_len = segment_positions(batch.n_tokens, batch.n_frames, frames_per_position)
    global_start = torch.cumsum(seg_len, 0) - seg_len
    row_start = torch.full((batch.n_rows,), int(seg_len.sum()), device=seg_len.device)
    row_start = row_start.scatter_reduce(0, batch.segment_row, global_start, "amin")
    seg_start = global_start - row_start[batch.segment_row]
    row_len = torch.zeros(batch.n_rows, dtype=torch.long, device=seg_len.device)
    row_len.index_add_(0, batch.segment_row, seg_len)
    length = int(row_len.max())
    base = batch.segment_row * length + seg_start

    token_seg, token_offset = _ranges(batch.n_tokens)
    audio_seg, audio_offset = _ranges(audio_count)
    position_seg, position_offset = _ranges(seg_len)
    flat_position = base[position_seg] + position_offset
    doc = torch.full((batch.n_rows * length,), PAD_DOC, dtype=torch.long, device=seg_len.device)
    doc[flat_position] = batch.segment_doc[position_seg]
    n_docs = int(batch.segment_doc.max()) + 1
    doc_start = torch.full((n_docs,), length, dtype=torch.long, device=seg_len.device)
    doc_start = doc_start.scatter_reduce(0, batch.segment_doc, seg_start, "amin")
    positions = torch.zeros(batch.n_rows * length, dtype=torch.long, device=seg_len.device)
    positions[flat_position] = flat_position % length - doc_start[batch.segment_doc[position_seg]]
    content = position_offset >= 2   # after the speaker and sentiment slots
    return Layout(
        n_rows=batch.n_rows, length=length, speaker_index=base, sentiment_index=base + 1,
        text_index=base[token_seg] + 2 + token_offset,
        audio_index=base[audio_seg] + 2 + batch.n_tokens[audio_seg] + audio_offset,
        content_index=flat_position[content], content_segment=position_seg[content],
        positions=positions.view(batch.n_rows, length), doc=doc.view(batch.n_rows, length))


@dataclass
class Masks:
    """True where the input is hidden and must be reconstructed."""
    text: torch.Tensor      # (tokens,)
    audio: torch.Tensor     # (frames / k,)
    speaker: torch.Tensor   # (segments,)
    sentiment: torch.Tensor

    def to(self, device) -> "Masks":
        return Masks(*(getattr(self, f.name).to(device) for f in fields(self)))


def _span_mask(n: int, ratio: float, span: int, generator: torch.Generator) -> torch.Tensor:
    """Spans of `span` items starting with probability ratio / span: about `ratio` hidden."""
    if n == 0 or ratio == 0:
        return torch.zeros(n, dtype=torch.bool)
    starts = torch.rand(n, generator=generator) < ratio / span
    if not starts.any():
        starts[torch.randint(n, (1,), generator=generator)] = True
    hidden = starts.clone()
    for shift in range(1, span):
        hidden[shift:] |= starts[:-shift]
    return hidden


def sample_masks(batch: Batch, cfg: ModelConfig, generator: torch.Generator) -> Masks:
    """Spans of text and audio; speaker and sentiment slots one by one, and now and then all of a
    document's at once: labelling new recordings hides every slot, and the model must have
    learned to read labels without a neighbour's."""
    n_segments = len(batch.n_tokens)
    text = _span_mask(len(batch.token_ids), cfg.text_mask_ratio, cfg.text_span, generator)
    audio = _span_mask(len(batch.mel) // cfg.frames_per_position, cfg.audio_mask_ratio, cfg.audio_span, generator)
    speaker = torch.rand(n_segments, generator=generator) < cfg.speaker_drop
    sentiment = torch.rand(n_segments, generator=generator) < cfg.sentiment_drop
    whole_document = (torch.rand(int(batch.segment_doc.max()) + 1 if n_segments else 0, generator=generator)
                      < cfg.document_drop)[batch.segment_doc.cpu()]
    return Masks(text=text, audio=audio, speaker=speaker | whole_document, sentiment=sentiment | whole_document)


@dataclass
class Held:
    """The encoder's output at the positions this process holds (all of them, or under context
    parallelism its slice of every row), and where each position of the grid is among them."""
    hidden: torch.Tensor                 # (held positions, d_model)
    places: torch.Tensor                 # (rows * length,): a position's row in hidden, -1 where another holds it
    slices: SequenceSlices | None = None

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid positions -> (whether this process holds each, its row in hidden)."""
        rows = self.places[index]
        return rows >= 0, rows

    def total(self, partial: torch.Tensor) -> torch.Tensor:
        """A sum over the held positions -> the sum over every position (differentiable)."""
        return partial if self.slices is None else self.slices.total(partial)

    def gathered(self, index: torch.Tensor) -> torch.Tensor:
        """The output at a few grid positions (the label slots), wherever they are held."""
        mine, rows = self.rows(index)
        return self.total(torch.where(mine[:, None], self.hidden[rows.clamp_min(0)], 0.0))


@dataclass
class Outputs:
    """The model's reading of a batch (CustomTransformer.infer)."""
    grid: Layout
    hidden: torch.Tensor             # (rows * length, d_model): the encoder's output at every position
    segment_vectors: torch.Tensor    # (segments, d_model): mean over a segment's text and audio (embed, enrolment)
    sentiment_inputs: torch.Tensor   # (segments, d_model): what the sentiment head reads (refit at a run's end)
    speaker_logits: torch.Tensor     # (segments, n_speakers)
    sentiment_logits: torch.Tensor   # (segments, 3)
    text_logits: torch.Tensor        # (tokens, vocab_size)
    mel: torch.Tensor                # (frames, 80) log-mel, frames padded to whole stacks
    f0_hz: torch.Tensor              # (frames,) where voiced
    voicing: torch.Tensor            # (frames,) probability
    energy: torch.Tensor             # (frames,) log energy


class CustomTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.offloaded: list[tuple[tuple[int, ...], int]] = []   # what the last forward kept in host memory
        self.cfg = cfg
        d, k = cfg.d_model, cfg.frames_per_position
        self.text_embed = nn.Embedding(cfg.vocab_size, d)
        self.speaker_embed = nn.Embedding(cfg.n_speakers, d)
        self.sentiment_embed = nn.Embedding(N_SENTIMENTS, d)
        self.affect_proj = nn.Linear(4, d)        # valence, arousal and whether each is known
        self.audio_proj = nn.Linear(k * N_MELS, d)
        self.prosody_proj = nn.Linear(k * PROSODY_FEATURES, d)
        self.aligned_audio_proj = nn.Linear(d, d)   # a token's aligned audio, added to the token
        self.modality_embed = nn.Embedding(4, d)
        self.mask_embed = nn.Embedding(4, d)          # one learned "hidden" input per modality
        self.blocks = nn.ModuleList(Block(cfg, cfg.layer_kind(i)) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.text_head = nn.Linear(d, cfg.vocab_size)
        self.mel_head = nn.Linear(d, k * N_MELS)
        self.prosody_head = nn.Linear(d, k * PROSODY_FEATURES)
        # Who speaks and how they feel are read from the whole segment, as speaker models pool
        # an utterance (x-vector statistics: the mean and spread of its positions), not from one slot.
        self.segment_pool = nn.Linear(2 * d, d)
        self.speaker_head = nn.Linear(d, cfg.n_speakers)
        self.sentiment_head = nn.Linear(d, N_SENTIMENTS)
        if cfg.speaker_embedding_dim:
            self.speaker_vector_proj = nn.Linear(cfg.speaker_embedding_dim, d)
            self.speaker_vector_head = nn.Linear(d, cfg.speaker_embedding_dim)
        # Corpus statistics (saved with the weights) that put features on a unit scale.
        self.register_buffer("mel_mean", torch.zeros(N_MELS))
        self.register_buffer("mel_std", torch.ones(N_MELS))
        self.register_buffer("prosody_stats", torch.tensor([0.0, 1.0, 0.0, 1.0]))  # log-F0, energy
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        for block in self.blocks:
            nn.init.normal_(block.attn.wo.weight, std=residual_std)
            nn.init.normal_(block.ffn.w2.weight, std=residual_std)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def compile_blocks(self) -> None:
        """torch.compile every block, with dynamic shapes since packed lengths vary per batch.
        Needs Triton on the GPU (sm_70 or newer: never a P40) or a C++ compiler on a CPU."""
        for block in self.blocks:
            block.compile(dynamic=True)

    def flops_per_position(self, seq_len: int) -> float:
        """Training FLOPs (forward and backward) per sequence position, as nanochat counts them.
        Embeddings and output heads (which run on the hidden positions only) are left out, so
        MFU computed from this errs low by a few percent."""
        return sum(self.flops_per_position_parts(seq_len))

    def flops_per_position_parts(self, seq_len: int) -> tuple[float, float]:
        """-> (matrix products: 6 per weight of the blocks' linear layers, attention: 6 * heads *
        (qk + v head dims) per key a query sees). Keys a query sees: the whole sequence on a G
        layer, the window on an L layer; on an S layer the window, one pooled key per unit (a
        block, or 2, 4... blocks of a long document) and the top-k blocks, plus the ranking of
        the units and of the top units' blocks (forward only: 2 * heads * qk dims per key ranked);
        a document of at most top-k blocks, bidirectional, the whole sequence."""
        cfg = self.cfg
        matmul = sum(module.weight.numel() for module in self.blocks.modules() if isinstance(module, nn.Linear))
        qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        window_keys = min(seq_len, cfg.window if cfg.causal else 2 * cfg.window + 1)
        n_blocks = -(-seq_len // cfg.sparse_block)
        unit = blocks_per_unit(n_blocks, cfg.sparse_compressed_keys)
        n_units = -(-n_blocks // unit)
        keys, ranking = 0, 0
        for block in self.blocks:
            if block.kind == "G" or (block.kind == "S" and not cfg.causal and n_blocks <= cfg.sparse_topk):
                keys += seq_len   # a short document: a sparse layer reads it whole
            elif block.kind == "L":
                keys += window_keys
            else:
                keys += window_keys + n_units + min(seq_len, cfg.sparse_topk * cfg.sparse_block)
                ranking += 2 * cfg.n_heads * qk_dim * (n_units + (cfg.sparse_topk * unit if unit > 1 else 0))
        return 6 * matmul, 6 * cfg.n_heads * (qk_dim + cfg.v_head_dim) * keys + ranking

    def set_corpus_stats(self, info: CorpusInfo) -> None:
        if info.vocab_size > self.cfg.vocab_size:
            raise ValueError(f"model.vocab_size {self.cfg.vocab_size} < the data's {info.vocab_size}")
        if info.n_speakers > self.cfg.n_speakers:
            raise ValueError(f"the training files name {info.n_speakers} speakers but model.n_speakers is "
                             f"{self.cfg.n_speakers}: set --set model.n_speakers={info.n_speakers} (or more)")
        self.mel_mean.copy_(torch.tensor(info.mel_mean))
        self.mel_std.copy_(torch.tensor(info.mel_std))
        self.prosody_stats.copy_(torch.tensor([info.log_f0_mean, info.log_f0_std,
                                               info.energy_mean, info.energy_std]))

    def normalised_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> mel (frames, 80) and prosody (frames, 3) on a unit scale; zero on padding frames."""
        f0_mean, f0_std, energy_mean, energy_std = self.prosody_stats
        valid = batch.frame_valid[:, None]
        mel = torch.where(valid, (batch.mel - self.mel_mean) / self.mel_std, 0.0)
        voiced = batch.f0_hz > 0
        log_f0 = torch.where(voiced, (batch.f0_hz.clamp_min(1.0).log() - f0_mean) / f0_std, 0.0)
        prosody = torch.stack([log_f0, batch.voicing, (batch.energy - energy_mean) / energy_std], -1)
        return mel, torch.where(valid, prosody, 0.0)

    def _speaker_vectors(self, batch: Batch) -> torch.Tensor | None:
        size, expected = batch.speaker_embedding.shape[1], self.cfg.speaker_embedding_dim
        if size and size != expected:
            raise ValueError(f"the data has speaker embeddings of size {size}: set "
                             f"model.speaker_embedding_dim={size} (now {expected})")
        if not expected:
            return None
        # a batch in which no segment has a vector: zeros, flagged absent by has_speaker_embedding
        return batch.speaker_embedding if size else batch.speaker_embedding.new_zeros(len(batch.speaker_embedding), expected)

    def embed(self, batch: Batch, grid: Layout, masks: Masks, mel, prosody, held: tuple | None = None) -> torch.Tensor:
        """Place every input in the grid; hidden or absent inputs become the mask embedding. With
        `held` (`held_positions`: under context parallelism) only the positions this process
        holds, (rows, its slice's length, d): inputs of the others are not even projected."""
        k = self.cfg.frames_per_position
        places, held_length = held or held_positions(grid, None)
        x = torch.zeros(grid.n_rows * held_length, self.cfg.d_model, device=mel.device,
                        dtype=self.text_embed.weight.dtype)

        def place(index, values, hidden, kind, context=0.0):   # the held ones of index (and of its values)
            rows = places[index]
            values = torch.where(hidden[:, None], self.mask_embed.weight[kind], values)
            x[rows] = values + self.modality_embed.weight[kind] + context

        def mine(index):
            return places[index] >= 0

        known_speaker = batch.speaker_id != UNKNOWN
        speaker = torch.where(known_speaker[:, None], self.speaker_embed(batch.speaker_id.clamp_min(0)), 0.0)
        vectors = self._speaker_vectors(batch)
        if vectors is not None:
            has_vector = batch.has_speaker_embedding[:, None]
            speaker = speaker + torch.where(has_vector, self.speaker_vector_proj(vectors), 0.0)
            known_speaker = known_speaker | batch.has_speaker_embedding
        slots = mine(grid.speaker_index)
        place(grid.speaker_index[slots], speaker[slots], (masks.speaker | ~known_speaker)[slots], SPEAKER)

        known_label = batch.sentiment != UNKNOWN
        known_affect = ~batch.affect.isnan()
        sentiment = (torch.where(known_label[:, None], self.sentiment_embed(batch.sentiment.clamp_min(0)), 0.0)
                     + self.affect_proj(torch.cat([batch.affect.nan_to_num(0.0), known_affect.float()], -1)))
        slots = mine(grid.sentiment_index)
        place(grid.sentiment_index[slots], sentiment[slots],
              (masks.sentiment | ~(known_label | known_affect.any(-1)))[slots], SENTIMENT)

        # The audio positions held here, and those the held tokens hear, projected.
        text, audio = mine(grid.text_index), mine(grid.audio_index)
        position = batch.token_audio_position[text]
        needed = audio.clone()
        needed[position[position >= 0]] = True
        chosen = needed.nonzero().squeeze(1)
        projected = (self.audio_proj(mel.reshape(-1, k * N_MELS)[chosen])
                     + self.prosody_proj(prosody.reshape(-1, k * PROSODY_FEATURES)[chosen]))
        row_of = torch.full((len(audio) + 1,), len(chosen), device=chosen.device)   # the last: a silent row
        row_of[chosen] = torch.arange(len(chosen), device=chosen.device)
        audible = torch.cat([projected, projected.new_zeros(1, projected.shape[1])])
        # A token, hidden or not, hears the audio where it starts unless that is hidden. Tokens
        # without an alignment (position -1) read the appended silent, never heard row.
        hears = (position >= 0) & ~torch.cat([masks.audio, masks.audio.new_zeros(1)])[position]
        heard = torch.where(hears[:, None], self.aligned_audio_proj(audible[row_of[position]]), 0.0)
        place(grid.text_index[text], self.text_embed(batch.token_ids[text]), masks.text[text], TEXT, heard)
        place(grid.audio_index[audio], audible[row_of[:-1][audio]], masks.audio[audio], AUDIO)
        return x.view(grid.n_rows, held_length, -1)

    def encode(self, x: torch.Tensor, grid: Layout, slices: SequenceSlices | None = None,
               held: tuple | None = None) -> Held:
        """The blocks over the rows (with `slices`, already over the rows as `run` fits them, and
        `held`: x is this process's slice of every row, as `embed` made it, and so is the output)."""
        cos, sin = rope_tables(grid.positions, self.cfg.qk_rope_head_dim, self.cfg.rope_theta)
        doc = grid.doc
        if slices is not None:   # rows too short for every slice to hold a window's reach are padded
            pad = slices.length - grid.length
            cos, sin = (F.pad(t, (0, 0, 0, pad)) for t in (cos, sin))
            doc = F.pad(doc, (0, pad), value=PAD_DOC)
        # the sparse layers' blocks of the whole rows, made once for every sparse layer and recomputation
        blocks = (block_table(doc, self.cfg.sparse_block, self.cfg.sparse_compressed_keys)
                  if "S" in self.cfg.layer_pattern else None)
        if slices is not None:
            cos, sin, doc = slices.mine(cos), slices.mine(sin), slices.mine(doc)
        checkpointed = self.cfg.activation_checkpointing and self.training
        offload = HostCheckpoints() if checkpointed and self.cfg.offload_checkpoints else contextlib.nullcontext()
        with offload:
            for block in self.blocks:
                if checkpointed:
                    x = checkpoint(block, x, cos, sin, doc, slices, blocks, use_reentrant=False)
                else:
                    x = block(x, cos, sin, doc, slices, blocks)
        self.offloaded = offload.moved if isinstance(offload, HostCheckpoints) else []
        places, _ = held or held_positions(grid, slices)
        return Held(self.norm(x).flatten(0, 1), places, slices)

    @property
    def reach(self) -> int:
        """How far a window or a block reaches: under context parallelism every slice is at least this long."""
        return max(self.cfg.window, self.cfg.sparse_block)

    def run(self, batch: Batch, masks: Masks, slices: SequenceSlices | None = None
            ) -> tuple[Layout, torch.Tensor, torch.Tensor, Held]:
        """-> the grid, the normalised mel and prosody inputs, and the encoder's output (at every
        position; with `slices`, at this process's slice of them)."""
        grid = layout(batch, self.cfg.frames_per_position)
        mel, prosody = self.normalised_features(batch)
        if slices is not None:   # rows too short for every slice to hold a window's reach are padded
            slices = slices.over(grid.length, self.reach)
        held = held_positions(grid, slices)
        return grid, mel, prosody, self.encode(self.embed(batch, grid, masks, mel, prosody, held), grid, slices, held)

    @staticmethod
    def segment_moments(grid: Layout, held: Held) -> tuple[torch.Tensor, torch.Tensor]:
        """(segments, d) each, in fp32 at least: the mean and standard deviation of the encoder's output
        over each segment's text and audio positions (its label slots left out), from the sums
        over every process's slice."""
        n_segments, width = len(grid.speaker_index), held.hidden.shape[1]
        mine, rows = held.rows(grid.content_index)
        values = _wide(held.hidden[rows[mine]])
        segment = grid.content_segment[mine]
        sums = held.total(values.new_zeros(n_segments, 1 + 2 * width).index_add_(
            0, segment, torch.cat([torch.ones_like(values[:, :1]), values, values.square()], 1)))
        count = sums[:, :1].clamp_min(1.0)
        mean, square = sums[:, 1:1 + width] / count, sums[:, 1 + width:] / count
        return mean, (square - mean.square()).clamp_min(1e-6).sqrt()

    def label_inputs(self, grid: Layout, held: Held, moments: tuple[torch.Tensor, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> what the speaker and the sentiment head read, one row per segment: its slot plus the
        segment's statistics (`segment_moments`), projected (a label is a property of the whole
        segment, as x-vectors pool an utterance)."""
        pooled = self.segment_pool(torch.cat(moments, -1).to(held.hidden.dtype))
        speaker, sentiment = held.gathered(torch.cat([grid.speaker_index, grid.sentiment_index])).chunk(2)
        return speaker + pooled, sentiment + pooled

    @torch.no_grad()
    def infer(self, batch: Batch, masks: Masks) -> Outputs:
        """What the model reads into every slot, hidden or not, on the data's own scales."""
        grid, _, _, held = self.run(batch, masks)
        hidden = held.hidden
        audio = hidden[grid.audio_index]
        f0_mean, f0_std, energy_mean, energy_std = self.prosody_stats.float()
        mel = self.mel_head(audio).float().view(-1, N_MELS) * self.mel_std + self.mel_mean
        prosody = self.prosody_head(audio).float().view(-1, PROSODY_FEATURES)
        moments = self.segment_moments(grid, held)
        speaker_in, sentiment_in = self.label_inputs(grid, held, moments)
        return Outputs(grid=grid, hidden=hidden, segment_vectors=moments[0],
                       sentiment_inputs=sentiment_in.float(),
                       speaker_logits=self.speaker_head(speaker_in).float(),
                       sentiment_logits=self.sentiment_head(sentiment_in).float(),
                       text_logits=self.text_head(hidden[grid.text_index]).float(), mel=mel,
                       f0_hz=torch.exp(prosody[:, 0] * f0_std + f0_mean), voicing=torch.sigmoid(prosody[:, 1]),
                       energy=prosody[:, 2] * energy_std + energy_mean)

    def export(self, out_dir: str | Path, extra: dict[str, dict] | None = None) -> None:
        """Weights as safetensors, the config (and any `extra`, e.g. label maps) as JSON."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = out_dir / "model.safetensors"
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()},
                  str(weights))
        weights.chmod(0o644)   # safetensors writes 0600: a model is for others to read
        (out_dir / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        for name, content in (extra or {}).items():
            (out_dir / f"{name}.json").write_text(json.dumps(content, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "CustomTransformer":
        """A model exported by `export` (model_trainer.py export), in eval mode."""
        directory = Path(directory)
        try:
            cfg = ModelConfig(**json.loads((directory / "config.json").read_text()))
            weights = load_file(str(directory / "model.safetensors"))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"{directory}: not an exported model: {err}") from err
        model = cls(cfg)
        model.load_state_dict(weights)
        return model.eval()

    def forward(self, batch: Batch, masks: Masks, denominators: torch.Tensor | None = None,
                slices: SequenceSlices | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """-> total loss and, detached: per-modality losses, accuracies, F0 error in cents.

        Each loss term is a sum over this batch's hidden items divided by `denominators` (in
        LOSS_TERMS order; default: this batch's own counts, i.e. a mean). Given the counts of a
        whole step over every rank (loss_counts, all-reduced), the terms of all batches add up to
        the mean over the step's union of batches, however unevenly ranks share the work.

        With `slices` (context parallelism: every process of the group given the same batch)
        each process runs the blocks and the per-position heads on its slice of the rows; the
        loss terms' sums, the segments' statistics and the label slots are summed over the
        group, so every process returns the whole loss: the backward of loss / group size, the
        gradients then summed over the group, is one process's."""
        cfg, k = self.cfg, self.cfg.frames_per_position
        grid, mel, prosody, held = self.run(batch, masks, slices)
        hidden = held.hidden
        targets = loss_targets(batch, masks, cfg)
        local = _counts(targets)
        denominators = (local if denominators is None else denominators).to(local.device).clamp_min(1.0)
        sums: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}

        # Every head runs every step, on no rows when nothing of its kind is hidden: its loss is
        # then an exact zero that still reaches its weights, as DDP expects of every parameter.
        def classify(name, head, inputs, target):   # inputs(selected): the head's input rows
            selected = targets[name]
            logits = _wide(head(inputs(selected)))
            if selected.any():
                metrics[f"{name}_acc"] = (logits.argmax(-1) == target[selected]).float().mean().detach()
                return F.cross_entropy(logits, target[selected], reduction="sum")
            return logits.sum()

        speaker_in, sentiment_in = self.label_inputs(grid, held, self.segment_moments(grid, held))
        sums["speaker"] = classify("speaker", self.speaker_head, lambda chosen: speaker_in[chosen], batch.speaker_id)
        sums["sentiment"] = classify("sentiment", self.sentiment_head, lambda chosen: sentiment_in[chosen],
                                     batch.sentiment)
        vectors = self._speaker_vectors(batch)
        sums["speaker_embedding"] = hidden.new_zeros(())
        if vectors is not None:
            selected = targets["speaker_embedding"]
            predicted = _wide(self.speaker_vector_head(speaker_in[selected]))
            sums["speaker_embedding"] = (1 - F.cosine_similarity(predicted, vectors[selected], dim=-1)).sum()

        # The per-position heads on the positions this process holds: partial sums, then totals.
        mine, rows = held.rows(grid.text_index)
        text = targets["text"] & mine
        text_logits = _wide(self.text_head(hidden[rows[text]]))
        text_target = batch.token_ids[text]
        mine, rows = held.rows(grid.audio_index)
        audio = masks.audio & mine
        frames = audio.repeat_interleave(k) & batch.frame_valid        # the hidden frames of those positions
        audio_out = hidden[rows[audio]]
        select = batch.frame_valid.view(-1, k)[audio]
        mel_pred = _wide(self.mel_head(audio_out)).view(-1, k, N_MELS)[select]
        prosody_pred = _wide(self.prosody_head(audio_out)).view(-1, k, PROSODY_FEATURES)[select]
        prosody_target = prosody[frames]
        voiced = batch.f0_hz[frames] > 0
        error = prosody_pred[voiced, 0] - prosody_target[voiced, 0]     # in log-F0 std units
        partial = torch.stack([
            F.cross_entropy(text_logits, text_target, reduction="sum") + text_logits.sum() * 0.0,
            (mel_pred - mel[frames]).abs().sum(),
            error.square().sum() + prosody_pred[:, 0].sum() * 0.0,      # reaches the head when nothing is voiced
            F.binary_cross_entropy_with_logits(prosody_pred[:, 1], prosody_target[:, 1], reduction="sum"),
            (prosody_pred[:, 2] - prosody_target[:, 2]).square().sum()])
        sums["text"], sums["mel"], sums["f0"], sums["voicing"], sums["energy"] = held.total(partial)
        with torch.no_grad():   # the metrics' counts, over the group too
            right_text, right_voicing, cents, voiced_count = held.total(torch.stack([
                (text_logits.argmax(-1) == text_target).sum().float(),
                ((prosody_pred[:, 1] > 0) == (prosody_target[:, 1] > 0.5)).sum().float(),
                (error.abs() * self.prosody_stats[1] * 1200 / math.log(2)).sum().float(),
                voiced.sum().float()])).tolist()
        if targets["text"].any():
            metrics["text_acc"] = torch.tensor(right_text / float(local[0]))
        if targets["frames"].any():
            metrics["voicing_acc"] = torch.tensor(right_voicing / float(targets["frames"].sum()))
        if voiced_count:
            metrics["f0_cents"] = torch.tensor(cents / voiced_count)
        losses = {name: sums[name] / denominators[i] for i, name in enumerate(LOSS_TERMS)}
        total = sum(getattr(cfg, f"weight_{name}") * value for name, value in losses.items())
        metrics.update({f"loss_{name}": (sums[name] / local[i].clamp_min(1.0)).detach()
                        for i, name in enumerate(LOSS_TERMS)})
        metrics["accuracy"] = metrics.get("text_acc", hidden.new_zeros(()))
        return total, metrics


def held_positions(grid: Layout, slices: SequenceSlices | None) -> tuple[torch.Tensor, int]:
    """-> (each grid position's row among those this process holds, -1 where another holds it;
    the length of the rows it holds): every position, or with `slices` (already over the rows'
    length) its slice of every row."""
    places = torch.arange(grid.n_rows * grid.length, device=grid.doc.device)
    if slices is None:
        return places, grid.length
    start, end = slices.bounds[slices.rank:slices.rank + 2]
    row, position = places // grid.length, places % grid.length
    return torch.where((position >= start) & (position < end), row * (end - start) + position - start, -1), end - start


def _wide(t: torch.Tensor) -> torch.Tensor:
    """A head's output for its loss: fp32 at least (half precision is too coarse for the sums),
    float64 kept (the exactness tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


LOSS_TERMS = ("text", "speaker", "sentiment", "speaker_embedding", "mel", "f0", "voicing", "energy")


def loss_targets(batch: Batch, masks: Masks, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """What each loss term is computed over: hidden items whose truth is known."""
    frames = masks.audio.repeat_interleave(cfg.frames_per_position) & batch.frame_valid
    return {"text": masks.text, "speaker": masks.speaker & (batch.speaker_id != UNKNOWN),
            "sentiment": masks.sentiment & (batch.sentiment != UNKNOWN),
            "speaker_embedding": masks.speaker & batch.has_speaker_embedding if cfg.speaker_embedding_dim
            else masks.speaker & False, "frames": frames, "voiced": frames & (batch.f0_hz > 0)}


def loss_counts(batch: Batch, masks: Masks, cfg: ModelConfig) -> torch.Tensor:
    """How many items each loss term averages over, in LOSS_TERMS order (mel: 80 values a frame)."""
    return _counts(loss_targets(batch, masks, cfg))


def _counts(t: dict[str, torch.Tensor]) -> torch.Tensor:
    frames = t["frames"].sum()
    return torch.stack([t["text"].sum(), t["speaker"].sum(), t["sentiment"].sum(), t["speaker_embedding"].sum(),
                        frames * N_MELS, t["voiced"].sum(), frames, frames]).float()
