"""The step feed: what each optimizer step of this process trains on.

It owns the stream of packed batches (read ahead in a thread, or by DataLoader workers), the
epoch's work plan (batches a step and their size, per process), padding batches where data
failed to come (so this rank still joins the step's collectives), the masks of each batch
(seeded by step, batch and rank alone, so a resumed run draws the same ones), what has been
consumed, and the reopening a new work plan needs. It saves and restores itself as the other
checkpoint pieces do (through the dataset's read position).

    feed = StepFeed(dataset, cfg, ranks, stop_requested)
    step = feed.next_step(n)      # -> Step: (batch, masks) pairs, and why data is missing if it is
    ... train on step.micro_batches ...
    feed.commit(step)             # recorded as consumed only once the step counted
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

import packing
import schema
from config import Config
from custom_transformer import Masks, sample_masks
from parallel import Ranks


class Interrupted(Exception):
    """The consumer of a prefetched stream was asked to stop while it waited for an item."""


class Prefetch:
    """Run `iterable` in a background thread, at most `depth` items ahead (0: each item is read
    when it is asked for), so that reading and packing overlap the training step (Arrow and torch
    release the GIL for their heavy work). Errors reach the consumer.

    The consumer never waits blindly: while it waits for an item (a server down, retries backing
    off), `interrupted()` is polled and, once true, ends the stream with Interrupted, and past
    WAITING_AFTER_S `waiting(seconds so far)` is told. `close()`
    stops the thread without waiting on a read in flight (the thread is a daemon);
    `close(wait=True)` waits for it, for a consumer that reopens the source right after."""

    _DONE = object()
    WAITING_AFTER_S = 2.0   # a wait this long is told to `waiting` (each poll after it)

    def __init__(self, iterable: Iterable, depth: int, interrupted: Callable[[], bool] = lambda: False,
                 waiting: Callable[[float], None] = lambda waited_s: None):
        self._items: queue.SimpleQueue = queue.SimpleQueue()   # unbounded: the requests below bound it
        self._requested = threading.Semaphore(depth)           # items the producer may read ahead
        self._stop = threading.Event()
        self._interrupted, self._waiting, self._finished = interrupted, waiting, False
        items, requested, stop, done = self._items, self._requested, self._stop, self._DONE

        def produce():   # holds no reference to self, so an abandoned stream is collected and stops
            try:
                iterator = iter(iterable)
                while True:
                    while not requested.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                    if stop.is_set():
                        return
                    item = next(iterator, done)
                    items.put((item, None))
                    if item is done:
                        return
            except BaseException as err:  # noqa: BLE001 - handed to the consumer
                items.put((done, err))
            finally:   # an abandoned stream shuts its DataLoader workers down now, not at exit
                getattr(iterable, "close", lambda: None)()

        self._thread = threading.Thread(target=produce, name="prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> "Prefetch":
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        self._requested.release()
        started = time.monotonic()
        while True:
            try:
                item, err = self._items.get(timeout=0.1)
                break
            except queue.Empty:
                if self._interrupted():
                    raise Interrupted from None
                if time.monotonic() - started >= self.WAITING_AFTER_S:
                    self._waiting(time.monotonic() - started)
        if item is self._DONE:
            self._finished = True
            if err is not None:
                raise err
            raise StopIteration
        return item

    def close(self, wait: bool = False) -> None:
        self._finished = True
        self._stop.set()
        self._thread.join(timeout=None if wait else 1.0)   # a read stalled on the network is not waited for

    def __del__(self):
        self._stop.set()


def batches(dataset, num_workers: int):
    """Endless stream of batches from the dataset's epoch and recorded position on."""
    epoch = dataset.epoch
    while True:
        dataset.set_epoch(epoch)   # keeps loaded positions if they belong to this epoch
        resumed = dataset.resuming
        # spawn, not fork: a forked worker would inherit the parent's gRPC client, which is not fork-safe
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                             multiprocessing_context="spawn" if num_workers else None)
        produced = 0
        for batch in loader:
            produced += 1
            yield batch
        if produced == 0 and not resumed:
            raise schema.DataError("the dataset produced no batches")
        epoch += 1


@dataclass
class Step:
    """This process's share of one optimizer step."""
    micro_batches: list[tuple[packing.Batch, Masks]]
    missing: Exception | None   # why some batches are padding: a DataError, or Interrupted (a signal)
    data_wait_s: float          # time spent waiting for the batches
    epoch: int                  # the epoch the batches belong to

    def positions(self, frames_per_position: int) -> int:
        return sum(batch.n_positions(frames_per_position) for batch, _ in self.micro_batches if not batch.padding)


@dataclass
class StepResult:
    loss: float           # over the union of every rank's batches
    metrics: dict         # this rank's, averaged over its accumulated batches
    grad_norm: float
    lr: float             # the rate this step used
    applied: bool         # False: a non-finite loss or gradient, or an abandoned step; weights untouched
    positions: int        # sequence positions trained on, all ranks together
    stop: bool            # some rank was asked to stop (SIGINT/SIGTERM): all stop after this step
    abandoned: bool = False   # some rank could not get its batches: the step does not count anywhere
    compute_s: float = 0.0    # with `timed`: this rank's forward and backward time, waits for other ranks left out


class StepFeed:
    """This process's steps: see the module's docstring."""

    def __init__(self, dataset, cfg: Config, ranks: Ranks, stop_requested: Callable[[], bool],
                 waiting: Callable[[float], None] = lambda waited_s: None):
        self.dataset, self.cfg, self.ranks, self.stop_requested = dataset, cfg, ranks, stop_requested
        self.waiting = waiting   # told how long a wait for a batch has lasted, past Prefetch.WAITING_AFTER_S
        self._stream: Prefetch | None = None
        self._mask_rng = torch.Generator()
        self.epoch, self.per_step, self.batch_sizes = dataset.epoch, *dataset.work(dataset.epoch)

    # -- the checkpoint piece (per rank): the dataset's read position --------------------------

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)
        self.epoch, (self.per_step, self.batch_sizes) = self.dataset.epoch, self.dataset.work(self.dataset.epoch)

    # -- the stream ----------------------------------------------------------------------------

    def open(self) -> None:
        """Start reading from the consumed batches on."""
        self._stream = Prefetch(batches(self.dataset, self.cfg.data.num_workers), self.cfg.data.prefetch,
                                interrupted=self.stop_requested, waiting=self.waiting)

    def close(self, wait: bool = False) -> None:
        if self._stream is not None:
            self._stream.close(wait=wait)

    def _next_batch(self) -> tuple[packing.Batch | None, Exception | None]:
        """-> (the next batch, None), or (None, why there is none): a DataError (the data stayed
        unreachable past the retry budget), or Interrupted (a signal while waiting, or a reader
        that a signal broke, as Ctrl-C does to DataLoader workers)."""
        try:
            return next(self._stream), None
        except (schema.DataError, Interrupted) as err:
            return None, err
        except Exception:
            if self.stop_requested():
                return None, Interrupted()
            raise

    # -- steps -------------------------------------------------------------------------------

    def next_step(self, step: int) -> Step:
        """This rank's batches for `step` (as many as the work of their epoch asks), each with its
        masks. Without data (a failure, a signal while waiting) padding keeps this rank in step."""
        started = time.perf_counter()
        micro_batches, missing = [], None
        while len(micro_batches) < self.per_step[self.ranks.data_rank]:
            batch, missing = self._next_batch() if missing is None else (None, missing)
            if batch is None:
                batch = packing.padding_batch(self.dataset.layout, None)
            elif not micro_batches and batch.resume_from.epoch != self.epoch:
                self.epoch = batch.resume_from.epoch
                self.per_step, self.batch_sizes = self.dataset.work(self.epoch)
            self._mask_rng.manual_seed(self.cfg.train.seed * 1_000_003 + (step * max(self.per_step) + len(micro_batches))
                                       * self.ranks.data_world + self.ranks.data_rank)
            micro_batches.append((batch, sample_masks(batch, self.cfg.model, self._mask_rng)))
        return Step(micro_batches, missing, time.perf_counter() - started, self.epoch)

    def commit(self, step: Step) -> None:
        """The step counted: its batches are consumed (a resume starts after them)."""
        for batch, _ in step.micro_batches:
            self.dataset.record(batch)

    def replan(self, per_step: list[int], batch_sizes: list[int]) -> None:
        """A new work plan, from the next epoch (an epoch's data is dealt when it starts). The
        stream may already have read into that epoch, so it is reopened from the consumed batches."""
        self.close(wait=True)
        self.dataset.load_state_dict(self.dataset.state_dict())
        self.dataset.set_work(per_step, batch_sizes, from_epoch=self.epoch + 1)
        self.open()
