"""Input checks shared by every public function.

Each check raises ``ValueError`` naming the offending argument, so that bad
input fails loudly at the call site instead of surfacing later as a NaN.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class NonFiniteError(ValueError):
    """An input holds inf or NaN: raised by the finiteness checks, so a caller can name the entry its own way."""


def as_float(name: str, value: torch.Tensor) -> torch.Tensor:
    """Return ``value`` as a float32/float64 tensor (half precision is lifted to float32)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dtype in _LOW_PRECISION:
        value = value.float()
    return value


def _all_finite(value: torch.Tensor) -> bool:
    """Whether every entry is finite: a finite sum proves it in one reduction; only an inf/NaN sum needs the full scan."""
    return math.isfinite(value.detach().sum()) or bool(torch.isfinite(value).all())  # no 0-d isfinite ops, no graph


def flat_values(name: str, value: torch.Tensor, *, allow_empty: bool = False, finite: bool = True) -> torch.Tensor:
    """A finite, one-dimensional float tensor.

    ``finite=False`` leaves the finiteness pass to a caller whose result is
    non-finite whenever an input is (it then calls :func:`finite_values`).
    """
    value = as_float(name, value)
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D (flat token layout), got shape {tuple(value.shape)}")
    if value.numel() == 0 and not allow_empty:
        raise ValueError(f"{name} is empty: at least one token is needed")
    return finite_values(name, value) if finite else value


def finite_values(name: str, value: torch.Tensor) -> torch.Tensor:
    """``value`` if every entry is finite, else ``ValueError`` naming ``name`` and the first bad index."""
    if not _all_finite(value):
        bad = int((~torch.isfinite(value)).nonzero()[0, 0])
        raise NonFiniteError(f"{name} has a non-finite value at index {bad}: {value[bad].item()}")
    return value


def positive_values(name: str, value: torch.Tensor) -> torch.Tensor:
    """Flat finite ratios that are strictly positive."""
    value = flat_values(name, value)
    if not bool(value.min() > 0):  # one reduction, no boolean temporary
        bad = int((value <= 0).nonzero()[0, 0])
        raise ValueError(f"{name} must be strictly positive (a probability ratio); index {bad} is {value[bad].item()}")
    return value


def id_column(name: str, value) -> torch.Tensor:
    """A 1-D tensor of an integer dtype (metadata only: no pass over the values)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of integer ids, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {value.dtype}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(value.shape)}")
    return value


def ids(name: str, value: torch.Tensor, like: torch.Tensor, *, sign: bool = True) -> torch.Tensor:
    """Integer segment ids, same length and device as ``like``, non-negative.

    ``sign=False`` leaves the non-negativity pass to the caller, for one
    that reads it off what it computes anyway (:meth:`Segments.from_ids`).
    """
    id_column(name, value)
    if value.shape != like.shape:
        raise ValueError(f"{name} has length {value.numel()} but the log-ratios have length {like.numel()}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the log-ratios are on {like.device}")
    if sign and value.numel() and int(value.min()) < 0:  # min: one reduction, no boolean temporary
        raise ValueError(f"{name} must be non-negative, found {int(value.min())}")
    return value.long() if sign else value  # Segments.from_ids indexes any integer dtype


def same_shape(name: str, value: torch.Tensor, like: torch.Tensor, *, finite: bool = True) -> torch.Tensor:
    """A finite float tensor with the same shape and device as ``like``.

    ``finite=False`` checks the metadata only, for a caller that proves
    finiteness from a reduction it computes anyway (and calls again to name
    the culprit when that fails).
    """
    value = as_float(name, value)
    if value.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(like.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device}, expected {like.device}")
    if finite and not _all_finite(value):
        raise NonFiniteError(f"{name} has non-finite values")
    return value


def positive(name: str, value: float | Sequence[float]) -> float:
    """A strictly positive finite hyper-parameter."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return number


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
