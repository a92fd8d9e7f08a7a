"""Shared machinery for property-search claim checks (Hypothesis, seeded, shrinking).

A property is a function ``prop(example) -> iterable of regime labels`` that
raises :class:`Falsified` (carrying exact, JSON-ready numbers) when the claim
fails on ``example``.  :func:`search` runs it under Hypothesis with the
profile's seed and example budget and returns what was searched and, if
anything, the *shrunk* witness: Hypothesis replays the minimal failing
example last, so the exception that escapes carries the minimized numbers.

Strategies here aim at where FiberPO-type claims break: x = 0 exactly,
repeated values, T = 1 and long T, budgets near zero, and the narrow
rollback window of g_agg (width C/T, Eq. 10).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from fiberpo_theory.claims import Profile


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


def secondary_budget(profile: Profile, fraction: float = 0.5) -> int:
    """Examples for a check's secondary search: a fraction in quick runs, the full count when thorough."""
    if profile.name == "thorough":
        return profile.max_examples
    return max(1, int(profile.max_examples * fraction))


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

# Values where gates switch or degenerate; the exact zero matters most (SPEC §1).
EDGE_VALUES = (0.0, 0.0, 1e-12, -1e-12, 1e-6, -1e-6, 0.04, -0.04, 0.5, -0.5, 3.0, -3.0)
BUDGETS = (1e-6, 1e-4, 1e-3, 0.04, 0.05, 0.12, 0.2, 1.0)
LONG_LENGTHS = (64, 256, 1024)


# Strategies are built once: constructing them inside every draw (validation, recursion
# checks) cost more than the checks themselves.


@lru_cache(maxsize=None)
def token_values(bound: float = 3.0) -> st.SearchStrategy[float]:
    return st.one_of(
        st.just(0.0),
        st.sampled_from(EDGE_VALUES),
        st.floats(-bound, bound, allow_nan=False, allow_infinity=False, allow_subnormal=False),
    )


@lru_cache(maxsize=None)
def budgets() -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from(BUDGETS), st.floats(1e-6, 2.0, allow_subnormal=False))


@lru_cache(maxsize=None)
def trajectory(*, max_short: int = 12, long_lengths=LONG_LENGTHS) -> st.SearchStrategy[list[float]]:
    """One trajectory's log-ratios: short, or a short pattern tiled to a long length."""
    pattern = st.lists(token_values(), min_size=1, max_size=max_short)
    if not long_lengths:
        return pattern
    tiled = st.tuples(pattern, st.sampled_from(long_lengths)).map(lambda p: (p[0] * (p[1] // len(p[0]) + 1))[: p[1]])
    # one draw in six is long; the short branch comes first so shrinking heads toward it
    return st.one_of(pattern, pattern, pattern, pattern, pattern, tiled)


@lru_cache(maxsize=None)
def float_lists(size: int, low: float, high: float) -> st.SearchStrategy[list[float]]:
    """Exactly ``size`` finite floats in [low, high] (cached: sizes repeat)."""
    return st.lists(st.floats(low, high, allow_subnormal=False), min_size=size, max_size=size)


@lru_cache(maxsize=None)
def int_lists(size: int, low: int, high: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(low, high), min_size=size, max_size=size)


_REGIMES = st.sampled_from(("free", "P", "P-edge", "R", "Z-edge", "Z"))
_THETA = st.floats(0.05, 0.95)


def draw_regime_targeted(draw, c_pos: float, c_neg: float, *, long_lengths=LONG_LENGTHS) -> tuple[list[float], dict]:
    """Draw a trajectory whose channel aggregates log s^± land in a chosen g_agg regime.

    The positive and negative parts of a random pattern are rescaled so that
    log s⁺ (resp. log s⁻) hits a target: pass (< C), the pass edge (= C),
    rollback (C, (1 + 1/T) C), the zero edge ((1 + 1/T) C), or beyond.  The
    rollback window has width C/T, so random log-ratios almost never hit it.
    """
    pattern = draw(trajectory(long_lengths=long_lengths))
    length = len(pattern)
    targets = {}
    values = torch.tensor(pattern, dtype=torch.float64)
    for name, budget, part_sign in (("pos", c_pos, 1.0), ("neg", c_neg, -1.0)):
        part = torch.clamp(part_sign * values, min=0)
        mean = float(part.mean())
        if mean <= 0:
            targets[name] = "empty"
            continue
        regime, theta = draw(_REGIMES), draw(_THETA)
        target = {
            "free": mean,
            "P": budget * theta,
            "P-edge": budget,
            "R": budget * (1 + theta / length),
            "Z-edge": budget * (1 + 1 / length),
            "Z": budget * (1 + 1 / length) * (1 + 4 * theta),
        }[regime]
        # part / mean first: with tiny tokens tiled long the mean is subnormal and target / mean overflows
        values = torch.where(part > 0, part_sign * (part / mean) * target, values)
        targets[name] = regime
    return values.tolist(), targets


def flatten(trajectories: list[list[float]], *, shuffle_key: int = 0, dtype=torch.float64):
    """Flat log-ratios and trajectory ids; ids are non-contiguous and, with a key, interleaved."""
    values = [v for traj in trajectories for v in traj]
    ids = [7 * (len(trajectories) - t) + 3 for t, traj in enumerate(trajectories) for _ in traj]
    x = torch.tensor(values, dtype=dtype)
    traj_id = torch.tensor(ids, dtype=torch.long)
    if shuffle_key:
        order = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(shuffle_key))
        x, traj_id = x[order], traj_id[order]
    return x, traj_id


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
