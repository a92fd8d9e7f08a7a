"""The APC-Obj clip bound rewritten through the per-state TV: T_s δ - C1 = T_s (δ - D̂TV(s)) + |Δ_a|."""

from __future__ import annotations

import sympy as sp

from fiberpo_theory.symbolic import Derivation, Step, is_zero



def bound_symbols():
    n = sp.symbols("n_1:4", positive=True)
    dev = sp.symbols("Delta_1:4", real=True)
    delta = sp.Symbol("delta", positive=True)
    return n, dev, delta


def derive() -> Derivation:
    n, dev, delta = bound_symbols()
    total = sum(n)
    tv = sum(k * sp.Abs(d) for k, d in zip(n, dev)) / total  # Eq. 39
    # A token of action 1: the other tokens at s are n_1 - 1 copies of action 1 and all of actions 2, 3 (Eq. 59).
    others = (n[0] - 1) * sp.Abs(dev[0]) + n[1] * sp.Abs(dev[1]) + n[2] * sp.Abs(dev[2])
    token_bound = total * delta - others
    kronecker = total * delta - sum((k - (1 if a == 0 else 0)) * sp.Abs(d) for a, (k, d) in enumerate(zip(n, dev)))
    rewritten = total * (delta - tv) + sp.Abs(dev[0])
    steps = [
        Step(sp.Symbol("B_{s,1}"), token_bound, "Eq. 59: budget T_s δ minus the other tokens' |r - 1| at s (C1)"),
        Step(token_bound, kronecker, "Eq. 74's form with n_{s,a'} - δ_{a,a'}"),
        Step(kronecker, rewritten, "substitute Σ_a n_a |Δ_a| = T_s $\\hat D_{TV}$(s) (Eq. 39): the form used by G in Def. D.8"),
    ]
    consumption = others + sp.Abs(dev[0])
    steps.append(Step(consumption, total * tv, "C1 + C2 = T_s $\\hat D_{TV}$(s) (App. C.2)"))
    verified = is_zero(token_bound - kronecker) and is_zero(kronecker - rewritten) and is_zero(consumption - total * tv)
    return Derivation(
        id="clip-bound",
        title="Clip-bound identity of APC-Obj",
        paper_ref="Eq. 59, Eq. 74, Def. D.8, proof of Thm D.10",
        statement=(
            "The budget a token of action a has left, T_s δ minus what every other token at its state consumes, "
            "equals T_s (δ - $\\hat D_{TV}$(s)) + |Δ_a|; the token-level clip of Eq. 59 and the operator G of Def. D.8 coincide."
        ),
        assumptions=["one state with three sampled actions and symbolic multiplicities"],
        steps=steps,
        conclusion="T_s δ - Σ_{a'≠a} |Δ_{a'}| = T_s (δ - $\\hat D_{TV}$(s)) + |Δ_a|.",
        verified=verified,
        results={"token_bound": token_bound, "rewritten": rewritten, "symbols": {"n": n, "Delta": dev, "delta": delta}},
    )
