"""The datasets that stream Parquet rows (schema.py) as packed training batches (packing.py).

One Parquet row is one spoken segment. Segments of one document (a recording or conversation)
share a doc_id and are numbered by segment_index. Two sources with one interface: `ArrowFlightDataset` streams from a Flight server (the data
machine), `LocalParquetDataset` reads files on the training machine.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pyarrow.parquet as pq
import torch

# The schema's and the packer's names stay importable from here: datasets is the data layer's
# front door for the trainer and tools; only the data machine imports schema.py alone.
from packing import (Batch, GreedyPacker, Segment, SequenceLayout, Skipped, StreamPosition, collate,  # noqa: F401
                     full_batch, pack_sequences, padding_batch, segment_positions, segments_from_batch)
from schema import (N_MELS, N_SENTIMENTS, ROW_GROUP_BYTES, SAMPLE_SCHEMA, SCHEMA_VERSION, UNKNOWN,  # noqa: F401
                    CorpusInfo, DataError, Labels, Ticket, corpus_info, feature_sums, read_metadata, samples_table,
                    schema_problems, skip_rows_of, speaker_names, summarise_problems, validate_file,
                    validate_table, write_samples)


# ---------------------------------------------------------------------------------------------
# Reading ahead

class Interrupted(Exception):
    """The consumer of a prefetched stream was asked to stop while it waited for an item."""


class Prefetch:
    """Run `iterable` in a background thread, at most `depth` items ahead (0: each item is read
    when it is asked for), so that reading and packing overlap the training step (Arrow and torch
    release the GIL for their heavy work). Errors reach the consumer.

    The consumer never waits blindly: while it waits for an item (a server down, retries backing
    off), `interrupted()` is polled and, once true, ends the stream with Interrupted. `close()`
    stops the thread without waiting on a read in flight (the thread is a daemon);
    `close(wait=True)` waits for it, for a consumer that reopens the source right after."""

    _DONE = object()

    def __init__(self, iterable: Iterable, depth: int, interrupted: Callable[[], bool] = lambda: False):
        self._items: queue.SimpleQueue = queue.SimpleQueue()   # unbounded: the requests below bound it
        self._requested = threading.Semaphore(depth)           # items the producer may read ahead
        self._stop = threading.Event()
        self._interrupted, self._finished = interrupted, False
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
        while True:
            try:
                item, err = self._items.get(timeout=0.1)
                break
            except queue.Empty:
                if self._interrupted():
                    raise Interrupted from None
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


# ---------------------------------------------------------------------------------------------
# Datasets

@dataclass
class DataConfig:
    batch_size: int = 4          # sequences per batch (rank_shares=auto: the most, fewer where memory is short)
    max_seq_len: int = 768       # positions per sequence
    shuffle: bool = True         # endpoints per epoch, then sequences within a window
    shuffle_window: int = 16     # batches whose sequences are shuffled together
    seed: int = 0
    num_workers: int = 0         # DataLoader workers, each with its own Flight client
    max_retries: int = 8         # Flight failures in a row before the run stops with an error (~1.5 min of waits)
    retry_backoff_s: float = 0.5  # first wait after a failure; doubles each time, at most 30 s
    read_timeout_s: float = 120.0  # a Flight call still running after this is cancelled and retried
    prefetch: int = 4            # batches read ahead in a background thread (0: none)

    def __post_init__(self):
        for name in ("batch_size", "max_seq_len", "shuffle_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be at least 1")
        if min(self.num_workers, self.prefetch, self.max_retries) < 0:
            raise ValueError("data.num_workers, data.prefetch and data.max_retries must be >= 0")
        if self.retry_backoff_s < 0 or self.read_timeout_s <= 0:
            raise ValueError("data.retry_backoff_s must be >= 0 and data.read_timeout_s > 0")


class _PackedStream(torch.utils.data.IterableDataset):
    """Endpoints (a file's row-group range) -> segments -> packed sequences -> batches.

    Endpoints are permuted by (seed, epoch) and dealt round-robin over shards, one shard per
    (rank, worker); packed sequences are then shuffled within windows of `shuffle_window`
    batches. Every batch says where its shard's next batch starts (the window's first row and
    the batches done in it), so `record(batch)` / `state_dict()` / `load_state_dict()` resume
    mid-epoch exactly: the resumed shard re-reads at most one window and yields the same batches
    in the same order as the uninterrupted run.
    """

    def __init__(self, layout: SequenceLayout, batch_size: int, shuffle: bool = True, seed: int = 0,
                 shuffle_window: int = 16):
        super().__init__()
        self.layout, self.batch_size, self.shuffle, self.seed = layout, batch_size, shuffle, seed
        self.shuffle_window = shuffle_window   # batches whose sequences are shuffled together
        self.epoch = 0
        # Where iteration starts: shard -> (endpoint index, row, batches done), for self.epoch;
        # empty for a fresh epoch. `_last_shard` is the shard whose batch came last before it.
        self._positions: dict[int, tuple[int, int, int]] = {}
        self._last_shard = -1
        self._needed_cache: dict = {}   # endpoint -> positions each row needs
        # What the trainer has consumed, kept apart: a prefetching producer runs ahead of it.
        self._consumed = {"epoch": 0, "positions": {}, "last_shard": -1}
        self._speaker_ids: dict[str, np.ndarray] = {}   # file -> its own speaker ids -> the run's
        self._speaker_names: dict[str, dict[int, str]] = {}
        self.unseen_speakers: collections.Counter = collections.Counter()   # name -> segments read
        # This process's rank, taken now: a spawned DataLoader worker has no process group.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank, self.world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                                 if distributed else (0, 1))
        # Work per rank by the epoch it starts from: {epoch: (batches per step, sequences per batch)}.
        # An epoch's data is dealt by the work in force when it starts, so a change (a re-balance,
        # or a resume with other shares) takes effect at the next epoch: every row is still read
        # once, and every rank still ends the epoch at the same step.
        self.work_plan: dict[int, tuple[list[int], list[int]]] = {}

    def set_work(self, per_step: list[int], batch_sizes: list[int], from_epoch: int = 0) -> None:
        """Uneven work per rank from epoch `from_epoch` on: rank r consumes per_step[r] batches of
        batch_sizes[r] sequences a step, so the epoch's data is dealt in that proportion."""
        if not len(per_step) == len(batch_sizes) == self.world or min(per_step + batch_sizes) < 1:
            raise ValueError(f"batches per step {per_step} of {batch_sizes} sequences: need counts >= 1 for each "
                             f"of {self.world} process(es)")
        self.work_plan = {epoch: work for epoch, work in self.work_plan.items() if epoch < from_epoch}
        self.work_plan[from_epoch] = (list(per_step), list(batch_sizes))

    def work(self, epoch: int | None = None, world: int | None = None) -> tuple[list[int], list[int]]:
        """(batches per step, sequences per batch) of each rank in `epoch` (default: the current
        one): as planned, or one batch of data.batch_size each."""
        epoch, world = self.epoch if epoch is None else epoch, world or self.world
        starts = [start for start in self.work_plan if start <= epoch]
        if starts and len(self.work_plan[max(starts)][0]) == world:
            return self.work_plan[max(starts)]
        return [1] * world, [self.batch_size] * world

    @property
    def resuming(self) -> bool:
        """Iteration starts mid-epoch, from a loaded state."""
        return bool(self._positions)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._positions = {}
        self.epoch = epoch

    def record(self, batch: Batch) -> None:
        """Note a batch the trainer consumed (it may come from a DataLoader worker, or from a
        producer that has already moved on to the next epoch)."""
        at = batch.resume_from
        if at.epoch != self._consumed["epoch"]:
            self._consumed = {"epoch": at.epoch, "positions": {}, "last_shard": -1}
        self._consumed["positions"][str(at.shard)] = [at.endpoint, at.row, at.batches_done]
        self._consumed["last_shard"] = at.shard

    def state_dict(self) -> dict:
        """Where the consumed batches end: load it to continue right after them."""
        consumed = self._consumed
        return {"epoch": consumed["epoch"], "positions": dict(consumed["positions"]),
                "last_shard": consumed["last_shard"],
                "work": [[epoch, *map(list, work)] for epoch, work in sorted(self.work_plan.items())]}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the consumed batches of `state`. Its epoch finishes with the work it was
        dealt by; where this run's work differs (other shares, recalibrated or by hand), that
        applies from the next epoch on."""
        epoch = int(state["epoch"])
        written = state.get("work") or [[0, [1] * self.world, [self.batch_size] * self.world]]
        if isinstance(written[0][-1], int):   # [batches per step, sequences per batch]: one work for all epochs
            written = [[0, *written]]
        saved = {int(start): (list(per_step), list(sizes)) for start, per_step, sizes in written}
        if len(next(iter(saved.values()))[0]) != self.world:
            raise ValueError(f"the checkpoint was written by {len(next(iter(saved.values()))[0])} process(es), this "
                             f"run has {self.world}: resume with as many")
        wanted = self.work(epoch + 1) if self.work_plan else None
        self.work_plan = {start: work for start, work in saved.items() if start <= epoch + 1}
        if wanted and wanted != self.work(epoch + 1):
            self.work_plan[epoch + 1] = wanted
        self.epoch = epoch
        self._positions = {int(k): tuple(int(x) for x in v) for k, v in state["positions"].items()}
        self._last_shard = int(state["last_shard"])
        self._consumed = {"epoch": self.epoch, "positions": {str(k): list(v) for k, v in self._positions.items()},
                          "last_shard": self._last_shard}

    def use_speakers(self, names: list[str]) -> None:
        """Number speakers as the run does (`names`: its speaker names by id, from the training
        files or a checkpoint): each file's own ids are mapped by name. A speaker the list lacks
        reads as unknown (never scored as someone else) and is counted in `unseen_speakers`."""
        index = {name: i for i, name in enumerate(names)}
        self._speaker_ids, self._speaker_names = {}, {}
        for file, speakers in self.file_speakers().items():
            if speakers is None:   # written by another tool: its ids are taken as they are
                continue
            mapping = np.full(max(speakers.values(), default=-1) + 1, UNKNOWN, np.int64)
            for name, local in speakers.items():
                mapping[local] = index.get(name, UNKNOWN)
            self._speaker_ids[file] = mapping
            self._speaker_names[file] = {local: name for name, local in speakers.items()}

    def _with_run_speakers(self, segments: list[Segment], file: str) -> list[Segment]:
        mapping = self._speaker_ids.get(file)
        if mapping is None:
            return segments
        for segment in segments:
            local = segment.speaker_id
            if local != UNKNOWN:
                segment.speaker_id = int(mapping[local]) if local < len(mapping) else UNKNOWN
                if segment.speaker_id == UNKNOWN:
                    self.unseen_speakers[self._speaker_names[file].get(local, f"id {local}")] += 1
        return segments

    def segments(self, endpoints: list, first_endpoint: int = 0, first_row: int = 0
                 ) -> Iterator[tuple[tuple[int, int], Segment]]:
        """((endpoint index, row), segment) in the order of `endpoints`, from the given one and
        row on, speakers numbered as the run numbers them."""
        for index in range(first_endpoint, len(endpoints)):
            row = first_row if index == first_endpoint else 0
            for record_batch in self.read_endpoint(endpoints[index], row):
                for segment in self._with_run_speakers(segments_from_batch(record_batch), endpoints[index][0]):
                    yield (index, row), segment
                    row += 1

    def file_speakers(self) -> dict[str, dict[str, int] | None]:
        """Each file's own speaker numbering (name -> id), None where its metadata has none."""
        raise NotImplementedError

    def endpoints(self) -> list:
        raise NotImplementedError

    def read_endpoint(self, endpoint, skip_rows: int, columns: tuple[str, ...] | None = None
                      ) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def metadata(self) -> dict[str, dict]:
        raise NotImplementedError

    def _ranks(self) -> tuple[int, int, int, int]:
        """-> rank, world size, worker, workers per rank."""
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return self.rank, self.world, worker, workers

    def _shard_endpoints(self, shard: int, world: int, workers: int) -> list:
        """The shard's endpoints this epoch: permuted, then dealt in turn over the (rank, worker)
        shards, a rank that takes k times the sequences per step taking k in each round."""
        endpoints = self.endpoints()
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(endpoints))
            endpoints = [endpoints[i] for i in order]
        per_step, batch_sizes = self.work(world=world)
        weights = [per_step[s // workers] * batch_sizes[s // workers] for s in range(world * workers)]
        deal = [s for turn in range(max(weights)) for s in range(len(weights)) if turn < weights[s]]
        return [endpoint for i, endpoint in enumerate(endpoints) if deal[i % len(deal)] == shard]

    def _positions_needed(self, endpoint) -> np.ndarray:
        """Positions each row of an endpoint takes, from its two small list columns (cached)."""
        cache = self._needed_cache
        if endpoint not in cache:
            parts = [segment_positions(*(pc.list_value_length(column).to_numpy() for column in b.columns),
                                       self.layout.frames_per_position)
                     for b in self.read_endpoint(endpoint, 0, ("token_ids", "f0_hz"))]
            cache[endpoint] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return cache[endpoint]

    def _batch_count(self, endpoints: list, batch_size: int) -> int:
        """The batches that packing `endpoints` yields, computed from row lengths alone."""
        packer = GreedyPacker(self.layout.max_seq_len)
        sequences = sum(packer.place(need) is True for endpoint in endpoints
                        for need in self._positions_needed(endpoint).tolist())
        return -(-sequences // batch_size)

    def _padding_batches(self, rank: int, world: int, workers: int) -> int:
        """How many fully masked batches this rank adds so that every rank's epoch lasts as many
        steps as the longest one's (DDP hangs when ranks disagree). Worker 0 yields them."""
        if world == 1:
            return 0
        per_step, batch_sizes = self.work(world=world)
        totals = [sum(self._batch_count(self._shard_endpoints(r * workers + w, world, workers), batch_sizes[r])
                      for w in range(workers)) for r in range(world)]
        steps = max(-(-total // count) for total, count in zip(totals, per_step))
        return steps * per_step[rank] - totals[rank]

    def __iter__(self) -> Iterator[Batch]:
        rank, world, worker, workers = self._ranks()
        if self._positions:
            # A resumed epoch: the DataLoader asks its workers in turn from worker 0, so rotate
            # shards onto workers to make the first request go to the shard the run asked next.
            worker = (worker + self._last_shard + 1) % workers
        shard = rank * workers + worker
        endpoints = self._shard_endpoints(shard, world, workers)
        batch_size = self.work(world=world)[1][rank]
        first_endpoint, first_row, skip_batches = self._positions.get(shard, (0, 0, 0))

        def emit(window, window_start, next_start, skip):
            """A window of sequences, shuffled by its start position, as batches. Each batch says
            where the next one begins: (window start, batches done) or the next window's start."""
            order = (np.random.default_rng([self.seed, self.epoch, shard, *window_start]).permutation(len(window))
                     if self.shuffle else range(len(window)))
            sequences = [window[i] for i in order]
            groups = [sequences[i:i + batch_size] for i in range(0, len(sequences), batch_size)]
            for done, group in enumerate(groups, 1):
                if done > skip:
                    after = (*window_start, done) if done < len(groups) else (*next_start, 0)
                    yield collate(group, self.layout, StreamPosition(self.epoch, shard, *after))

        window_size = batch_size * self.shuffle_window
        window, window_start, skip, skipped = [], None, skip_batches, Skipped()
        for start, sequence in pack_sequences(self.segments(endpoints, first_endpoint, first_row), self.layout,
                                              skipped):
            if len(window) == window_size:
                yield from emit(window, window_start, start, skip)
                window, skip = [], 0
            if not window:
                window_start = start
            window.append(sequence)
        end = (len(endpoints), 0)
        if window:
            yield from emit(window, window_start, end, skip)
        if skipped.segments:   # once per epoch and shard, never silently
            warnings.warn(skipped.summary(self.layout, f"epoch {self.epoch}, shard {shard}"))
        if worker == 0:   # padding batches count on from the end position's "batches done"
            done_before = skip_batches if (first_endpoint, first_row) == end else 0
            for done in range(done_before + 1, self._padding_batches(rank, world, workers) + 1):
                yield padding_batch(self.layout, StreamPosition(self.epoch, shard, *end, done))


_CHECKED: dict[tuple, None] = {}   # (path, mtime, size) of files whose values passed the checks


def check_content(path: str | Path) -> None:
    """Raise DataError naming file, row and column unless every value of the file passes the
    checks the Flight server applies (once per file version and process)."""
    stat = os.stat(path)
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key in _CHECKED:
        return
    problems = validate_file(path)
    if problems:
        raise DataError(f"{path}: {summarise_problems(problems)}")
    _CHECKED[key] = None


class LocalParquetDataset(_PackedStream):
    """Parquet files on this machine; one endpoint per row group."""

    def __init__(self, files: list[str | Path], layout: SequenceLayout, batch_size: int, *,
                 shuffle: bool = True, seed: int = 0, shuffle_window: int = 16):
        super().__init__(layout, batch_size, shuffle, seed, shuffle_window)
        self.files = [str(f) for f in files]

    def endpoints(self) -> list[tuple[str, int]]:
        for f in self.files:
            check_content(f)
        return [(f, group) for f in self.files for group in range(pq.ParquetFile(f).num_row_groups)]

    def read_endpoint(self, endpoint, skip_rows: int = 0, columns: tuple[str, ...] | None = None):
        path, group = endpoint
        batches = pq.ParquetFile(path).iter_batches(row_groups=[group], columns=list(columns) if columns else None)
        yield from skip_rows_of(batches, skip_rows)

    def metadata(self) -> dict[str, dict]:
        return {f: read_metadata(pq.read_schema(f), f) for f in self.files}

    def file_speakers(self) -> dict[str, dict[str, int] | None]:
        return {f: meta.get("speakers") for f, meta in self.metadata().items()}


log = logging.getLogger("mmtrain.data")
RETRYABLE = (flight.FlightUnavailableError, flight.FlightTimedOutError, flight.FlightCancelledError)


class ArrowFlightDataset(_PackedStream):
    """Streams the given files (default: every file the server lists) from a Flight server
    (flight_server.py on the data machine), with an optional bearer token and TLS."""

    def __init__(self, host: str, port: int, files: list[str] | None, layout: SequenceLayout,
                 batch_size: int, *, shuffle: bool = True, seed: int = 0, shuffle_window: int = 16,
                 token: str | None = None, tls_root_cert: bytes | None = None, max_retries: int = 8,
                 retry_backoff_s: float = 0.5, read_timeout_s: float = 120.0):
        super().__init__(layout, batch_size, shuffle, seed, shuffle_window)
        self.max_retries, self.retry_backoff_s, self.read_timeout_s = max_retries, retry_backoff_s, read_timeout_s
        self.location = f"{'grpc+tls' if tls_root_cert else 'grpc'}://{host}:{port}"
        self.token, self.tls_root_cert = token, tls_root_cert
        self._client = None
        self._infos = None
        self.files = list(files) if files else self._served_files()

    def __getstate__(self):
        # gRPC clients are not fork-safe: each DataLoader worker makes its own.
        return {**self.__dict__, "_client": None, "_infos": None}   # neither pickles; a worker fetches its own

    @property
    def client(self):
        if self._client is None:
            self._client = flight.FlightClient(self.location, tls_root_certs=self.tls_root_cert)
        return self._client

    @property
    def _options(self):
        """Every call carries the token and is cancelled after read_timeout_s (then retried)."""
        headers = [(b"authorization", f"Bearer {self.token}".encode())] if self.token else []
        return flight.FlightCallOptions(headers=headers, timeout=self.read_timeout_s)

    def _failed(self, failures: int, what: str, err: Exception) -> None:
        """After a retryable failure: raise once there were too many in a row, else say so and
        back off."""
        if failures > self.max_retries:
            raise DataError(f"{self.location}: {what} failed {failures} times in a row: "
                            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
        wait = min(self.retry_backoff_s * 2 ** (failures - 1), 30.0)
        log.warning("%s: %s failed (%s); retry %d of %d in %.1f s", self.location, what, type(err).__name__,
                    failures, self.max_retries, wait)
        time.sleep(wait)
        self._client = None   # reconnect

    def _call(self, what: str, call):
        failures = 0
        while True:
            try:
                return call()
            except RETRYABLE as err:
                failures += 1
                self._failed(failures, what, err)
            except flight.FlightError as err:
                raise DataError(f"{self.location}: {what}: {err}") from err

    def _served_files(self) -> list[str]:
        files = self._call("listing files", lambda: [info.descriptor.path[0].decode()
                                                     for info in self.client.list_flights(options=self._options)])
        if not files:
            raise DataError(f"{self.location} serves no valid Parquet files")
        return files

    def _flight_infos(self):
        if self._infos is None:
            infos = {}
            for name in self.files:
                infos[name] = self._call(f"getting {name}", lambda name=name: self.client.get_flight_info(
                    flight.FlightDescriptor.for_path(name), self._options))
            self._infos = infos
        return self._infos

    def endpoints(self) -> list[tuple[str, bytes]]:
        return [(name, endpoint.ticket.ticket) for name, info in self._flight_infos().items()
                for endpoint in info.endpoints]

    def read_endpoint(self, endpoint, skip_rows: int = 0, columns: tuple[str, ...] | None = None):
        """Stream one endpoint. A lost connection or a read past `read_timeout_s` is retried with
        backoff from the first row not yet delivered; `max_retries` failures in a row are an error."""
        name, raw = endpoint
        ticket, delivered, failures = Ticket.decode(raw), skip_rows, 0
        options = self._options
        while True:
            try:
                request = replace(ticket, skip_rows=delivered, columns=columns or ticket.columns)
                reader = self.client.do_get(flight.Ticket(request.encode()), options)
                for chunk in reader:
                    delivered += chunk.data.num_rows
                    failures = 0
                    yield chunk.data
                return
            except RETRYABLE as err:
                failures += 1
                self._failed(failures, f"reading {name} from row {delivered}", err)
            except flight.FlightError as err:
                raise DataError(f"{self.location}: reading {name} failed: {err}") from err

    def metadata(self) -> dict[str, dict]:
        return {f"{self.location}/{name}": read_metadata(info.schema, name)
                for name, info in self._flight_infos().items()}

    def file_speakers(self) -> dict[str, dict[str, int] | None]:
        return {name: read_metadata(info.schema, name).get("speakers") for name, info in self._flight_infos().items()}
