"""Checkpoints: atomic files, and the Checkpointer that saves and restores a run's pieces.

Each piece saves and restores itself (`state_dict` / `load_state_dict`, as torchtitan's
checkpoint pieces do). Model and optimizer go through torch.distributed.checkpoint's full state
dicts, the same for one process, DDP and FSDP2; pieces that differ per process (RNG, data
position) are gathered from every rank; the run's counters sit at the top level, so `step` is
one key away for any tool that reads a checkpoint.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from parallel import Ranks, from_rank0
from schema import fsync_directory

CHECKSUM_KEY = "sha256"   # of the payload, stored in the same file


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


# ---------------------------------------------------------------------------------------------
# Files

class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount); the earlier ones are intact."""


class CheckpointCorrupt(ValueError):
    """A checkpoint file that does not load, or whose content changed after it was written."""


def payload_digest(state) -> str:
    """SHA-256 over a state's structure and every tensor's bytes, in a fixed order: a flipped bit
    anywhere in the weights, optimizer or counters changes it."""
    digest = hashlib.sha256()

    def visit(value):
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(value, dict):
            digest.update(f"D{len(value)}".encode())
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                visit(item)
        else:
            digest.update(repr(value).encode())

    visit(state)
    return digest.hexdigest()


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind an error (torch.save reports a failed write as a RuntimeError whose
    context holds it)."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def write_atomically(path: Path, state: dict) -> Path:
    """Temporary file, fsync, rename: a crash mid-write leaves the previous file intact. The file
    carries a checksum of its content, which load_checkpoint verifies. A failed write (a full
    disk) removes the temporary file and raises CheckpointWriteError naming the folder and the
    space needed."""
    state = {**state, CHECKSUM_KEY: payload_digest(state)}
    tmp = path.with_suffix(".pt.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except (OSError, RuntimeError) as err:
        reason = _os_error(err)
        if reason is None:
            raise
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        raise CheckpointWriteError(
            f"cannot write checkpoint {path.name} in {path.parent}: {reason.strerror or reason} "
            f"(it needs about {_tensor_bytes(state) / 2**20:,.0f} MiB; {free / 2**20:,.0f} MiB free there)") from None
    return path


def save_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    """ckpt-STEP.pt, keeping the newest `keep` of them (best.pt is kept apart)."""
    path = write_atomically(out_dir / f"ckpt-{state['step']:08d}.pt", state)
    for old in sorted(out_dir.glob("ckpt-*.pt"))[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    """The state saved in `path`, its checksum verified. Raises CheckpointCorrupt saying why not."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointCorrupt(f"{path}: empty file (0 bytes): the write never finished")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load fails in many ways on a damaged file
        raise CheckpointCorrupt(f"{path}: not a loadable checkpoint ({size:,} bytes): "
                                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'truncated'}") from err
    if not isinstance(state, dict):
        raise CheckpointCorrupt(f"{path}: not a checkpoint (a {type(state).__name__})")
    expected = state.pop(CHECKSUM_KEY, None)
    if expected is not None and payload_digest(state) != expected:
        raise CheckpointCorrupt(f"{path}: checksum mismatch: the file changed after it was written "
                                f"(a disk or copy error); it would resume different weights")
    return state


def newest_checkpoint(out_dir: Path, problems: list[str] | None = None) -> tuple[Path, dict] | None:
    """The newest checkpoint in out_dir that loads and verifies, with its state; each one passed
    over is said (and added to `problems`)."""
    for path in sorted(out_dir.glob("ckpt-*.pt"), reverse=True):
        try:
            return path, load_checkpoint(path)
        except CheckpointCorrupt as err:
            print(f"skipping checkpoint {err}", file=sys.stderr)
            if problems is not None:
                problems.append(str(err))
    return None


# ---------------------------------------------------------------------------------------------
# Pieces that are not objects of their own

class GlobalRNG:
    """Every global generator, in types that torch.load(weights_only=True) accepts."""

    def state_dict(self) -> dict:
        kind, keys, *rest = np.random.get_state()
        state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), *rest),
                 "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Checkpointer:
    """A run's checkpoints. Every rank calls `state`, `save` and `load` (they are collective);
    rank 0 alone reads and writes files.

    pieces: saved once, the same on every rank (scheduler, scaler);
    per_rank: one state per rank (RNG, data position), gathered to rank 0;
    progress: the run's counters, kept at the checkpoint's top level (step, ...);
    extra: constant facts written into every checkpoint (the config)."""

    def __init__(self, out_dir: Path, keep: int, ranks: Ranks, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, pieces: dict[str, Stateful], per_rank: dict[str, Stateful],
                 progress: Stateful, extra: dict):
        self.out_dir, self.keep, self.ranks = out_dir, keep, ranks
        self.model, self.optimizer = model, optimizer
        self.pieces, self.per_rank, self.progress, self.extra = pieces, per_rank, progress, extra

    def state(self) -> dict | None:
        """Everything a checkpoint holds, assembled on rank 0 (None elsewhere)."""
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer, options=FULL_STATE)
        mine = {name: piece.state_dict() for name, piece in self.per_rank.items()}
        every_rank = [mine]
        if torch.distributed.is_initialized():
            every_rank = [None] * self.ranks.world if self.ranks.main else None
            torch.distributed.gather_object(mine, every_rank, dst=0)
        if not self.ranks.main:
            return None
        return {"model": model_state, "optimizer": optimizer_state,
                **{name: piece.state_dict() for name, piece in self.pieces.items()},
                "ranks": every_rank, **self.progress.state_dict(), **self.extra}

    def save(self, name: str | None = None) -> Path | None:
        """ckpt-STEP.pt (the newest `keep` kept), or the file `name` (best.pt). -> the path on rank 0."""
        state = self.state()
        if state is None:
            return None
        if name is not None:
            return write_atomically(self.out_dir / name, state)
        return save_checkpoint(self.out_dir, state, self.keep)

    def load(self, state: dict | None) -> None:
        """Restore from a checkpoint that rank 0 read (`state` is None on the other ranks, whose
        machines may not hold the run folder): weights and optimizer are broadcast, every rank
        takes its own RNG and data position."""
        small = from_rank0({k: v for k, v in state.items() if k not in ("model", "optimizer")} if state else None)
        if len(small["ranks"]) != self.ranks.world:
            raise ValueError(f"the checkpoint was written by {len(small['ranks'])} process(es); resume it with "
                             f"as many (torchrun --nproc_per_node), not {self.ranks.world}")
        # Two calls, not set_state_dict: given an empty model dict (the other ranks) it would skip the model.
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.ranks.world > 1)
        set_model_state_dict(self.model, state["model"] if state else {}, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"] if state else {}, options=options)
        for name, piece in self.pieces.items():
            if name in small:   # a piece added since the checkpoint was written keeps its new state
                piece.load_state_dict(small[name])
        for name, piece in self.per_rank.items():
            piece.load_state_dict(small["ranks"][self.ranks.rank][name])
        self.progress.load_state_dict(small)
