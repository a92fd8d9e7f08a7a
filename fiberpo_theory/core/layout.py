"""Padded ``(B, L)`` batches with a response mask ⇄ the flat token layout.

verl and TRL store responses as a padded ``(B, L)`` tensor with a 0/1
``response_mask``; this package computes on flat ``(N,)`` tensors with a
trajectory id per token.  Rows are trajectories.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class FlatBatch(NamedTuple):
    """The flat view of a padded batch: values keep row-major token order."""

    traj_id: torch.Tensor  # (N,) row index of each token
    mask: torch.Tensor  # (B, L) bool
    shape: torch.Size


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
    mask = response_mask.bool()
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        raise ValueError(f"{name} row {int(empty.nonzero()[0, 0])} is an empty trajectory (no response token)")
    return mask


def flatten_mask(response_mask: torch.Tensor) -> FlatBatch:
    """Index a padded batch: every masked token gets its row as trajectory id."""
    mask = _mask("response_mask", response_mask, None)
    rows = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)
    return FlatBatch(rows[mask], mask, mask.shape)


def to_flat(values: torch.Tensor, batch: FlatBatch, name: str = "values") -> torch.Tensor:
    """Select the masked tokens of a ``(B, L)`` tensor, or broadcast a ``(B,)`` per-row tensor."""
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor")
    if values.shape == batch.shape:
        return values[batch.mask]
    if values.dim() == 1 and values.shape[0] == batch.shape[0]:
        return values.index_select(0, batch.traj_id)
    raise ValueError(f"{name} has shape {tuple(values.shape)}; expected {tuple(batch.shape)} or ({batch.shape[0]},)")


def to_padded(flat: torch.Tensor, batch: FlatBatch, fill: float = 0.0) -> torch.Tensor:
    """Scatter flat token values back into a ``(B, L)`` tensor (padding = ``fill``)."""
    if flat.dim() != 1 or flat.numel() != int(batch.mask.sum()):
        raise ValueError(f"flat has shape {tuple(flat.shape)}, expected ({int(batch.mask.sum())},)")
    out = flat.new_full(batch.shape, fill)
    return out.masked_scatter(batch.mask, flat)
