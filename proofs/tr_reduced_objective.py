"""Eq. 68: the sample-based TV-TRPO objective (Eq. 67) minus a Δ-free constant is j(Δ)."""

from __future__ import annotations

import sympy as sp

from fiberpo_theory.symbolic import Derivation, Step, is_zero

from ._tr_common import adv_norm, gamma


def _instance():
    """Two states, two actions each: multiplicities, advantages, Γ(s), deviations (all symbolic)."""
    pairs_ids = ("11", "12", "21", "22")  # (state, action)
    n = sp.symbols([f"n_{k}" for k in pairs_ids], positive=True)
    adv = sp.symbols([f"A_{k}" for k in pairs_ids], real=True)
    dev = sp.symbols([f"Delta_{k}" for k in pairs_ids], real=True)
    mass = sp.symbols("Gamma_1:3", positive=True)
    pairs = [(0, (0, 1)), (1, (2, 3))]
    return n, adv, dev, mass, pairs


def derive() -> Derivation:
    n, adv, dev, mass, pairs = _instance()
    j_old = sp.Symbol("J_old", real=True)
    big_gamma = sum(mass)
    counts = [n[a] + n[b] for _, (a, b) in pairs]
    ratio = [1 + d for d in dev]

    def state_sum(values, s):
        a, b = pairs[s][1]
        return n[a] * values[a] + n[b] * values[b]

    def tv(values, s):
        a, b = pairs[s][1]
        return (n[a] * sp.Abs(values[a] - 1) + n[b] * sp.Abs(values[b] - 1)) / counts[s]

    penalty = 4 * gamma * adv_norm / (1 - gamma) ** 2
    # Eq. 67 (third line) in terms of ratios r = 1 + Δ.
    full = j_old + sum(mass[s] / counts[s] * state_sum([r * a for r, a in zip(ratio, adv)], s) for s in range(2)) / (
        (1 - gamma) * big_gamma
    ) - penalty * sp.Max(tv(ratio, 0), tv(ratio, 1)) ** 2
    # Eq. 68 in terms of Δ.
    tv_dev = [tv([1 + d for d in dev], s) for s in range(2)]
    reduced = sum(mass[s] / counts[s] * state_sum([d * a for d, a in zip(dev, adv)], s) for s in range(2)) / (
        (1 - gamma) * big_gamma
    ) - penalty * sp.Max(*tv_dev) ** 2
    constant = j_old + sum(mass[s] / counts[s] * state_sum(list(adv), s) for s in range(2)) / ((1 - gamma) * big_gamma)

    steps = [
        Step(sp.Symbol(r"\hat J^{(TV\text{-}TRPO)}"), full, "Eq. 67 on two states with two actions each"),
        Step(sp.Symbol(r"j(\Delta)"), reduced, "Eq. 68"),
        Step(full - reduced, constant, "the difference is the Δ-free constant J(θ_old) + (1/((1-γ)Γ)) Σ Γ(s)/T_s Σ n Â"),
    ]
    difference_ok = is_zero(full - reduced - constant)
    free_of_dev = not (sp.expand(full - reduced).free_symbols & set(dev))
    centred = {adv[1]: -n[0] * adv[0] / n[1], adv[3]: -n[2] * adv[2] / n[3]}
    steps.append(Step(constant.subs(centred), j_old, "with centred advantages (Eq. 66) the constant is J(θ_old)"))
    centred_ok = is_zero(constant.subs(centred) - j_old)
    return Derivation(
        id="eq-68",
        title="The reduced TV-TRPO objective j(Δ)",
        paper_ref="Eq. 67, Eq. 68 (App. D.2)",
        statement=(
            "Writing r = 1 + Δ, the sample-based TV-TRPO objective equals j(Δ) plus a term that does not depend on Δ, "
            "so both have the same maximizers; under advantage centring that term is J(θ_old)."
        ),
        assumptions=["two states with two sampled actions each (the algebra is per state and per pair)", "0 < γ < 1"],
        steps=steps,
        conclusion="Eq. 68 differs from Eq. 67 by a constant.",
        verified=difference_ok and free_of_dev and centred_ok,
        results={"full": full, "reduced": reduced, "constant": constant, "symbols": {"n": n, "A": adv, "Delta": dev, "Gamma": mass, "J_old": j_old, "gamma": gamma, "adv_norm": adv_norm}},
    )
