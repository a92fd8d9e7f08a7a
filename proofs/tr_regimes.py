"""Eq. 61-63: the APC-Obj regimes P/R/Z as solved inequalities in the per-state TV."""

from __future__ import annotations

import sympy as sp

from fiberpo_theory.symbolic import Derivation, Step

from ._tr_common import same


def _tidy(relation):
    """The same relation with its right-hand side expanded (SymPy's solve leaves nested signs)."""
    return relation.func(relation.lhs, sp.expand(relation.rhs))


def derive() -> Derivation:
    tv = sp.Symbol(r"\hat D_{TV}", real=True)
    delta = sp.Symbol("delta", positive=True)
    count = sp.Symbol("T_s", positive=True)
    size = sp.Symbol(r"|\Delta|", positive=True)  # a token with Δ ≠ 0; Δ = 0 is treated in the conclusion
    residual = count * (delta - tv) + size  # (B) - (C1), derivation clip-bound
    steps = [Step(sp.Symbol("(B) - (C1)"), residual, "clip-bound identity")]

    passes = sp.solve(size <= residual, tv)
    steps.append(Step(sp.Symbol("(P)"), passes, "clip inactive, |Δ| <= (B) - (C1)  (Eq. 61)"))
    zeroed = _tidy(sp.solve(residual <= 0, tv))
    steps.append(Step(sp.Symbol("(Z)"), zeroed, "output zero, (B) - (C1) <= 0  (Eq. 63)"))
    positive = _tidy(sp.solve(residual > 0, tv))
    active = _tidy(sp.solve(size > residual, tv))
    steps.append(Step(sp.Symbol("(R)"), sp.And(positive, active), "0 < (B) - (C1) < |Δ|  (Eq. 62)"))

    # The paper's printed conditions, compared with the solved ones.
    pass_ok = same(passes.rhs, delta) and isinstance(passes, sp.LessThan)
    zero_edge = delta + size / count
    zero_ok = isinstance(zeroed, sp.GreaterThan) and same(zeroed.rhs, zero_edge)
    rollback_ok = isinstance(positive, sp.StrictLessThan) and same(positive.rhs, zero_edge) and isinstance(active, sp.StrictGreaterThan) and same(active.rhs, delta)
    steps.append(Step(size / count, tv - delta, "Eq. 62's token condition: inside R, $\\hat D_{TV}$ < δ + |Δ|/T_s", relation=">"))
    steps.append(Step(size / count, tv - delta, "Eq. 63's token condition: inside Z, $\\hat D_{TV}$ >= δ + |Δ|/T_s", relation="<="))
    printed_ok = same(zero_edge - delta, size / count)

    # Rescale D̂TV = δ + σ |Δ|/T_s: the edges become σ = 0 and σ = 1, and the solved sets are plain intervals.
    sigma = sp.Symbol("sigma", real=True)
    rescale = {tv: delta + sigma * size / count}
    p_set = sp.solve(passes.subs(rescale), sigma).as_set()
    r_set = sp.solve([positive.subs(rescale), active.subs(rescale)], sigma).as_set()
    z_set = sp.solve(zeroed.subs(rescale), sigma).as_set()
    union = sp.Union(p_set, r_set, z_set)
    disjoint = all(a.intersect(b) == sp.EmptySet for a, b in ((p_set, r_set), (p_set, z_set), (r_set, z_set)))
    covers = union == sp.S.Reals
    steps.append(Step(sp.Symbol(r"\sigma"), sp.Tuple(p_set, r_set, z_set), "with $\\hat D_{TV}$ = δ + σ|Δ|/T_s: P, R, Z are σ <= 0, 0 < σ < 1, σ >= 1"))
    steps.append(Step(sp.Symbol(r"P \cup R \cup Z"), union, "for |Δ| > 0 the three regimes partition the values of $\\hat D_{TV}$"))

    # Outputs of clip(Δ, ((B)-(C1))⁺) by regime: |Δ|, (B)-(C1) ∈ (0, |Δ|), 0.
    steps.append(Step(sp.Symbol(r"|\mathrm{clip}|_{R}"), residual, "strictly between 0 and |Δ| inside R"))
    return Derivation(
        id="eq-61-63",
        title="APC-Obj clipping regimes as solved inequalities",
        paper_ref="Eq. 60-63 (App. C.2)",
        statement=(
            "With (B) - (C1) = T_s(δ - $\\hat D_{TV}$) + |Δ|, the clip is inactive exactly when $\\hat D_{TV}$ <= δ, its output is zero "
            "exactly when $\\hat D_{TV}$ >= δ + |Δ|/T_s, and in between it is strictly reduced but non-zero; for Δ ≠ 0 these "
            "three ranges of $\\hat D_{TV}$ partition the real line."
        ),
        assumptions=["T_s > 0, δ > 0", "|Δ| > 0 (at Δ = 0 the output is 0 in every regime: identity and zero coincide)"],
        steps=steps,
        conclusion="P: $\\hat D_{TV}$ <= δ; R: δ < $\\hat D_{TV}$ < δ + |Δ|/T_s; Z: $\\hat D_{TV}$ >= δ + |Δ|/T_s.",
        verified=pass_ok and zero_ok and rollback_ok and printed_ok and disjoint and covers,
        results={"pass_edge": passes.rhs, "zero_edge": zero_edge, "residual": residual, "symbols": {"D": tv, "delta": delta, "T_s": count, "size": size}},
    )
