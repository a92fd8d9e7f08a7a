"""Proposition 5.2 (the FiberPO Ratio Gating Jacobian, Eq. 20) and Properties 5.3-5.5.

Method.  On one trajectory of T tokens the gated log-ratio log G_i (Eq. 7 in
log form: Eq. 8 plus Eq. 16) is piecewise linear in x = log r.  A *region*
fixes the sign label of every token, the g_agg branch of each channel
(P, R+, Z; R- cannot occur because the channel aggregates are >= 0) and the
clip branch of l_i u_i and l_i v_i.  In a region every gate is one branch of
its table in ``fiberpo_theory.symbolic``, so log G_i is an explicit linear
expression; we differentiate it with SymPy and compare with Eq. 20, whose
indicators and slope γ are read off the same region.  Row i of the Jacobian
depends only on the signs, the two channel branches and token i's own clip
branches, so enumerating those (instead of every token's branches at once)
covers every region while staying fast.  The rollback slope k is a symbol
(the paper's Fig. 4 uses k ≠ T); k = T is the default of FiberPO.

d log G_i / d log r_j equals r_j J_ij / G_i, so comparing the log-Jacobian is
comparing Eq. 20.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import sympy as sp

from fiberpo_theory import symbolic as S
from fiberpo_theory.symbolic import Derivation, Step

EPS, C_POS, C_NEG, K = sp.symbols("epsilon C_+ C_- k", positive=True)
MAX_T = 4
FULL_DOMAIN_MAX_T = 3  # differentiating the full Piecewise is slower; regions cover T = 4
CHANNEL_BRANCHES = ("P", "R+", "Z")
CLIP_BRANCHES = ("low", "in", "high")


def token_symbols(T: int):
    return sp.symbols(f"x_1:{T + 1}", real=True)


def eq20_log_entry(i, j, signs, T, gamma, u_in: bool, v_in: bool):
    """The bracket of Eq. 20: d log G_i / d log r_j as the paper states it.

    ``gamma`` maps a sign label to γ^(l) = g_agg'(log s^(l)); ``u_in``/``v_in``
    are 1[|u_i| <= ε] and 1[|v_i| <= ε]; both tokens are in the same trajectory.
    """
    same = signs[i] == signs[j]
    local = sp.Integer(1) if (u_in and i == j) else sp.Integer(0)
    coupling = sp.sympify(gamma[signs[j]]) - (1 if (u_in and same) else 0) - (1 if (v_in and not same) else 0)
    return local + coupling / sp.Integer(T)


def _gradient(expr, xs):
    return [sp.expand(sp.diff(expr, x)) for x in xs]


@lru_cache(maxsize=None)
def region_table(T: int, k=K):
    """Every (row, region) of a length-T trajectory: the derived row and Eq. 20's row.

    Returns a list of dicts with keys ``signs, pos, neg, u, v, i, derived,
    eq20`` (rows as tuples of SymPy expressions).  The clip branches of l_i v_i
    are restricted to those its sign allows: l_i v_i = -l_i log s^(-l_i) is
    <= 0 for l_i = +1 and >= 0 for l_i = -1 (log s^(±) >= 0 by Eq. 9).
    """
    xs = token_symbols(T)
    rows = []
    for signs in itertools.product("+-", repeat=T):
        # channel aggregates of this sign pattern (one build; base and residual are read per branch)
        base_grad = {}
        for pos, neg in itertools.product(CHANNEL_BRANCHES, repeat=2):
            fp = S.fiberpo_trajectory(xs, eps=EPS, c_pos=C_POS, c_neg=C_NEG, k=k, region={"sign": signs, "pos": pos, "neg": neg, "u": ["in"] * T, "v": ["in"] * T})
            base_grad[pos, neg] = _gradient(fp["log_base"], xs)
        res_grad = {}
        for ub, vb in itertools.product(CLIP_BRANCHES, repeat=2):
            fp = S.fiberpo_trajectory(xs, eps=EPS, c_pos=C_POS, c_neg=C_NEG, k=k, region={"sign": signs, "pos": "P", "neg": "P", "u": [ub] * T, "v": [vb] * T})
            for i in range(T):
                allowed_v = ("low", "in") if signs[i] == "+" else ("in", "high")
                if vb in allowed_v:
                    res_grad[i, ub, vb] = _gradient(fp["log_residual"][i], xs)
        for (pos, neg), bg in base_grad.items():
            gamma = {"+": S.g_agg_slope(pos, k), "-": S.g_agg_slope(neg, k)}
            for (i, ub, vb), rg in res_grad.items():
                derived = tuple(sp.expand(a + b) for a, b in zip(bg, rg))
                eq20 = tuple(
                    sp.expand(eq20_log_entry(i, j, signs, T, gamma, ub == "in", vb == "in")) for j in range(T)
                )
                rows.append(dict(signs=signs, pos=pos, neg=neg, u=ub, v=vb, i=i, derived=derived, eq20=eq20))
    return rows


def full_domain_log_jacobian(T: int, *, eps, c_pos, c_neg, k=None):
    """d log G_i / d x_j over the whole domain (Piecewise), for lambdify against torch.

    ``eps``, ``c_pos``, ``c_neg`` may be numbers or symbols.  Returns
    ``(xs, log_gated, jacobian)`` with ``jacobian[i][j]`` a SymPy expression.
    """
    xs = token_symbols(T)
    fp = S.fiberpo_trajectory(xs, eps=eps, c_pos=c_pos, c_neg=c_neg, k=k)
    jac = [[sp.diff(fp["log_gated"][i], xs[j]) for j in range(T)] for i in range(T)]
    return xs, fp["log_gated"], jac


def _coupling(row):
    """Split a derived row into (a) the diagonal local term and (b) the 1/T coupling."""
    i = row["i"]
    local = sp.Integer(1) if row["u"] == "in" else sp.Integer(0)
    return local, [sp.expand(d - (local if j == i else 0)) for j, d in enumerate(row["derived"])]


def _survey_regions() -> dict:
    """Every (row, region) pair for T = 1..MAX_T: Eq. 20 mismatches, Property 5.4's region, Property 5.5's coupling."""
    survey = {"counts": {}, "mismatches": [], "on_policy_identity": True, "separation_ok": 0, "separation_bad": 0,
              "worst_rollback": None}
    for T in range(1, MAX_T + 1):
        table = region_table(T)
        survey["counts"][T] = len(table)
        for row in table:
            if any(sp.expand(a - b) != 0 for a, b in zip(row["derived"], row["eq20"])):
                survey["mismatches"].append((T, row))
            # Property 5.4's region: both channels pass through, both clips inactive.
            if row["pos"] == "P" and row["neg"] == "P" and row["u"] == "in" and row["v"] == "in":
                expected = [1 if j == row["i"] else 0 for j in range(T)]
                survey["on_policy_identity"] &= all(sp.expand(d - e) == 0 for d, e in zip(row["derived"], expected))
            # Property 5.5: size of the coupling term (b).
            _, coupling = _coupling(row)
            big = max(abs(c.subs(K, T)) for c in coupling)
            if "R+" in (row["pos"], row["neg"]):
                worst = survey["worst_rollback"]
                survey["worst_rollback"] = big if worst is None else max(worst, big)
            elif big <= sp.Rational(1, T):
                survey["separation_ok"] += 1
            else:
                survey["separation_bad"] += 1
    return survey


def _worked_region_steps() -> list[Step]:
    """The printout's worked region: T = 2, signs (+, -), positive channel rolling back."""
    xs2 = token_symbols(2)
    region = {"sign": ("+", "-"), "pos": "R+", "neg": "P", "u": ["in", "low"], "v": ["in", "in"]}
    fp = S.fiberpo_trajectory(xs2, eps=EPS, c_pos=C_POS, c_neg=C_NEG, k=K, region=region)
    row0 = [sp.diff(fp["log_gated"][0], x) for x in xs2]
    gamma = {"+": -K, "-": sp.Integer(1)}
    return [
        Step(S.Tex(r"\log s^{+}"), fp["log_s_pos"], "Eq. 9 on the worked region (T = 2, $x_1 \\ge 0 > x_2$)"),
        Step(S.Tex(r"\log s^{-}"), fp["log_s_neg"], "Eq. 9"),
        Step(S.Tex(r"\log G_1"), fp["log_gated"][0],
             "Eq. 8 + Eq. 16 with the positive channel in rollback (branch R+), the negative one passing, $|u_1|, |v_1| \\le ε$"),
        Step(S.Tex(r"\partial \log G_1/\partial x_1"), row0[0], "SymPy differentiation of the branch expression"),
        Step(S.Tex(r"\text{Eq. 20}_{11}"), eq20_log_entry(0, 0, ("+", "-"), 2, gamma, True, True),
             "Eq. 20 with $γ^{+} = -k$, $1[|u_1| \\le ε] = 1$"),
        Step(S.Tex(r"\partial \log G_1/\partial x_2"), row0[1], "SymPy differentiation"),
        Step(S.Tex(r"\text{Eq. 20}_{12}"), eq20_log_entry(0, 1, ("+", "-"), 2, gamma, True, True),
             "Eq. 20 with $γ^{-} = 1$, opposite signs, $1[|v_1| \\le ε] = 1$"),
    ]


def _block_diagonal() -> bool:
    """Property 5.3: a token's gated log-ratio does not contain another trajectory's tokens."""
    xs2 = token_symbols(2)
    ys = sp.symbols("y_1:3", real=True)
    fp_a = S.fiberpo_trajectory(list(xs2), eps=EPS, c_pos=C_POS, c_neg=C_NEG)
    fp_b = S.fiberpo_trajectory(list(ys), eps=EPS, c_pos=C_POS, c_neg=C_NEG)
    cross = [sp.diff(e, y) for e in fp_a["log_gated"] for y in ys] + [sp.diff(e, x) for e in fp_b["log_gated"] for x in xs2]
    return all(c == 0 for c in cross)


def _identity_at_zero() -> bool:
    """Property 5.4 at exactly r = 1 on the full domain (sign label +1 at 0)."""
    at_zero = True
    for T in range(1, FULL_DOMAIN_MAX_T + 1):
        xs, _, jac = full_domain_log_jacobian(T, eps=EPS, c_pos=C_POS, c_neg=C_NEG)
        zero = {x: 0 for x in xs}
        at_zero &= all(sp.simplify(jac[i][j].subs(zero)) == (1 if i == j else 0) for i in range(T) for j in range(T))
    return at_zero


def _conclusion(total: int, mismatches: list, worst_rollback) -> str:
    return (
        f"Eq. 20 equals the derivative of the gated log-ratio in all {total} (row, region) pairs for T = 1..4 "
        f"({'no' if not mismatches else len(mismatches)} mismatches), with the paper's boundary conventions "
        "(pass-through closed at |log s| = C, zeroed from (1 + 1/k)C on, clips closed, label +1 at x = 0), "
        "and for any rollback slope k, not only k = T. "
        "Property 5.3 holds everywhere: the row of token i never involves another trajectory. "
        "Property 5.4 holds at r = 1 with the convention l = +1 at x = 0 (checked on the full Piecewise for T <= 3), and in fact on the whole region "
        "where both channels pass through and every |u_i|, |v_i| <= ε (there log G_i = x_i, so G = r). "
        "Property 5.5 is conditional: |(b)| <= 1/T when neither channel is in rollback, but in rollback γ = −k "
        f"gives |(b)| up to {worst_rollback} at k = T (k/T in general), an O(1) coupling."
    )


def derive() -> Derivation:
    survey = _survey_regions()
    mismatches, worst_rollback = survey["mismatches"], survey["worst_rollback"]
    separation_ok, separation_bad = survey["separation_ok"], survey["separation_bad"]
    total = sum(survey["counts"].values())
    block_diagonal, at_zero = _block_diagonal(), _identity_at_zero()
    steps = _worked_region_steps() + [
        Step(S.Tex(r"\#\{\text{(row, region) pairs checked}\}"), sp.Integer(total),
             "T = 1..4, every sign pattern, channel branches P/R+/Z each, every clip branch of $l_i u_i$ and the sign-allowed ones of $l_i v_i$"),
        Step(S.Tex(r"\#\{\text{pairs where derivative} \ne \text{Eq. 20}\}"), sp.Integer(len(mismatches)),
             "exact comparison of the expanded expressions (k symbolic)"),
        Step(S.Tex(r"\partial \log G_i/\partial y_j \;(i \in \tau_1,\ j \in \tau_2)"), sp.Integer(0) if block_diagonal else S.Tex(r"\ne 0"),
             "Property 5.3: the full Piecewise expression of one trajectory has no other trajectory's token among its symbols"),
        Step(S.Tex(r"\left.\partial \log G_i/\partial x_j\right|_{x = 0}"), S.Tex(r"\delta_{ij}") if at_zero else S.Tex(r"\text{not the identity}"),
             "Property 5.4: full-domain Piecewise derivative at x = 0 for T = 1..3 (label +1 at 0)"),
        Step(S.Tex(r"|(b)|\ \text{outside rollback}"), S.Tex(r"\le 1/T_\tau"),
             f"Property 5.5 holds in {separation_ok} of {separation_ok + separation_bad} non-rollback (row, region) pairs"),
        Step(S.Tex(r"\max |(b)|\ \text{in rollback}, k = T"), worst_rollback,
             "Property 5.5 fails there: γ = −k makes (b) = (−k − …)/T of order 1 (k/T in general)"),
    ]
    verified = not mismatches and block_diagonal and at_zero and survey["on_policy_identity"]
    return Derivation(
        id="prop-5.2",
        title="Proposition 5.2: the FiberPO Ratio Gating Jacobian, region by region (with Properties 5.3-5.5)",
        paper_ref="Sec. 5.4, Proposition 5.2, Eq. 19-20; Properties 5.3, 5.4, 5.5",
        statement=(
            "On each trajectory the FiberPO gated ratio has Jacobian $J_{ij} = (G_i/r_j)\\,1[τ_i = τ_j]"
            "(1[|u_i| \\le ε]\\,δ_{ij} + (γ^{(l_j)} - 1[|u_i| \\le ε]1[l_i = l_j] - 1[|v_i| \\le ε]1[l_i \\ne l_j])/T)$ (Eq. 20)."
        ),
        assumptions=[
            "x_t = log r_t real; ε, C⁺, C⁻ > 0; rollback slope k > 0 symbolic (FiberPO uses k = T).",
            "Sign label l = +1 at x = 0 (the package convention), so x = 0 feeds the positive channel.",
            "At a region boundary the derivative is the one-sided derivative selected by the closed branch; "
            "this is the convention Eq. 20's indicators (<=) and the torch gates use.",
        ],
        steps=steps,
        conclusion=_conclusion(total, mismatches, worst_rollback),
        verified=bool(verified),
        results={
            "region_counts": survey["counts"],
            "mismatches": mismatches,
            "block_diagonal": block_diagonal,
            "identity_at_r1": at_zero,
            "identity_on_LI_GI": survey["on_policy_identity"],
            "rollback_coupling_max": worst_rollback,
            "symbols": {"eps": EPS, "c_pos": C_POS, "c_neg": C_NEG, "k": K},
        },
    )


@lru_cache(maxsize=None)
def _region_index(T: int):
    return {(row["signs"], row["pos"], row["neg"], row["i"], row["u"], row["v"]): row["derived"] for row in region_table(T)}


def _branch_taken(branches) -> str:
    for name, _, cond in branches:
        if bool(cond):
            return name
    raise ValueError("no branch holds")


def region_of(xs, log_s_pos, log_s_neg, u, v, *, eps, c_pos, c_neg, k):
    """The region of a numeric point, read off the SymPy branch conditions evaluated at the given values.

    ``xs``, ``u``, ``v`` per token and the channel aggregates are numbers (for
    example an implementation's intermediate values); the conditions are the
    same tables the derivation used, so a point exactly on an edge is put in
    the closed branch.
    """
    F = sp.Float
    signs = tuple(_branch_taken(S.sign_channel_branches(F(x))) for x in xs)
    pos = _branch_taken(S.g_agg_branches(F(log_s_pos), F(c_pos), F(k)))
    neg = _branch_taken(S.g_agg_branches(F(log_s_neg), F(c_neg), F(k)))
    lab = [1 if s == "+" else -1 for s in signs]
    ub = [_branch_taken(S.clip_branches(F(l * ui), -F(eps), F(eps))) for l, ui in zip(lab, u)]
    vb = [_branch_taken(S.clip_branches(F(l * vi), -F(eps), F(eps))) for l, vi in zip(lab, v)]
    return signs, pos, neg, ub, vb


def derived_log_jacobian_at(xs, log_s_pos, log_s_neg, u, v, *, eps, c_pos, c_neg, k=None):
    """d log G_i / d x_j of the derivation, in the region of the given point (k = T by default).

    Returns a list of rows of SymPy numbers, for comparison with an implementation.
    """
    T = len(xs)
    k = T if k is None else k
    signs, pos, neg, ub, vb = region_of(xs, log_s_pos, log_s_neg, u, v, eps=eps, c_pos=c_pos, c_neg=c_neg, k=k)
    index = _region_index(T)
    return [[e.subs(K, k) for e in index[signs, pos, neg, i, ub[i], vb[i]]] for i in range(T)]
