"""Torch's intra-op thread count, pinned to one while tiny tensors are computed."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def single_thread():
    """Run tiny tensor ops on one intra-op thread.

    The instances are a few hundred tokens; with a contended CPU the thread
    pool's hand-off costs ~100x the arithmetic (measured: 0.7 ms vs 10 µs for
    a 4x4 log_softmax), which would blow the quick profile's time budget.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
