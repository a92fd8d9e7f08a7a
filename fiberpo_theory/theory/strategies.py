"""Hypothesis strategies for random fibration hierarchies and FiberPO batches.

Everything here produces inputs in the package's flat layout: per-token id
columns with arbitrary, non-contiguous, unsorted integer ids and shuffled
tokens.  The shapes are built bottom-up (tokens into trajectories, those
into groups, …) from partitions that Hypothesis shrinks towards simple
cases, with explicit styles for the corner cases that matter: single-child
fibres, one huge fibre next to singletons, length-1 trajectories.

Importing this module registers two settings profiles, ``"ci"`` (quick,
derandomized) and ``"thorough"`` (≥ 1000 examples); ``use_profile()`` loads
the one named by the environment variable ``HYPOTHESIS_PROFILE`` (default
``"ci"``).  The test suite's conftest calls it; importing the module alone
leaves a user's own Hypothesis settings untouched.

Claim checks (``fiberpo_theory.checks``) run these strategies through their seeded search helper.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from ..core.segments import Segments

__all__ = [
    "use_profile",
    "HierarchySample",
    "FGHExample",
    "FlatBatch",
    "partitions",
    "hierarchies",
    "log_ratios",
    "level_budgets",
    "fgh_examples",
    "aimed_fgh_examples",
    "flat_batches",
    "token_values",
    "budgets",
    "trajectory",
    "float_lists",
    "int_lists",
    "draw_regime_targeted",
    "flatten",
]

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=_SUPPRESS)
settings.register_profile("thorough", max_examples=1000, deadline=None, suppress_health_check=_SUPPRESS)


def use_profile(name: str | None = None) -> str:
    """Load the settings profile ``name`` (default: ``$HYPOTHESIS_PROFILE`` or ``"ci"``); returns its name."""
    name = name or os.environ.get("HYPOTHESIS_PROFILE", "ci")
    settings.load_profile(name)
    return name

PARTITION_STYLES = ("random", "singletons", "one-block", "unbalanced")
LOG_RATIO_STYLES = ("mixed", "far", "drift", "near", "on-policy")


# ---------------------------------------------------------------------------
# Hierarchy shapes
# ---------------------------------------------------------------------------


@st.composite
def partitions(draw, n_items: int, style: str | None = None) -> list[int]:
    """Block label of each of ``n_items`` ordered items; blocks are consecutive and non-empty.

    Styles: ``singletons`` (every parent has one child), ``one-block``,
    ``unbalanced`` (one big block, the rest singletons), ``random`` cuts.
    """
    style = style or draw(st.sampled_from(PARTITION_STYLES))
    gaps = n_items - 1
    if style == "singletons":
        cuts = [True] * gaps
    elif style == "one-block":
        cuts = [False] * gaps
    elif style == "unbalanced":
        big = draw(st.integers(1, n_items))
        start = draw(st.integers(0, n_items - big))
        gap = torch.arange(gaps)
        cuts = (~((gap >= start) & (gap < start + big - 1))).tolist()
    else:
        cuts = draw(st.lists(st.booleans(), min_size=gaps, max_size=gaps))
    return [0] + torch.tensor(cuts, dtype=torch.long).cumsum(0).tolist()


@dataclass(frozen=True)
class HierarchySample:
    """A random chain hierarchy in flat layout.

    ``level_ids`` are per-token id tensors, coarsest level first, trajectory
    last.  ``sizes`` counts the elements of each level (then tokens);
    ``styles`` records how each level was partitioned.
    """

    level_ids: tuple[torch.Tensor, ...]
    sizes: tuple[int, ...]
    styles: tuple[str, ...]

    @property
    def depth(self) -> int:
        return len(self.level_ids)

    @property
    def n_tokens(self) -> int:
        return self.sizes[-1]

    @property
    def traj_id(self) -> torch.Tensor:
        return self.level_ids[-1]

    def features(self) -> list[str]:
        """Structural regimes this sample reaches (for search reports)."""
        out = [f"depth={self.depth}"]
        lengths = Segments.from_ids(self.traj_id).count
        if bool((lengths == 1).any()):
            out.append("length-1 trajectory")
        for k in range(self.depth):
            parent = Segments.from_ids(self.level_ids[k - 1]).index if k else torch.zeros_like(self.traj_id)
            child = Segments.from_ids(self.level_ids[k])
            fibre = torch.bincount(parent[_first_token(child)])
            if bool((fibre == 1).any()) and k:
                out.append("single-child fibre")
            if fibre.numel() and int(fibre.max()) >= 4 * max(1, int(fibre.min())):
                out.append("unbalanced fibres")
        return sorted(set(out))


def _first_token(seg: Segments) -> torch.Tensor:
    """Index of one token in each segment (the segment's label is the same on all)."""
    first = torch.full((seg.size,), seg.index.numel(), dtype=torch.long)
    return first.scatter_reduce(0, seg.index, torch.arange(seg.index.numel()), reduce="amin")


@st.composite
def hierarchies(
    draw, *, min_depth: int = 1, max_depth: int = 6, min_tokens: int = 1, max_tokens: int = 40
) -> HierarchySample:
    """Random chain hierarchies: depth, branching, trajectory lengths, ids and token order all drawn."""
    depth = draw(st.integers(min_depth, max_depth))
    n_tokens = draw(st.integers(min_tokens, max_tokens))
    labels = [torch.arange(n_tokens)]  # per-token label at each level, finest first
    styles = []
    for _ in range(depth):
        style = draw(st.sampled_from(PARTITION_STYLES))
        block = torch.tensor(draw(partitions(int(labels[-1].max()) + 1, style)), dtype=torch.long)
        labels.append(block[labels[-1]])
        styles.append(style)
    per_level = labels[:0:-1]  # coarsest first, trajectory last
    order = torch.tensor(draw(st.permutations(range(n_tokens))), dtype=torch.long)
    level_ids = []
    for level in per_level:
        n_elems = int(level.max()) + 1
        new_ids = draw(st.lists(st.integers(0, 2**40), min_size=n_elems, max_size=n_elems, unique=True))
        level_ids.append(torch.tensor(new_ids, dtype=torch.long)[level[order]])
    sizes = tuple(int(level.max()) + 1 for level in per_level) + (n_tokens,)
    return HierarchySample(tuple(level_ids), sizes, tuple(reversed(styles)))


# ---------------------------------------------------------------------------
# Log-ratios and budgets
# ---------------------------------------------------------------------------


@st.composite
def log_ratios(draw, traj_id: torch.Tensor, *, style: str | None = None, max_abs: float = 5.0):
    """Float64 log-ratios for the tokens labelled by ``traj_id``, from exactly 0 to ±``max_abs``.

    Returns ``(log_ratio, style)``.  ``drift`` adds a per-trajectory offset
    so that trajectory and coarser aggregates leave pass-through.
    """
    n = traj_id.numel()
    style = style or draw(st.sampled_from(LOG_RATIO_STYLES))
    finite = dict(allow_nan=False, allow_infinity=False)
    if style == "on-policy":
        values = [0.0] * n
    elif style == "near":
        values = draw(st.lists(st.floats(-1e-3, 1e-3, **finite), min_size=n, max_size=n))
    elif style == "far":
        values = draw(st.lists(st.floats(-max_abs, max_abs, **finite), min_size=n, max_size=n))
    elif style == "mixed":
        element = st.one_of(st.just(0.0), st.floats(-max_abs, max_abs, **finite), st.floats(-0.1, 0.1, **finite))
        values = draw(st.lists(element, min_size=n, max_size=n))
    else:
        traj = Segments.from_ids(traj_id)
        offsets = draw(st.lists(st.floats(-2.0, 2.0, **finite), min_size=traj.size, max_size=traj.size))
        noise = draw(st.lists(st.floats(-0.2, 0.2, **finite), min_size=n, max_size=n))
        drift = torch.tensor(offsets, dtype=torch.float64).index_select(0, traj.index)
        return (drift + torch.tensor(noise, dtype=torch.float64)).clamp(-max_abs, max_abs), style
    return torch.tensor(values, dtype=torch.float64), style


def _budget(lo: float, hi: float):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False)


@st.composite
def level_budgets(draw, depth: int, *, lo: float = 0.005, hi: float = 3.0):
    """``(c_pos, c_neg)``: one positive budget per level and channel, or occasionally one shared float."""
    if draw(st.booleans()):
        return draw(_budget(lo, hi)), draw(_budget(lo, hi))
    c_pos = tuple(draw(st.lists(_budget(lo, hi), min_size=depth, max_size=depth)))
    c_neg = tuple(draw(st.lists(_budget(lo, hi), min_size=depth, max_size=depth)))
    return c_pos, c_neg


@dataclass(frozen=True)
class FGHExample:
    """A random FiberPO-on-a-hierarchy input: hierarchy, log-ratios and budgets."""

    sample: HierarchySample
    log_ratio: torch.Tensor
    eps: float
    c_pos: Any
    c_neg: Any
    style: str
    target: str = "-"

    @property
    def level_ids(self):
        return list(self.sample.level_ids)

    def features(self) -> list[str]:
        aimed = [f"aimed:{self.target}"] if self.target != "-" else []
        return self.sample.features() + [f"log-ratio:{self.style}"] + aimed


@st.composite
def fgh_examples(draw, *, min_depth: int = 1, max_depth: int = 6, max_tokens: int = 40, styles=None) -> FGHExample:
    """Hierarchy + log-ratios + ε + per-level budgets, all random."""
    sample = draw(hierarchies(min_depth=min_depth, max_depth=max_depth, max_tokens=max_tokens))
    style = draw(st.sampled_from(styles or LOG_RATIO_STYLES))
    x, style = draw(log_ratios(sample.traj_id, style=style))
    eps = draw(_budget(0.005, 1.5))
    c_pos, c_neg = draw(level_budgets(sample.depth))
    return FGHExample(sample, x, eps, c_pos, c_neg, style)


def _replace_budget(value, level: int, depth: int, new: float, scalar: bool):
    if scalar:
        return new
    values = list(value) if isinstance(value, tuple) else [value] * depth
    values[level] = new
    return tuple(values)


@st.composite
def aimed_fgh_examples(
    draw, *, min_depth: int = 1, max_depth: int = 6, max_tokens: int = 40, scalar_budgets: bool = False, styles=None
) -> FGHExample:
    """Like :func:`fgh_examples`, with one budget aimed at a g_agg regime of one element.

    A level, an element with a non-zero gate argument, a channel and a
    regime (P, R, Z) are drawn; that level's budget for that channel is set
    so the element's g_agg argument falls in the regime (the rollback band
    is only C/k wide, so random budgets rarely reach it on coarse levels).
    With ``scalar_budgets`` one budget per channel serves every level, as in
    the closed forms of the objectives module.
    """
    from ..hierarchy import fgh
    from .. import hierarchy as hier

    styles = styles or [s for s in LOG_RATIO_STYLES if s != "on-policy"]
    ex = draw(fgh_examples(min_depth=min_depth, max_depth=max_depth, max_tokens=max_tokens, styles=styles))
    depth = ex.sample.depth
    c_pos = draw(_budget(0.005, 3.0)) if scalar_budgets else ex.c_pos
    c_neg = draw(_budget(0.005, 3.0)) if scalar_budgets else ex.c_neg
    h = hier.from_ids(ex.level_ids)
    parts = fgh.fiberpo_fgh(h, trajectory=h.total - 1, eps=ex.eps, c_pos=1.0, c_neg=1.0).parts(ex.log_ratio)
    mass = hier.trajectory_mass(h, h.total - 1)
    args = [(parts.residuals[v] / mass[v].unsqueeze(1)).abs() for v in range(depth)]
    candidates = [(v, int(e), int(c)) for v in range(depth) for e, c in (args[v] > 0).nonzero().tolist()]
    if not candidates:
        return FGHExample(ex.sample, ex.log_ratio, ex.eps, c_pos, c_neg, ex.style)
    level, element, channel = candidates[draw(st.integers(0, len(candidates) - 1))]
    aggregate, tokens = float(args[level][element, channel]), float(h.token_count[level][element])
    budget, regime = _aimed_budget(draw, aggregate, tokens, draw(st.sampled_from("PRZ")))
    budget = max(budget, 1e-9)
    if channel == 0:
        c_pos = _replace_budget(c_pos, level, depth, budget, scalar_budgets)
    else:
        c_neg = _replace_budget(c_neg, level, depth, budget, scalar_budgets)
    target = f"level{level}{'+-'[channel]}:{regime}"
    return FGHExample(ex.sample, ex.log_ratio, ex.eps, c_pos, c_neg, ex.style, target)


# ---------------------------------------------------------------------------
# Flat FiberPO batches with budgets aimed at a regime
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FlatBatch:
    """A flat FiberPO input ``(log_ratio, traj_id)`` with ε, C⁺, C⁻.

    ``target`` names the g_agg regime (P, R or Z) the budgets were chosen to
    put one trajectory's positive and negative aggregates in (``"-"`` when
    that aggregate is 0 and only P is reachable).
    """

    log_ratio: torch.Tensor
    traj_id: torch.Tensor
    eps: float
    c_pos: float
    c_neg: float
    target: tuple[str, str]
    style: str


def _aimed_budget(draw, aggregate: float, length: float, regime: str) -> tuple[float, str]:
    """A budget putting ``aggregate`` (≥ 0) in ``regime`` of g_agg(·, C, k = length) (Eq. 10)."""
    if aggregate <= 0:
        return draw(_budget(0.005, 3.0)), "-"
    if regime == "P":
        return aggregate * draw(st.floats(1.0, 4.0)), "P"
    if regime == "R":
        # |a| = C (1 + f/k) with 0 < f < 1 lies strictly inside the rollback band.
        frac = draw(st.floats(0.05, 0.95))
        return aggregate / (1.0 + frac / length), "R"
    frac = draw(st.floats(0.05, 0.95))
    return aggregate / (1.0 + 1.0 / length) * (1.0 - frac), "Z"


@st.composite
def flat_batches(draw, *, max_tokens: int = 40, styles=None) -> FlatBatch:
    """Flat FiberPO batches (one id level) whose budgets aim one trajectory at a g_agg regime."""
    sample = draw(hierarchies(min_depth=1, max_depth=1, max_tokens=max_tokens))
    style = draw(st.sampled_from(styles or LOG_RATIO_STYLES))
    x, style = draw(log_ratios(sample.traj_id, style=style))
    traj = Segments.from_ids(sample.traj_id)
    positive = torch.where(x >= 0, x, torch.zeros_like(x))
    negative = torch.where(x >= 0, torch.zeros_like(x), -x)
    chosen = draw(st.integers(0, traj.size - 1))
    length = float(traj.count[chosen])
    agg_pos, agg_neg = float(traj.mean(positive)[chosen]), float(traj.mean(negative)[chosen])
    c_pos, t_pos = _aimed_budget(draw, agg_pos, length, draw(st.sampled_from("PRZ")))
    c_neg, t_neg = _aimed_budget(draw, agg_neg, length, draw(st.sampled_from("PRZ")))
    eps = draw(_budget(0.005, 1.5))
    return FlatBatch(x, sample.traj_id, eps, max(c_pos, 1e-6), max(c_neg, 1e-6), (t_pos, t_neg), style)


# ---------------------------------------------------------------------------
# Trajectories aimed at the edges of the FiberPO claims (used by the claim checks)
# ---------------------------------------------------------------------------

# These aim at where FiberPO-type claims break: x = 0 exactly, repeated values,
# T = 1 and long T, budgets near zero, and the narrow rollback window of g_agg
# (width C/T, Eq. 10).

# Values where gates switch or degenerate; the exact zero matters most (the gates' kinks sit at x = 0, Eq. 10, 12).
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
