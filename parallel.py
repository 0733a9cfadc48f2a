"""Hardware and scale-out: this process's place in a torchrun job, its device and precision, and
the wrapping of the model for several processes (DDP or FSDP2). torch.distributed is the engine;
this module only chooses and wires its parts.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from context_parallel import SequenceSlices


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (one process: rank 0 of 1)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    context: SequenceSlices | None = None   # with context parallelism: the processes sharing its sequences

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharing(self) -> int:
        """Processes that hold the same batches (a context-parallel group; 1 without)."""
        return self.context.world if self.context else 1

    @property
    def data_rank(self) -> int:
        """Whose share of the data this process reads: its group's place among the groups."""
        return self.rank // self.sharing

    @property
    def data_world(self) -> int:
        return self.world // self.sharing


def init_distributed(device: str, context_parallel: int = 1) -> Ranks:
    """Join the process group that torchrun describes in the environment: NCCL between GPUs,
    gloo between CPU processes (`device` is train.device); with `context_parallel` > 1, also
    the group of that many consecutive processes this one shares its sequences with."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % context_parallel:
        raise ValueError(f"train.context_parallel={context_parallel} does not divide the {world} process(es)")
    if world == 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(ranks.local_rank)
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo")
    if context_parallel > 1:
        groups = [torch.distributed.new_group(list(range(first, first + context_parallel)))
                  for first in range(0, world, context_parallel)]   # every process makes every group
        ranks = replace(ranks, context=SequenceSlices(groups[ranks.rank // context_parallel],
                                                      ranks.rank % context_parallel, context_parallel))
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
    precision auto, fp16 is only the first guess: `faster_precision` measures it against fp32.
    A process that computes on the CPU keeps its freed host memory for reuse (`reuse_host_memory`)."""
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
    if device.type == "cpu":
        reuse_host_memory()
    return device, dtypes[precision]


def reuse_host_memory() -> bool:
    """Large host allocations taken from the heap and kept there when freed, where glibc maps
    fresh pages for each one over 32 MB and unmaps them when it is freed: the kernel then zeroes
    every page on first touch, and a CPU step's large gathers and copies ran at that rate (a
    67 MB gather 55 ms, 8 ms in reused memory; a `small` training step at 16,384 positions 13-24%
    faster). The process keeps its peak of host memory until it exits, and a little more: a
    freed chunk can be a few bytes short of the same tensor's aligned request until it merges
    with its neighbours (the step's peak RSS measured 5-10% higher). (Huge pages instead, torch's
    THP_MEM_ALLOC_ENABLE, made the gathers faster and the step 13-20% slower: each one zeroed
    and compacted afresh.) -> whether it applied (glibc only; elsewhere a no-op)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4   # malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def autocast(device: torch.device, amp_dtype: torch.dtype):
    """Mixed precision in `amp_dtype` where it is not fp32 (the context every forward runs in)."""
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype != torch.float32)


class HostCheckpoints(torch.autograd.graph.saved_tensors_hooks):
    """While active, what autograd keeps for backward of the computation graph (with activation
    checkpointing: each block's input) is copied to pinned host memory, and back when backward
    needs it, as Arctic Long Sequence Training offloads its checkpoints; the device then holds
    one block's working set instead of every block's input. Tensors outside the graph (rotary
    tables, document ids: saved by every block) and small ones stay. On a CPU nothing moves:
    `moved` lists what would have (shape, bytes)."""

    MIN_BYTES = 1 << 16

    def __init__(self):
        self.moved: list[tuple[tuple[int, ...], int]] = []
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if not tensor.requires_grad or tensor.nbytes < self.MIN_BYTES:
            return tensor
        self.moved.append((tuple(tensor.shape), tensor.nbytes))
        if tensor.device.type != "cuda":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return tensor.device, host

    @staticmethod
    def _unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)


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
               compression: str = "none", first_backward: Callable[[torch.nn.Module], None] | None = None
               ) -> torch.nn.Module:
    """-> the module to train: the model itself on one process, a DDP replica or, with
    parallel="fsdp", the model sharded in place by FSDP2 (each block, then the rest). With DDP,
    `compression` picks a communication hook for the gradients (fp16, bf16, powersgd), and
    `first_backward` (a forward and backward of the replica on a fixed batch) fixes the order of
    the gradient buckets before training."""
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
    # backward pass, and launches their exchanges in bucket order. Left to the first training
    # step, a sparse layer's graph makes that order depend on the step's documents, and with 3 or
    # more processes the bucket layout decides how each gradient's parts are summed: a resumed
    # run would drift from the uninterrupted one in the last bits. One backward of a batch that
    # is the same in every run and resume fixes it, in backward order: the last layers' buckets
    # first, so each exchange starts while the backward pass goes on through the layers before.
    if first_backward is not None:
        first_backward(replica)
        replica.zero_grad(set_to_none=True)
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
