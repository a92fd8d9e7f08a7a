"""Lemma D.11: δ^(APC-Obj) <= δ^(TRPO); and the printed Def. 3.2 radius is not t*."""

from __future__ import annotations

import sympy as sp

from fiberpo_theory.symbolic import Derivation, Step

from ._tr_common import GAMMA_OF_RHO, adv_norm, aggregate, delta_trpo_expr, gamma, nonnegative, rho, same, t_star_expr


def derive() -> Derivation:
    delta_apc = t_star_expr()  # Eq. 72
    delta_trpo = delta_trpo_expr()
    total = sp.Symbol("T", positive=True)
    delta_printed = (1 - gamma) ** 2 * aggregate / (8 * gamma * adv_norm * total)  # Def. 3.2 / C.1 as printed
    steps = [
        Step(sp.Symbol(r"\delta^{(APC\text{-}Obj)}"), delta_apc, "Eq. 72 (Def. D.4), equal to t* of Thm D.3"),
        Step(sp.Symbol(r"\delta^{(TRPO)}"), delta_trpo, "Eq. 76"),
    ]
    difference = delta_trpo - delta_apc
    factored = (1 - gamma) * (adv_norm - aggregate) / (8 * gamma * adv_norm)
    steps.append(Step(difference, factored, "common factor (1-γ)/(8γ‖Â‖∞)"))
    identity_ok = same(difference, factored)
    slack = sp.Symbol("e", nonnegative=True)  # ‖Â‖∞ - M >= 0 by Lemma D.2
    signed = sp.simplify(factored.subs(GAMMA_OF_RHO).subs(aggregate, adv_norm - slack))
    steps.append(Step(signed, 0, "γ = 1/(1+ρ) and M = ‖Â‖∞ - e with e >= 0 (Lemma D.2)", relation=">="))
    sign_ok = nonnegative(signed)

    ratio = sp.simplify(delta_printed / delta_apc)
    steps.append(Step(delta_printed / sp.Symbol(r"\delta^{(APC\text{-}Obj)}"), ratio, "Def. 3.2's printed radius is Eq. 72's times (1-γ)/T"))
    ratio_ok = same(ratio, (1 - gamma) / total)
    equal_at = sp.solve(sp.Eq(ratio, 1), gamma)
    steps.append(Step(sp.Symbol(r"\gamma\,|\,\delta_{printed} = t^*"), sp.FiniteSet(*equal_at), "the two agree only at γ = 1 - T <= 0, outside (0, 1]: with M > 0 the printed radius is never t*"))
    never_equal = equal_at == [1 - total]
    printed_gap = sp.simplify((delta_apc - delta_printed).subs(GAMMA_OF_RHO).subs(total, 1 + sp.Symbol("k", nonnegative=True)))
    steps.append(Step(printed_gap, 0, "T = 1 + k, k >= 0: the printed radius is even smaller, so it also satisfies the bound", relation=">="))
    printed_ok = nonnegative(printed_gap)
    return Derivation(
        id="lemma-d.11",
        title="The APC-Obj radius is below the TRPO radius",
        paper_ref="Lemma D.11, Eq. 72, Eq. 76, Def. 3.2, Def. C.1",
        statement=(
            "δ^(TRPO) - δ^(APC-Obj) = (1-γ)(‖Â‖∞ - M)/(8γ‖Â‖∞) >= 0 by Lemma D.2.  The radius printed in Def. 3.2 and "
            "Def. C.1, (1-γ)² M/(8γ‖Â‖∞ T), is Eq. 72's times (1-γ)/T: also below δ^(TRPO), but never equal to t*."
        ),
        assumptions=["0 < γ < 1", "‖Â‖∞ > 0", "0 <= M <= ‖Â‖∞ (Lemma D.2)", "T >= 1 sampled tokens"],
        steps=steps,
        conclusion="δ^(APC-Obj) <= δ^(TRPO) for either definition; only Eq. 72's equals t*.",
        verified=identity_ok and sign_ok and ratio_ok and never_equal and printed_ok,
        results={"difference": factored, "delta_apc": delta_apc, "delta_printed": delta_printed, "delta_trpo": delta_trpo,
                 "symbols": {"gamma": gamma, "M": aggregate, "adv_norm": adv_norm, "T": total, "rho": rho}},
    )
