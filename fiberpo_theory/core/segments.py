"""Segment reductions over integer ids (no Python loops over segments).

A *segment* is the set of tokens sharing an id (a trajectory, a prompt group,
a domain, a state).  ``Segments`` maps the ids to a dense index ``0..M-1``
once, taking the layout as it comes:

* padded ``(B, L)`` batches and packed ``cu_seqlens``-style batches give the
  segment lengths directly (:meth:`Segments.from_lengths`): nothing is sorted;
* ids that are already sorted (every packed layout, and the row ids of a
  flattened padded batch) are indexed by their runs: one pass marks where the
  id changes (one C loop, :mod:`~fiberpo_theory.core.native`, which also
  stops at the first decrease), and the ids are sorted iff the M run values
  increase (no separate sortedness pass, no sort); the per-element index is
  a cumulative sum of the marks on the torch path, and on the C path is
  repeated from the run lengths only when something asks for it;
* unsorted ids in a range a few times their number are ranked by counting
  (``bincount``); only the others are sorted (``torch.unique``).

Contiguous segments (the first two cases) reduce with ``segment_reduce`` by
lengths; the others with ``index_add``.  The index is held as int32 where it
fits (the long one is built only when asked for).
"""

from __future__ import annotations

import ctypes

import torch

from . import _validate
from . import native as _native


# ids up to this many times their number are ranked by counting instead of sorting
_DENSE_FACTOR = 4


def _index_dtype(size: int) -> torch.dtype:
    """int32 when a (segment, sign) key ``2 * index + 1`` of ``size`` segments fits: half the index traffic."""
    return torch.int32 if 2 * size + 2 < torch.iinfo(torch.int32).max else torch.long


def _version(tensor: torch.Tensor) -> int:
    """How many in-place writes ``tensor`` has had (inference-mode tensors keep no count: they are taken as is)."""
    return -1 if tensor.is_inference() else tensor._version


class Segments:
    """Dense indexing of the segments named by one id column.

    Attributes:
        index: ``(N,)`` long, the dense segment index of each element (built
            on first use from :attr:`narrow_index` where that is int32).
        narrow_index: ``(N,)`` the same index as int32 where it fits: what
            the package's own gathers, segment sums and sign keys read.
        count: ``(M,)`` long, the number of elements in each segment.
        ids: ``(M,)`` long, the original id of each segment (sorted).
        contiguous: every segment is one run of consecutive elements, in
            segment order (``index`` is non-decreasing), so reductions can go
            by lengths.

    A ready ``Segments`` is what validates a batch once: functions given one
    do not look at the ids again.  Contiguous segments may be made from
    their lengths alone (``elements`` given, no index): the per-element
    index is then built on first use, and the compiled loops that walk the
    segments by their lengths never need it.  A hand-built ``Segments`` has
    its index range and its lengths tested once before a compiled loop reads
    them (``checked=True`` is for constructors that guarantee both).

    The attributes are read-only, and a tensor changed in place after its
    test (``seg.count[0] = ...``) is tested again at its next read: the
    compiled loops read and write by these lengths and indices without
    bounds checks.
    """

    def __init__(self, index=None, count=None, ids=None, contiguous: bool = False, *, narrow_index=None,
                 elements: int | None = None, checked: bool = False):
        if index is None and narrow_index is None and not (contiguous and elements is not None):
            raise ValueError("Segments needs index or narrow_index (or, when contiguous, elements)")
        self._index, self._narrow = index, narrow_index
        self._count, self._ids, self._contiguous = count, ids, contiguous
        self._elements = elements if index is None and narrow_index is None else None
        # id(tensor) -> the version (in-place write count) at which it passed its test: the index in 0..M-1, the
        # counts covering the elements.  checked: the package's own constructors guarantee both.
        self._trusted: dict[int, int] = {}
        if checked:
            for tensor in (index, narrow_index, count):
                self._trust(tensor)
        self._runs = None

    def _trust(self, tensor: torch.Tensor | None) -> None:
        if tensor is not None:
            self._trusted[id(tensor)] = _version(tensor)  # the tensor is held by self, so its id is not reused

    def _is_trusted(self, tensor: torch.Tensor) -> bool:
        return self._trusted.get(id(tensor)) == _version(tensor)

    @property
    def count(self) -> torch.Tensor:
        return self._count

    @property
    def ids(self) -> torch.Tensor:
        return self._ids

    @property
    def contiguous(self) -> bool:
        return self._contiguous

    def _in_range(self, index: torch.Tensor) -> torch.Tensor:
        """``index``, tested once to lie in ``0..M-1`` when this ``Segments`` was built by hand (``ValueError`` else).

        Every path reads the index: the compiled loops without bounds checks,
        ``index_add`` with an ``IndexError`` and CUDA with a device-side
        assert, so the range is checked at the first read, whichever it is.
        """
        if not self._is_trusted(index):
            if index.numel():
                low, high = (int(v) for v in torch.aminmax(index))
                if low < 0 or high >= self.size:
                    raise ValueError(f"Segments index runs from {low} to {high} but there are {self.size} segments")
            self._trust(index)
        return index

    @property
    def index(self) -> torch.Tensor:
        if self._index is None:
            self._index = self._derived(self.narrow_index, self.narrow_index.long())
        return self._in_range(self._index)

    @property
    def narrow_index(self) -> torch.Tensor:
        if self._narrow is None and self._index is None:  # known by its lengths only: repeat each segment number
            dense = torch.arange(self.size, dtype=_index_dtype(self.size), device=self.device)
            self._narrow = dense.repeat_interleave(self.count, output_size=self._elements)
            self._trust(self._narrow)  # segment numbers 0..M-1 by construction
        elif self._narrow is None:
            dtype = _index_dtype(self.size)
            narrow = self._index if dtype == self._index.dtype else self._index.to(dtype)
            self._narrow = self._derived(self._index, narrow)
        return self._in_range(self._narrow)

    def _derived(self, source: torch.Tensor, copy: torch.Tensor) -> torch.Tensor:
        """``copy`` of the index ``source``, trusted as far as the source is (no second range test)."""
        if self._is_trusted(source):
            self._trust(copy)
        return copy

    @property
    def size(self) -> int:
        return int(self.count.numel())

    @property
    def elements(self) -> int:
        """N, the number of indexed elements (without building the index)."""
        if self._elements is not None:
            return self._elements
        return (self._narrow if self._index is None else self._index).numel()

    @property
    def runs(self) -> torch.Tensor | None:
        """The segment lengths when the compiled run loops can walk them (contiguous, CPU, int64), else ``None``.

        The loops trust the lengths to cover the elements exactly, so that is checked (once) here: a
        ``Segments`` built by hand with lengths that do not add up raises instead of reading out of bounds.
        """
        count = self._count
        if self._runs is not None and self._is_trusted(count):  # asked several times per step
            return self._runs
        runs = None
        if self._contiguous and count.dtype == torch.long and _native.plain_cpu(count):
            runs = self._lengths().contiguous()
        self._runs = runs
        return runs

    def _lengths(self) -> torch.Tensor:
        """:attr:`count` of contiguous segments, tested once (and again after an in-place write) to be at least 1
        each and to cover the elements: the run loops walk the elements by them, ``segment_reduce`` takes them
        unchecked."""
        count = self._count
        if not self._is_trusted(count):
            total = int(count.sum())
            if total != self.elements or (count.numel() and int(count.min()) < 1):
                raise ValueError(f"contiguous Segments: the counts sum to {total} (each must be at least 1) "
                                 f"but {self.elements} elements are indexed")
            self._trust(count)
        return count

    @property
    def device(self) -> torch.device:
        return self.count.device

    def sign_key(self, x: torch.Tensor) -> torch.Tensor:
        """``2 * index + 1[x < 0]``: the (segment, sign) entry of every element, l = +1 at x = 0 (Eq. 13).

        Written into one fresh buffer by a comparison and an in-place add
        (``bool + int`` would promote through a second temporary).
        """
        narrow = self.narrow_index
        key = torch.lt(x, 0, out=torch.empty(x.shape, dtype=narrow.dtype, device=x.device))
        return key.add_(narrow, alpha=2)

    @classmethod
    def from_ids(cls, ids: torch.Tensor, *, name: str = "ids") -> "Segments":
        """Index an id column, equal to ``torch.unique(ids, sorted=True, ...)`` whatever the path.

        Sorted ids cost a boundary pass and a count pass (no sort, no
        separate sortedness pass: they are sorted iff the run values increase);
        unsorted ids whose largest value is below a few times their number
        are ranked by a ``bincount`` (no sort); only the rest sort.  Negative
        ids raise ``ValueError`` naming ``name``, read off the run values or
        the min that ranking needs anyway.
        """
        _validate.id_column(name, ids)
        if ids.numel() >= 2:
            # the C pass stops at the first decrease, so it needs no probe first; the torch passes do
            native = _native_runs_for(ids)
            segs = _native_sorted_runs(ids.contiguous()) if native else _sorted_runs(ids) if _maybe_sorted(ids) else None
            if segs is not None:
                first = _first_id(segs.ids) if native else int(segs.ids[0])  # sorted: the first id is the least
                if first < 0:
                    raise ValueError(f"{name} must be non-negative, found {first}")
                return segs
        if ids.numel() < 2:
            unique, inverse, count = torch.unique_consecutive(ids.long(), return_inverse=True, return_counts=True)
            if ids.numel() and int(unique[0]) < 0:
                raise ValueError(f"{name} must be non-negative, found {int(unique[0])}")
            return cls(index=inverse, count=count, ids=unique, contiguous=True, checked=True)
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0:
            raise ValueError(f"{name} must be non-negative, found {low}")
        if high < _DENSE_FACTOR * ids.numel() + 1024:
            count = torch.bincount(ids)
            present = count > 0
            rank = present.cumsum(0, dtype=_index_dtype(count.numel())) - 1
            return cls(narrow_index=rank.index_select(0, ids), count=count[present], ids=present.nonzero().squeeze(1),
                       checked=True)
        unique, inverse, count = torch.unique(ids.long(), sorted=True, return_inverse=True, return_counts=True)
        return cls(index=inverse, count=count, ids=unique, checked=True)

    @classmethod
    def from_lengths(cls, lengths: torch.Tensor, ids: torch.Tensor | None = None) -> "Segments":
        """Contiguous segments of the given lengths (a padded batch's ``mask.sum(1)``, or ``diff(cu_seqlens)``).

        ``ids`` (default ``0..M-1``) must be increasing so that ``ids`` stays
        sorted as :meth:`from_ids` would give it.  The index is repeated as
        int32 where it fits (a long ``repeat_interleave`` costs several times more),
        and only when something asks for it.
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
        # the index is built on first use
        return cls(count=lengths, ids=ids, contiguous=True, elements=int(lengths.sum()), checked=True)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Per-segment sum of ``values`` (first dimension indexed like ``index``)."""
        if self.contiguous and values.is_floating_point():  # segment_reduce has no integer kernels
            # the lengths are tested once per Segments, not by segment_reduce on every call (two scalars read
            # back, host-device syncs on CUDA)
            lengths = self._lengths()
            unsafe = values.shape[0] == self.elements
            return torch.segment_reduce(values, "sum", lengths=lengths, axis=0, unsafe=unsafe)
        out = values.new_zeros((self.size,) + tuple(values.shape[1:]))
        return out.index_add(0, self.narrow_index, values)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        counts = self.count.to(values.dtype)
        if values.dim() > 1:
            counts = counts.view(-1, *([1] * (values.dim() - 1)))
        return self.sum(values) / counts

    def gather(self, per_segment: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-segment tensor back to its elements (by the run lengths where the loops can)."""
        runs = self.runs if per_segment.dim() == 1 and not per_segment.requires_grad else None
        source = per_segment.contiguous() if runs is not None else per_segment
        kernels = _native.kernels_for(source) if runs is not None else None
        if kernels is None:
            return per_segment.index_select(0, self.narrow_index)
        lib, _, suffix = kernels
        out = torch.empty(self.elements, dtype=per_segment.dtype)
        getattr(lib, f"gather_runs_{suffix}")(self.size, _native.ptr(runs), _native.ptr(source), _native.ptr(out))
        return out


def _maybe_sorted(ids: torch.Tensor, probes: int = 4096) -> bool:
    """False when some of ``probes`` evenly spread neighbour pairs decrease: shuffled ids skip the run passes.

    A cheap filter only (True does not prove sorted ids); costs O(probes).
    """
    stride = max(1, (ids.numel() - 1) // probes)
    return bool((ids[1::stride] >= ids[:-1:stride]).all())


def _sorted_runs(ids: torch.Tensor) -> "Segments | None":
    """Segments of ids in non-decreasing order by their runs, or ``None`` when they are not sorted.

    One pass marks where the id changes, a cumulative sum over the marks is
    the (int32) index; the ids are sorted iff the run values strictly
    increase, an M-sized check instead of an N-sized one.
    """
    n = ids.numel()
    change = torch.empty(n, dtype=torch.bool, device=ids.device)
    change[0] = False  # written in place so that the cumulative sum below needs no shifted copy
    torch.ne(ids[1:], ids[:-1], out=change[1:])
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=ids.device), change.nonzero().squeeze(1)])
    unique = ids.index_select(0, starts).long()
    if unique.numel() > 1 and not bool((unique[1:] > unique[:-1]).all()):
        return None
    count = torch.diff(starts, append=torch.full((1,), n, dtype=torch.long, device=ids.device))
    index = change.cumsum(0, dtype=_index_dtype(unique.numel()))
    return Segments(narrow_index=index, count=count, ids=unique, contiguous=True, checked=True)


_NATIVE_IDS = {torch.int64: "i64", torch.int32: "i32"}
_RUN_ROOM = 1 << 14


def _native_runs_for(ids: torch.Tensor) -> bool:
    """Whether the C sorted-runs loop takes this id column."""
    return ids.dtype in _NATIVE_IDS and _native.plain_cpu(ids) and _native.library() is not None


def _native_sorted_runs(ids: torch.Tensor) -> "Segments | None":
    """:func:`_sorted_runs` by one C loop: run lengths, run ids and the sortedness test in one pass; the index is left lazy."""
    n = ids.numel()
    runs_of = getattr(_native.library(), f"sorted_runs_{_NATIVE_IDS[ids.dtype]}")
    # room for a typical number of runs: an N-sized buffer would cost page faults on every call
    room = min(n, _RUN_ROOM)
    count, values = torch.empty(room, dtype=torch.long), torch.empty(room, dtype=torch.long)
    runs = runs_of(n, _native.ptr(ids), None, None, _native.ptr(count), _native.ptr(values), room)
    if runs > room:  # more runs than room: once more with room for all of them
        count, values = torch.empty(runs, dtype=torch.long), torch.empty(runs, dtype=torch.long)
        runs = runs_of(n, _native.ptr(ids), None, None, _native.ptr(count), _native.ptr(values), runs)
    if runs < 0:
        return None
    if runs < count.numel():  # shrunk in place (the buffers are ours alone): cheaper than two views
        count.resize_(runs), values.resize_(runs)
    return Segments(count=count, ids=values, contiguous=True, elements=n, checked=True)


def _first_id(values: torch.Tensor) -> int:
    """``int(values[0])`` of a contiguous CPU int64 tensor the C loop wrote, read from its memory (no indexing op)."""
    return ctypes.c_int64.from_address(values.data_ptr()).value


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


def _carried_by_runs(child: Segments, columns: list[torch.Tensor]) -> torch.Tensor | None:
    """The ``(M, K)`` coarser ids of contiguous child segments, or ``None`` when some column does not nest.

    A column is constant on every run of the child iff each place where it
    changes is a run start: compare its number of changes with the number
    found just before the starts (a change pass and a sum, no scatter).
    Each segment then carries its first element's id.
    """
    starts = child.count.cumsum(0) - child.count
    native = all(c.dtype in _NATIVE_IDS and _native.plain_cpu(c) for c in columns) and _native.library()
    if native and child.runs is not None:  # runs: the lengths are checked to cover the elements
        return _native_carried_by_runs(child, starts, [c.contiguous() for c in columns])
    before_start = starts[1:] - 1
    nests = []
    for column in columns:
        change = column[1:] != column[:-1]
        nests.append(change.sum() == change.index_select(0, before_start).sum())
    if not bool(torch.stack(nests).all()):
        return None
    return torch.stack([column.index_select(0, starts).long() for column in columns], dim=1)


def _native_carried_by_runs(child: Segments, starts: torch.Tensor, columns: list[torch.Tensor]):
    """:func:`_carried_by_runs` by one C loop per column: the run check and the carried id in one read."""
    carried = torch.empty((len(columns), child.size), dtype=torch.long)
    for column, out in zip(columns, carried):
        carry = getattr(_native.library(), f"carried_runs_{_NATIVE_IDS[column.dtype]}")
        if not carry(child.size, _native.ptr(starts), column.numel(), _native.ptr(column), _native.ptr(out)):
            return None
    return carried.t()


def nested_segments(
    coarser: list[torch.Tensor], finest: Segments, labels: list[str], *, id_names: list[str] | None = None
) -> tuple[list[Segments], list[torch.Tensor]]:
    """Index a chain of nested id columns: coarsest first, the finest already indexed.

    Only the finest column is indexed per element; each coarser id is carried
    to the finest segments by a per-segment min and max (:func:`carried_ids`),
    which agree exactly when the ids nest, and the coarser levels are indexed
    over those M segments instead of the N elements.  Returns the Segments of
    every level over the finest segments (the finest itself last) and, for
    each level below the coarsest, the dense index of its parent per segment.
    ``labels`` name the levels (coarsest first) in the ``ValueError`` raised
    when some level does not nest in the one above.  ``id_names`` (the
    arguments the coarser columns came as) turns on their sign check, read
    off the carried ids: the smallest carried id is the column's minimum on
    either path, so no N-sized min pass is needed.
    """
    if not coarser:
        return [finest], []
    low = _carried_by_runs(finest, coarser) if finest.contiguous else None
    split = None  # the run check found every column constant on every run: nothing splits
    if low is None:  # scattered segments, or ids that do not nest: the min/max pass names the culprit
        low, split = carried_ids(finest, torch.stack([column.long() for column in coarser], dim=1))
    if id_names is not None:
        smallest = low.amin(dim=0).tolist()  # one read of the (M, K) carried ids
        for name, value in zip(id_names, smallest):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, found {value}")
    for k in reversed(range(len(coarser)) if split is not None else ()):  # the nearest parent first
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
        if like.dim() != 1 or ids.elements != like.numel() or ids.device != like.device:
            raise ValueError(f"{name} segments index {ids.elements} elements but the values have {like.numel()}")
        return ids
    return Segments.from_ids(_validate.ids(name, ids, like, sign=False), name=name)
