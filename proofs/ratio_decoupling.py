"""Ratio decoupling (Sec. 5.2): with both fiber clips inactive, log r̃_i = x_i - mean_t x_t.

Two facts: (1) with |u_i| <= ε and |v_i| <= ε the clips of Eq. 16 are the
identity, so log r̃_i = l_i (u_i - v_i) = x_i - (log s⁺ - log s⁻) for either
label; (2) max(x, 0) - max(-x, 0) = x on both sign branches, so
log s⁺ - log s⁻ = mean_t x_t for any trajectory length.

The paper's regime L-I is defined by max_i |u_i| < ε alone.  In the region
where |u_i| <= ε but |v_i| > ε the same computation gives the exact gap
|v_i| - ε, and we exhibit a trajectory in that region: the identity needs the
condition on v as well.
"""

from __future__ import annotations

import sympy as sp

from fiberpo_theory import symbolic as S
from fiberpo_theory.symbolic import Derivation, Step

X = sp.Symbol("x", real=True)
LSP, LSN = sp.symbols(r"\log{s^{+}} \log{s^{-}}", nonnegative=True)
EPS = sp.Symbol("epsilon", positive=True)
T = sp.Symbol("T", integer=True, positive=True)
t = sp.Idx("t")
XT = sp.IndexedBase("x")


def residual(label: int, u_branch: str, v_branch: str) -> sp.Expr:
    """log r̃ (Eq. 16) on one clip region, for sign label ``label``."""
    same, opposite = (LSP, LSN) if label > 0 else (LSN, LSP)
    u, v = label * X - same, -opposite
    return S.symmetric_clip(label * u, EPS, u_branch) - S.symmetric_clip(label * v, EPS, v_branch)


def counterexample():
    """An exact trajectory with every |u_t| < ε but |v_1| > ε, and its decoupling gap.

    Returns ``(xs, eps, u, v, log_residual_1, centred_1)`` as Rationals,
    computed from the Piecewise definitions.
    """
    xs = [sp.Rational(1, 100), sp.Rational(-2, 5), sp.Rational(-2, 5), sp.Rational(-2, 5)]
    eps = sp.Rational(1, 5)
    fp = S.fiberpo_trajectory(xs, eps=eps, c_pos=1, c_neg=1)
    centred = xs[0] - sum(xs) / len(xs)
    return xs, eps, fp["u"], fp["v"], fp["log_residual"][0], centred


def derive() -> Derivation:
    steps, ok = [], True
    centred = X - (LSP - LSN)
    for label in (1, -1):
        r = residual(label, "in", "in")
        gap = sp.expand(r - centred)
        ok &= gap == 0
        steps.append(Step(S.Tex(rf"\log \tilde r\ (l = {label:+d},\ |u|, |v| \le \varepsilon)"), r,
                          "Eq. 16 with both clips on their identity branch"))
        steps.append(Step(S.Tex(rf"\log \tilde r - (x - \log s^{{+}} + \log s^{{-}})\ (l = {label:+d})"), gap, "expand"))
    # per-token identity on both branches of the channel split
    per_token = [sp.expand(S.positive_part(X, b) - S.negative_part(X, b) - X) for b in ("+", "-")]
    ok &= all(p == 0 for p in per_token)
    steps.append(Step(S.Tex(r"\max(x,0) - \max(-x,0) - x\ \text{on } x \ge 0,\ x < 0"), sp.Matrix([per_token]).T,
                      "Eq. 9's summands, both sign branches"))
    # sum over a trajectory of any length, whichever branch each summand takes
    sums = [sp.Sum(sp.expand(S.positive_part(XT[t], b) - S.negative_part(XT[t], b) - XT[t]), (t, 0, T - 1)).doit()
            for b in ("+", "-")]
    mean_gap = sums[0] if sums[0] == sums[1] else sp.Matrix(sums)
    ok &= mean_gap == 0
    steps.append(Step(S.Tex(r"T(\log s^{+} - \log s^{-}) - \textstyle\sum_t x_t"), mean_gap,
                      "sum of the per-token identity over the trajectory (any T)"))
    steps.append(Step(S.Tex(r"\log \tilde r_i\ \text{(both clips inactive)}"), XT[sp.Symbol("i")] - sp.Sum(XT[t], (t, 0, T - 1)) / T,
                      "ratio decoupling"))
    # outside the hypothesis: |u| <= ε but l v below -ε (l = +1)
    r_bad = residual(1, "in", "low")
    gap_bad = sp.expand(centred - r_bad)
    steps.append(Step(S.Tex(r"(x - \bar x) - \log \tilde r\ \ (l = +1,\ |u| \le \varepsilon < |v|)"), gap_bad,
                      "Eq. 16 with the v-clip saturated: the gap is $|v| - ε = \\log s^{-} - ε > 0$"))
    xs, eps, u, v, r1, c1 = counterexample()
    in_LI = all(abs(ui) < eps for ui in u)
    steps.append(Step(S.Tex(r"(x_t)_{t=1..4},\ \varepsilon"), sp.Matrix([xs + [eps]]), "an exact trajectory"))
    steps.append(Step(S.Tex(r"(u_t)"), sp.Matrix([u]), "Eq. 14: every $|u_t| < ε$, so the trajectory is in L-I as the paper defines it"))
    steps.append(Step(S.Tex(r"v_1"), v[0], "Eq. 15: $|v_1| > ε$"))
    steps.append(Step(S.Tex(r"\log \tilde r_1"), r1, "Eq. 16"))
    steps.append(Step(S.Tex(r"x_1 - \bar x"), c1, "the decoupled value; it differs by $|v_1| - ε$"))
    fails_LI = in_LI and abs(v[0]) > eps and sp.simplify(c1 - r1 - (abs(v[0]) - eps)) == 0
    return Derivation(
        id="ratio-decoupling",
        title="Ratio decoupling: log r̃ = x − mean x when both fiber clips are inactive",
        paper_ref="Sec. 5.2, ratio decoupling paragraph and the regime L-I; Eq. 9, 14-16",
        statement=(
            "If $|u_i| \\le ε$ and $|v_i| \\le ε$ then $\\log \\tilde r_i = x_i - \\frac{1}{T}\\sum_t x_t$. "
            "The regime L-I of the paper ($\\max_i |u_i| < ε$) does not by itself imply it."
        ),
        assumptions=["x real, ε > 0, log s^± >= 0; sign label +1 at 0."],
        steps=steps,
        conclusion=(
            "Under |u_i| <= ε and |v_i| <= ε (the hypothesis stated with the decoupling formula) the identity holds for "
            "both labels and every T. In L-I defined by the u's alone it can fail: when |v_i| > ε the gated log-residual "
            "falls short of x_i − mean x by exactly |v_i| − ε; the exact trajectory above is such a case."
        ),
        verified=bool(ok and fails_LI),
        results={"counterexample": counterexample(), "gap_when_v_saturated": gap_bad, "mean_gap": mean_gap},
    )
