"""The symbolic core: a derivation is data, printing is elsewhere.

A proof module in ``proofs/`` exposes ``derive() -> Derivation``: a list of
small SymPy steps, each an equation (or relation) with a short justification.
``fiberpo_theory.symbolic.latex`` prints any ``Derivation``; tests turn the symbolic
results into numbers with ``sympy.lambdify`` and compare them with the torch
implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy as sp

__all__ = [
    "Branch",
    "Derivation",
    "OddFunction",
    "Step",
    "Tex",
    "Undecided",
    "branch_condition",
    "budget_clip",
    "clip",
    "clip_branches",
    "decide",
    "elementwise",
    "fbg_operator",
    "fgh_compact",
    "fgh_operator",
    "fiberpo_trajectory",
    "g_agg",
    "g_agg_branches",
    "g_agg_slope",
    "is_zero",
    "lambdify",
    "logclip",
    "negative_part",
    "negative_part_branches",
    "normal_form",
    "positive_part",
    "positive_part_branches",
    "pushforward_matrix",
    "resolve",
    "select",
    "sign_channel",
    "sign_channel_branches",
    "sign_of",
    "symmetric_clip",
]


@dataclass(frozen=True)
class Step:
    """One line of a derivation: ``lhs <relation> rhs`` because ``why``."""

    lhs: sp.Basic
    rhs: sp.Basic
    why: str = ""
    relation: str = "="  # one of "=", "<=", "<", ">=", ">", "approx"


@dataclass
class Derivation:
    """A derived (or refuted) paper result.

    ``verified`` is what the derivation established by computation (for
    example that a difference simplifies to 0), never a constant written in
    advance.  ``results`` holds the SymPy expressions other code may reuse
    (lambdify them for numeric cross-checks).
    """

    id: str
    title: str
    paper_ref: str
    statement: str
    assumptions: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    conclusion: str = ""
    verified: bool = False
    results: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# SymPy counterparts of the atomic gates (fiberpo_theory.core.gates).
#
# Each gate is defined once, as a table of named branches ``(name, expr,
# condition)`` read in order (the first branch whose condition holds wins, as
# in a Piecewise).  ``branch=None`` returns the whole Piecewise (for lambdify
# and for differentiation over the full domain); ``branch="R+"`` returns the
# expression of that branch alone (for region-by-region proofs).  The
# conventions at the boundaries are those of the torch gates: the
# pass-through and in-range branches are closed, the zeroed branch of g_agg
# starts at exactly (1 + 1/k) C, and the sign label is +1 at 0.
# ---------------------------------------------------------------------------

Branch = tuple  # (name: str, expr: sp.Expr, condition: sp.Boolean)


def select(branches: list[Branch], branch: str | None = None) -> sp.Expr:
    """The Piecewise built from ``branches``, or the expression of one named branch."""
    if branch is None:
        return sp.Piecewise(*[(expr, cond) for _, expr, cond in branches])
    for name, expr, _ in branches:
        if name == branch:
            return expr
    raise KeyError(f"no branch {branch!r}; branches are {[b[0] for b in branches]}")


def branch_condition(branches: list[Branch], branch: str) -> sp.Boolean:
    """The region where ``branch`` is the one taken: its condition and no earlier one."""
    earlier = []
    for name, _, cond in branches:
        if name == branch:
            return sp.And(cond, *[sp.Not(c) for c in earlier])
        earlier.append(cond)
    raise KeyError(branch)


def sign_channel_branches(x) -> list[Branch]:
    """Sign label l of Eq. 13 with the package convention l = +1 at x = 0."""
    return [("+", sp.Integer(1), x >= 0), ("-", sp.Integer(-1), True)]


def sign_channel(x, branch: str | None = None) -> sp.Expr:
    return select(sign_channel_branches(x), branch)


def positive_part_branches(x) -> list[Branch]:
    """max(x, 0) of Eq. 9, split at the sign label (x = 0 counts as positive)."""
    return [("+", x, x >= 0), ("-", sp.Integer(0), True)]


def positive_part(x, branch: str | None = None) -> sp.Expr:
    return select(positive_part_branches(x), branch)


def negative_part_branches(x) -> list[Branch]:
    """max(-x, 0) of Eq. 9, split at the sign label."""
    return [("+", sp.Integer(0), x >= 0), ("-", -x, True)]


def negative_part(x, branch: str | None = None) -> sp.Expr:
    return select(negative_part_branches(x), branch)


def clip_branches(x, lo, hi) -> list[Branch]:
    """clip(x, lo, hi) for lo <= hi; the in-range branch is closed (as torch.clamp's gradient)."""
    return [("low", lo, x < lo), ("high", hi, x > hi), ("in", x, True)]


def clip(x, lo, hi, branch: str | None = None) -> sp.Expr:
    return select(clip_branches(x, lo, hi), branch)


def symmetric_clip(x, bound, branch: str | None = None) -> sp.Expr:
    """clip(x, ±b) for b >= 0."""
    return clip(x, -bound, bound, branch)


def budget_clip(a, bound, branch: str | None = None) -> sp.Expr:
    """clip(a, B) := clip(a, -B⁺, B⁺) with B⁺ = max(B, 0) (Eq. 3 / Eq. 59)."""
    return symmetric_clip(a, sp.Max(bound, 0), branch)


def logclip(x, eps, branch: str | None = None) -> sp.Expr:
    """logclip(x, ε) = exp(clip(log x, ±ε)) for x > 0 (Eq. 12)."""
    return sp.exp(symmetric_clip(sp.log(x), eps, branch))


def g_agg_branches(x, c, k) -> list[Branch]:
    """The aggregate gate of Eq. 10 / Eq. 78 as named branches.

    P: identity for |x| <= C; R+ / R-: rollback ±(k+1)C - kx (the two signs of
    ``sign(x)``) for C < |x| < (1 + 1/k)C; Z: zero otherwise.
    """
    upper = (1 + 1 / k) * c
    return [
        ("P", x, sp.Abs(x) <= c),
        ("R+", (k + 1) * c - k * x, sp.And(x > c, x < upper)),
        ("R-", -(k + 1) * c - k * x, sp.And(x < -c, x > -upper)),
        ("Z", sp.Integer(0), True),
    ]


def g_agg(x, c, k, branch: str | None = None) -> sp.Expr:
    """g_agg(x, C, k) of Eq. 10 / Eq. 78 (Piecewise, or one branch)."""
    return select(g_agg_branches(x, c, k), branch)


#: derivative γ of g_agg in each branch (Eq. 20's γ): 1, -k, -k, 0.
def g_agg_slope(branch: str, k) -> sp.Expr:
    return {"P": sp.Integer(1), "R+": -k, "R-": -k, "Z": sp.Integer(0)}[branch]


# ---------------------------------------------------------------------------
# Deciding conditions by positive parametrisation.
#
# A region proof writes every point of a region as a formula in positive
# symbols (for example s = C + (C/k)/(1 + q) with C, k, q > 0 covers the open
# interval (C, (1 + 1/k)C)).  Each comparison is then a question about the
# sign of a rational function of positive symbols, which SymPy answers after
# putting it over a common denominator and factoring.
# ---------------------------------------------------------------------------


class Undecided(ValueError):
    """A condition whose truth value could not be decided on the region."""


def normal_form(expr) -> sp.Expr:
    """A canonical-ish form for sign decisions: common denominator, factored."""
    expr = sp.sympify(expr)
    expr = expr.replace(lambda e: isinstance(e, sp.Abs), lambda e: sp.Abs(sp.factor(sp.together(e.args[0]))))
    return sp.factor(sp.together(sp.expand(expr)))


def sign_of(expr) -> int:
    """-1, 0 or +1 for an expression whose sign SymPy can decide; raises Undecided otherwise."""
    d = normal_form(expr)
    if d.is_zero:
        return 0
    if d.is_positive:
        return 1
    if d.is_negative:
        return -1
    raise Undecided(f"cannot decide the sign of {d}")


_RELATIONS = {
    sp.StrictLessThan: lambda s: s < 0,
    sp.LessThan: lambda s: s <= 0,
    sp.StrictGreaterThan: lambda s: s > 0,
    sp.GreaterThan: lambda s: s >= 0,
    sp.Equality: lambda s: s == 0,
    sp.Unequality: lambda s: s != 0,
}


def decide(cond) -> bool:
    """Truth value of a (compound) condition on a positively parametrised region."""
    if cond is sp.true or cond is True:
        return True
    if cond is sp.false or cond is False:
        return False
    if isinstance(cond, (sp.And, sp.Or)):
        # decide what can be decided: one False settles an And, one True settles an Or
        values, undecided = [], None
        for c in cond.args:
            try:
                values.append(decide(c))
            except Undecided as err:
                undecided = err
        settle = isinstance(cond, sp.Or)
        if settle in values:
            return settle
        if undecided is not None:
            raise undecided
        return not settle
    if isinstance(cond, sp.Not):
        return not decide(cond.args[0])
    for rel, test in _RELATIONS.items():
        if isinstance(cond, rel):
            lhs = cond.lhs.replace(lambda e: isinstance(e, sp.Abs), lambda e: sp.Abs(normal_form(e.args[0])))
            rhs = cond.rhs.replace(lambda e: isinstance(e, sp.Abs), lambda e: sp.Abs(normal_form(e.args[0])))
            return test(sign_of(lhs - rhs))
    raise Undecided(f"cannot decide {cond}")


def resolve(expr) -> sp.Expr:
    """Replace every Piecewise (innermost first) and Max/Min by the branch taken on the region."""
    expr = sp.sympify(expr)
    kinds = (sp.Piecewise, sp.Max, sp.Min)
    while True:
        inner = [a for a in expr.atoms(*kinds) if not (a.atoms(*kinds) - {a})]
        if not inner:
            return expr
        mapping = {}
        for a in inner:
            if isinstance(a, sp.Piecewise):
                for e, c in a.args:
                    if decide(c):
                        mapping[a] = e
                        break
                else:
                    raise Undecided(f"no branch of {a} holds")
            else:
                best = a.args[0]
                for other in a.args[1:]:
                    s = sign_of(other - best)
                    if (isinstance(a, sp.Max) and s > 0) or (isinstance(a, sp.Min) and s < 0):
                        best = other
                mapping[a] = best
        expr = expr.xreplace(mapping)


def is_zero(expr) -> bool:
    """True when ``expr`` simplifies to exactly 0 (the test every identity uses)."""
    return normal_form(sp.simplify(expr)) == 0


# ---------------------------------------------------------------------------
# The FiberPO gating map on one symbolic trajectory (Eq. 7-16).
# ---------------------------------------------------------------------------


def fiberpo_trajectory(xs, *, eps, c_pos, c_neg, k=None, region: dict | None = None) -> dict:
    """SymPy counterpart of ``objectives.fiberpo_parts`` for one trajectory.

    ``xs`` are the token log-ratios x_t (symbols or numbers).  Without
    ``region`` every gate is the full Piecewise (for lambdify and for
    differentiation over the whole domain).  With ``region`` the named branch
    of each gate is used instead (for region-by-region proofs); its keys are
    ``"sign"`` (one of "+"/"-" per token), ``"pos"``/``"neg"`` (the g_agg
    branch of each channel: "P", "R+", "R-", "Z") and ``"u"``/``"v"`` (the
    clip branch of l_i u_i / l_i v_i per token: "low", "in", "high").
    Missing keys mean "full Piecewise".

    Returns the intermediates of Eq. 9 and 13-16 and ``log_gated`` =
    log G(r)_i = log w_τ + log r̃_i (Eq. 7 in log form).
    """
    region = region or {}
    T = len(xs)
    k = T if k is None else k
    signs = region.get("sign") or [None] * T
    u_br = region.get("u") or [None] * T
    v_br = region.get("v") or [None] * T
    log_s_pos = sum(positive_part(x, b) for x, b in zip(xs, signs)) / T  # Eq. 9
    log_s_neg = sum(negative_part(x, b) for x, b in zip(xs, signs)) / T  # Eq. 9
    label = [sign_channel(x, b) for x, b in zip(xs, signs)]  # Eq. 13
    same = [select([("+", log_s_pos, x >= 0), ("-", log_s_neg, True)], b) for x, b in zip(xs, signs)]
    opposite = [select([("+", log_s_neg, x >= 0), ("-", log_s_pos, True)], b) for x, b in zip(xs, signs)]
    u = [l * x - s for l, x, s in zip(label, xs, same)]  # Eq. 14
    v = [-s for s in opposite]  # Eq. 15
    log_base = g_agg(log_s_pos, c_pos, k, region.get("pos")) - g_agg(log_s_neg, c_neg, k, region.get("neg"))  # Eq. 8
    log_residual = [
        symmetric_clip(l * ui, eps, bu) - symmetric_clip(l * vi, eps, bv)  # Eq. 16
        for l, ui, vi, bu, bv in zip(label, u, v, u_br, v_br)
    ]
    return {
        "log_s_pos": log_s_pos,
        "log_s_neg": log_s_neg,
        "label": label,
        "u": u,
        "v": v,
        "log_base": log_base,
        "log_residual": log_residual,
        "log_gated": [log_base + r for r in log_residual],
    }


# ---------------------------------------------------------------------------
# Numeric functions from symbolic results.
# ---------------------------------------------------------------------------


def _select(condlist, choicelist, default=float("nan")):
    """np.select that accepts Python booleans (SymPy prints a final ``True`` branch that way)."""
    import numpy as np

    arrays = np.broadcast_arrays(*[np.asarray(c) for c in condlist], *[np.asarray(c, dtype=float) for c in choicelist])
    n = len(condlist)
    conds = [a.astype(bool) for a in arrays[:n]]
    return np.select(conds, arrays[n:], default=default)


def lambdify(args, expr):
    """``sympy.lambdify`` to NumPy (float64), robust to Piecewise with a catch-all branch.

    Results broadcast over array arguments, so one call evaluates many inputs.
    """
    import numpy as np

    return sp.lambdify(args, expr, modules=[{"select": _select, "Heaviside": lambda x, h=0.5: np.heaviside(x, h)}, "numpy"])


class Tex(sp.Symbol):
    """A symbol that prints as the LaTeX given as its name.

    Used for the left-hand side of a step that names a quantity in words or
    notation SymPy would mangle (``Tex(r"\\partial \\log G_1/\\partial x_2")``).
    """

    def _latex(self, printer):
        return self.name


# ---------------------------------------------------------------------------
# Fiber Bundle Gating (Eq. 4) and the Fibration Gating Hierarchy (Eq. 23-28)
# on finite sets: a density is a column vector, a pushforward is a 0/1 matrix
# summing each fibre, a Markov kernel is a column-stochastic matrix supported
# on fibres.  Gates are callables ``gate(vector, lower) -> vector`` where
# ``lower`` lists the pushed-forward densities of the strata below.
# ---------------------------------------------------------------------------


def pushforward_matrix(parent: list[int], n_parents: int) -> sp.Matrix:
    """π_* for a fibration given by ``parent[e]`` = index of the base element of e."""
    m = sp.zeros(n_parents, len(parent))
    for e, b in enumerate(parent):
        m[b, e] = 1
    return m


def elementwise(fn, *params_of_index):
    """A local (pointwise) gate: applies ``fn(v_j, *params(j))`` to each entry (FGH locality condition)."""

    def gate(vector, lower=()):
        return sp.Matrix([fn(v, *[p(j) for p in params_of_index]) for j, v in enumerate(vector)])

    return gate


def fbg_operator(sigma, pushforward, kernel, g_base, g_fiber):
    """Eq. 4: K(g_Base(π_* σ)) + g_Fiber,π_*σ(σ − K(π_* σ))."""
    base = pushforward * sigma
    return kernel * g_base(base) + g_fiber(sigma - kernel * base, (base,))


def _chain(mats, identity_size):
    out = sp.eye(identity_size)
    for m in mats:
        out = m * out
    return out


def fgh_operator(sigma, pushforwards, kernels, gates):
    """Eq. 26 for a uniform hierarchy of depth n = len(pushforwards).

    ``pushforwards[k-1]`` is the matrix of π_k∗ : B_k → B_{k-1} (k = 1..n);
    ``kernels[k]`` the matrix of K_k : B_k → B_{k+1} (k = 0..n-1);
    ``gates[k]`` the gate of stratum k (k = 0..n).
    """
    n = len(pushforwards)
    levels = [None] * (n + 1)  # π_{k←n*} σ, computed down the chain (Eq. 25)
    levels[n] = sigma
    for k in range(n, 0, -1):
        levels[k - 1] = pushforwards[k - 1] * levels[k]

    def k_up(k):  # K_{n←k} (Eq. 23)
        return _chain(kernels[k:n], levels[k].shape[0])

    total = k_up(0) * gates[0](levels[0], ())
    for k in range(1, n + 1):
        residual = levels[k] - kernels[k - 1] * levels[k - 1]
        total += k_up(k) * gates[k](residual, tuple(levels[:k]))
    return total


def fgh_compact(sigma, pushforwards, kernels, gates):
    """Eq. 27-28: Σ_k K_{n←k} G_k(π_{k←n*} σ) with G_k(σ_k) = g_k(σ_k − K_{k−1} π_k∗ σ_k).

    The pushforward to each stratum is formed as one composite matrix
    π_{k+1∗} ⋯ π_{n∗} (Eq. 24-25), not down the chain as in ``fgh_operator``.
    """
    n = len(pushforwards)
    total, lowers = None, []
    for k in range(0, n + 1):
        sigma_k = _compose_down(pushforwards, k, n, sigma.shape[0]) * sigma
        if k == 0:
            contribution = gates[0](sigma_k, ())
        else:
            contribution = gates[k](sigma_k - kernels[k - 1] * (pushforwards[k - 1] * sigma_k), tuple(lowers))
        lowers.append(sigma_k)
        term = _chain(kernels[k:n], sigma_k.shape[0]) * contribution
        total = term if total is None else total + term
    return total


def _compose_down(pushforwards, k, n, size_n):
    """The matrix of π_{k←n*} = π_{k+1*} ∘ ⋯ ∘ π_{n*} (identity when k = n)."""
    out = sp.eye(size_n)
    for m in pushforwards[k:n][::-1]:
        out = m * out
    return out


class OddFunction(sp.Function):
    """An undefined function odd in its first argument: f(-y, ...) = -f(y, ...).

    Used as a stand-in for a clip gate when an identity needs only oddness
    (the oddness of the concrete clip is proved separately).
    """

    @classmethod
    def eval(cls, y, *params):
        if y.is_zero:
            return sp.Integer(0)  # f(0) = -f(0)
        if y.could_extract_minus_sign():
            return -cls(-y, *params)
        return None
