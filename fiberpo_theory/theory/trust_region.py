"""Tabular sample-based TV-TRPO and APC-Obj (paper App. B.1, C.1-C.2, D).

The test bed of the trust-region claims is a *tabular instance*: the distinct
sampled pairs (s, a), each with its multiplicity n_{s,a} and a centred
advantage Â_{s,a} (Eq. 66).  A candidate update is a vector of ratio
deviations Δ_{s,a} = r_{s,a} - 1, one per pair, that satisfies the probability
constraint Σ_a n_{s,a} Δ_{s,a} = 0 at every state (Eq. 65).  Under "complete
parametrization" every such Δ is reachable, so the paper's equivalence
results are statements about functions of Δ; this module evaluates them.

Every function that takes deviations accepts a single vector ``(K,)`` or a
batch ``(..., K)`` (K = number of pairs), so searches evaluate many
candidates in one call.  Per-state sums go through the pair-to-state
incidence matrix instead of a loop over states.

Conventions.  The APC-Obj objectives here drop the constant factor
1/(1-γ) of Eq. 72-73, as Def. C.1 does: it does not move the maximizer and it
makes γ = 1 well defined (state weights Γ(s)/Γ become T_s/T).  The TV-TRPO
reduced objective j(Δ) keeps Eq. 68 exactly as printed, because there the
ratio between the linear part and the penalty decides the maximizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import numpy as np
import torch
from scipy.optimize import linprog, minimize_scalar

from ..core import _validate
from ..core.gates import budget_clip
from ..core.objectives import apc_obj_gated_ratio

__all__ = [
    "TabularInstance",
    "StateLP",
    "center_advantages",
    "random_instance",
    "token_pairs",
    "probability_residual",
    "tv_per_state",
    "max_tv",
    "linear_gain",
    "reduced_objective",
    "solve_state_lp",
    "state_values",
    "aggregate_value",
    "advantage_range",
    "unit_tv_maximizer",
    "t_star",
    "delta_trpo",
    "delta_apc_obj",
    "delta_apc_obj_printed",
    "tv_trpo_maximizer",
    "tv_trpo_maximizer_lp",
    "apc_obj_gated_deviation",
    "apc_obj_objective",
    "apc_obj_correction",
    "apc_obj_surrogate",
    "apc_obj_maximizer",
    "retraction_clip",
    "centred_projection",
    "retraction",
]

Gate = Callable[..., torch.Tensor]

# Relative tolerance for the sample identities (Eq. 65, 66) on float inputs:
# centring in float64 leaves residuals of a few ulps of Σ n|x|.
_IDENTITY_RTOL = 1e-9


# ---------------------------------------------------------------------------
# Instances (App. D.1)
# ---------------------------------------------------------------------------


def _int_vector(name: str, value, *, minimum: int) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {array.shape}")
    if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array)):
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    if array.min() < minimum:
        raise ValueError(f"{name} must be >= {minimum}, found {int(array.min())}")
    return array.astype(np.int64)


def _float_vector(name: str, value, length: int) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite entries")
    return array


def _gamma(gamma) -> float:
    value = _validate.positive("gamma", gamma)
    if value > 1:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma!r}")
    return value


@dataclass(frozen=True, eq=False)
class TabularInstance:
    """One sampled batch in tabular form: a row per distinct pair (s, a).

    Args:
        state: ``(K,)`` non-negative integer state id of each pair (relabelled
            to the dense index 0..S-1, in sorted id order).
        counts: ``(K,)`` multiplicities n_{s,a} >= 1.
        advantages: ``(K,)`` Â_{s,a}, centred at every state (Eq. 66);
            :func:`center_advantages` produces such values.
        gamma: discount factor in (0, 1].
        discount_mass: ``(S,)`` Γ(s) = Σ_tokens at s γ^t (App. D.1).  ``None``
            gives T_s, the value at γ = 1 (as if every γ^t were 1).

    Derived: ``n_states`` S, ``state_count`` T_s, ``total`` T,
    ``state_weight`` Γ(s)/Γ, ``adv_norm`` ‖Â‖∞ over the sampled pairs.
    """

    state: np.ndarray
    counts: np.ndarray
    advantages: np.ndarray
    gamma: float = 1.0
    discount_mass: np.ndarray | None = None
    n_states: int = field(init=False)
    state_count: np.ndarray = field(init=False)
    total: int = field(init=False)
    state_weight: np.ndarray = field(init=False)
    adv_norm: float = field(init=False)
    incidence: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        raw_state = _int_vector("state", self.state, minimum=0)
        _, dense = np.unique(raw_state, return_inverse=True)
        counts = _int_vector("counts", self.counts, minimum=1)
        if counts.shape != raw_state.shape:
            raise ValueError(f"counts has length {counts.size}, expected one per pair ({raw_state.size})")
        advantages = _float_vector("advantages", self.advantages, raw_state.size)
        n_states = int(dense.max()) + 1
        incidence = np.zeros((raw_state.size, n_states))
        incidence[np.arange(raw_state.size), dense] = 1.0
        state_count = counts @ incidence
        _check_centred("advantages", advantages, counts, incidence, "Eq. 66; see center_advantages")
        gamma = _gamma(self.gamma)
        if self.discount_mass is None:
            mass = state_count.astype(np.float64)
        else:
            mass = _float_vector("discount_mass", self.discount_mass, n_states)
            if np.any(mass <= 0):
                raise ValueError("discount_mass must be positive at every state")
        for name, value in (
            ("state", dense.astype(np.int64)),
            ("counts", counts),
            ("advantages", advantages),
            ("gamma", gamma),
            ("discount_mass", mass),
            ("n_states", n_states),
            ("state_count", state_count.astype(np.int64)),
            ("total", int(counts.sum())),
            ("state_weight", mass / mass.sum()),
            ("adv_norm", float(np.abs(advantages).max())),
            ("incidence", incidence),
        ):
            object.__setattr__(self, name, value)

    @property
    def n_pairs(self) -> int:
        return int(self.state.size)

    def with_gamma(self, gamma: float, discount_mass=None) -> "TabularInstance":
        """The same pairs under another discount (Γ(s) defaults to T_s)."""
        return TabularInstance(self.state, self.counts, self.advantages, gamma, discount_mass)

    def to_json(self) -> dict:
        """Exact, re-checkable numbers (floats are written with full precision)."""
        return {
            "state": self.state.tolist(),
            "counts": self.counts.tolist(),
            "advantages": [float(a) for a in self.advantages],
            "gamma": float(self.gamma),
            "discount_mass": [float(m) for m in self.discount_mass],
        }


def _check_centred(name, values, counts, incidence, where):
    """Raise unless Σ_a n_sa x_sa = 0 at every state, up to float rounding.

    The allowance scales with each state's own Σ n|x| and, for states whose
    centred values are tiny next to the rest (near-ties), with T_s ‖x‖∞.
    """
    rows = np.atleast_2d(values)
    residual = (counts * rows) @ incidence
    scale = (counts * np.abs(rows)) @ incidence
    largest = np.abs(rows).max(axis=-1, keepdims=True)
    allowed = _IDENTITY_RTOL * scale + 1e-12 * counts.sum() * largest
    bad = np.argwhere(np.abs(residual) > allowed)
    if bad.size:
        row, s = (int(v) for v in bad[0])
        raise ValueError(f"{name} must satisfy Σ_a n_sa x_sa = 0 at every state ({where}); state {s} gives {residual[row, s]!r}")


def center_advantages(state, counts, advantages) -> np.ndarray:
    """Subtract each state's count-weighted mean so that Eq. 66 holds."""
    state = _int_vector("state", state, minimum=0)
    counts = _int_vector("counts", counts, minimum=1)
    if counts.shape != state.shape:
        raise ValueError(f"counts has length {counts.size}, expected {state.size}")
    raw = _float_vector("advantages", advantages, state.size)
    _, dense = np.unique(state, return_inverse=True)
    total = np.bincount(dense, weights=counts)
    centred = raw
    for _ in range(2):  # the second pass removes the rounding left by the first (near-ties)
        centred = centred - (np.bincount(dense, weights=counts * centred) / total)[dense]
    return centred


def random_instance(
    rng: np.random.Generator,
    *,
    n_states: int = 3,
    max_actions: int = 4,
    max_count: int = 5,
    gamma: float = 1.0,
    horizon: int = 32,
) -> TabularInstance:
    """A random tabular instance drawn from ``rng``.

    Each state gets 1..max_actions distinct actions (so single-action states
    occur), multiplicities 1..max_count, standard normal advantages centred
    per Eq. 66, and each token a time step in 0..horizon-1, from which
    Γ(s) = Σ γ^t follows (App. D.1).
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    n_states = _validate.positive_int("n_states", n_states)
    max_actions = _validate.positive_int("max_actions", max_actions)
    max_count = _validate.positive_int("max_count", max_count)
    horizon = _validate.positive_int("horizon", horizon)
    gamma = _gamma(gamma)
    actions = rng.integers(1, max_actions + 1, size=n_states)
    state = np.repeat(np.arange(n_states), actions)
    counts = rng.integers(1, max_count + 1, size=state.size)
    advantages = center_advantages(state, counts, rng.standard_normal(state.size))
    steps = rng.integers(0, horizon, size=int(counts.sum()))
    mass = np.bincount(np.repeat(state, counts), weights=gamma**steps, minlength=n_states)
    return TabularInstance(state, counts, advantages, gamma, mass)


def token_pairs(inst: TabularInstance) -> np.ndarray:
    """``(T,)`` the pair index of every sampled token: pair k repeated n_k times."""
    return np.repeat(np.arange(inst.n_pairs), inst.counts)


# ---------------------------------------------------------------------------
# Divergences and the reduced TV-TRPO objective (Eq. 39, 65, 68)
# ---------------------------------------------------------------------------


def _deviation(name: str, inst: TabularInstance, value) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 0 or array.shape[-1] != inst.n_pairs:
        raise ValueError(f"{name} must have last dimension {inst.n_pairs} (one entry per pair), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite entries")
    return array


def probability_residual(inst: TabularInstance, deviation) -> np.ndarray:
    """``(..., S)`` Σ_a n_{s,a} Δ_{s,a}, zero for a feasible update (Eq. 65)."""
    dev = _deviation("deviation", inst, deviation)
    return (inst.counts * dev) @ inst.incidence


def tv_per_state(inst: TabularInstance, deviation) -> np.ndarray:
    """``(..., S)`` the per-state TV estimate D̂TV(s, Δ) = Σ_a n |Δ| / T_s (Eq. 39)."""
    dev = _deviation("deviation", inst, deviation)
    return (inst.counts * np.abs(dev)) @ inst.incidence / inst.state_count


def max_tv(inst: TabularInstance, deviation) -> np.ndarray:
    """``(...)`` the sample max-TV max_s D̂TV(s, Δ) (Eq. 44)."""
    return tv_per_state(inst, deviation).max(axis=-1)


def linear_gain(inst: TabularInstance, deviation) -> np.ndarray:
    """``(...)`` (1/Γ) Σ_s Γ(s)/T_s Σ_a n Δ Â: the Δ-dependent part of the linear surrogate (App. D.2)."""
    dev = _deviation("deviation", inst, deviation)
    per_state = (inst.counts * inst.advantages * dev) @ inst.incidence
    return per_state @ (inst.state_weight / inst.state_count)


def _penalty(inst: TabularInstance) -> float:
    """The coefficient 4γ‖Â‖∞/(1-γ)² of the max-TV penalty (Eq. 55, 67)."""
    return 4 * inst.gamma * inst.adv_norm / (1 - inst.gamma) ** 2


def _require_discounted(inst: TabularInstance):
    if inst.gamma >= 1:
        raise ValueError("gamma must be < 1: the TV-TRPO objective (Eq. 67-68) divides by 1 - gamma")


def reduced_objective(inst: TabularInstance, deviation) -> np.ndarray:
    """The reduced sample-based TV-TRPO objective j(Δ) of Eq. 68.

    j(Δ) = linear_gain(Δ)/(1-γ) - 4γ‖Â‖∞/(1-γ)² · (max_s D̂TV(s, Δ))².
    Defined for γ < 1 only.
    """
    _require_discounted(inst)
    return linear_gain(inst, deviation) / (1 - inst.gamma) - _penalty(inst) * max_tv(inst, deviation) ** 2


# ---------------------------------------------------------------------------
# The per-state linear program (Eq. 69-71) and the TV-TRPO maximizer (Thm D.3)
# ---------------------------------------------------------------------------


class StateLP(NamedTuple):
    """A HiGHS solution of Eq. 69 for every state.

    ``deviation`` is an optimal vertex Δ ``(K,)``; ``value`` ``(S,)`` is each
    state's optimum Σ_a n Δ Â (radius · M(s) by Eq. 70).
    """

    deviation: np.ndarray
    value: np.ndarray


def solve_state_lp(inst: TabularInstance, radius=1.0, *, floor: float | None = None) -> StateLP:
    """Solve Eq. 69 at every state with ``scipy.optimize.linprog(method="highs")``.

    The TV condition is imposed as D̂TV(s, Δ) <= radius (the relaxed form of
    Eq. 71); it binds wherever the state's optimum is positive.  Δ is split
    as p - q with p, q >= 0, so Σ n (p + q) <= T_s · radius bounds Σ n |Δ|.
    States share no variable, so one block LP solves them all.

    Args:
        radius: a float or ``(S,)`` array of TV radii >= 0.
        floor: optional lower bound on every Δ (``-1`` is ratio positivity,
            r = 1 + Δ >= 0), which Eq. 69 itself does not impose.
    """
    radius = np.broadcast_to(np.asarray(radius, dtype=np.float64), (inst.n_states,))
    if not np.all(np.isfinite(radius)) or np.any(radius < 0):
        raise ValueError(f"radius must be finite and >= 0, got {radius}")
    k = inst.n_pairs
    weighted = (inst.counts[:, None] * inst.incidence).T  # (S, K): row s holds n_{s,a} on its pairs
    gain = inst.counts * inst.advantages
    # HiGHS treats reduced costs below ~1e-7 as zero, so a state whose advantages are
    # small next to another's would come back unsolved.  States do not interact: dividing
    # each state's objective by its own max |Â| changes no maximizer and fixes the scale.
    top, bottom = advantage_range(inst)
    state_scale = np.maximum(np.abs(top), np.abs(bottom))
    unit_gain = gain / np.where(state_scale > 0, state_scale, 1.0)[inst.state]
    cost = -np.concatenate([unit_gain, -unit_gain])
    a_eq = np.hstack([weighted, -weighted])
    a_ub = [np.hstack([weighted, weighted])]
    b_ub = [inst.state_count * radius]
    if floor is not None:
        if not np.isfinite(floor):
            raise ValueError(f"floor must be finite, got {floor!r}")
        a_ub.append(np.hstack([-np.eye(k), np.eye(k)]))  # q - p <= -floor  <=>  Δ >= floor
        b_ub.append(np.full(k, -float(floor)))
    result = linprog(
        cost,
        A_ub=np.vstack(a_ub),
        b_ub=np.concatenate(b_ub),
        A_eq=a_eq,
        b_eq=np.zeros(inst.n_states),
        bounds=(0, None),
        method="highs",
        # Tighter than HiGHS's 1e-7 defaults: advantages that differ by 1e-8 must still be told apart.
        options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10},
    )
    if result.status != 0:
        raise RuntimeError(f"HiGHS did not solve the per-state LP: {result.message}")
    deviation = result.x[:k] - result.x[k:]
    return StateLP(deviation, (gain * deviation) @ inst.incidence)


def state_values(inst: TabularInstance) -> np.ndarray:
    """``(S,)`` M(s), the optimum of Eq. 69 at unit TV, from the LP.

    A single-action state admits only Δ = 0 under Eq. 65, so the equality
    D̂TV = 1 of Eq. 69 is infeasible there; the relaxed LP gives M(s) = 0.
    """
    return solve_state_lp(inst, 1.0).value


def aggregate_value(inst: TabularInstance, values) -> float:
    """M = Σ_s (Γ(s)/Γ) M(s)/T_s (App. D.3, "aggregate notation")."""
    values = _float_vector("values", values, inst.n_states)
    return float(values @ (inst.state_weight / inst.state_count))


def advantage_range(inst: TabularInstance) -> tuple[np.ndarray, np.ndarray]:
    """``(S,)`` each state's largest and smallest sampled advantage."""
    top = np.full(inst.n_states, -np.inf)
    bottom = np.full(inst.n_states, np.inf)
    np.maximum.at(top, inst.state, inst.advantages)
    np.minimum.at(bottom, inst.state, inst.advantages)
    return top, bottom


def unit_tv_maximizer(inst: TabularInstance) -> np.ndarray:
    """``(K,)`` Δ̂*: the least-norm maximizer of Eq. 69 at every state (closed form).

    With y = n Δ the LP reads max Σ y Â, Σ y = 0, Σ|y| <= T_s, so the optimum
    puts mass T_s/2 on the largest advantage and -T_s/2 on the smallest
    (M(s) = T_s (max Â - min Â)/2; derived in ``proofs/tr_state_lp.py``).
    Ties are broken by the least Σ_a Δ², the rule Def. D.1 gives the TV-TRPO
    maximizer: Δ_a = ± n_a T_s / (2 Σ_tied n²).  Where every advantage at s is
    equal (M(s) = 0, single-action states included) Δ̂* is set to 0, the
    choice that tie-break makes.
    """
    s = inst.state
    top, bottom = advantage_range(inst)
    spread = top > bottom
    is_top = (inst.advantages == top[s]) & spread[s]
    is_bottom = (inst.advantages == bottom[s]) & spread[s]
    n = inst.counts.astype(np.float64)
    top_sq = np.bincount(s, weights=n**2 * is_top, minlength=inst.n_states)
    bottom_sq = np.bincount(s, weights=n**2 * is_bottom, minlength=inst.n_states)
    half = inst.state_count / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(is_top, n * half[s] / top_sq[s], 0.0)
        down = np.where(is_bottom, n * half[s] / bottom_sq[s], 0.0)
    return up - down


def t_star(aggregate: float, adv_norm: float, gamma: float) -> float:
    """t* = (1-γ) M / (8γ ‖Â‖∞), the TV-TRPO step size of Thm D.3.

    When every advantage is zero, M = 0 and the maximizer is Δ = 0, so t* = 0
    (the theorem's trivial case) instead of 0/0.
    """
    gamma = _gamma(gamma)
    aggregate = float(aggregate)
    adv_norm = float(adv_norm)
    if not np.isfinite(aggregate) or aggregate < 0:
        raise ValueError(f"aggregate must be a finite M >= 0, got {aggregate!r}")
    if not np.isfinite(adv_norm) or adv_norm < 0:
        raise ValueError(f"adv_norm must be finite and >= 0, got {adv_norm!r}")
    if adv_norm == 0:
        if aggregate != 0:
            raise ValueError("adv_norm is 0 but aggregate is not: M <= ‖Â‖∞ is violated")
        return 0.0
    return (1 - gamma) * aggregate / (8 * gamma * adv_norm)


def delta_trpo(gamma: float) -> float:
    """δ^(TRPO) = (1-γ)/(8γ) (Eq. 76); 0 at γ = 1 (Thm 2.1)."""
    gamma = _gamma(gamma)
    return (1 - gamma) / (8 * gamma)


def _aggregate(inst: TabularInstance) -> float:
    return aggregate_value(inst, state_values(inst))


def delta_apc_obj(inst: TabularInstance) -> float:
    """δ^(APC-Obj) of Def. D.4 (Eq. 72): (1-γ) M / (8γ ‖Â‖∞), equal to t*."""
    return t_star(_aggregate(inst), inst.adv_norm, inst.gamma)


def delta_apc_obj_printed(inst: TabularInstance) -> float:
    """δ^(APC-Obj) as printed in Def. 3.2 and Def. C.1: (1-γ)² M / (8γ ‖Â‖∞ T).

    Kept to audit the discrepancy with Eq. 72: the two differ by the factor
    (1-γ)/T, and only Eq. 72's value equals t* (Thm D.10).
    """
    if inst.adv_norm == 0:
        return 0.0
    return (1 - inst.gamma) ** 2 * _aggregate(inst) / (8 * inst.gamma * inst.adv_norm * inst.total)


def tv_trpo_maximizer(inst: TabularInstance) -> np.ndarray:
    """Δ* = t* Δ̂*, the TV-TRPO maximizer claimed by Thm D.3."""
    step = t_star(_aggregate(inst), inst.adv_norm, inst.gamma)
    return step * unit_tv_maximizer(inst)


def tv_trpo_maximizer_lp(inst: TabularInstance, *, floor: float | None = None, xatol: float = 1e-12):
    """Maximize j(Δ) (Eq. 68) numerically, without Thm D.3's closed form.

    For a common cap t on every D̂TV(s, Δ) the best linear gain is an LP
    (:func:`solve_state_lp` at radius t); j's maximum is then a concave
    function of t, maximized by a bounded scalar search.  The search bracket
    [0, (1-γ)/(4γ)] comes from |linear gain| <= ‖Â‖∞ max_s D̂TV, beyond which
    j < 0 = j(0).  ``floor`` adds Δ >= floor (ratio positivity with -1).

    Returns ``(deviation, t)``: the LP vertex at the best cap and the cap.
    """
    _require_discounted(inst)
    penalty = _penalty(inst)
    weights = inst.state_weight / inst.state_count

    def value(cap: float) -> float:
        lp = solve_state_lp(inst, cap, floor=floor)
        return float(lp.value @ weights) / (1 - inst.gamma) - penalty * cap**2

    upper = (1 - inst.gamma) / (4 * inst.gamma)
    best = minimize_scalar(lambda cap: -value(cap), bounds=(0.0, upper), method="bounded", options={"xatol": xatol})
    cap = float(best.x)
    return solve_state_lp(inst, cap, floor=floor).deviation, cap


# ---------------------------------------------------------------------------
# APC-Obj: gated deviations, objective, surrogate (Eq. 57, 59, 72-74)
# ---------------------------------------------------------------------------


def apc_obj_gated_deviation(inst: TabularInstance, deviation, delta: float, *, gate: Gate = apc_obj_gated_ratio) -> np.ndarray:
    """``(..., K)`` the APC-Obj gated deviation G(r) - 1 of each pair (Eq. 59).

    The pairs are expanded into their n_{s,a} tokens and gated token by token
    with ``gate`` (``objectives.apc_obj_gated_ratio``: budget T_s δ minus the
    other tokens' |r - 1| at the same state).  Each batch row is gated as its
    own set of states.  A pair's value is the mean over its tokens, so that
    n · value is exactly the pair's token sum (Remark D.7 groups those terms).
    """
    delta = _validate.positive("delta", delta)
    dev = _deviation("deviation", inst, deviation)
    if np.any(dev <= -1):
        raise ValueError("deviation must be > -1 everywhere: the ratios 1 + Δ must be positive")
    batch_shape = dev.shape[:-1]
    rows = dev.reshape(-1, inst.n_pairs)
    pairs = token_pairs(inst)
    ratio = torch.from_numpy(1.0 + rows[:, pairs]).reshape(-1)
    offsets = (np.arange(rows.shape[0]) * inst.n_states)[:, None]
    state_id = torch.from_numpy((inst.state[pairs][None, :] + offsets).reshape(-1))
    gated = gate(ratio, state_id, delta=delta).detach().cpu().double().numpy().reshape(rows.shape[0], -1) - 1.0
    per_pair = np.zeros_like(rows)
    np.add.at(per_pair, (slice(None), pairs), gated)
    return (per_pair / inst.counts).reshape(*batch_shape, inst.n_pairs)


def _token_weight(inst: TabularInstance) -> np.ndarray:
    """``(K,)`` μ per token of pair k: Γ(s)/(Γ T_s) (1/T at γ = 1, the μ of Eq. 57)."""
    return (inst.state_weight / inst.state_count)[inst.state]


def apc_obj_objective(inst: TabularInstance, deviation, delta: float, *, gate: Gate = apc_obj_gated_ratio) -> np.ndarray:
    """``(...)`` the APC-Obj objective Σ_tokens μ G(r) Â (Eq. 57 at γ = 1, Eq. 72 otherwise).

    μ = Γ(s)/(Γ T_s) per token; the factor 1/(1-γ) of Eq. 72 is dropped (Def. C.1).
    """
    gated = apc_obj_gated_deviation(inst, deviation, delta, gate=gate)
    return ((1.0 + gated) * inst.counts * inst.advantages * _token_weight(inst)).sum(axis=-1)


def apc_obj_correction(inst: TabularInstance, gated_deviation) -> np.ndarray:
    """``(..., S)`` C(Δ)_s = Σ_a n clip(...) / T_s, the centring correction of Eq. 74."""
    gated = _deviation("gated_deviation", inst, gated_deviation)
    return (inst.counts * gated) @ inst.incidence / inst.state_count


def apc_obj_surrogate(inst: TabularInstance, deviation, delta: float, *, gate: Gate = apc_obj_gated_ratio) -> np.ndarray:
    """``(...)`` the surrogated APC-Obj j^(APC-Obj)(Δ, δ) of Eq. 73 (factor 1/(1-γ) dropped).

    Σ_s Γ(s)/(Γ T_s) Σ_a n [clip(...) Â + (1 - C(Δ)_s) Â], the clip term
    being the per-token APC-Obj gate and C(Δ)_s its Eq. 74 correction.
    """
    gated = apc_obj_gated_deviation(inst, deviation, delta, gate=gate)
    correction = apc_obj_correction(inst, gated)[..., inst.state]
    terms = inst.counts * (gated * inst.advantages + (1.0 - correction) * inst.advantages)
    return (terms * _token_weight(inst)).sum(axis=-1)


def apc_obj_maximizer(inst: TabularInstance, delta: float | None = None) -> np.ndarray:
    """Δ = δ Δ̂*, the APC-Obj maximizer claimed in the proof of Thm D.10.

    ``delta`` defaults to Eq. 72's δ^(APC-Obj).
    """
    delta = delta_apc_obj(inst) if delta is None else _validate.positive("delta", delta)
    return delta * unit_tv_maximizer(inst)


# ---------------------------------------------------------------------------
# The retraction of Def. D.8 (Lemma D.9)
# ---------------------------------------------------------------------------


def retraction_clip(inst: TabularInstance, u, delta: float) -> np.ndarray:
    """``(..., K)`` G(u)_{s,a} = clip(u_{s,a}, T_s (δ - D̂TV(s, u)) + |u_{s,a}|) (Def. D.8).

    ``u`` must satisfy the probability constraint (Eq. 65), as Def. D.8 asks.
    """
    delta = _validate.positive("delta", delta)
    u = _deviation("u", inst, u)
    _check_centred("u", u.reshape(-1, inst.n_pairs), inst.counts, inst.incidence, "Eq. 65, required by Def. D.8")
    budget = (inst.state_count * (delta - tv_per_state(inst, u)))[..., inst.state] + np.abs(u)
    return budget_clip(torch.from_numpy(u), torch.from_numpy(budget)).numpy()


def centred_projection(inst: TabularInstance, v) -> np.ndarray:
    """``(..., K)`` proj(v)_{s,a} = v_{s,a} - C(v)_s (Def. D.8): restores Eq. 65."""
    v = _deviation("v", inst, v)
    return v - apc_obj_correction(inst, v)[..., inst.state]


def retraction(inst: TabularInstance, u, delta: float) -> np.ndarray:
    """``(..., K)`` proj(G(u)), the retraction of Lemma D.9."""
    return centred_projection(inst, retraction_clip(inst, u, delta))
