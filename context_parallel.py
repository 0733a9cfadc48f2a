"""Context parallelism: the processes of a group each hold a contiguous slice of the same
sequences (rows), and attention reaches across the slices through differentiable collectives.

A sliding-window layer needs only a window's halo from each neighbour, a global layer every
slice's; with MLA what travels is what keys and values are made from: the compressed latent and
the rotated rotary key (kv_lora_rank + qk_rope_head_dim numbers a position), not per-head keys
and values. Documents may straddle slices: document ids travel with them. Gradients flow back
to the slice that owns each position.

Plumbing only (torch.distributed, no model): attention.py asks for halos.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

OUT_OF_RANGE = -2   # a halo position beyond the sequence's ends: never equal to a real document id


class _GatherSlices(torch.autograd.Function):
    """All-gather along a new leading dim; backward sums every process's gradient for its own
    slice's copies (a reduce-scatter: no process holds the whole gradient)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        tensor = tensor.contiguous()
        gathered = tensor.new_empty(world * tensor.shape[0], *tensor.shape[1:])   # one buffer, no copies to stack
        dist.all_gather_into_tensor(gathered, tensor, group=group)
        return gathered.view(world, *tensor.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mine = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_tensor(mine, grad.contiguous().flatten(0, 1), group=ctx.group)
        return mine, None


class _SumOverSlices(torch.autograd.Function):
    """Every process's tensor summed, on every process; backward the same sum of the gradients
    (each process's loss reads the sum, so each part's gradient is all of theirs)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


@dataclass(frozen=True)
class SequenceSlices:
    """This process's slice of every row: the group's processes hold consecutive slices in rank
    order, in proportion to their `shares` (equal without; a faster or larger card takes a
    longer slice), each at least a halo long. `over(length)` fixes the rows' length."""
    group: object          # a torch.distributed process group (None: the default group)
    rank: int
    world: int
    shares: tuple[int, ...] = ()
    length: int = 0

    def over(self, length: int, reach: int = 0) -> SequenceSlices:
        """Slices of rows of `length` positions, or of the shortest rows whose every slice is at
        least `reach` long where those are short (the caller pads its rows to `.length`)."""
        shares = self.shares or (1,) * self.world
        return replace(self, length=max(length, -(-(reach + 1) * sum(shares) // min(shares))))

    @property
    def bounds(self) -> list[int]:
        """Where each process's slice starts, and the rows' end: world + 1 positions."""
        shares = self.shares or (1,) * self.world
        total = sum(shares)
        return [round(self.length * sum(shares[:i]) / total) for i in range(self.world + 1)]

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    def mine(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's slice of the rows (dim 1) of a tensor over whole rows."""
        bounds = self.bounds
        return tensor[:, bounds[self.rank]:bounds[self.rank + 1]]

    def whole(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's slice (B, its length, ...) put back into whole rows, differentiable."""
        return self._joined(self.gather(self._padded(tensor)))

    def whole_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Every process's slice of ids (document ids, rotary tables: no gradient), whole rows."""
        return self._joined(self.gather_ids(self._padded(ids)))

    def _padded(self, tensor: torch.Tensor) -> torch.Tensor:   # to the longest slice: gathers need one size
        longest = max(b - a for a, b in itertools.pairwise(self.bounds))
        return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], longest - tensor.shape[1], *tensor.shape[2:])], 1)

    def _joined(self, parts: torch.Tensor) -> torch.Tensor:
        return torch.cat([part[:, :b - a] for part, (a, b) in zip(parts, itertools.pairwise(self.bounds))], 1)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """(world, *tensor.shape): every process's tensor, differentiable."""
        return _GatherSlices.apply(tensor, self.group)

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of every process's tensor (a partial sum over its slice), differentiable."""
        return _SumOverSlices.apply(tensor, self.group)

    def gather_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(world, *ids.shape): every process's ids (no gradient)."""
        gathered = ids.new_empty(self.world * ids.shape[0], *ids.shape[1:])
        dist.all_gather_into_tensor(gathered, ids.contiguous(), group=self.group)
        return gathered.view(self.world, *ids.shape)

    def with_halo(self, values: torch.Tensor, doc: torch.Tensor, width: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """values (B, L, C) and doc (B, L) of this slice -> both extended by `width` positions of
        the neighbouring slices on either side (B, width + L + width, ...); beyond the
        sequence's ends zeros with document OUT_OF_RANGE."""
        shortest = min(b - a for a, b in itertools.pairwise(self.bounds))
        if shortest < width:   # every process sees it (the bounds are alike), so all stop together
            raise ValueError(f"context parallelism: a slice of {shortest} positions is shorter than the window's "
                             f"reach ({width}); use fewer processes per sequence or longer sequences")
        edges = torch.cat([values[:, :width], values[:, -width:]], dim=1)          # (B, 2 width, C)
        all_edges = self.gather(edges)                                            # (world, B, 2 width, C)
        doc_edges = torch.cat([doc[:, :width], doc[:, -width:]], dim=1)
        all_doc = self.gather_ids(doc_edges)
        blank = values.new_zeros(values.shape[0], width, values.shape[2])
        blank_doc = torch.full_like(doc[:, :width], OUT_OF_RANGE)
        left = all_edges[self.rank - 1, :, width:] if self.rank > 0 else blank
        left_doc = all_doc[self.rank - 1, :, width:] if self.rank > 0 else blank_doc
        right = all_edges[self.rank + 1, :, :width] if self.rank < self.world - 1 else blank
        right_doc = all_doc[self.rank + 1, :, :width] if self.rank < self.world - 1 else blank_doc
        return torch.cat([left, values, right], dim=1), torch.cat([left_doc, doc, right_doc], dim=1)
