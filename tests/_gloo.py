"""Shared pieces of the multi-process (gloo) tests: one rank's life, and error capture across ranks."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def run_rank(rank: int, world: int, init_file, out_dir, body) -> None:
    """Join a gloo group, fill a result dict by ``body(result, process_group)``, save it as ``rank{rank}.pt``.

    The result is saved even when ``body`` raises, so the parent test can
    show what the rank got before it failed.
    """
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    result = {}
    try:
        body(result, dist.group.WORLD)
    finally:
        torch.save(result, f"{out_dir}/rank{rank}.pt")
        dist.destroy_process_group()


def value_error_of(call):
    """The ValueError message ``call`` raises, or None when it returns."""
    try:
        call()
    except ValueError as err:
        return str(err)
    return None
