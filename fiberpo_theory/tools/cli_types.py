"""Argument types shared by every ``fiberpo-theory`` subcommand.

Each is an ``argparse`` ``type=`` callable: a bad value raises
``argparse.ArgumentTypeError``, which argparse turns into a one-line
``error: argument --NAME: ...`` message and exit status 2 before any work starts.
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def torch_device(text: str) -> str:
    """A device this torch build can use: ``cpu``, or ``cuda[:N]`` when CUDA is available."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this torch build has no usable CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (use cpu or cuda[:N])")
    return text


def int_in_range(minimum: int, maximum: int | None = None):
    """An integer type that refuses values below ``minimum`` or, when given, above ``maximum``."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    parse.__name__ = f"int_in_range_{minimum}_{maximum}"
    return parse


def output_dir(text: str) -> str:
    """A directory to write into: created later if missing, refused if it names an existing file."""
    from pathlib import Path

    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a directory")
    _parents_are_directories(text)
    return text


def _parents_are_directories(text: str) -> None:
    """Refuse a path below an existing file: the folders to create there could never be made."""
    from pathlib import Path

    if any(parent.exists() and not parent.is_dir() for parent in Path(text).parents):
        raise argparse.ArgumentTypeError(f"{text!r}: a parent path exists and is not a directory")


def output_file(text: str):
    """A file to write: refused if it names an existing directory (its parent folders are created later)."""
    from pathlib import Path

    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a directory, expected a file path")
    _parents_are_directories(text)
    return path
