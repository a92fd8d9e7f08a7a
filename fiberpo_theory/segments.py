"""Segment reductions over arbitrary integer ids (no Python loops over segments).

A *segment* is the set of tokens sharing an id (a trajectory, a prompt group,
a domain, a state).  Ids are arbitrary non-negative integers; ``Segments``
maps them to a dense index ``0..M-1`` once, and every reduction is then an
``index_add_`` / ``scatter_reduce`` over that index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _validate


@dataclass(frozen=True)
class Segments:
    """Dense indexing of the segments named by one id column.

    Attributes:
        index: ``(N,)`` long, the dense segment index of each element.
        count: ``(M,)`` long, the number of elements in each segment.
        ids: ``(M,)`` long, the original id of each segment (sorted).
    """

    index: torch.Tensor
    count: torch.Tensor
    ids: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.count.numel())

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> "Segments":
        unique, inverse, count = torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)
        return cls(index=inverse, count=count, ids=unique)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-segment sum of ``values`` (first dimension indexed like ``index``)."""
        out = values.new_zeros((self.size,) + tuple(values.shape[1:]))
        return out.index_add(0, self.index, values)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        counts = self.count.to(values.dtype)
        if values.dim() > 1:
            counts = counts.view(-1, *([1] * (values.dim() - 1)))
        return self.sum(values) / counts

    def gather(self, per_segment: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-segment tensor back to its elements."""
        return per_segment.index_select(0, self.index)


def parent_of(child: Segments, parent_index: torch.Tensor, *, child_name: str, parent_name: str) -> torch.Tensor:
    """Map each child segment to its unique parent segment.

    ``parent_index`` is the dense parent index of every element.  Raises
    ``ValueError`` when some child segment has elements in two parents (the
    ids do not nest).
    """
    low = torch.full((child.size,), parent_index.numel(), dtype=torch.long, device=parent_index.device)
    high = torch.full((child.size,), -1, dtype=torch.long, device=parent_index.device)
    low = low.scatter_reduce(0, child.index, parent_index, reduce="amin")
    high = high.scatter_reduce(0, child.index, parent_index, reduce="amax")
    split = low != high
    if bool(split.any()):
        bad = int(split.nonzero()[0, 0])
        raise ValueError(
            f"{child_name} does not nest in {parent_name}: {child_name} {int(child.ids[bad])} "
            f"has elements in more than one {parent_name}"
        )
    return low


def carried_ids(child: Segments, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarser ids each child segment carries, and where its elements disagree.

    ``columns`` is ``(N, K)``: K coarser id columns of the N elements.
    Returns ``(ids, split)``, both ``(M, K)``: the per-segment minimum of each
    column and whether the maximum differs from it (the column does not nest
    in the child there).  Two ``scatter_reduce`` calls replace a sort of N ids
    per coarser column: the coarser levels can then be indexed over M
    segments instead of N elements.
    """
    index = child.index.unsqueeze(1).expand_as(columns)
    big = torch.iinfo(torch.long)
    shape = (child.size, columns.shape[1])
    low = torch.full(shape, big.max, dtype=torch.long, device=columns.device).scatter_reduce(0, index, columns, "amin")
    high = torch.full(shape, big.min, dtype=torch.long, device=columns.device).scatter_reduce(0, index, columns, "amax")
    return low, low != high


def segments_for(name: str, ids: torch.Tensor, like: torch.Tensor) -> Segments:
    """Validate an id column against the values it labels and index it."""
    return Segments.from_ids(_validate.ids(name, ids, like))
