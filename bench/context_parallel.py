"""Context parallelism: one sequence's forward + backward split over processes against one
process doing the same work on the same cores.

    python bench/context_parallel.py [--preset long] [--positions 16384] [--pattern L] [--processes 2]

The preset's width with its layer pattern replaced by --pattern, one document of synthetic
segments; one process with P threads against P processes of one thread each (gloo), each step
timed after a warm-up, the median of --repeats. The bytes each process sends in a step's
collectives are counted (ring algorithms: an all-gather sends (P-1) parts, a reduce-scatter
(P-1)/P of its input, an all-reduce twice that), and the step modelled over slower links than
shared memory: the measured split step plus those bytes at the link's rate, nothing overlapped.
Headline: split time over one process's (goal <= 1.2).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

from common import ROOT, header, save

import config  # noqa: E402 (path set by common)
from context_parallel import SequenceSlices  # noqa: E402
from custom_transformer import CustomTransformer, sample_masks  # noqa: E402
from long_context import synthetic_document  # noqa: E402


def step_seconds(cfg, positions: int, repeats: int, slices: SequenceSlices | None = None) -> float:
    torch.manual_seed(0)
    model = CustomTransformer(cfg.model)
    batch = synthetic_document(positions, cfg.model.frames_per_position)
    masks = sample_masks(batch, cfg.model, torch.Generator().manual_seed(0))
    times = []
    for _ in range(repeats + 1):   # the first is a warm-up
        started = time.perf_counter()
        loss, _ = model(batch, masks, slices=slices)
        (loss / (slices.world if slices else 1)).backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


LINKS = {"PCIe 3.0 x16 (12 GB/s)": 12e9, "PCIe 3.0 x4 (3 GB/s)": 3e9, "PCIe 1.1 x1 (0.25 GB/s)": 0.25e9}


def counting_collectives(world: int) -> list[int]:
    """Wrap the collectives context parallelism calls so that each adds the bytes this process
    sends (ring algorithms) to the returned one-item list."""
    sent = [0]
    dist = torch.distributed
    gather, scatter, reduce = dist.all_gather_into_tensor, dist.reduce_scatter_tensor, dist.all_reduce

    def all_gather_into_tensor(output, tensor, *args, **kwargs):
        sent[0] += (world - 1) * tensor.numel() * tensor.element_size()
        return gather(output, tensor, *args, **kwargs)

    def reduce_scatter_tensor(output, tensor, *args, **kwargs):
        sent[0] += (world - 1) * tensor.numel() * tensor.element_size() // world
        return scatter(output, tensor, *args, **kwargs)

    def all_reduce(tensor, *args, **kwargs):
        sent[0] += 2 * (world - 1) * tensor.numel() * tensor.element_size() // world
        return reduce(tensor, *args, **kwargs)

    dist.all_gather_into_tensor, dist.reduce_scatter_tensor, dist.all_reduce = (
        all_gather_into_tensor, reduce_scatter_tensor, all_reduce)
    return sent


def _split(rank, world, port, overrides, preset, positions, repeats, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = config.load_config(str(ROOT / "config.yaml"), overrides, preset)
        sent = counting_collectives(world)
        seconds = step_seconds(cfg, positions, repeats, SequenceSlices(None, rank, world))
        results[rank] = (seconds, sent[0] // (repeats + 1))   # every step sends alike
    finally:
        torch.distributed.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="long")
    parser.add_argument("--positions", type=int, default=16_384)
    parser.add_argument("--pattern", default="L")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    overrides = [f"model.layer_pattern={args.pattern}"]
    cfg = config.load_config(str(ROOT / "config.yaml"), overrides, args.preset)
    torch.set_num_threads(args.processes)
    one = step_seconds(cfg, args.positions, args.repeats)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_split, args=(args.processes, port, overrides, args.preset, args.positions, args.repeats, results),
             nprocs=args.processes)
    split = max(seconds for seconds, _ in results.values())   # the step ends with its slowest process
    sent = max(sent for _, sent in results.values())
    lines = [*header(), f"preset {args.preset} width, pattern {args.pattern}, {cfg.model.n_layers} layers, "
             f"{args.positions:,} positions: forward + backward of one document",
             f"{f'one process, {args.processes} threads':<44} {one:8.2f} s",
             f"{f'{args.processes} processes of 1 thread, a slice each':<44} {split:8.2f} s   "
             f"({sent / 1e6:.1f} MB sent by a process)",
             *(f"{f'  modelled over {link}':<44} {split + sent / rate:8.2f} s   x{(split + sent / rate) / one:.2f}"
               for link, rate in LINKS.items()),
             f"split / one: {split / one:.2f} (goal <= 1.2)"]
    print("\n".join(lines))
    save(f"context_parallel_{args.preset}_{args.pattern}", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
