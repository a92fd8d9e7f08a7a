"""Log-clip asymmetry (Sec. 5.2): a symmetric clip in log space is asymmetric in ratio space.

logclip(r, ε) confines r to [e^-ε, e^ε].  The upward room e^ε - 1 exceeds the
downward room 1 - e^-ε for every ε > 0; their difference is a perfect square
and their quotient is exactly e^ε.
"""

from __future__ import annotations

import sympy as sp

from fiberpo_theory import symbolic as S
from fiberpo_theory.symbolic import Derivation, Step

EPS = sp.Symbol("epsilon", positive=True)
R = sp.Symbol("r", positive=True)


def excursions(eps=EPS):
    """(upper room e^ε − 1, lower room 1 − e^−ε), read off the saturated branches of logclip (Eq. 12)."""
    upper = S.logclip(R, eps, "high") - 1
    lower = 1 - S.logclip(R, eps, "low")
    return upper, lower


def derive() -> Derivation:
    upper, lower = excursions()
    diff = upper - lower
    square = (sp.exp(EPS / 2) - sp.exp(-EPS / 2)) ** 2
    as_square = sp.simplify(sp.expand(diff - square)) == 0
    sinh_form = sp.simplify((diff - 4 * sp.sinh(EPS / 2) ** 2).rewrite(sp.exp)) == 0
    quotient = sp.simplify(upper / lower)
    ratio_ok = sp.simplify(quotient - sp.exp(EPS)) == 0
    positive = sp.exp(EPS / 2) - sp.exp(-EPS / 2)
    # e^{ε/2} > e^{-ε/2} for ε > 0 because exp is increasing: ε/2 − (−ε/2) = ε > 0
    strict = bool(sp.exp(EPS).is_positive) and (EPS / 2 - (-EPS / 2)).is_positive
    series = sp.series(diff, EPS, 0, 6).removeO()
    steps = [
        Step(S.Tex(r"e^{\varepsilon} - 1"), upper, "saturated upper branch of logclip (Eq. 12)"),
        Step(S.Tex(r"1 - e^{-\varepsilon}"), lower, "saturated lower branch"),
        Step(S.Tex(r"(e^{\varepsilon} - 1) - (1 - e^{-\varepsilon})"), square, "difference written as a square (checked by expansion)"),
        Step(square, 4 * sp.sinh(EPS / 2) ** 2, "rewrite with sinh"),
        Step(S.Tex(r"\frac{e^{\varepsilon} - 1}{1 - e^{-\varepsilon}}"), quotient, "exact quotient"),
        Step(diff, series, "Taylor series at ε = 0 (order 6)", relation="approx"),
        Step(positive, sp.Integer(0), "exp is strictly increasing and ε/2 > −ε/2", relation=">"),
    ]
    ok = bool(as_square and sinh_form and ratio_ok and strict)
    return Derivation(
        id="logclip-asymmetry",
        title="Log-clip asymmetry in ratio space",
        paper_ref="Sec. 5.2, log-clipping paragraph; Eq. 12; App. E.5.2 (natural asymmetry)",
        statement="For every ε > 0 the upper room of logclip exceeds the lower one: $e^{ε} - 1 > 1 - e^{-ε}$.",
        assumptions=["ε > 0, r > 0."],
        steps=steps,
        conclusion=(
            "The difference equals (e^{ε/2} − e^{−ε/2})² = 4 sinh²(ε/2) = ε² + ε⁴/12 + ..., strictly positive for ε > 0; "
            "the upper room is exactly e^ε times the lower room. (In float64 the two rooms become indistinguishable "
            "once ε² is below the rounding of e^ε, around ε < 1e-8.)"
        ),
        verified=ok,
        results={"upper": upper, "lower": lower, "difference": diff, "quotient": quotient, "symbols": (EPS,)},
    )
