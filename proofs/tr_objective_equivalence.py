"""Lemma D.6: the surrogated APC-Obj (Eq. 73) equals APC-Obj (Eq. 72) under advantage centring."""

from __future__ import annotations

import sympy as sp

from fiberpo_theory.symbolic import Derivation, Step, is_zero



def derive() -> Derivation:
    n = sp.symbols("n_1:4", positive=True)
    adv = sp.symbols("A_1:4", real=True)
    gated = sp.symbols("g_1:4", real=True)  # clip(Δ_a, bound_a): any values, the lemma does not use their form
    total = sum(n)
    correction = sum(k * g for k, g in zip(n, gated)) / total  # Eq. 74
    eq73 = sum(k * (g * a + (1 - correction) * a) for k, g, a in zip(n, gated, adv))
    eq72 = sum(k * (g * a + a) for k, g, a in zip(n, gated, adv))
    exposed = -correction * sum(k * a for k, a in zip(n, adv))
    steps = [
        Step(sp.Symbol("C(\\Delta)_s"), correction, "Eq. 74"),
        Step(eq73 - eq72, exposed, "one state's terms of Eq. 73 minus Eq. 72 (the weight Γ(s)/((1-γ)Γ T_s) is common)"),
    ]
    exposed_ok = is_zero(eq73 - eq72 - exposed)
    centred = {adv[2]: -(n[0] * adv[0] + n[1] * adv[1]) / n[2]}  # Eq. 66
    steps.append(Step(exposed.subs(centred), 0, "Eq. 66 makes Σ_a n Â = 0"))
    centred_ok = is_zero(exposed.subs(centred))
    projected = sum(k * (g - correction) * a for k, g, a in zip(n, gated, adv)) + sum(k * a for k, a in zip(n, adv))
    steps.append(Step(eq73, projected, "Eq. 75: the clip term minus the correction is proj(G(Δ))"))
    projected_ok = is_zero(eq73 - projected)
    balance = sum(k * (g - correction) for k, g in zip(n, gated))
    steps.append(Step(balance, 0, "proj(G(Δ)) satisfies the probability constraint (Eq. 65)"))
    balance_ok = is_zero(balance)
    return Derivation(
        id="lemma-d.6",
        title="Surrogated APC-Obj equals APC-Obj",
        paper_ref="Lemma D.6, Eq. 72-75, Remark D.7",
        statement=(
            "At each state the surrogate of Eq. 73 differs from Eq. 72 by -C(Δ)_s Σ_a n Â, which vanishes when "
            "advantages are centred (Eq. 66); regrouped, the surrogate is the linear objective at proj(G(Δ))."
        ),
        assumptions=["one state with three sampled actions (terms of distinct states do not interact)", "arbitrary clip outputs g_a"],
        steps=steps,
        conclusion="Eq. 73 = Eq. 72 whenever Eq. 66 holds; without centring they differ by -C(Δ)_s Σ n Â per state.",
        verified=exposed_ok and centred_ok and projected_ok and balance_ok,
        results={"eq73": eq73, "eq72": eq72, "difference": exposed, "symbols": {"n": n, "A": adv, "g": gated}},
    )
