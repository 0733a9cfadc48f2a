"""model_trainer.py on simulated unequal cards, for bench/mixed_gpus.py (run under torchrun).

Each rank's compute is stretched: every forward of a training step lasts SIM_BATCH_SECONDS /
speed per sequence of the batch (the real forward, then a sleep for the rest), the speed taken from SIM_SPEEDS by rank (1: the fastest card);
with SIM_SPEEDS_LATER the speeds change after SIM_CHANGE_AFTER forwards (a card that throttles
as it heats up). SIM_MOST_SEQUENCES gives each rank's largest micro-batch, as its memory would
(24 GB against 8 GB cards); the rest of the probe is real. With SIM_LINK_BYTES_PER_S
each gradient bucket's exchange completes only when a serial link of that speed would have
carried the bucket's share of a ring all-reduce of SIM_GRADIENT_BYTES (the `base` preset's fp32
gradients) times SIM_SENT_SHARE (what the compression sends). Transfers overlap the rest of the
backward pass, as DDP's do. Everything else is the real trainer.
"""
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import custom_transformer  # noqa: E402
import model_trainer  # noqa: E402
import planning  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
SPEED = float(os.environ["SIM_SPEEDS"].split(",")[RANK])
SPEED_LATER = float(os.environ.get("SIM_SPEEDS_LATER", os.environ["SIM_SPEEDS"]).split(",")[RANK])
CHANGE_AFTER = int(os.environ.get("SIM_CHANGE_AFTER", "0"))
MOST_SEQUENCES = os.environ.get("SIM_MOST_SEQUENCES")
BATCH_SECONDS = float(os.environ["SIM_BATCH_SECONDS"])
LINK = float(os.environ.get("SIM_LINK_BYTES_PER_S", "0"))          # 0: unlimited
GRADIENT_BYTES = float(os.environ.get("SIM_GRADIENT_BYTES", "0"))
SENT_SHARE = float(os.environ.get("SIM_SENT_SHARE", "1"))

forward = custom_transformer.CustomTransformer.forward
forwards_done = 0


def slow_forward(self, batch, *args, **kwargs):
    global forwards_done
    started = time.perf_counter()
    result = forward(self, batch, *args, **kwargs)
    if torch.is_grad_enabled():   # training steps and the speed probe, not evaluation
        forwards_done += 1
        speed = SPEED_LATER if CHANGE_AFTER and forwards_done > CHANGE_AFTER else SPEED
        # The forward lasts the simulated time whatever the real one took (on a shared CPU the
        # real forward's time depends on what the other processes do).
        time.sleep(max(0.0, BATCH_SECONDS * batch.n_rows / speed - (time.perf_counter() - started)))
    return result


def memory_limited(model, layout, most, device, amp_dtype):
    return min(most, int(MOST_SEQUENCES.split(",")[RANK]))


class SerialLink:
    """One link per process: a transfer starts when the previous one has finished."""

    def __init__(self):
        self.free_at, self.lock = 0.0, threading.Lock()

    def delay(self, nbytes: float) -> float:
        with self.lock:
            now = time.monotonic()
            self.free_at = max(now, self.free_at) + nbytes / LINK
            return self.free_at - now


LINK_STATE = SerialLink()
register = DistributedDataParallel.register_comm_hook


def register_over_the_link(self, state, hook):
    world = torch.distributed.get_world_size()
    elements = sum(p.numel() for p in self.module.parameters())

    def delayed(hook_state, bucket):
        nbytes = 2 * (world - 1) / world * GRADIENT_BYTES * SENT_SHARE * bucket.buffer().numel() / elements
        wait = LINK_STATE.delay(nbytes)
        sent, arrived = hook(hook_state, bucket), torch.futures.Future()
        sent.add_done_callback(lambda f: threading.Timer(wait, arrived.set_result, args=(f.value(),)).start())
        return arrived

    return register(self, state, delayed)


distribute = model_trainer.distribute


def distribute_over_the_link(model, parallel, ranks, device, compression="none", first_backward=None):
    replica = distribute(model, parallel, ranks, device, compression, first_backward)
    if compression == "none" and isinstance(replica, DistributedDataParallel):
        replica.register_comm_hook(None, default_hooks.allreduce_hook)   # plain all-reduce, over the link
    return replica


custom_transformer.CustomTransformer.forward = slow_forward
if MOST_SEQUENCES:
    planning.largest_micro_batch = memory_limited
if LINK:
    DistributedDataParallel.register_comm_hook = register_over_the_link
    model_trainer.distribute = distribute_over_the_link

if __name__ == "__main__":
    model_trainer.cli()
