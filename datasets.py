"""The datasets that stream Parquet rows (schema.py) as packed training batches (packing.py).

One Parquet row is one spoken segment. Segments of one document (a recording or conversation)
share a doc_id and are numbered by segment_index. Two sources with one interface: `ArrowFlightDataset` streams from a Flight server (the data
machine), `LocalParquetDataset` reads files on the training machine.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from config import DataConfig
from flight_client import Connection, Servers

from packing import (Batch, GreedyPacker, Segment, SequenceLayout, Skipped, StreamPosition, collate, pack_sequences,
                     padding_batch, segment_positions, segments_from_batch)
from schema import UNKNOWN, DataError, read_metadata, skip_rows_of, summarise_problems, validate_file


# ---------------------------------------------------------------------------------------------
# Datasets

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

    def read_as(self, rank: int, world: int) -> None:
        """Read the share of the data of `rank` among `world` (by default this process's place
        in the process group; under context parallelism its group's among the groups)."""
        self.rank, self.world = rank, world

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
        saved_world = len(written[0][1])
        if saved_world != self.world:
            raise ValueError(f"the checkpoint was written by {saved_world} process(es), this run has {self.world}: "
                             "resume with as many")
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
                segment.speaker_name = self._speaker_names[file].get(local)
                segment.speaker_id = int(mapping[local]) if local < len(mapping) else UNKNOWN
                if segment.speaker_id == UNKNOWN:
                    self.unseen_speakers[self._speaker_names[file].get(local, f"id {local}")] += 1
        return segments

    def segments(self, endpoints: list, first_endpoint: int = 0, first_row: int = 0
                 ) -> Iterator[tuple[tuple[int, int], Segment]]:
        """((endpoint index, row), segment) in the order of `endpoints`, from the given one and
        row on, speakers numbered as the run numbers them."""
        for index, row, record_batches in self._endpoint_reads(endpoints, first_endpoint, first_row):
            for record_batch in record_batches:
                for segment in self._with_run_speakers(segments_from_batch(record_batch), endpoints[index][0]):
                    yield (index, row), segment
                    row += 1

    def _endpoint_reads(self, endpoints: list, first_endpoint: int, first_row: int) -> Iterator[tuple[int, int, Iterable]]:
        """(endpoint index, first row, its record batches) for each endpoint from the given one on."""
        for index in range(first_endpoint, len(endpoints)):
            row = first_row if index == first_endpoint else 0
            yield index, row, self.read_endpoint(endpoints[index], row)

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


class ArrowFlightDataset(_PackedStream):
    """Streams the given files (default: every file the servers list) from one or more Flight
    servers (flight_server.py on the data machines), reached as `connection` says, read as one
    (flight_client.Servers: replicas, retries, failover). While one endpoint of a replicated file
    is read the next is read ahead, which keeps two servers busy at once."""

    def __init__(self, connection: Connection, files: list[str] | None, layout: SequenceLayout,
                 batch_size: int, *, shuffle: bool = True, seed: int = 0, shuffle_window: int = 16,
                 max_retries: int = 8, retry_backoff_s: float = 0.5, read_timeout_s: float = 120.0):
        super().__init__(layout, batch_size, shuffle, seed, shuffle_window)
        self.servers = Servers(connection, max_retries, retry_backoff_s, read_timeout_s)
        self.locations = connection.locations
        self.files = list(files) if files else self.servers.served_files()

    @classmethod
    def configured(cls, connection: Connection, files: list[str] | None, layout: SequenceLayout, data: DataConfig,
                   *, shuffle: bool, batch_size: int | None = None) -> "ArrowFlightDataset":
        """With the run's data settings (order, retries, timeouts): training and predict/embed/
        evaluate open their data alike."""
        return cls(connection, files, layout, batch_size or data.batch_size, shuffle=shuffle, seed=data.seed,
                   shuffle_window=data.shuffle_window, max_retries=data.max_retries,
                   retry_backoff_s=data.retry_backoff_s, read_timeout_s=data.read_timeout_s)

    def endpoints(self) -> list[tuple[str, bytes, tuple[str, ...]]]:
        return self.servers.endpoints(self.files)

    def read_endpoint(self, endpoint, skip_rows: int = 0, columns: tuple[str, ...] | None = None):
        return self.servers.read_endpoint(endpoint, skip_rows, columns)

    def _endpoint_reads(self, endpoints: list, first_endpoint: int, first_row: int):
        """With replicas, the next endpoint is read ahead in a thread (whole: a row group), so
        that its server works while this endpoint's rows are packed and trained on."""
        if not any(len(endpoint[2]) > 1 for endpoint in endpoints[first_endpoint:]):
            yield from super()._endpoint_reads(endpoints, first_endpoint, first_row)
            return
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="read-ahead")

        def read(index):
            return list(self.read_endpoint(endpoints[index], first_row if index == first_endpoint else 0))

        try:
            ahead = pool.submit(read, first_endpoint) if first_endpoint < len(endpoints) else None
            for index in range(first_endpoint, len(endpoints)):
                record_batches = ahead.result()
                ahead = pool.submit(read, index + 1) if index + 1 < len(endpoints) else None
                yield index, first_row if index == first_endpoint else 0, record_batches
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def metadata(self) -> dict[str, dict]:
        return {f"{locations[0]}/{name}": read_metadata(info.schema, name)
                for name, (info, locations) in self.servers.catalog(self.files).items()}

    def file_speakers(self) -> dict[str, dict[str, int] | None]:
        return {name: read_metadata(info.schema, name).get("speakers")
                for name, (info, _) in self.servers.catalog(self.files).items()}
