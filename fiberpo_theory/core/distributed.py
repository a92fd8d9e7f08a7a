"""Segment sums over a data-parallel batch (torch.distributed).

In data-parallel training each rank holds a shard of the batch, but the
aggregates above the trajectory level are defined on the whole batch: the
prompt-group and domain means log s_g^(l), log s_D^(l) of Eq. 33, the token
counts T_g, T_D that serve as the rollback slopes k of Eq. 31, and the
trajectory counts |Tj(g)|, |Tj(D)| that weight Eq. 33.  One prompt group or
domain can have trajectories on several ranks, and an id can be present on
some ranks and absent from others.

:func:`global_segment_sums` turns per-id *local* sums into per-id *global*
sums.  Every such aggregate is a sum over trajectories (or tokens) divided by
a count, so summing the numerators and the counts separately across ranks and
dividing afterwards gives exactly the single-process value on the
concatenated batch (up to floating-point summation order).

Assumptions, shared by every caller:

* **Trajectories never span ranks.**  All tokens of a trajectory are on one
  rank.  Trajectory ids are therefore only compared within a rank: the same
  trajectory id on two ranks names two different trajectories (per-rank row
  numbers are fine).  A trajectory whose tokens were split across ranks
  would be counted once on each rank; this cannot be detected without
  globally unique trajectory ids, so it is the caller's responsibility.
* **Ids above the trajectory level are global.**  A group or domain id means
  the same group or domain on every rank.  Nesting must hold globally: a
  group id must belong to the same domain on every rank.  Pass
  ``parent_ids`` to have this checked; the check uses the gathered data, so
  every rank reaches the same verdict and raises together.
* **Every rank calls with the same sequence of collectives** (the usual
  SPMD rule), and every rank calls ``backward`` on a loss that depends on
  the results, because the backward pass is itself a collective.

``process_group=None`` is the single-process case: the local sums are
returned unchanged and ``torch.distributed`` is not touched at all, so no
``init_process_group`` is needed.  To reduce over every rank pass
``torch.distributed.group.WORLD``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["global_segment_sums", "global_max"]


class _AllReduceSum(torch.autograd.Function):
    """``S = Σ_ranks a_rank`` with the gradient of the summed loss.

    Each rank's loss L_r depends on the global sum S, and data-parallel
    training differentiates L = Σ_r L_r (DDP averages, i.e. differentiates
    L / world size; the factor is common to every term).  Since
    ∂S/∂a_r = I for every rank r,

        ∂L/∂a_r = Σ_q ∂L_q/∂S,

    the sum over ranks of the incoming gradients.  The backward pass is
    therefore an all-reduce (SUM) of ``grad_output``; each rank then
    back-propagates the result into its own local inputs only.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = local.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def _check_group(process_group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "process_group was given but torch.distributed is not initialised "
            "(call torch.distributed.init_process_group first, or pass process_group=None)"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(
            f"process_group must be a torch.distributed.ProcessGroup or None, got {type(process_group).__name__}"
        )
    world = dist.get_world_size(process_group)
    if world < 1:
        raise ValueError("process_group does not contain this rank")
    return world


def _check_ids(name: str, ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of integer ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.dim() != 1:
        raise ValueError(f"{name} must be a 1-D integer tensor, got dtype {ids.dtype} and shape {tuple(ids.shape)}")
    return ids.long()


def _id_union(ids: torch.Tensor, group, world: int) -> torch.Tensor:
    """Sorted union of the id sets of all ranks (two all-gathers: sizes, padded ids)."""
    size = torch.tensor([ids.numel()], dtype=torch.long, device=ids.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = torch.cat(sizes)
    longest = int(sizes.max())
    padded = ids.new_zeros(longest)
    padded[: ids.numel()] = ids
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    valid = torch.arange(longest, device=ids.device).unsqueeze(0) < sizes.unsqueeze(1)
    return torch.unique(torch.stack(gathered)[valid], sorted=True)


def _check_single_parent(union, position, parent_ids, group, *, name, parent_name) -> None:
    """Raise ``ValueError`` (on every rank alike) if an id has two parents anywhere.

    One all-reduce (MAX) of ``(max parent, -min parent)`` per id of the union;
    the reduced tensor is identical on all ranks, so all ranks agree.
    """
    lowest = torch.iinfo(torch.long).min
    extremes = torch.full((union.numel(), 2), lowest, dtype=torch.long, device=union.device)
    signed = torch.stack([parent_ids, -parent_ids], dim=1)
    extremes = extremes.scatter_reduce(0, position.unsqueeze(1).expand(-1, 2), signed, reduce="amax")
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=group)
    high, low = extremes[:, 0], -extremes[:, 1]
    split = high != low
    if bool(split.any()):
        bad = int(split.nonzero()[0, 0])
        raise ValueError(
            f"{name} does not nest in {parent_name} across ranks: {name} {int(union[bad])} belongs to "
            f"{parent_name} {int(low[bad])} on one rank and {parent_name} {int(high[bad])} on another"
        )


def global_segment_sums(
    ids: torch.Tensor,
    *values: torch.Tensor,
    process_group=None,
    parent_ids: torch.Tensor | None = None,
    name: str = "segment",
    parent_name: str = "parent",
) -> tuple[torch.Tensor, ...]:
    """Sum per-id local values over all ranks of ``process_group``.

    Args:
        ids: ``(M,)`` integer ids of this rank's segments (e.g. ``Segments.ids``
            of the group or domain column).  Need not be sorted or unique;
            rows with equal ids are summed together.
        *values: tensors of shape ``(M, ...)``, the local per-id sums or
            counts (float or integer; float ones may require grad).
        process_group: ``None`` for a single process (identity, no
            ``torch.distributed`` call), else the process group to reduce over.
        parent_ids: optional ``(M,)`` integer id of each segment's parent; if
            given, it is checked that every id has one parent on all ranks.
        name, parent_name: how ``ValueError`` messages call the two levels.

    Returns:
        One tensor per value, same shape and dtype: row m holds the sum over
        all ranks of the rows whose id equals ``ids[m]``.  Differentiable;
        the backward pass all-reduces the incoming gradient (see
        ``_AllReduceSum``).

    Cost: two all-gathers of the id sets (sizes, then ids padded to the
    longest set), one all-reduce per distinct value dtype of a ``(U, C)``
    tensor (U ids in the union, C value columns), and one more all-reduce
    when ``parent_ids`` is given.
    """
    ids = _check_ids("ids", ids)
    _check_values(ids, values)
    if parent_ids is not None:
        parent_ids = _check_ids("parent_ids", parent_ids)
        if parent_ids.shape != ids.shape:
            raise ValueError(f"parent_ids has shape {tuple(parent_ids.shape)}, expected {tuple(ids.shape)}")
    if process_group is None:
        return tuple(values)

    world = _check_group(process_group)
    union = _id_union(ids, process_group, world)
    position = torch.searchsorted(union, ids)
    if parent_ids is not None:
        _check_single_parent(union, position, parent_ids, process_group, name=name, parent_name=parent_name)
    return _reduce_by_dtype(values, union.numel(), position, process_group)


def _check_values(ids: torch.Tensor, values) -> None:
    """Every value has one row per id and lives on the ids' device."""
    for k, value in enumerate(values):
        if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != ids.numel():
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"values[{k}] must be a tensor with {ids.numel()} rows (one per id), got {shape}")
        if value.device != ids.device:
            raise ValueError(f"values[{k}] is on {value.device} but ids are on {ids.device}")


def _reduce_by_dtype(values, union_size: int, position: torch.Tensor, process_group) -> tuple[torch.Tensor, ...]:
    """Scatter every value into a ``(U, C)`` table at its union position and all-reduce it, one table per dtype.

    One collective per dtype rather than per value: the values of a level
    (sums and counts) travel together.
    """
    columns = [value.reshape(position.numel(), value.shape[1:].numel()) for value in values]
    totals: list[torch.Tensor | None] = [None] * len(values)
    for dtype in dict.fromkeys(column.dtype for column in columns):
        members = [k for k, column in enumerate(columns) if column.dtype == dtype]
        widths = [columns[k].shape[1] for k in members]
        local = torch.cat([columns[k] for k in members], dim=1)
        table = local.new_zeros((union_size, local.shape[1])).index_add(0, position, local)
        table = _AllReduceSum.apply(table, process_group)
        for k, part in zip(members, table.index_select(0, position).split(widths, dim=1)):
            totals[k] = part.reshape(values[k].shape)
    return tuple(totals)


def global_max(values: torch.Tensor, process_group=None) -> torch.Tensor:
    """Element-wise maximum of ``values`` over all ranks of ``process_group`` (no gradient).

    For verdicts computed from rank-local data (e.g. the largest kernel
    error a rank sees): reducing them first makes every rank reach the same
    verdict, so all raise together instead of some waiting in the next
    collective.  ``process_group=None``: ``values`` unchanged, no
    ``torch.distributed`` call.
    """
    if process_group is None:
        return values
    _check_group(process_group)
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=process_group)
    return out
