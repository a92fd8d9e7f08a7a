"""Padded ``(B, L)`` batches with a response mask ⇄ the flat token layout.

verl and TRL store responses as a padded ``(B, L)`` tensor with a 0/1
``response_mask``; this package computes on flat ``(N,)`` tensors with a
trajectory id per token.  Rows are trajectories.
"""

from __future__ import annotations

import torch

from . import native as _native
from .segments import Segments


class FlatBatch:
    """The flat view of a padded batch: values keep row-major token order.

    Selections go by ``positions`` (``index_select``, whose backward is one
    ``index_add``); boolean-mask indexing of a ``(B, L)`` tensor costs about
    ten times more on CPU, forward and backward.  ``traj_id`` (the row of
    each token, ``(N,)`` long) is built on first use: the fused objectives
    walk the rows by their ``lengths`` instead.
    """

    __slots__ = ("mask", "shape", "positions", "lengths", "row_starts", "_traj_id")

    def __init__(self, mask: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                 row_starts: torch.Tensor | None = None):
        self.mask = mask  # (B, L) bool
        self.shape = mask.shape
        self.positions = positions  # (N,) each token's row-major index into the (B, L) batch (int32 where B·L fits)
        self.lengths = lengths  # (B,) long, response tokens per row
        # (B,) long, the column of each row's first token when every row's tokens are one block (left- or
        # right-padded batches), else None: then selections copy blocks instead of gathering by position
        self.row_starts = row_starts
        self._traj_id = None

    @property
    def traj_id(self) -> torch.Tensor:
        """``(N,)`` long: the row index of each token."""
        if self._traj_id is None:
            rows = torch.arange(self.shape[0], device=self.mask.device)
            self._traj_id = rows.repeat_interleave(self.lengths, output_size=self.positions.numel())
        return self._traj_id


def _mask(name: str, response_mask: torch.Tensor, shape) -> torch.Tensor:
    if not isinstance(response_mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor")
    if response_mask.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, L), got shape {tuple(response_mask.shape)}")
    if shape is not None and response_mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(response_mask.shape)}, expected {tuple(shape)}")
    if response_mask.is_floating_point():
        if not bool(((response_mask == 0) | (response_mask == 1)).all()):
            raise ValueError(f"{name} must contain only 0 and 1")
    return response_mask.bool()


def flatten_mask(response_mask: torch.Tensor, *, allow_empty_rows: bool = False) -> FlatBatch:
    """Index a padded batch: every masked token gets its row as trajectory id.

    One pass finds the token positions and one the row lengths; the row ids
    are the rows repeated by their lengths (no boolean indexing).  A row
    without a response token raises ``ValueError`` naming it, unless
    ``allow_empty_rows`` (verl's micro-batches may hold such rows; they then
    have no tokens and no trajectory).
    """
    mask = _mask("response_mask", response_mask, None)
    narrow = mask.numel() < torch.iinfo(torch.int32).max  # what backward saves of each selection: half the bytes
    found = _native_positions(mask) if narrow else None
    starts = empty = None
    if found is not None:
        positions, lengths, starts, empty = found
    else:
        lengths = mask.sum(1)
        positions = mask.reshape(-1).nonzero().squeeze(1)
        positions = positions.to(torch.int32) if narrow else positions
    if not allow_empty_rows and mask.shape[0]:
        if empty is None:
            empty = int((lengths == 0).nonzero()[0, 0]) if int(lengths.min()) == 0 else -1
        if empty >= 0:
            raise ValueError(f"response_mask row {empty} is an empty trajectory (no response token)")
    return FlatBatch(mask, positions, lengths, starts)


def _native_positions(mask: torch.Tensor):
    """(int32 positions, long lengths, row starts or ``None``, first empty row or -1) by one C pass over a CPU
    mask; ``None`` without the loops.

    The row starts are given only when every row's tokens form one block.
    """
    lib = _native.library() if _native.plain_cpu(mask) else None
    if lib is None:
        return None
    mask = mask.contiguous()
    # room for every element: the pages past the last token are never written, so they cost nothing
    room = torch.empty(mask.numel(), dtype=torch.int32)
    b, ptr = mask.shape[0], _native.ptr
    rows = torch.empty(2 * b + 2, dtype=torch.long)  # lengths, starts, (one block per row, first empty row)
    n = lib.mask_positions(b, mask.shape[1], ptr(mask), ptr(room), ptr(rows), ptr(rows, b), ptr(rows, 2 * b),
                           room.numel())
    blocks, empty = rows[2 * b :].tolist()
    return room[:n], rows[:b], (rows[b : 2 * b] if blocks else None), empty


class _RowBlocks(torch.autograd.Function):
    """The tokens of a ``(B, L)`` CPU tensor whose rows hold one block each, by block copies (C), and back.

    The same values as ``index_select`` by the positions, and the same
    gradient as its backward (``index_add`` into zeros), without the
    per-token index.  A gradient the loops cannot take (another dtype, a
    vmap-batched one, one that needs a graph) goes by ``index_add``.
    """

    @staticmethod
    def forward(ctx, values, batch):
        ctx.batch = batch
        return _gather_rows(values, batch)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_rows(grad, ctx.batch), None


def _gather_rows(values: torch.Tensor, batch: FlatBatch) -> torch.Tensor:
    values = values.contiguous()
    out = torch.empty(batch.positions.numel(), dtype=values.dtype)
    ptr = _native.ptr
    _native.library().gather_blocks(batch.shape[0], batch.shape[1], values.element_size(), ptr(values),
                                    ptr(batch.row_starts), ptr(batch.lengths), ptr(out))
    return out


def _scatter_rows(grad: torch.Tensor, batch: FlatBatch) -> torch.Tensor:
    """The ``(B, L)`` gradient of a row-block selection: ``grad`` in the blocks, +0 elsewhere."""
    found = _native.kernels_for(grad) if not (torch.is_grad_enabled() and grad.requires_grad) else None
    if found is None:
        return grad.new_zeros(batch.mask.numel()).index_add(0, batch.positions, grad).view(batch.shape)
    lib, _, suffix = found
    out = torch.empty(batch.shape, dtype=grad.dtype)
    ptr = _native.ptr
    getattr(lib, f"scatter_blocks_{suffix}")(batch.shape[0], batch.shape[1], ptr(grad), ptr(batch.row_starts),
                                             ptr(batch.lengths), ptr(out))
    return out


class _RowBlocksDifference(torch.autograd.Function):
    """``a - b`` on the tokens of two ``(B, L)`` CPU tensors of one dtype whose rows hold one block each (C).

    The same values as ``to_flat(a - b, batch)``, with no difference taken
    of the padding; the gradient of each operand is the block scatter of
    ``_RowBlocks`` (negated for ``b``).
    """

    @staticmethod
    def forward(ctx, a, b, batch):
        lib, _, suffix = _native.loops(a.dtype)
        a, b = a.contiguous(), b.contiguous()
        out = torch.empty(batch.positions.numel(), dtype=a.dtype)
        ptr = _native.ptr
        getattr(lib, f"gather_blocks_difference_{suffix}")(batch.shape[0], batch.shape[1], ptr(a), ptr(b),
                                                           ptr(batch.row_starts), ptr(batch.lengths), ptr(out))
        ctx.batch = batch
        return out

    @staticmethod
    def backward(ctx, grad):
        need_a, need_b, _ = ctx.needs_input_grad
        padded = _scatter_rows(grad, ctx.batch)
        return padded if need_a else None, -padded if need_b else None, None


def _row_blocks(values: torch.Tensor, batch: FlatBatch) -> bool:
    """Whether ``values`` (shaped like the batch) can go by row-block copies."""
    return batch.row_starts is not None and _native.plain_cpu(values) and values.device == batch.mask.device


def to_flat(values: torch.Tensor, batch: FlatBatch, name: str = "values") -> torch.Tensor:
    """Select the masked tokens of a ``(B, L)`` tensor, or broadcast a ``(B,)`` per-row tensor."""
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor")
    if values.shape == batch.shape:
        if _row_blocks(values, batch):
            if values.requires_grad and torch.is_grad_enabled():
                return _RowBlocks.apply(values, batch)
            return _gather_rows(values, batch)  # no graph to record: the copies without the autograd node
        return values.reshape(-1).index_select(0, batch.positions)
    if values.dim() == 1 and values.shape[0] == batch.shape[0]:
        return values.index_select(0, batch.traj_id)
    raise ValueError(f"{name} has shape {tuple(values.shape)}; expected {tuple(batch.shape)} or ({batch.shape[0]},)")


def to_flat_difference(a: torch.Tensor, b: torch.Tensor, batch: FlatBatch, name: str = "values") -> torch.Tensor:
    """``to_flat(a - b, batch)`` for two ``(B, L)`` tensors, e.g. log π_θ − log π_old: the log-ratios x_i.

    On CPU rows of one block each, one C pass takes the difference on the
    response tokens only (the padding is never read); the values and the
    gradients are those of ``to_flat(a - b, batch)``.
    """
    for label, value in ((f"{name} (first operand)", a), (f"{name} (second operand)", b)):
        if not isinstance(value, torch.Tensor) or value.shape != batch.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{label} has shape {shape}, expected {tuple(batch.shape)}")
    if a.dtype == b.dtype and _native.kernels_for(a) is not None and _row_blocks(a, batch) and _row_blocks(b, batch):
        return _RowBlocksDifference.apply(a, b, batch)
    return to_flat(a - b, batch, name)


def to_padded(flat: torch.Tensor, batch: FlatBatch, fill: float = 0.0) -> torch.Tensor:
    """Scatter flat token values back into a ``(B, L)`` tensor (padding = ``fill``); differentiable in ``flat``."""
    if flat.dim() != 1 or flat.numel() != batch.positions.numel():
        raise ValueError(f"flat has shape {tuple(flat.shape)}, expected ({batch.positions.numel()},)")
    out = flat.new_full((batch.mask.numel(),), fill)
    return out.index_put((batch.positions,), flat).view(batch.shape)  # index_put: int32 positions as they are


def trajectory_segments(batch: FlatBatch) -> Segments:
    """The rows with tokens as contiguous trajectory ``Segments`` (ids: their row numbers), from the row lengths.

    No pass over the token ids: the rows are already in order, so the
    segments are their runs.
    """
    present = batch.lengths > 0
    rows = torch.arange(batch.shape[0], device=batch.mask.device)
    if bool(present.all()):
        return Segments(count=batch.lengths, ids=rows, contiguous=True, elements=batch.positions.numel(),
                        checked=True)
    return Segments.from_lengths(batch.lengths[present], ids=rows[present])
