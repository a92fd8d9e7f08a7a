"""The symbolic core: a derivation is data, printing is elsewhere.

A proof module in ``proofs/`` exposes ``derive() -> Derivation``: a list of
small SymPy steps, each an equation (or relation) with a short justification.
``fiberpo_theory.latex`` prints any ``Derivation``; tests turn the symbolic
results into numbers with ``sympy.lambdify`` and compare them with the torch
implementation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sympy as sp


@dataclass(frozen=True)
class Step:
    """One line of a derivation: ``lhs <relation> rhs`` because ``why``."""

    lhs: sp.Basic
    rhs: sp.Basic
    why: str = ""
    relation: str = "="  # one of "=", "<=", "<", ">=", ">", "approx"


@dataclass
class Derivation:
    """A derived (or refuted) paper result.

    ``verified`` is what the derivation established by computation (for
    example that a difference simplifies to 0), never a constant written in
    advance.  ``results`` holds the SymPy expressions other code may reuse
    (lambdify them for numeric cross-checks).
    """

    id: str
    title: str
    paper_ref: str
    statement: str
    assumptions: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    conclusion: str = ""
    verified: bool = False
    results: dict[str, Any] = field(default_factory=dict)
