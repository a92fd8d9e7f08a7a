"""Derivation IV's claim that the decomposed clip is "stricter" than the channel-split clip.

Channel-split clip of token i (label l, s = log s^(l), T tokens, budget C):
A = clip(x, T C - T s + l x).  Decomposed clip (before Eq. 77):
D = l clip(l x - s, ±ε) + clip(l s, T C - T s - (ε - l x)), both with
clip(a, B) := clip(a, ±B⁺).  The paper says |D| is strictly less than |A|.
We show (1) on the open region where no clip is active D = A = x, so the
strict inequality fails on a set of positive measure, and (2) an exact
trajectory where |D| > |A|, so even the weak inequality fails.
"""

from __future__ import annotations

import sympy as sp

from fiberpo_theory import symbolic as S
from fiberpo_theory.symbolic import Derivation, Step

X = sp.Symbol("x", real=True)
SS = sp.Symbol("s", nonnegative=True)
C, EPS, T = sp.symbols("C epsilon T", positive=True)


def channel_split(x, s, c, eps, T, label, branch=None):
    """A = clip(x, T C − T s + l x) (B⁺ convention)."""
    return S.budget_clip(x, T * c - T * s + label * x, branch)


def decomposed(x, s, c, eps, T, label, fiber_branch=None, base_branch=None):
    """D = l clip(l x − s, ±ε) + clip(l s, T C − T s − (ε − l x))."""
    return label * S.symmetric_clip(label * x - s, eps, fiber_branch) + S.budget_clip(label * s, T * c - T * s - (eps - label * x), base_branch)


def instance(xs, c, eps, i):
    """A and D for token i of an exact trajectory."""
    n = len(xs)
    x = xs[i]
    label = 1 if x >= 0 else -1
    s = sum((S.positive_part if label > 0 else S.negative_part)(v) for v in xs) / n
    return s, channel_split(x, s, c, eps, n, label), decomposed(x, s, c, eps, n, label)


def derive() -> Derivation:
    steps = []
    # (1) all clips inactive (label +1): A = x and D = (x − s) + s = x
    A_in = channel_split(X, SS, C, EPS, T, 1, "in")
    D_in = decomposed(X, SS, C, EPS, T, 1, "in", "in")
    equal = sp.expand(A_in - D_in) == 0
    steps.append(Step(S.Tex(r"A\ \ [\text{no clip active}]"), A_in, "channel-split clip on its identity branch"))
    steps.append(Step(S.Tex(r"D\ \ [\text{no clip active}]"), sp.expand(D_in), "decomposed clip on identity branches: equal to A, so $|D| < |A|$ fails"))
    # this region is non-empty and open: an exact interior point
    pt = {X: sp.Rational(1, 10), SS: sp.Rational(1, 10), C: 1, EPS: sp.Rational(1, 5), T: 2}
    bound_a = (T * C - T * SS + X).subs(pt)
    fiber = (X - SS).subs(pt)
    bound_d = (T * C - T * SS - (EPS - X)).subs(pt)
    interior = abs(pt[X]) < bound_a and abs(fiber) < pt[EPS] and pt[SS] < bound_d
    steps.append(Step(S.Tex(r"(x, s, C, \varepsilon, T)"), sp.Matrix([[pt[X], pt[SS], pt[C], pt[EPS], pt[T]]]),
                      f"an interior point of that region: |x| < {bound_a}, |x − s| < ε, s < {bound_d}"))
    # (2) reversal: small token in a trajectory of large positive log-ratios
    xs = [sp.Rational(1, 100), sp.Integer(1)]
    c, eps = sp.Integer(1), sp.Rational(1, 10)
    s, A, D = instance(xs, c, eps, 0)
    steps.append(Step(S.Tex(r"(x_1, x_2),\ C,\ \varepsilon"), sp.Matrix([[*xs, c, eps]]), "exact trajectory, T = 2, token 1"))
    steps.append(Step(S.Tex(r"\log s^{+}"), s, "Eq. 9"))
    steps.append(Step(S.Tex(r"A"), A, "channel split: the bound exceeds |x_1|, no clipping"))
    steps.append(Step(S.Tex(r"D"), D, "decomposed: $x_1 - \\log s^{+} < -ε$, so the fiber clip returns −ε while the aggregate term keeps log s⁺"))
    reversed_ = abs(D) > abs(A)
    ok = bool(equal and interior and reversed_)
    return Derivation(
        id="eq-77-stricter",
        title="Derivation IV: the decomposed clip is not stricter than the channel-split clip",
        paper_ref="App. E.5.4, Derivation IV (the decomposition displayed before Eq. 77)",
        statement="The paper states that the decomposed clip has absolute value strictly less than the channel-split clip.",
        assumptions=["clip(a, B) := clip(a, ±B⁺); s = log s^(l) >= 0; T, C, ε > 0."],
        steps=steps,
        conclusion=(
            "False as stated. Where no clip is active the two coincide (D = A = x) on an open set, so the strict "
            f"inequality fails; and a token far below its channel's mean is clipped up: in the exact example |D| = {D} "
            f"exceeds |A| = {A}. The decomposition is a different clip, neither uniformly stricter nor looser."
        ),
        verified=ok,
        results={"channel_split": channel_split, "decomposed": decomposed, "instance": instance,
                 "reversal": {"log_ratio": xs, "C": c, "eps": eps, "token": 0, "A": A, "D": D}},
    )
