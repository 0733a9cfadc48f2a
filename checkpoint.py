"""Checkpoints: atomic files, and the Checkpointer that saves and restores a run's pieces.

Each piece saves and restores itself (`state_dict` / `load_state_dict`, as torchtitan's
checkpoint pieces do). Model and optimizer go through torch.distributed.checkpoint's full state
dicts, the same for one process, DDP and FSDP2; pieces that differ per process (RNG, data
position) are gathered from every rank; the run's counters sit at the top level, so `step` is
one key away for any tool that reads a checkpoint.
"""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from parallel import Ranks, from_rank0


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


# ---------------------------------------------------------------------------------------------
# Files

def write_atomically(path: Path, state: dict) -> Path:
    """Temporary file, fsync, rename: a crash mid-write leaves the previous file intact."""
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    """ckpt-STEP.pt, keeping the newest `keep` of them (best.pt is kept apart)."""
    path = write_atomically(out_dir / f"ckpt-{state['step']:08d}.pt", state)
    for old in sorted(out_dir.glob("ckpt-*.pt"))[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def find_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint in out_dir that loads."""
    for path in sorted(out_dir.glob("ckpt-*.pt"), reverse=True):
        try:
            load_checkpoint(path)
            return path
        except Exception as err:  # noqa: BLE001 - a damaged file is skipped, not fatal
            print(f"skipping unreadable checkpoint {path}: {err}", file=sys.stderr)
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
            piece.load_state_dict(small[name])
        for name, piece in self.per_rank.items():
            piece.load_state_dict(small["ranks"][self.ranks.rank][name])
        self.progress.load_state_dict(small)
