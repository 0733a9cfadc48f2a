"""Gradient exchange overlapping the backward pass: DDP's buckets in backward order (as
`parallel.distribute` fixes them) against parameter order (what it did before), side by side.

    python bench/ddp_overlap.py [--layers 32] [--width 768] [--link-mb-s 250] [--steps 6]

Two gloo processes train a stack of linear layers whose gradients fill several DDP buckets. The
link is modelled as in bench/simulated_ranks.py: a bucket's exchange completes only when a
serial link of the given speed (PCIe gen1 x1: ~250 MB/s) would have carried its share of a
ring all-reduce; transfers run while the backward pass goes on, as DDP's do. DDP launches the
exchanges in bucket order, so with the first layers in the first bucket nothing leaves before
the backward pass has ended. Reported: the median step time of each order, and the backward
pass alone.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import header, save

import parallel  # noqa: E402 (path set by common)


def link_hook(bytes_per_s: float):
    """A comm hook whose all-reduce completes when a serial link would have carried it."""
    lock, free_at = threading.Lock(), [0.0]

    def hook(state, bucket):
        nbytes = 2 * (dist.get_world_size() - 1) / dist.get_world_size() * bucket.buffer().numel() * 4
        with lock:
            free_at[0] = max(time.monotonic(), free_at[0]) + nbytes / bytes_per_s
            done_at = free_at[0]
        work = dist.all_reduce(bucket.buffer(), async_op=True).get_future()

        def delayed(fut):   # complete when the link would have carried the bucket
            time.sleep(max(0.0, done_at - time.monotonic()))
            return fut.value()[0] / dist.get_world_size()
        return work.then(delayed)

    return hook


def worker(rank: int, port: int, order: str, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ranks = parallel.init_distributed("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(args.width, args.width), torch.nn.GELU())
                                  for _ in range(args.layers)])
    x = torch.randn(args.batch, args.width)
    if order == "backward":
        replica = parallel.distribute(model, "ddp", ranks, torch.device("cpu"),
                                      first_backward=lambda module: module(x).sum().backward())
    else:   # the earlier way: buckets rebuilt in parameter order
        replica = parallel.distribute(model, "ddp", ranks, torch.device("cpu"))
        replica.reducer._push_all_rebuilt_params()
    replica.register_comm_hook(None, link_hook(args.link_mb_s * 1e6))
    steps, backward_only = [], []
    for _ in range(args.steps + 2):
        dist.barrier()
        started = time.perf_counter()
        replica(x).sum().backward()   # returns once every bucket's exchange has completed
        steps.append(time.perf_counter() - started)
        replica.zero_grad(set_to_none=True)
    with replica.no_sync():   # the same pass with no exchange: the floor
        for _ in range(args.steps):
            started = time.perf_counter()
            replica(x).sum().backward()
            backward_only.append(time.perf_counter() - started)
            replica.zero_grad(set_to_none=True)
    if rank == 0:
        logged = replica._get_ddp_logging_data()
        results[order] = (statistics.median(steps[2:]), statistics.median(backward_only),
                          logged.get("rebuilt_per_bucket_param_indices", ""))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--link-mb-s", type=float, default=250.0)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    results = mp.Manager().dict()
    for order in ("parameter", "backward"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(port, order, args, results), nprocs=2)
    gradient_mb = args.layers * (args.width + 1) * args.width * 4 / 1e6
    lines = [*header(), f"# 2 gloo processes, {args.layers} linear layers of {args.width} ({gradient_mb:.0f} MB of fp32 "
             f"gradients), batch {args.batch}, link {args.link_mb_s:.0f} MB/s (serial, ring all-reduce share)",
             f"{'bucket order':<14} {'step s':>8} {'backward alone s':>17}  buckets (parameter indices)"]
    for order in ("parameter", "backward"):
        step, alone, buckets = results[order]
        lines.append(f"{order:<14} {step:>8.3f} {alone:>17.3f}  {buckets}")
    before, after = results["parameter"][0], results["backward"][0]
    lines.append(f"backward-order buckets: step {after / before:.2f}x the parameter-order time "
                 f"({before - after:+.3f} s a step hidden behind the backward pass)")
    print("\n".join(lines))
    save("ddp_overlap", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
