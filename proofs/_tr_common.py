"""Shared symbols and helpers of the trust-region derivations (``proofs/tr_*.py``).

Not a derivation itself (no ``derive``): the modules that use it are.
"""

from __future__ import annotations

import sympy as sp

from fiberpo_theory.symbolic import is_zero

# γ ∈ (0, 1) is written γ = 1/(1 + ρ) with ρ > 0 where a sign must be decided:
# then 1 - γ = ρ/(1 + ρ) and SymPy's assumption system sees every factor's sign.
gamma = sp.Symbol("gamma", positive=True)
rho = sp.Symbol("rho", positive=True)
GAMMA_OF_RHO = {gamma: 1 / (1 + rho)}

adv_norm = sp.Symbol(r"\|\hat A\|_\infty", positive=True)  # ‖Â‖∞ > 0
aggregate = sp.Symbol("M", nonnegative=True)  # M, the aggregate LP value
t = sp.Symbol("t", nonnegative=True)  # a common TV level max_s D̂TV(s, Δ)


def same(a, b) -> bool:
    """True when SymPy proves a = b identically."""
    return is_zero(a - b)


def t_star_expr():
    """t* = (1-γ) M / (8γ ‖Â‖∞) as printed in Thm D.3."""
    return (1 - gamma) * aggregate / (8 * gamma * adv_norm)


def delta_trpo_expr():
    """δ^(TRPO) = (1-γ)/(8γ), Eq. 76."""
    return (1 - gamma) / (8 * gamma)


def surrogate_in_t():
    """j along Δ = t Δ̂* (proof of Thm D.3): t M/(1-γ) - 4γ‖Â‖∞ t²/(1-γ)²."""
    return t * aggregate / (1 - gamma) - 4 * gamma * adv_norm * t**2 / (1 - gamma) ** 2


def nonnegative(expr) -> bool:
    """True when SymPy's assumptions prove ``expr >= 0`` after putting it over one denominator.

    Expanding numerator and denominator separately exposes sums of
    non-negative monomials, which the assumption system can then sign.
    """
    numerator, denominator = sp.fraction(sp.together(sp.simplify(expr)))
    numerator, denominator = sp.expand(numerator), sp.expand(denominator)
    return bool(numerator.is_nonnegative) and bool(denominator.is_positive)
