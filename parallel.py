"""Hardware and scale-out: this process's place in a torchrun job, its device and precision, and
the wrapping of the model for several processes (DDP or FSDP2). torch.distributed is the engine;
this module only chooses and wires its parts.
"""
from __future__ import annotations

import contextlib
import os
import resource
import time
from dataclasses import dataclass

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from config import Config
from custom_transformer import sample_masks
from packing import SequenceLayout, full_batch


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (one process: rank 0 of 1)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Ranks:
    """Join the process group that torchrun describes in the environment: NCCL between GPUs,
    gloo between CPU processes (`device` is train.device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(ranks.local_rank)
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo")
    return ranks


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_ranks(value) -> list:
    """Every rank's `value`, in rank order (pickled; for small objects)."""
    if not torch.distributed.is_initialized():
        return [value]
    values = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(values, value)
    return values


def describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    major, minor = torch.cuda.get_device_capability(device)
    return f"{device} {torch.cuda.get_device_name(device)} sm_{major}{minor}"


def from_rank0(value):
    """Rank 0's `value` on every rank (pickled; for small objects)."""
    if not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# Under torchrun, objects that hold the gloo/NCCL process group live until the process exits
# and the process leaves by os._exit (see cli()): destroying a gloo group from Python can deadlock
# (its destructor joins worker threads while holding the GIL, and a worker freeing the last
# collective's Python-owned tensors waits for that GIL; seen at the end of 2-rank runs).
_HELD_UNTIL_EXIT: list = []


def choose_device(requested: str = "auto", precision: str = "auto", local_rank: int = 0
                  ) -> tuple[torch.device, torch.dtype]:
    """train.device and train.precision -> the device and autocast dtype: bf16 on sm_80+, fp16
    (with a GradScaler) on older GPUs such as the P40, fp32 on CPU. On an older GPU with
    precision auto, fp16 is only the first guess: `faster_precision` measures it against fp32."""
    name = requested if requested != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={requested}: CUDA is not available here")
    if precision == "auto":
        precision = "fp32" if device.type == "cpu" else (
            "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise ValueError(f"train.precision={precision!r}: use auto, fp32, fp16 or bf16")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("train.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
    return device, dtypes[precision]


def set_cpu_threads(requested: int, device: torch.device, ranks: Ranks) -> tuple[int, str | None]:
    """train.cpu_threads -> the torch threads this process uses, and a warning when the machine
    is busier than its cores (threads then spin against other work: on a loaded 2-core machine,
    two threads a process measured 10-57 s a step where one measured 1.6-6 s)."""
    if requested:
        torch.set_num_threads(requested)
    elif "OMP_NUM_THREADS" not in os.environ and ranks.world > 1 and device.type == "cpu":
        torch.set_num_threads(1)
    threads, cores = torch.get_num_threads(), os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and threads > 1 and load > cores:
        return threads, (f"this machine's load ({load:.1f}) exceeds its {cores} cores: {threads} torch threads per "
                         "process will spin against the other work; train.cpu_threads=1 (--set) is often "
                         "several times faster here")
    return threads, None


# Dense peak FLOP/s by GPU name and autocast dtype, from the vendors' data sheets (tensor cores,
# no sparsity). fp16 on Pascal runs its matrix products at the fp32 rate (fp32 accumulation).
# A GPU not listed gets no MFU: "unknown" beats a guess.
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "fp16": 989e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12},
    "H100": {"bf16": 989e12, "fp16": 989e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12},
    "RTX 4090": {"bf16": 165e12, "fp16": 165e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "P40": {"fp16": 11.8e12, "fp32": 11.8e12},
}


def peak_flops(device: torch.device, amp_dtype: torch.dtype) -> float | None:
    """The device's peak for this precision, or None when it is not known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[amp_dtype]
    for fragment, peaks in PEAK_FLOPS.items():   # the more specific names come first
        if fragment in name:
            return peaks.get(precision)
    return None


def peak_memory_gb(device: torch.device) -> float:
    """The most memory this process has held: CUDA allocations on a GPU, resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # Linux reports KiB


def distribute(model: torch.nn.Module, parallel: str, ranks: Ranks, device: torch.device,
               compression: str = "none") -> torch.nn.Module:
    """-> the module to train: the model itself on one process, a DDP replica or, with
    parallel="fsdp", the model sharded in place by FSDP2 (each block, then the rest). With DDP,
    `compression` picks a communication hook for the gradients (fp16, bf16, powersgd)."""
    if ranks.world == 1:
        return model
    if parallel == "fsdp":
        if compression != "none":
            raise ValueError("train.grad_compression works with DDP (train.parallel=ddp), not FSDP")
        for block in model.blocks:
            fully_shard(block)
        return fully_shard(model)
    # Buffers are corpus statistics, equal everywhere: nothing to broadcast each step.
    replica = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    # DDP rebuilds its gradient buckets once, in the order gradients became ready in the first
    # step; a sparse layer's graph makes that order depend on the step's documents, and with 3 or
    # more processes the bucket layout decides the order in which each gradient's parts are
    # summed, so a resumed run (whose first step is another) would drift from the uninterrupted
    # one in the last bits. Rebuilding in parameter order keeps it the same in every run.
    replica.reducer._push_all_rebuilt_params()
    if compression in ("fp16", "bf16"):
        replica.register_comm_hook(None, getattr(default_hooks, f"{compression}_compress_hook"))
    elif compression == "powersgd":
        # Rank 1 approximations after 10 exact steps; the error it leaves is fed back each step.
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=10)
        replica.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return replica


def gradient_sync(trained: torch.nn.Module, enabled: bool):
    """A context in which backward does (or, for all but the last accumulated batch, does not)
    reduce gradients across ranks."""
    if isinstance(trained, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else trained.no_sync()
    if isinstance(trained, FSDPModule):
        trained.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()




def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP replica (FSDP2 shards the model in place: it is the model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def clock(device: torch.device) -> float:
    """Seconds, once the device has finished what it was given."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


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


def measure_speed(model: torch.nn.Module, batch, masks, device: torch.device, amp_dtype: torch.dtype,
                  repeats: int = 2) -> float:
    """This card's training speed, positions/s: forward and backward of the model itself (no
    collectives, so no rank waits for another), after one warm-up; gradients are cleared after."""
    batch, masks = batch.to(device), masks.to(device)
    timings = []
    for _ in range(repeats + 1):
        started = clock(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
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
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
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
    if cfg.train.rank_shares != "auto":
        return (*rank_work(cfg, ranks.world), None)
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
