"""Work per process: how many batches of how many sequences each process takes a step, by hand
(train.rank_shares) or measured on every card (its speed and memory on probe steps of real
shapes, and on a GPU before sm_80 which precision is faster), and kept even while training by
the rebalancer. Knows the model's objective (probe batches and masks); parallel.py below it
knows no model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from config import Config
from custom_transformer import sample_masks
from packing import SequenceLayout, full_batch
from parallel import Ranks, all_ranks, autocast, clock, describe_device


def compute_seconds(forwards: list[float], backwards: list[float], world: int) -> float:
    """A rank's own compute in a step. The last backward also waits for the other ranks' gradients
    (DDP's all-reduce): it is estimated from its forward by this rank's backward/forward ratio in
    the batches before it (2, as is usual, when there were none)."""
    if world == 1:
        return sum(forwards) + sum(backwards)
    ratio = sum(backwards[:-1]) / sum(forwards[:-1]) if len(forwards) > 1 and sum(forwards[:-1]) > 0 else 2.0
    return sum(forwards) + sum(backwards[:-1]) + forwards[-1] * ratio


def probe_inputs(layout: SequenceLayout, model_cfg, sequences: int, seed: int = 0):
    """A batch of `sequences` full sequences of the shapes training meets, and its masks: the
    probe steps that measure a card."""
    batch = full_batch(layout, sequences)
    return batch, sample_masks(batch, model_cfg, torch.Generator().manual_seed(seed))


def fixed_backward(layout: SequenceLayout, model_cfg, device: torch.device, amp_dtype: torch.dtype):
    """-> a forward and backward of a module on one full sequence that is the same in every run
    (distribute's `first_backward`: it fixes DDP's gradient buckets in backward order)."""
    batch, masks = probe_inputs(layout, model_cfg, 1)

    def step(module: torch.nn.Module) -> None:
        with autocast(device, amp_dtype):
            loss, _ = module(batch.to(device), masks.to(device))
        loss.backward()

    return step


def measure_speed(model: torch.nn.Module, batch, masks, device: torch.device, amp_dtype: torch.dtype,
                  repeats: int = 2) -> float:
    """This card's training speed, positions/s: forward and backward of the model itself (no
    collectives, so no rank waits for another), after one warm-up; gradients are cleared after."""
    batch, masks = batch.to(device), masks.to(device)
    timings = []
    for _ in range(repeats + 1):
        started = clock(device)
        with autocast(device, amp_dtype):
            loss, _ = model(batch, masks)
        loss.backward()
        timings.append(clock(device) - started)
    model.zero_grad(set_to_none=True)
    return batch.n_positions(model.cfg.frames_per_position) / min(timings[1:])


def needs_precision_probe(device: torch.device, precision: str) -> bool:
    """train.precision=auto on a GPU without bf16 (before sm_80): whether fp16 beats fp32 there
    depends on the card (a P40's fp16 arithmetic runs at a fraction of its fp32 rate), so it is
    measured rather than assumed."""
    return precision == "auto" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8


def faster_precision(model: torch.nn.Module, layout: SequenceLayout, batch_size: int, device: torch.device,
                     candidates=(torch.float16, torch.float32)) -> tuple[torch.dtype, dict[torch.dtype, float]]:
    """-> the autocast dtype with the most positions/s on a training step of real shapes on this
    card, and each one's speed."""
    probe, masks = probe_inputs(layout, model.cfg, batch_size)
    speeds = {dtype: measure_speed(model, probe, masks, device, dtype) for dtype in candidates}
    return max(speeds, key=speeds.get), speeds


def largest_micro_batch(model: torch.nn.Module, layout: SequenceLayout, most: int, device: torch.device,
                        amp_dtype: torch.dtype, headroom: float = 0.9) -> int:
    """The most sequences (at most `most`) a training batch may hold on this card. Probe steps of
    one and of two full sequences give what a sequence adds to the peak; what stays (weights,
    gradients, AdamW's two moments, the rest of the peak) is set aside, and `headroom` of the
    memory free to this process is used. Host memory is not probed: on a CPU, `most`."""
    if device.type != "cuda":
        return most
    peaks = []
    for size in (1, 2):
        batch, masks = (t.to(device) for t in probe_inputs(layout, model.cfg, size))
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        try:
            with autocast(device, amp_dtype):
                loss, _ = model(batch, masks)
            loss.backward()
        except torch.OutOfMemoryError:
            loss = None
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if size == 1:
                raise ValueError(f"{describe_device(device)}: a batch of one sequence of {layout.max_seq_len} "
                                 "positions does not fit in its memory: lower data.max_seq_len") from None
            return 1
        peaks.append(torch.cuda.max_memory_allocated(device) - before)
        loss = None
        model.zero_grad(set_to_none=True)
    per_sequence = max(peaks[1] - peaks[0], 1)
    fixed = max(peaks[0] - per_sequence, 0)   # includes the gradients
    moments = 2 * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    free, _ = torch.cuda.mem_get_info(device)
    usable = (free + torch.cuda.memory_reserved(device)) * headroom - torch.cuda.memory_allocated(device)
    return max(1, min(most, int((usable - moments - fixed) // per_sequence)))


def work_from_speeds(speeds: list[float], most_sequences: list[int], total_sequences: int, widest: int = 16
                     ) -> tuple[list[int], list[int]]:
    """-> (batches per step, sequences per batch) of every rank such that each rank's compute per
    step takes about as long as every other's: sequences in proportion to the measured speeds
    (positions/s), the step's total near `total_sequences` but never less than one sequence for
    the slowest rank (nor more than `widest` times its share for any). Each rank's batches hold at
    most its `most_sequences` (what fits its memory); more work means more batches."""
    slowest = min(speeds)
    unit = max(1, round(total_sequences * slowest / sum(speeds)))   # the slowest rank's sequences
    sequences = [min(widest * unit, max(unit, round(unit * speed / slowest))) for speed in speeds]
    per_step = [-(-n // most) for n, most in zip(sequences, most_sequences)]
    return per_step, [max(1, min(most, round(n / batches))) for n, batches, most in zip(sequences, per_step, most_sequences)]


def imbalance(per_step: list[int], batch_sizes: list[int], speeds: list[float]) -> float:
    """The slowest rank's compute per step over the mean: 1.0 when no rank waits for another."""
    seconds = [batches * size / speed for batches, size, speed in zip(per_step, batch_sizes, speeds)]
    return max(seconds) / (sum(seconds) / len(seconds))


@dataclass
class Rebalancer:
    """train.rebalance_every: each rank adds up its compute (forward and backward, waits for the
    other ranks left out) and positions; every `every` steps the ranks share their speeds and a
    new work plan is proposed when it evens out their compute clearly (by 10%) better."""
    most_sequences: list[int]
    total_sequences: int
    every: int
    positions: float = 0.0
    seconds: float = 0.0

    def add(self, positions: int, compute_seconds: float) -> None:
        self.positions += positions
        self.seconds += compute_seconds

    def propose(self, step: int, per_step: list[int], batch_sizes: list[int]
                ) -> tuple[list[int], list[int], list[float]] | None:
        """Collective at every `every`-th step: -> (batches per step, sequences per batch, the
        speeds measured) for a better plan, or None."""
        if not self.every or step % self.every:
            return None
        speeds = [max(p, 1.0) / max(s, 1e-9) for p, s in all_ranks((self.positions, self.seconds))]
        self.positions = self.seconds = 0.0
        proposed = work_from_speeds(speeds, self.most_sequences, self.total_sequences)
        if imbalance(*proposed, speeds) < 0.9 * imbalance(per_step, batch_sizes, speeds):
            return (*proposed, speeds)
        return None


# ---------------------------------------------------------------------------------------------
# Work per rank

def accumulation_steps(cfg: Config, world: int) -> int:
    """Batches each rank accumulates per optimizer step to come near train.tokens_per_step."""
    per_batch = cfg.data.batch_size * cfg.data.max_seq_len * world
    return max(1, round(cfg.train.tokens_per_step / per_batch)) if cfg.train.tokens_per_step else 1


def rank_work(cfg: Config, world: int, shares: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Each rank's work per optimizer step in proportion to train.rank_shares -> (batches it
    accumulates, sequences per batch). Under DDP a share multiplies the batches (a slow card takes
    fewer micro-batches of the same size); under FSDP, whose every forward is collective, every
    rank takes as many batches and a share multiplies the batch size. A share of 1 takes what
    train.tokens_per_step asks of a process."""
    shares = shares or cfg.train.rank_shares or [1] * world
    if len(shares) != world:
        raise ValueError(f"train.rank_shares has {len(shares)} entries for {world} process(es): give one per process")
    unit = accumulation_steps(cfg, sum(shares))
    if cfg.train.parallel == "fsdp":
        return [unit] * world, [share * cfg.data.batch_size for share in shares]
    return [share * unit for share in shares], [cfg.data.batch_size] * world


def plan_work(cfg: Config, ranks: Ranks, model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype,
              say) -> tuple[list[int], list[int], Rebalancer | None]:
    """-> (batches per step, sequences per batch) of every rank, and with train.rank_shares=auto
    the Rebalancer that keeps them even. Shares given by hand are taken as they are; "auto" finds
    every card's largest micro-batch (at most data.batch_size) and its speed at that size, each
    card alone before DDP hooks its gradients, and deals the step's sequences by speed."""
    if ranks.context:   # the shares are the slices' lengths (context_shares); the groups' work is equal
        return (*rank_work(cfg, ranks.data_world, [1] * ranks.data_world), None)
    if cfg.train.rank_shares != "auto":
        return (*rank_work(cfg, ranks.data_world), None)
    layout = SequenceLayout(cfg.data.max_seq_len, cfg.model.frames_per_position)
    most = largest_micro_batch(model, layout, cfg.data.batch_size, device, amp_dtype)
    probe, masks = probe_inputs(layout, cfg.model, most, cfg.train.seed)
    measured = all_ranks((most, measure_speed(model, probe, masks, device, amp_dtype)))
    most_sequences, speeds = [m for m, _ in measured], [s for _, s in measured]
    total = (round(cfg.train.tokens_per_step / cfg.data.max_seq_len) if cfg.train.tokens_per_step
             else ranks.world * cfg.data.batch_size)
    per_step, batch_sizes = work_from_speeds(speeds, most_sequences, total)
    say("measured per process: " + ", ".join(f"{speed:,.0f} positions/s at {m} sequence(s)" for m, speed in measured)
        + f" -> batches {per_step} of {batch_sizes} sequences")
    return per_step, batch_sizes, Rebalancer(most_sequences, total, cfg.train.rebalance_every)


def context_shares(cfg: Config, ranks: Ranks, model: torch.nn.Module, device: torch.device, amp_dtype: torch.dtype,
                   say) -> tuple[int, ...]:
    """Under context parallelism: the length of each slice of this process's group, as shares
    (SequenceSlices.shares). By hand: train.rank_shares of the group's processes. "auto": each
    card measured alone on one sequence of a slice's length; a card's share is the smaller of its
    part of the group's speed and of its free memory (a CPU: speed alone), so that a card
    neither waits for the others nor runs out first. Equal without shares."""
    first = ranks.rank - ranks.context.rank
    if cfg.train.rank_shares == "auto":
        layout = SequenceLayout(max(1, cfg.data.max_seq_len // ranks.sharing), cfg.model.frames_per_position)
        probe, masks = probe_inputs(layout, cfg.model, 1, cfg.train.seed)
        speed = measure_speed(model, probe, masks, device, amp_dtype)
        memory = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else speed   # a CPU: speed alone
        measured = all_ranks((speed, memory))[first:first + ranks.sharing]
        speeds, memories = [s for s, _ in measured], [m for _, m in measured]
        parts = [min(s / sum(speeds), m / sum(memories)) for s, m in zip(speeds, memories)]
        shares = tuple(max(1, round(100 * part / max(parts))) for part in parts)
        say("measured per process of a group: " + ", ".join(f"{s:,.0f} positions/s" for s in speeds)
            + (", free memory " + ", ".join(f"{m / 2**30:.1f} GiB" for m in memories) if device.type == "cuda" else "")
            + f" -> slices in shares {list(shares)}")
        return shares
    if not cfg.train.rank_shares:
        return ()
    if len(cfg.train.rank_shares) != ranks.world:
        raise ValueError(f"train.rank_shares has {len(cfg.train.rank_shares)} entries for {ranks.world} process(es): "
                         "give one per process (with context_parallel: its slice's share of the group's sequences)")
    return tuple(cfg.train.rank_shares[first:first + ranks.sharing])
