"""Lemma D.2: M <= ‖Â‖∞, through the closed form M(s)/T_s = (max Â - min Â)/2."""

from __future__ import annotations

import sympy as sp

from fiberpo_theory.symbolic import Derivation, Step

from ._tr_common import adv_norm, nonnegative, same
from .tr_state_lp import derive as derive_state_lp


def derive() -> Derivation:
    lp = derive_state_lp()
    sym = lp.results["symbols"]
    per_state = lp.results["state_value"] / sym["T_s"]
    steps = [Step(sp.Symbol("M(s)/T_s"), per_state, "Eq. 69 in closed form (derivation eq-69)")]

    # Any advantage lies in [-‖Â‖∞, ‖Â‖∞]: write max Â = ‖Â‖∞ - e_1 and min Â = -‖Â‖∞ + e_2, e_i >= 0.
    e1, e2 = sp.symbols("e_1 e_2", nonnegative=True)
    slack = sp.expand((adv_norm - per_state).subs({sym["A_max"]: adv_norm - e1, sym["A_min"]: -adv_norm + e2}))
    steps.append(Step(adv_norm - per_state, slack, "with max Â = ‖Â‖∞ - e_1, min Â = -‖Â‖∞ + e_2"))
    per_state_ok = same(slack, (e1 + e2) / 2) and nonnegative(slack)

    # M is a Γ(s)/Γ-weighted mean of the M(s)/T_s (three states; weights sum to 1).
    w1, w2 = sp.symbols("w_1 w_2", nonnegative=True)
    m = sp.symbols("m_1:4", real=True)
    weights = (w1, w2, 1 - w1 - w2)
    aggregate = sum(w * v for w, v in zip(weights, m))
    gap = sum(w * (adv_norm - v) for w, v in zip(weights, m))
    steps.append(Step(adv_norm - aggregate, gap, "M = Σ_s (Γ(s)/Γ) M(s)/T_s with Σ Γ(s)/Γ = 1"))
    mean_ok = same(adv_norm - aggregate, gap)

    steps.append(Step(sp.Symbol("M"), adv_norm, "each term of the weighted mean is <= ‖Â‖∞", relation="<="))
    tight = slack.subs({e1: 0, e2: 0})
    steps.append(Step(sp.Symbol(r"\|\hat A\|_\infty - M"), tight, "equality iff max Â = ‖Â‖∞ = -min Â at every weighted state"))
    return Derivation(
        id="lemma-d.2",
        title="The aggregate LP value is bounded by the advantage sup-norm",
        paper_ref="Lemma D.2",
        statement=(
            "Each state's unit-TV value per sample, M(s)/T_s, is half the spread of its advantages, hence at most "
            "‖Â‖∞; the aggregate M, a weighted mean of these, is at most ‖Â‖∞, with equality exactly when every "
            "weighted state has advantages reaching both +‖Â‖∞ and -‖Â‖∞."
        ),
        assumptions=["Γ(s) > 0", "at most three actions per state for the closed form (the bound itself is general)"],
        steps=steps,
        conclusion="M <= ‖Â‖∞, and the bound is attained.",
        verified=lp.verified and per_state_ok and mean_ok and tight == 0,
        results={"per_state": per_state, "slack": slack, "symbols": sym | {"adv_norm": adv_norm}},
    )
