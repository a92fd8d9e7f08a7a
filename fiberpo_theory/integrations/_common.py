"""Helpers shared by the verl and TRL adapters: string ids and whole prompt groups."""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["string_ids", "require_whole_groups"]


def string_ids(values: Iterable) -> torch.LongTensor:
    """Integer ids for hashable labels (``uid`` or ``data_source`` strings), in first-appearance order.

    Ids are stable within one call only: the first distinct label gets 0, the
    next new one 1, and so on.  Trainers hand the labels over as lists or
    numpy object arrays, so anything iterable is accepted.
    """
    if isinstance(values, (str, bytes)):
        raise ValueError("values must be a sequence of labels, not a single string")
    index: dict = {}
    try:
        ids = [index.setdefault(value, len(index)) for value in values]
    except TypeError as error:
        raise ValueError(f"values must be hashable labels (e.g. uid strings): {error}") from None
    return torch.tensor(ids, dtype=torch.long)


def require_whole_groups(
    group_ids: torch.LongTensor, expected_size: int, *, name: str = "group", labels=None
) -> None:
    """Raise ``ValueError`` unless every id in ``group_ids`` occurs exactly ``expected_size`` times.

    ``labels`` (optional, indexed by id, e.g. the distinct ``uid`` strings in
    :func:`string_ids` order) lets the message name the group by its label.

    FiberPO-Domain's group aggregate (paper Eq. 30-33) is a mean over all
    responses of a prompt; a micro-batch that holds only part of a group would
    silently compute a different loss, so a split group is refused.
    """
    if not isinstance(group_ids, torch.Tensor) or group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"{name} ids must be an integer torch.Tensor")
    if group_ids.dim() != 1:
        raise ValueError(f"{name} ids must be 1-D (one per response), got shape {tuple(group_ids.shape)}")
    if isinstance(expected_size, bool) or int(expected_size) != expected_size or expected_size < 1:
        raise ValueError(f"expected_size must be a positive integer, got {expected_size!r}")
    ids, counts = torch.unique(group_ids, return_counts=True)
    bad = (counts != expected_size).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        group = int(ids[i]) if labels is None else repr(labels[int(ids[i])])
        raise ValueError(
            f"{name} {group} has {int(counts[i])} responses in this micro-batch, expected {int(expected_size)}: "
            f"the {name} is split across micro-batches; make the mini/micro batch sizes multiples of the "
            f"number of responses per prompt"
        )
