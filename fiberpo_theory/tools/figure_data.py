"""The data of the paper's Figures 2, 3 and 4, recomputed by this package (no matplotlib).

Each figure has a pure *data* function returning a frozen dataclass of numpy
arrays; :mod:`fiberpo_theory.tools.figures` only draws them.  The data
functions never re-derive a formula: every base weight, gate value, fiber
residual and regime label comes from :mod:`fiberpo_theory.core.gates`,
:func:`fiberpo_theory.core.objectives.fiberpo_parts`, the baselines of
:mod:`fiberpo_theory.core.objectives` and :mod:`fiberpo_theory.core.diagnostics`.  The
tests check these arrays (regime boundaries, marker positions, objective
values), not pixels.

* Figure 2 -- ``gate_curves`` (panel a: g_agg of Eq. 10 for several k) and
  ``base_weight_map`` (panel b: log w of Eq. 8 over (log s⁺, log s⁻) with the
  budget lines C^± and the zeroing lines C*^± = (1 + 1/k) C^±).
* Figure 3 -- ``simplex_map``: local (L-I/II/III, Sec. 5.2) and global
  (G-I ... G-III, Sec. 5.1) regimes of one T = 3 trajectory whose ratios lie on
  the simplex (1/T) Σ_t r_t = 1.
* Figure 4 -- ``drift_data``: the per-token and total objective (Eq. 17, 18)
  along r_i = 1 + t Δ_i, beside GRPO with the same ε, with the transition
  markers of the caption located by bisection on the package's own quantities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..core import diagnostics
from ..core.gates import PASS, ROLLBACK, ZEROED, g_agg, g_agg_thresholds, symmetric_clip
from ..core.objectives import aggregation_weights, fiberpo_parts, grpo_gated_ratio, rgf_objective

__all__ = [
    "GateCurves",
    "BaseWeightMap",
    "SimplexMap",
    "DriftMarker",
    "DriftData",
    "gate_curves",
    "base_weight_map",
    "simplex_map",
    "drift_data",
    "simplex_to_ratios",
    "ratios_to_simplex",
    "drift_direction",
    "GLOBAL_REGIMES",
    "LOCAL_REGIMES",
    "PAPER_ZOOM",
]

DTYPE = torch.float64
GLOBAL_REGIMES = diagnostics.GLOBAL_REGIMES
LOCAL_REGIMES = diagnostics.LOCAL_REGIMES

# Figure 3(a) zooms ±0.18 around the centroid, in probability units p_t = r_t / T.
PAPER_ZOOM = 0.18

# Seed of the fixed drift direction Δ (and advantages Â) of Figure 4.
DRIFT_SEED = 20260308


def _zeroing_threshold(c: float, k: float) -> float:
    """C* = (1 + 1/k) C: where g_agg's rollback reaches zero (Eq. 10)."""
    return float(g_agg_thresholds(c, k)[1])


def _channel_boundaries(c_pos: float, c_neg: float, k: float) -> dict[str, float]:
    return {
        "C+": c_pos,
        "C*+": _zeroing_threshold(c_pos, k),
        "C-": c_neg,
        "C*-": _zeroing_threshold(c_neg, k),
    }


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy()


def _channel_trajectories(log_s_pos: torch.Tensor, log_s_neg: torch.Tensor):
    """A batch of two-token trajectories with prescribed (log s⁺, log s⁻).

    Trajectory j has log-ratios (2 P_j, -2 N_j): its positive-channel mean
    (Eq. 9) is exactly P_j and its negative one exactly N_j (scaling by 2 is
    exact in binary floating point).  Feeding these to ``fiberpo_parts`` lets
    the figures read the base weight of Eq. 8 from the core instead of
    recomputing it.
    """
    p = log_s_pos.reshape(-1)
    n = log_s_neg.reshape(-1)
    x = torch.stack([2 * p, -2 * n], dim=1).reshape(-1)
    traj_id = torch.arange(p.numel()).repeat_interleave(2)
    return x, traj_id


# ---------------------------------------------------------------------------
# Figure 2
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GateCurves:
    """Panel (a): ``values[j] = g_agg(x, c, k_values[j])`` (Eq. 10)."""

    x: np.ndarray
    k_values: tuple[float, ...]
    c: float
    values: np.ndarray  # (len(k_values), len(x))


def gate_curves(*, c: float = 0.15, k_values=(1, 2, 3, 8, 32), x_max: float = 0.3, num: int = 1201) -> GateCurves:
    """g_agg(x, C, k) on [-x_max, x_max] for several rollback slopes k (Fig. 2a).

    The grid contains ±C and ±(1 + 1/k) C for every k, so the kinks are drawn
    exactly where Eq. 10 puts them.
    """
    kinks = [c, -c] + [s * _zeroing_threshold(c, k) for k in k_values for s in (1, -1)]
    kinks = np.array([v for v in kinks if abs(v) <= x_max])
    base = np.linspace(-x_max, x_max, num)
    base = base[np.abs(base[:, None] - kinks[None, :]).min(axis=1) > 1e-12]  # no near-duplicates of a kink
    x = np.union1d(base, kinks)
    xt = torch.as_tensor(x, dtype=DTYPE)
    values = torch.stack([g_agg(xt, c, float(k)) for k in k_values])
    return GateCurves(x=x, k_values=tuple(float(k) for k in k_values), c=float(c), values=_numpy(values))


@dataclass(frozen=True)
class BaseWeightMap:
    """log w of Eq. 8 on a grid of (log s⁺, log s⁻) and the regime of each cell.

    ``log_w[i, j]`` belongs to ``log_s_neg[i]`` (rows) and ``log_s_pos[j]``
    (columns).  ``global_regime`` indexes ``GLOBAL_REGIMES``; ``labels`` holds
    one annotation position per (positive, negative) channel-regime pair.
    """

    log_s_pos: np.ndarray
    log_s_neg: np.ndarray
    log_w: np.ndarray
    regime_pos: np.ndarray  # (rows, cols) P/R/Z of the positive channel
    regime_neg: np.ndarray  # (rows, cols) P/R/Z of the negative channel
    global_regime: np.ndarray
    c_pos: float
    c_neg: float
    k: float
    boundaries: dict[str, float]
    labels: list[tuple[float, float, str]] = field(default_factory=list)


_PAIR_TEXT = {
    (ROLLBACK, ROLLBACK): "G-III,r\nboth rollback",
    (ROLLBACK, ZEROED): "G-III,r\nP rollback, N gated",
    (ZEROED, ROLLBACK): "G-III,r\nP gated, N rollback",
}


def base_weight_map(
    *,
    c_pos: float = 0.20,
    c_neg: float = 0.10,
    k: float = 2.0,
    p_max: float = 0.40,
    n_max: float = 0.30,
    num: int = 401,
) -> BaseWeightMap:
    """The base weight over (log s⁺, log s⁻) as FiberPO computes it (Fig. 2b, Fig. 4a).

    Every cell is a two-token trajectory (see ``_channel_trajectories``) run
    through :func:`fiberpo_parts` with the given k; regimes come from
    :mod:`fiberpo_theory.core.diagnostics`.
    """
    p = torch.linspace(0.0, p_max, num, dtype=DTYPE)
    n = torch.linspace(0.0, n_max, max(2, int(round(num * n_max / p_max))), dtype=DTYPE)
    nn, pp = torch.meshgrid(n, p, indexing="ij")
    x, traj_id = _channel_trajectories(pp, nn)
    parts = fiberpo_parts(x, traj_id, eps=1.0, c_pos=c_pos, c_neg=c_neg, k=k)
    shape = nn.shape
    log_w = parts.log_base_weight[::2].reshape(shape)
    pos, neg = diagnostics.channel_regimes(parts, c_pos=c_pos, c_neg=c_neg, k=k)
    regime = diagnostics.global_regime(pos, neg).reshape(shape)
    bounds = _channel_boundaries(c_pos, c_neg, k)

    # One label per channel-regime pair, at the centre of its rectangle.
    edges_p = [0.0, bounds["C+"], bounds["C*+"], p_max]
    edges_n = [0.0, bounds["C-"], bounds["C*-"], n_max]
    labels = []
    for rp in (PASS, ROLLBACK, ZEROED):
        for rn in (PASS, ROLLBACK, ZEROED):
            lo_p, hi_p = edges_p[rp], min(edges_p[rp + 1], p_max)
            lo_n, hi_n = edges_n[rn], min(edges_n[rn + 1], n_max)
            if hi_p <= lo_p or hi_n <= lo_n:
                continue
            code = int(diagnostics.global_regime(torch.tensor([rp]), torch.tensor([rn]))[0])
            text = _PAIR_TEXT.get((rp, rn), GLOBAL_REGIMES[code])
            labels.append(((lo_p + hi_p) / 2, (lo_n + hi_n) / 2, text))
    return BaseWeightMap(
        log_s_pos=_numpy(p),
        log_s_neg=_numpy(n),
        log_w=_numpy(log_w),
        regime_pos=_numpy(pos.reshape(shape)),
        regime_neg=_numpy(neg.reshape(shape)),
        global_regime=_numpy(regime),
        c_pos=float(c_pos),
        c_neg=float(c_neg),
        k=float(k),
        boundaries=bounds,
        labels=labels,
    )


# ---------------------------------------------------------------------------
# Figure 3: regime map on the probability simplex (T = 3)
# ---------------------------------------------------------------------------

# Orthonormal basis of the plane Σ_t r_t = 0, oriented so that the vertex
# r1 = 3 sits bottom-left, r2 = 3 bottom-right and r3 = 3 on top.
_SIMPLEX_BASIS = np.array([[-1.0, 1.0, 0.0], [-1.0, -1.0, 2.0]]) / np.array([[math.sqrt(2)], [math.sqrt(6)]])


def simplex_to_ratios(xy: np.ndarray) -> np.ndarray:
    """Plane coordinates (..., 2) -> ratios (..., 3) with (1/3) Σ r = 1 (isometric embedding)."""
    return 1.0 + np.asarray(xy) @ _SIMPLEX_BASIS


def ratios_to_simplex(r: np.ndarray) -> np.ndarray:
    """Ratios (..., 3) -> plane coordinates (..., 2); distances are ratio-space distances."""
    return (np.asarray(r) - 1.0) @ _SIMPLEX_BASIS.T


@dataclass(frozen=True)
class SimplexMap:
    """Fields of one T = 3 trajectory over a square grid of the simplex plane.

    Arrays are ``(ny, nx)``; cells outside the open simplex (some r_t <= 0)
    hold NaN (floats) or -1 (labels).  ``local_regime`` indexes
    ``LOCAL_REGIMES``, ``global_regime`` indexes ``GLOBAL_REGIMES``.
    """

    x: np.ndarray
    y: np.ndarray
    ratios: np.ndarray  # (ny, nx, 3)
    inside: np.ndarray  # (ny, nx) bool
    log_s_pos: np.ndarray
    log_s_neg: np.ndarray
    log_w: np.ndarray
    max_abs_u: np.ndarray
    min_abs_u: np.ndarray
    local_regime: np.ndarray
    global_regime: np.ndarray
    vertices: np.ndarray  # (3, 2): r1 = 3, r2 = 3, r3 = 3
    eps: float
    c_pos: float
    c_neg: float
    k: float
    boundaries: dict[str, float]
    labels: list[tuple[float, float, str]] = field(default_factory=list)


def _simplex_fields(r: torch.Tensor, *, eps, c_pos, c_neg, k):
    """fiberpo_parts and regime labels for a batch of T-token trajectories ``r`` (M, T)."""
    m, t_len = r.shape
    x = torch.log(r).reshape(-1)
    traj_id = torch.arange(m).repeat_interleave(t_len)
    parts = fiberpo_parts(x, traj_id, eps=eps, c_pos=c_pos, c_neg=c_neg, k=k)
    pos, neg = diagnostics.channel_regimes(parts, c_pos=c_pos, c_neg=c_neg, k=k)
    abs_u = parts.u.abs().reshape(m, t_len)
    return {
        "log_s_pos": parts.log_s_pos,
        "log_s_neg": parts.log_s_neg,
        "log_w": parts.log_base_weight.reshape(m, t_len)[:, 0],
        "max_abs_u": abs_u.amax(dim=1),
        "min_abs_u": abs_u.amin(dim=1),
        "local_regime": diagnostics.local_regime(parts, eps=eps),
        "global_regime": diagnostics.global_regime(pos, neg),
    }


def simplex_map(
    *,
    eps: float = 0.025,
    c_pos: float = 0.15,
    c_neg: float = 0.09,
    k: float = 3.0,
    center=(0.0, 0.0),
    half_width: float | None = None,
    num: int = 401,
) -> SimplexMap:
    """Local and global regimes over the T = 3 simplex (in the spirit of Fig. 3).

    The plane coordinates are an isometric embedding of ratio space (see
    :func:`ratios_to_simplex`).  ``half_width=None`` covers the whole simplex;
    a number zooms on the square ``center ± half_width`` (ratio units).  The
    paper's panel (a) zooms ±0.18 around the centroid in probability units
    p_t = r_t / T, i.e. ``half_width = 0.18 * 3`` here.
    """
    vertices = ratios_to_simplex(3.0 * np.eye(3))
    if half_width is None:
        pad = 0.02
        x = np.linspace(vertices[:, 0].min() - pad, vertices[:, 0].max() + pad, num)
        y = np.linspace(vertices[:, 1].min() - pad, vertices[:, 1].max() + pad, num)
    else:
        x = np.linspace(center[0] - half_width, center[0] + half_width, num)
        y = np.linspace(center[1] - half_width, center[1] + half_width, num)
    xx, yy = np.meshgrid(x, y)
    r = simplex_to_ratios(np.stack([xx, yy], axis=-1))
    inside = (r > 1e-9).all(axis=-1)
    fields = _simplex_fields(torch.as_tensor(r[inside], dtype=DTYPE), eps=eps, c_pos=c_pos, c_neg=c_neg, k=k)
    out = {}
    for name, value in fields.items():
        is_label = name.endswith("regime")
        grid = np.full(inside.shape, -1 if is_label else np.nan, dtype=np.int64 if is_label else np.float64)
        grid[inside] = _numpy(value)
        out[name] = grid
    r_out = np.where(inside[..., None], r, np.nan)
    labels = _simplex_labels(eps=eps, c_pos=c_pos, c_neg=c_neg, k=k, zoom=half_width)
    return SimplexMap(
        x=x,
        y=y,
        ratios=r_out,
        inside=inside,
        vertices=vertices,
        eps=float(eps),
        c_pos=float(c_pos),
        c_neg=float(c_neg),
        k=float(k),
        boundaries={"eps": float(eps), **_channel_boundaries(c_pos, c_neg, k)},
        labels=labels,
        **out,
    )


def _simplex_labels(*, eps, c_pos, c_neg, k, zoom: float | None) -> list[tuple[float, float, str]]:
    """One annotation point per regime met along a ray from the centroid.

    Local regimes when zoomed (``zoom`` is the half width), global ones over
    the whole simplex.  The point is the middle of the first run of that
    regime along the ray, so it lies inside the region it names.
    """
    zoomed = zoom is not None
    names = LOCAL_REGIMES if zoomed else GLOBAL_REGIMES
    length = 1.0 if not zoomed else zoom
    s = np.linspace(0.0, length, 4001)[1:]
    # The first of a few fixed directions along which every regime occurs (else the last one).
    for angle in (-90.0, -60.0, -30.0, -75.0, -45.0, -15.0):
        direction = np.array([math.cos(math.radians(angle)), math.sin(math.radians(angle))])
        pts = s[:, None] * direction
        r = torch.as_tensor(simplex_to_ratios(pts), dtype=DTYPE)
        f = _simplex_fields(r, eps=eps, c_pos=c_pos, c_neg=c_neg, k=k)
        codes = _numpy(f["local_regime" if zoomed else "global_regime"])
        if np.unique(codes).size == len(names):
            break
    labels = []
    for code in range(len(names)):
        hits = np.flatnonzero(codes == code)
        if hits.size == 0:
            continue
        first = hits[0]
        run_end = first
        while run_end + 1 < codes.size and codes[run_end + 1] == code:
            run_end += 1
        mid = (first + run_end) // 2
        labels.append((float(pts[mid, 0]), float(pts[mid, 1]), names[code]))
    return labels


# ---------------------------------------------------------------------------
# Figure 4: per-token and total objective under parameterized drift
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftMarker:
    """A transition along the drift: ``kind`` is ``"eps"`` (L-I -> L-II,
    max_i |u_i| = ε), ``"eps-token"`` (token ``token`` reaches |u_i| = ε),
    ``"C-"``/``"C*-"``/``"C+"``/``"C*+"`` (log s^∓ reaches that threshold)."""

    t: float
    kind: str
    token: int | None = None


@dataclass(frozen=True)
class DriftData:
    """Everything Figure 4 plots, along r_i(t) = 1 + t Δ_i of one trajectory.

    ``fiberpo_token``/``grpo_token`` are G(r)_i Â_i (the per-token objective
    of Eq. 17 without its prefactor 1/(|Tj| T_τ)); the totals are Eq. 2 with
    μ from :func:`aggregation_weights` (= 1/T for one trajectory).
    ``unweighted_total`` is the same sum with the base weight set to 1 (only
    the fiber gate): the baseline FiberPO returns to once both channels are
    zeroed (G-III).  ``linear_total`` is Σ μ_i r_i Â_i (no gating at all).
    """

    t: np.ndarray
    delta: np.ndarray
    advantages: np.ndarray
    eps: float
    c_pos: float
    c_neg: float
    k: float
    log_ratio: np.ndarray  # (n_t, T)
    log_s_pos: np.ndarray
    log_s_neg: np.ndarray
    log_base_weight: np.ndarray
    max_abs_u: np.ndarray
    abs_u: np.ndarray  # (n_t, T)
    local_regime: np.ndarray
    global_regime: np.ndarray
    fiberpo_token: np.ndarray
    grpo_token: np.ndarray
    fiberpo_total: np.ndarray
    grpo_total: np.ndarray
    unweighted_total: np.ndarray
    linear_total: np.ndarray
    markers: list[DriftMarker]
    tokens: tuple[int, int]  # the two representative tokens of panel (c)
    t_bar: float  # where panel (b) is drawn
    bar_log_ratio: np.ndarray
    bar_numerator: np.ndarray  # clip(l u, ε)
    bar_base_minus_denominator: np.ndarray  # log w - clip(l v, ε)
    bar_log_gated: np.ndarray  # log G(r)_i
    heatmap: BaseWeightMap


def drift_direction(t_len: int = 10, seed: int = DRIFT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed seeded Δ and Â with sign(Δ_i) = sign(Â_i) (Fig. 4)."""
    gen = torch.Generator().manual_seed(seed)
    delta = 0.1 * torch.randn(t_len, generator=gen, dtype=DTYPE)
    magnitude = 0.25 + 0.5 * torch.rand(t_len, generator=gen, dtype=DTYPE)
    return delta, torch.sign(delta) * magnitude


def _drift_evaluator(delta, advantages, *, eps, c_pos, c_neg, k):
    """Closure mapping a 1-D tensor of drifts t to every Figure 4 quantity."""
    t_len = delta.numel()
    single = torch.zeros(t_len, dtype=DTYPE)
    mu = aggregation_weights("fiberpo", single, torch.zeros(t_len, dtype=torch.long))  # 1/(|Tj| T)
    mu_grpo = aggregation_weights("grpo", single, torch.zeros(t_len, dtype=torch.long))

    def evaluate(t: torch.Tensor, *, full: bool = True) -> dict[str, torch.Tensor]:
        t = torch.as_tensor(t, dtype=DTYPE).reshape(-1)
        m = t.numel()
        ratio = 1.0 + t[:, None] * delta[None, :]
        x = torch.log(ratio).reshape(-1)
        traj_id = torch.arange(m).repeat_interleave(t_len)
        parts = fiberpo_parts(x, traj_id, eps=eps, c_pos=c_pos, c_neg=c_neg, k=k)
        out = {
            "parts": parts,
            "log_ratio": x.reshape(m, t_len),
            "log_s_pos": parts.log_s_pos,
            "log_s_neg": parts.log_s_neg,
            "abs_u": parts.u.abs().reshape(m, t_len),
        }
        if not full:
            return out

        def per_trajectory_objective(gated: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
            return torch.stack([rgf_objective(g, advantages, weights) for g in gated.reshape(m, t_len)])

        adv = advantages.repeat(m)
        grpo = grpo_gated_ratio(ratio.reshape(-1), eps=eps, advantages=adv)
        pos, neg = diagnostics.channel_regimes(parts, c_pos=c_pos, c_neg=c_neg, k=k)
        out.update(
            log_base_weight=parts.log_base_weight.reshape(m, t_len)[:, 0],
            local_regime=diagnostics.local_regime(parts, eps=eps),
            global_regime=diagnostics.global_regime(pos, neg),
            fiberpo_token=(parts.gated_ratio * adv).reshape(m, t_len),
            grpo_token=(grpo * adv).reshape(m, t_len),
            fiberpo_total=per_trajectory_objective(parts.gated_ratio, mu),
            grpo_total=per_trajectory_objective(grpo, mu_grpo),
            unweighted_total=per_trajectory_objective(torch.exp(parts.log_gated_residual), mu),
            linear_total=per_trajectory_objective(torch.exp(x), mu),
        )
        return out

    return evaluate


def _bisect(f: Callable[[float], float], lo: float, hi: float, iters: int = 60) -> float:
    """Root of a continuous f with a sign change on [lo, hi] (to ~1 ulp)."""
    lo_positive = f(lo) > 0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if (f(mid) > 0) == lo_positive:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _first_crossings(t: np.ndarray, values: np.ndarray, level: float, scalar: Callable[[float], float]) -> list[float]:
    """First t on each side of t = 0 where ``values`` reaches ``level``, refined by bisection.

    ``values`` is sampled on the grid ``t`` (which contains 0); ``scalar``
    evaluates the same quantity at one t.
    """
    zero = int(np.flatnonzero(t == 0.0)[0])
    found = []
    for step in (1, -1):
        idx = zero
        while 0 <= idx + step < t.size and values[idx + step] < level:
            idx += step
        if 0 <= idx + step < t.size:
            found.append(_bisect(lambda s: scalar(s) - level, float(t[idx]), float(t[idx + step])))
    return found


def _drift_markers(evaluate, t, arr, max_abs_u, *, eps, c_pos, c_neg, k) -> list[DriftMarker]:
    """Where the path first crosses ε (largest |u|, then each token) and each of C⁻, C*⁻, C⁺, C*⁺, by bisection."""

    def scalar(name, reduce=None):
        def f(s: float) -> float:
            v = evaluate(torch.tensor([s], dtype=DTYPE), full=False)[name]
            return float(reduce(v) if reduce else v.reshape(-1)[0])

        return f

    markers: list[DriftMarker] = []
    for s in _first_crossings(t, max_abs_u, eps, scalar("abs_u", lambda v: v.max())):
        markers.append(DriftMarker(s, "eps"))
    for i in range(arr["abs_u"].shape[1]):
        for s in _first_crossings(t, arr["abs_u"][:, i], eps, scalar("abs_u", lambda v, i=i: v[0, i])):
            markers.append(DriftMarker(s, "eps-token", token=i))
    bounds = _channel_boundaries(c_pos, c_neg, k)
    for key, channel in (("C-", "log_s_neg"), ("C*-", "log_s_neg"), ("C+", "log_s_pos"), ("C*+", "log_s_pos")):
        for s in _first_crossings(t, arr[channel], bounds[key], scalar(channel)):
            markers.append(DriftMarker(s, key))
    return markers


def drift_data(
    *,
    t_len: int = 10,
    k: float = 32.0,
    eps: float = 0.04,
    c_pos: float = 0.12,
    c_neg: float = 0.05,
    seed: int = DRIFT_SEED,
    num: int = 1601,
    t_bar: float = 1.0,
    heatmap_num: int = 301,
) -> DriftData:
    """Figure 4's data: FiberPO vs GRPO along r_i = 1 + tΔ_i, markers by bisection.

    t spans both directions, up to 96% of the largest |t| keeping every
    r_i > 0; t = 0 (on-policy) is a grid point.
    """
    delta, adv = drift_direction(t_len, seed)
    evaluate = _drift_evaluator(delta, adv, eps=eps, c_pos=c_pos, c_neg=c_neg, k=k)
    t_hi = 0.96 / float((-delta).clamp(min=0).max()) if bool((delta < 0).any()) else 5.0
    t_lo = -0.96 / float(delta.clamp(min=0).max()) if bool((delta > 0).any()) else -5.0
    half = num // 2
    t = np.concatenate([np.linspace(t_lo, 0.0, half + 1), np.linspace(0.0, t_hi, half + 1)[1:]])
    ev = evaluate(torch.as_tensor(t))
    arr = {name: _numpy(v) for name, v in ev.items() if name != "parts"}
    max_abs_u = arr["abs_u"].max(axis=1)

    markers = _drift_markers(evaluate, t, arr, max_abs_u, eps=eps, c_pos=c_pos, c_neg=c_neg, k=k)

    bar = evaluate(torch.tensor([t_bar], dtype=DTYPE))
    parts = bar["parts"]
    numerator = symmetric_clip(parts.sign * parts.u, eps)  # numerator of Eq. 16, in log space
    tokens = (int(torch.argmax(delta)), int(torch.argmin(delta)))
    return DriftData(
        t=t,
        delta=_numpy(delta),
        advantages=_numpy(adv),
        eps=float(eps),
        c_pos=float(c_pos),
        c_neg=float(c_neg),
        k=float(k),
        max_abs_u=max_abs_u,
        markers=sorted(markers, key=lambda m: m.t),
        tokens=tokens,
        t_bar=float(t_bar),
        bar_log_ratio=_numpy(bar["log_ratio"][0]),
        bar_numerator=_numpy(numerator),
        bar_base_minus_denominator=_numpy(parts.log_base_weight + parts.log_gated_residual - numerator),
        bar_log_gated=_numpy(torch.log(parts.gated_ratio)),
        heatmap=base_weight_map(c_pos=c_pos, c_neg=c_neg, k=k, p_max=0.25, n_max=0.25, num=heatmap_num),
        **arr,
    )
