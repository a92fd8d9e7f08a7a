"""Shared machinery for property-search claim checks (Hypothesis, seeded, shrinking).

A property is a function ``prop(example) -> iterable of regime labels`` that
raises :class:`Falsified` (carrying exact, JSON-ready numbers) when the claim
fails on ``example``.  :func:`search` runs it under Hypothesis with the
profile's seed and example budget and returns what was searched and, if
anything, the *shrunk* witness: Hypothesis replays the minimal failing
example last, so the exception that escapes carries the minimized numbers.

The strategies the searches draw from live in :mod:`fiberpo_theory.theory.strategies`.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed

from fiberpo_theory.core._threads import single_thread
from fiberpo_theory.theory.claims import Profile


class Falsified(AssertionError):
    """The property failed; ``witness`` holds the exact numbers that show it."""

    def __init__(self, message: str, witness: dict[str, Any]):
        super().__init__(message)
        self.witness = witness


@dataclass
class SearchResult:
    examples: int
    regimes: dict[str, int] = field(default_factory=dict)
    witness: dict[str, Any] | None = None
    message: str = ""

    @property
    def falsified(self) -> bool:
        return self.witness is not None


def search(
    profile: Profile,
    strategy: st.SearchStrategy,
    prop: Callable[[Any], Iterable[str]],
    *,
    max_examples: int | None = None,
    salt: int = 0,
) -> SearchResult:
    """Run ``prop`` on up to ``max_examples`` Hypothesis examples, seeded by the profile.

    ``salt`` separates the streams of several searches inside one check so
    that they do not all draw the same examples.
    """
    regimes: Counter[str] = Counter()
    count = [0]

    @hypothesis_seed(profile.seed * 1_000_003 + salt)
    @settings(
        max_examples=max_examples or profile.max_examples,
        deadline=None,
        database=None,  # no example database: a run depends on the seed only
        derandomize=False,
        verbosity=Verbosity.quiet,
        suppress_health_check=list(HealthCheck),
        phases=(Phase.generate, Phase.target, Phase.shrink),
        print_blob=False,
        report_multiple_bugs=False,  # one minimal witness; distinct failure sites would arrive as an ExceptionGroup
    )
    @given(strategy)
    def run(example):
        count[0] += 1
        for label in prop(example):
            regimes[label] += 1

    with single_thread(), _without_local_constants():
        try:
            run()
        except Falsified as failure:
            return SearchResult(count[0], dict(regimes), failure.witness, str(failure))
    return SearchResult(count[0], dict(regimes))


@contextmanager
def _without_local_constants():
    """Keep Hypothesis from mining literals out of whatever local modules happen to be imported.

    Hypothesis (>= 6.131) mixes constants found in loaded local modules into its draws, so
    the same seed gave different examples depending on which modules a process had
    imported (a pytest session vs the CLI) and on unrelated edits anywhere in the repo.
    A claim report must depend on its seed only.  This uses a private hook; on a
    Hypothesis without it the context is a no-op.
    """
    try:
        from hypothesis.internal.conjecture import providers
    except ImportError:  # pragma: no cover
        yield
        return
    original = getattr(providers, "_get_local_constants", None)
    cache = getattr(providers, "CONSTANTS_CACHE", None)
    if original is None or cache is None or not hasattr(cache, "cache"):
        yield
        return
    empty = type(providers._local_constants)()
    cache.cache.clear()
    providers._get_local_constants = lambda: empty
    try:
        yield
    finally:
        providers._get_local_constants = original
        cache.cache.clear()


def secondary_budget(profile: Profile, fraction: float = 0.5) -> int:
    """Examples for a check's secondary search: a fraction in quick runs, the full count when thorough."""
    if profile.name == "thorough":
        return profile.max_examples
    return max(1, int(profile.max_examples * fraction))


def length_labels(trajectories: list[list[float]]) -> list[str]:
    labels = []
    lengths = [len(t) for t in trajectories]
    if 1 in lengths:
        labels.append("T=1")
    if max(lengths) >= 64:
        labels.append("T>=64")
    values = [v for t in trajectories for v in t]
    if any(v == 0.0 for v in values):
        labels.append("x=0 token")
    if len(set(values)) < len(values):
        labels.append("repeated values")
    return labels


def budget_labels(**budgets_: float) -> list[str]:
    return [f"{name}<1e-3" for name, value in budgets_.items() if value < 1e-3]


def max_abs(tensor: torch.Tensor) -> float:
    return float(tensor.abs().max()) if tensor.numel() else 0.0
