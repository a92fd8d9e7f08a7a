"""Theorem 2.1 / Eq. 76: the TRPO radius (1-γ)/(8γ) vanishes as γ → 1 and a radius-0 ball is {π_old}."""

from __future__ import annotations

import sympy as sp

from fiberpo_theory.symbolic import Derivation, Step, is_zero

from ._tr_common import GAMMA_OF_RHO, adv_norm, aggregate, delta_trpo_expr, gamma, rho, same, t_star_expr


def _pinsker_bernoulli():
    """Pinsker's inequality (Eq. 36) for two actions, via convexity in the first argument.

    g(q) = KL(q ‖ p) - 2 (q - p)²: g(p) = 0, g'(p) = 0 and g'' = (1-2q)²/(q(1-q)) >= 0,
    so g >= 0; a zero KL ball is therefore inside the zero TV ball.
    """
    q, p = sp.symbols("q p", positive=True)
    kl = q * sp.log(q / p) + (1 - q) * sp.log((1 - q) / (1 - p))
    g = kl - 2 * (q - p) ** 2
    second = sp.diff(g, q, 2)
    closed = (1 - 2 * q) ** 2 / (q * (1 - q))
    ok = is_zero(g.subs(q, p)) and is_zero(sp.diff(g, q).subs(q, p)) and same(second, closed)
    return second, closed, ok


def derive() -> Derivation:
    delta = delta_trpo_expr()
    eps = sp.Symbol("epsilon", positive=True)  # ε = 1 - γ
    steps: list[Step] = []

    # Eq. 76 is t* at the largest M that Lemma D.2 allows.
    worst = t_star_expr().subs(aggregate, adv_norm)
    ok_worst = same(worst, delta)
    steps.append(Step(sp.Symbol(r"t^*|_{M = \|\hat A\|_\infty}"), worst, "t* of Thm D.3 with M = ‖Â‖∞ (the bound of Lemma D.2) is Eq. 76"))

    limit = sp.limit(delta, gamma, 1, "-")
    steps.append(Step(sp.Limit(delta, gamma, 1, "-"), limit, "the radius vanishes as γ → 1⁻"))
    at_one = delta.subs(gamma, 1)
    steps.append(Step(sp.Symbol(r"\delta^{(TRPO)}|_{\gamma=1}"), at_one, "at γ = 1 the radius is exactly 0"))

    slope = sp.diff(delta, gamma)
    slope_closed = -1 / (8 * gamma**2)
    steps.append(Step(sp.Derivative(delta, gamma), slope_closed, "strictly decreasing on (0, 1]"))
    decreasing = same(slope, slope_closed) and bool(slope_closed.is_negative)

    series = sp.series(delta.subs(gamma, 1 - eps), eps, 0, 3).removeO()
    steps.append(Step(delta.subs(gamma, 1 - eps), series, "near γ = 1 the radius is (1-γ)/8 to first order", relation="approx"))
    first_order = same(series.coeff(eps, 1), sp.Rational(1, 8)) and is_zero(series.coeff(eps, 0))

    positive = bool(delta.subs(GAMMA_OF_RHO).simplify().is_positive)
    steps.append(Step(delta.subs(GAMMA_OF_RHO), sp.simplify(delta.subs(GAMMA_OF_RHO)), "with γ = 1/(1+ρ), ρ > 0: the radius ρ/8 is positive for every γ < 1"))

    # A TV ball of radius 0: for two actions D_TV = |p - q|, zero only at p = q.
    p, q = sp.symbols("p q", real=True)
    tv = sp.Rational(1, 2) * (sp.Abs(p - q) + sp.Abs((1 - p) - (1 - q)))
    tv_closed = sp.Abs(p - q)
    zero_tv = sp.solve(sp.Eq(tv_closed, 0), p)
    steps.append(Step(tv, tv_closed, "two-action TV distance (Eq. 34)"))
    steps.append(Step(p, zero_tv[0] if zero_tv else sp.nan, "D_TV = 0 forces π = π_old: the ball of radius 0 is {π_old}"))
    ball_collapses = same(tv, tv_closed) and zero_tv == [q]

    second, closed, pinsker = _pinsker_bernoulli()
    steps.append(Step(second, closed, "g(q) = KL(q‖p) - 2(q-p)² is convex with g(p) = g'(p) = 0, so KL >= 2 TV² (Eq. 36) and a zero KL ball is also {π_old}"))

    verified = all([ok_worst, limit == 0, at_one == 0, decreasing, first_order, positive, ball_collapses, pinsker])
    return Derivation(
        id="thm-2.1",
        title="TRPO vanishing: the TV radius (1-γ)/(8γ) collapses at γ = 1",
        paper_ref="Thm 2.1, Thm B.3, Lemma B.2, Eq. 76",
        statement=(
            "The TRPO trust-region radius δ^(TRPO) = (1-γ)/(8γ) is positive for γ < 1, strictly decreasing, "
            "behaves like (1-γ)/8 near γ = 1 and equals 0 at γ = 1; a TV (or, by Pinsker, KL) ball of radius 0 "
            "contains only the reference policy."
        ),
        assumptions=["0 < γ <= 1", "two-action policies for the ball argument (the general case is per-action)"],
        steps=steps,
        conclusion="δ^(TRPO) → 0 as γ → 1 and at γ = 1 the trust region is {π_old}.",
        verified=verified,
        results={"delta_trpo": delta, "gamma": gamma, "slope": slope_closed, "rho": rho},
    )
