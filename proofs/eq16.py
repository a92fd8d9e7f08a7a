"""Eq. 16 equals Eq. 11: the gated residual in ratio space and in log space.

Eq. 11 writes the gated residual with logclip on ratios (s^(l))^(-l) r and
(s^(-l))^(-l); Eq. 16 writes it with clips of l u and l v.  Taking logs of
Eq. 11 (the ratios are positive) and using l^2 = 1 turns one into the other,
separately for l = +1 and l = -1.
"""

from __future__ import annotations

import sympy as sp

from fiberpo_theory import symbolic as S
from fiberpo_theory.symbolic import Derivation, Step

X = sp.Symbol("x", real=True)  # log r_i
LSP, LSN = sp.symbols(r"\log{s^{+}} \log{s^{-}}", nonnegative=True)  # log s^± (Eq. 9, >= 0)
EPS = sp.Symbol("epsilon", positive=True)


def channel(label: int):
    """(log s^(l), log s^(-l)) for the sign label l."""
    return (LSP, LSN) if label > 0 else (LSN, LSP)


def eq11(label: int) -> sp.Expr:
    """Eq. 11 for a token with sign label ``label``: logclip((s^l)^(-l) r, ε) / logclip((s^-l)^(-l), ε)."""
    same, opposite = channel(label)
    ratio = sp.exp(X)
    return S.logclip(sp.exp(same) ** (-label) * ratio, EPS) / S.logclip(sp.exp(opposite) ** (-label), EPS)


def eq16_log(label: int) -> sp.Expr:
    """log of Eq. 16: clip(l u, ε) - clip(l v, ε) with u, v of Eq. 14-15."""
    same, opposite = channel(label)
    u = label * X - same  # Eq. 14
    v = -opposite  # Eq. 15
    return S.symmetric_clip(label * u, EPS) - S.symmetric_clip(label * v, EPS)


def full_domain():
    """Both sides over the whole domain (the sign label chosen by x's sign): for lambdify.

    Returns ``((x, log s⁺, log s⁻, ε), log Eq. 11, log Eq. 16)``.
    """
    log11 = S.select([("+", sp.log(eq11(1)), X >= 0), ("-", sp.log(eq11(-1)), True)])
    log16 = S.select([("+", eq16_log(1), X >= 0), ("-", eq16_log(-1), True)])
    return (X, LSP, LSN, EPS), log11, log16


def derive() -> Derivation:
    steps = []
    ok = True
    for label in (1, -1):
        lhs = eq11(label)
        log_lhs = sp.expand_log(sp.log(lhs), force=True)
        rhs = eq16_log(label)
        same, opposite = channel(label)
        name = "+" if label > 0 else "-"
        steps.append(Step(S.Tex(rf"\tilde r^{{\mathrm{{fiber}}}}\ (l = {label:+d})"), lhs, "Eq. 11 with Eq. 12 (logclip)"))
        steps.append(Step(S.Tex(rf"\log \tilde r^{{\mathrm{{fiber}}}}\ (l = {label:+d})"), log_lhs,
                          "log of a quotient of exponentials; $\\log((e^{a})^{-l} e^{x}) = x - l a$ for real a, x"))
        lu = sp.expand(label * (label * X - same))
        steps.append(Step(S.Tex(rf"l u\ (l = {label:+d})"), lu, "Eq. 14 and $l^2 = 1$"))
        steps.append(Step(S.Tex(rf"l v\ (l = {label:+d})"), sp.expand(-label * opposite), "Eq. 15"))
        diff = sp.expand(log_lhs - rhs)
        steps.append(Step(S.Tex(rf"\log(\text{{Eq. 11}}) - \log(\text{{Eq. 16}})\ (l = {label:+d})"), diff,
                          "expanded difference (sign branch " + name + ")"))
        ok &= S.is_zero(diff)
    return Derivation(
        id="eq-16",
        title="Eq. 16 equals Eq. 11 (gated residual, ratio form and log form)",
        paper_ref="Sec. 5.2, Eq. 11-16",
        statement=(
            "For either sign label l, the ratio-space gated residual "
            "$\\mathrm{logclip}((s^{(l)})^{-l} r, ε)/\\mathrm{logclip}((s^{(-l)})^{-l}, ε)$ equals "
            "$\\exp(\\mathrm{clip}(l u, \\pm ε) - \\mathrm{clip}(l v, \\pm ε))$ with u, v of Eq. 14-15."
        ),
        assumptions=["x = log r real; log s⁺, log s⁻ >= 0 (Eq. 9); ε > 0; l ∈ {+1, −1}."],
        steps=steps,
        conclusion=(
            "The two forms agree exactly for both sign labels (the difference of their logarithms simplifies to 0); "
            "the identity needs only that the ratios are positive and l² = 1."
            if ok
            else "The difference did not simplify to 0; see the steps."
        ),
        verified=bool(ok),
        results={"full_domain": full_domain(), "symbols": (X, LSP, LSN, EPS)},
    )
