"""Lemma D.12: the TV-TRPO and APC-Obj maximizers lie in the TV ball of radius δ^(TRPO)."""

from __future__ import annotations

import sympy as sp

from fiberpo_theory.symbolic import Derivation, Step

from ._tr_common import GAMMA_OF_RHO, adv_norm, aggregate, delta_trpo_expr, nonnegative, same, t, t_star_expr


def derive() -> Derivation:
    n = sp.symbols("n_1:4", positive=True)
    dev = sp.symbols("Delta_1:4", real=True)
    total = sum(n)
    tv = sum(k * sp.Abs(d) for k, d in zip(n, dev)) / total
    scaled = sum(k * sp.Abs(t * d) for k, d in zip(n, dev)) / total
    steps = [Step(sp.Symbol(r"\hat D_{TV}(s, t\hat\Delta)"), t * tv, "TV is positively homogeneous (t >= 0), Eq. 39")]
    homogeneous = same(scaled, t * tv)
    steps.append(Step(sp.Symbol(r"\max_s \hat D_{TV}(s, t^*\hat\Delta^*)"), t_star_expr(), "every state with M(s) > 0 has $\\hat D_{TV}$(s, $\\hat\\Delta^*$) = 1; the others have Δ* = 0"))
    steps.append(Step(sp.Symbol(r"\max_s \hat D_{TV}(s, \delta^{(APC\text{-}Obj)}\hat\Delta^*)"), t_star_expr(), "δ^(APC-Obj) of Eq. 72 equals t*"))
    margin = sp.simplify((delta_trpo_expr() - t_star_expr()).subs(GAMMA_OF_RHO).subs(aggregate, adv_norm - sp.Symbol("e", nonnegative=True)))
    steps.append(Step(margin, 0, "δ^(TRPO) - t* with γ = 1/(1+ρ), M = ‖Â‖∞ - e, e >= 0 (Lemma D.2)", relation=">="))
    inside = nonnegative(margin)
    return Derivation(
        id="lemma-d.12",
        title="TV-TRPO and APC-Obj updates stay in the δ^(TRPO) ball",
        paper_ref="Lemma D.12, Lemma B.2",
        statement=(
            "The claimed maximizers t*$\\hat\\Delta^*$ and δ^(APC-Obj)$\\hat\\Delta^*$ have sample max-TV t* (TV is homogeneous and $\\hat\\Delta^*$ has "
            "unit TV where M(s) > 0), and t* <= δ^(TRPO) by Lemma D.2."
        ),
        assumptions=[
            "0 < γ < 1, ‖Â‖∞ > 0",
            "the sampled $\\hat D_{TV}$ stands in for the true per-state TV, as App. D.1 assumes; unsampled states are not controlled",
        ],
        steps=steps,
        conclusion="max_s $\\hat D_{TV}$(s, Δ*) = t* <= δ^(TRPO).",
        verified=homogeneous and inside,
        results={"margin": margin},
    )
