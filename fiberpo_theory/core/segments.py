"""Segment reductions over integer ids (no Python loops over segments).

A *segment* is the set of tokens sharing an id (a trajectory, a prompt group,
a domain, a state).  ``Segments`` maps the ids to a dense index ``0..M-1``
once, taking the layout as it comes:

* padded ``(B, L)`` batches and packed ``cu_seqlens``-style batches give the
  segment lengths directly (:meth:`Segments.from_lengths`): nothing is sorted;
* ids that are already sorted (every packed layout, and the row ids of a
  flattened padded batch) are detected by one comparison pass and indexed by
  ``unique_consecutive`` (a boundary pass), not a sort;
* unsorted ids in a range a few times their number are ranked by counting
  (``bincount``); only the others are sorted (``torch.unique``).

Contiguous segments (the first two cases) reduce with ``segment_reduce`` by
lengths; the others with ``index_add``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from . import _validate


# ids up to this many times their number are ranked by counting instead of sorting
_DENSE_FACTOR = 4


@dataclass(frozen=True)
class Segments:
    """Dense indexing of the segments named by one id column.

    Attributes:
        index: ``(N,)`` long, the dense segment index of each element.
        count: ``(M,)`` long, the number of elements in each segment.
        ids: ``(M,)`` long, the original id of each segment (sorted).
        contiguous: every segment is one run of consecutive elements, in
            segment order (``index`` is non-decreasing), so reductions can go
            by lengths.
    """

    index: torch.Tensor
    count: torch.Tensor
    ids: torch.Tensor
    contiguous: bool = False

    @property
    def size(self) -> int:
        return int(self.count.numel())

    @functools.cached_property
    def key_base(self) -> torch.Tensor:
        """``2 * index`` as int32 (when it fits): the base of a (segment, sign) key, built once per ``Segments``."""
        dtype = torch.int32 if 2 * self.index.numel() < torch.iinfo(torch.int32).max else torch.long
        return self.index.to(dtype) * 2

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> "Segments":
        """Index an id column, equal to ``torch.unique(ids, sorted=True, ...)`` whatever the path.

        Sorted ids cost one comparison pass and a boundary pass; unsorted
        ids whose largest value is below a few times their number are
        ranked by a ``bincount`` (two passes, no sort); only the rest sort.
        """
        if ids.numel() < 2 or bool((ids[1:] >= ids[:-1]).all()):
            unique, inverse, count = torch.unique_consecutive(ids, return_inverse=True, return_counts=True)
            return cls(index=inverse, count=count, ids=unique, contiguous=True)
        if int(ids.max()) < _DENSE_FACTOR * ids.numel() + 1024:
            count = torch.bincount(ids)
            present = count > 0
            rank = present.cumsum(0) - 1
            return cls(index=rank.index_select(0, ids), count=count[present], ids=present.nonzero().squeeze(1))
        unique, inverse, count = torch.unique(ids, sorted=True, return_inverse=True, return_counts=True)
        return cls(index=inverse, count=count, ids=unique)

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, ids: torch.Tensor | None = None) -> "Segments":
        """Contiguous segments of the given lengths (a padded batch's ``mask.sum(1)``, or ``diff(cu_seqlens)``).

        ``ids`` (default ``0..M-1``) must be increasing so that ``ids`` stays
        sorted as :meth:`from_ids` would give it.
        """
        if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.is_floating_point():
            raise ValueError("lengths must be a 1-D integer tensor")
        if lengths.numel() == 0 or bool((lengths < 1).any()):
            raise ValueError("lengths must be non-empty and every segment at least one element long")
        lengths = lengths.long()
        dense = torch.arange(lengths.numel(), device=lengths.device)
        ids = dense if ids is None else ids.long()
        if ids.shape != lengths.shape or (ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all())):
            raise ValueError("ids must be increasing, one per length")
        return cls(index=dense.repeat_interleave(lengths), count=lengths, ids=ids, contiguous=True)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-segment sum of ``values`` (first dimension indexed like ``index``)."""
        if self.contiguous and values.is_floating_point():  # segment_reduce has no integer kernels
            return torch.segment_reduce(values, "sum", lengths=self.count, axis=0)
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


def nested_segments(
    coarser: list[torch.Tensor], finest: Segments, labels: list[str]
) -> tuple[list[Segments], list[torch.Tensor]]:
    """Index a chain of nested id columns: coarsest first, the finest already indexed.

    Only the finest column is indexed per element; each coarser id is carried
    to the finest segments by a per-segment min and max (:func:`carried_ids`),
    which agree exactly when the ids nest, and the coarser levels are indexed
    over those M segments instead of the N elements.  Returns the Segments of
    every level over the finest segments (the finest itself last) and, for
    each level below the coarsest, the dense index of its parent per segment.
    ``labels`` name the levels (coarsest first) in the ``ValueError`` raised
    when some level does not nest in the one above.
    """
    if not coarser:
        return [finest], []
    low, split = carried_ids(finest, torch.stack(coarser, dim=1))
    for k in reversed(range(len(coarser))):  # the nearest parent first
        if bool(split[:, k].any()):
            bad = int(split[:, k].nonzero()[0, 0])
            child, parent = labels[-1], labels[k]
            raise ValueError(
                f"{child} does not nest in {parent}: {child} {int(finest.ids[bad])} has elements in more than one {parent}"
            )
    segs = [Segments.from_ids(low[:, k]) for k in range(len(coarser))] + [finest]
    projection = [
        parent_of(segs[k + 1], segs[k].index, child_name=labels[k + 1], parent_name=labels[k])
        for k in range(len(segs) - 2)  # over segments: a coarse level can still fail to nest in the next
    ]
    return segs, projection + [segs[-2].index]


def segments_for(name: str, ids, like: torch.Tensor) -> Segments:
    """Validate an id column against the values it labels and index it.

    ``ids`` may also be a ready ``Segments`` (from :meth:`Segments.from_lengths`
    or an earlier call), which is only checked to cover ``like``.
    """
    if isinstance(ids, Segments):
        if ids.index.shape != like.shape or ids.index.device != like.device:
            raise ValueError(f"{name} segments index {ids.index.numel()} elements but the values have {like.numel()}")
        return ids
    return Segments.from_ids(_validate.ids(name, ids, like))
