"""The KL bias of the two channels (App. E.5.4): log s⁻ - log s⁺ = -mean log r >= 0 in expectation.

Per token, max(-x, 0) - max(x, 0) = -x on both sign branches, so the
channel gap is minus the trajectory mean of the log-ratios (Eq. 9).  Under
sampling from π_old its expectation, state by state, is
E_{a~p}[-log(q_a/p_a)] = KL(p || q) >= 0 (Gibbs' inequality, from
-log t >= 1 - t), which is the reason the paper gives for C⁻ < C⁺.
"""

from __future__ import annotations

import sympy as sp

from fiberpo_theory import symbolic as S
from fiberpo_theory.symbolic import Derivation, Step

X = sp.Symbol("x", real=True)
TT = sp.Symbol("t", positive=True)
N_ACTIONS = 3
P = sp.symbols(f"p_1:{N_ACTIONS + 1}", positive=True)
Q = sp.symbols(f"q_1:{N_ACTIONS + 1}", positive=True)


def expected_gap(p=P, q=Q):
    """E_{a~p}[log s⁻ − log s⁺] for a one-token trajectory: Σ_a p_a (−log(q_a/p_a))."""
    return sum(pa * (-sp.log(qa / pa)) for pa, qa in zip(p, q))


def derive() -> Derivation:
    steps = []
    per_token = {b: sp.expand(S.negative_part(X, b) - S.positive_part(X, b) + X) for b in ("+", "-")}
    ok_identity = all(v == 0 for v in per_token.values())
    steps.append(Step(S.Tex(r"\max(-x,0) - \max(x,0) + x\ \ (x \ge 0)"), per_token["+"], "Eq. 9 summand, positive branch"))
    steps.append(Step(S.Tex(r"\max(-x,0) - \max(x,0) + x\ \ (x < 0)"), per_token["-"], "negative branch"))
    steps.append(Step(S.Tex(r"\log s^{-} - \log s^{+}"), S.Tex(r"-\tfrac{1}{T}\textstyle\sum_t \log r_t"), "average over the trajectory"))
    # Lemma: f(t) = t − 1 − log t >= 0 on t > 0 (convex, stationary at t = 1 where f = 0)
    f = TT - 1 - sp.log(TT)
    f1, f2 = sp.diff(f, TT), sp.diff(f, TT, 2)
    crit = sp.solve(sp.Eq(f1, 0), TT)
    lemma = crit == [1] and f.subs(TT, 1) == 0 and bool(f2.is_positive)
    steps.append(Step(S.Tex(r"f(t) = t - 1 - \log t,\ f'(t)"), f1, "derivative"))
    steps.append(Step(S.Tex(r"f''(t)"), f2, "positive on t > 0: f is convex"))
    steps.append(Step(S.Tex(r"f(1)"), f.subs(TT, 1), "unique stationary point t = 1, so f >= 0, i.e. −log t >= 1 − t"))
    gap = expected_gap()
    bound = sum(pa * (1 - qa / pa) for pa, qa in zip(P, Q))
    bound_s = sp.expand(bound)
    simplex = {P[-1]: 1 - sum(P[:-1]), Q[-1]: 1 - sum(Q[:-1])}
    steps.append(Step(S.Tex(r"\mathbb{E}_{a \sim p}[\log s^{-} - \log s^{+}]"), gap, f"one state, {N_ACTIONS} actions, p = π_old, q = π_θ"))
    steps.append(Step(gap, bound, "apply −log t >= 1 − t to t = q_a/p_a, weights p_a > 0", relation=">="))
    steps.append(Step(bound, sp.simplify(bound_s.subs(simplex)), "Σ p_a = Σ q_a = 1"))
    ok_sum = sp.simplify(bound_s.subs(simplex)) == 0
    return Derivation(
        id="kl-bias",
        title="The KL bias between the negative and positive channels",
        paper_ref="App. E.5.4 (per-channel budgets and C⁻ < C⁺); Eq. 9, Eq. 49",
        statement=(
            "$\\log s^{-}_τ - \\log s^{+}_τ = -\\frac{1}{T}\\sum_t \\log r_t$, and under sampling from π_old its "
            "expectation is a KL divergence, hence nonnegative."
        ),
        assumptions=[
            "Actions sampled from π_old; both policies have full support on the sampled actions.",
            "The trajectory length T does not depend on the actions taken (e.g. a fixed horizon): the 1/T "
            "average then splits into per-step expectations, each a KL divergence.",
        ],
        steps=steps,
        conclusion=(
            "The identity holds token by token, and the expectation is KL(π_old || π_θ) >= 0 (zero only when the policies "
            "agree). It is a statement in expectation: a single trajectory can have log s⁻ < log s⁺. When T depends on "
            "the actions the 1/T weight correlates with the log-ratios and the expectation can be negative; the "
            "kl-bias check of `fiberpo-theory verify` exhibits such a two-step episode."
        ),
        verified=bool(ok_identity and lemma and ok_sum),
        results={"expected_gap": gap, "symbols": (P, Q)},
    )
