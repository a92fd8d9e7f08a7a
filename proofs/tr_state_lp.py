"""Eq. 69 in closed form for two and three actions: M(s) = T_s (max Â - min Â) / 2."""

from __future__ import annotations

from itertools import permutations

import sympy as sp

from fiberpo_theory.symbolic import Derivation, Step

from ._tr_common import nonnegative, same


def _vertices(k: int, total):
    """Vertices of {y : Σ y = 0, Σ |y| <= T} with y_a = n_a Δ_a.

    A vertex needs k independent active constraints: Σ y = 0, the budget
    Σ σ_a y_a = T (σ the sign pattern) and y_a = 0 on k - 2 coordinates; so
    exactly one coordinate is positive and one negative.  Each such system is
    solved, not written down.
    """
    y = sp.symbols(f"y_1:{k + 1}", real=True)
    out = {}
    for i, j in permutations(range(k), 2):
        system = [sp.Eq(sum(y), 0), sp.Eq(y[i] - y[j], total)] + [sp.Eq(y[a], 0) for a in range(k) if a not in (i, j)]
        solution = sp.solve(system, y, dict=True)
        out[(i, j)] = tuple(solution[0][v] for v in y) if len(solution) == 1 else None
    return y, out


def _two_actions():
    """Two actions solved directly from Eq. 65 and D̂TV = 1 (no vertex argument)."""
    n1, n2 = sp.symbols("n_1 n_2", positive=True)
    a1, a2 = sp.symbols("A_1 A_2", real=True)
    d1 = sp.Symbol("Delta_1", real=True)
    total = n1 + n2
    d2 = -n1 * d1 / n2  # Eq. 65
    tv = (n1 * sp.Abs(d1) + n2 * sp.Abs(d2)) / total
    roots = sp.solve(sp.Eq(tv, 1), d1)
    objective = n1 * d1 * a1 + n2 * d2 * a2
    values = {r: sp.simplify(objective.subs(d1, r)) for r in roots}
    return (n1, n2, a1, a2, d1), tv, roots, values


def derive() -> Derivation:
    steps: list[Step] = []
    (n1, n2, a1, a2, d1), tv2, roots, values2 = _two_actions()
    steps.append(Step(sp.Symbol(r"\hat D_{TV}(s,\Delta)"), tv2, "two actions: Eq. 65 gives Δ_2 = -n_1 Δ_1 / n_2"))
    steps.append(Step(sp.Symbol(r"\Delta_1"), sp.FiniteSet(*roots), "the unit-TV condition of Eq. 69 leaves two points"))
    total2 = n1 + n2
    top_root = total2 / (2 * n1)
    up = [r for r in roots if same(r, top_root)]
    down = [r for r in roots if same(r, -top_root)]
    two_ok = len(roots) == 2 and len(up) == 1 and len(down) == 1 and same(values2[up[0]], total2 * (a1 - a2) / 2)
    steps.append(Step(sp.Symbol(r"M(s)"), total2 * sp.Abs(a1 - a2) / 2, "the better of the two: Δ_1 = T_s/(2 n_1) when Â_1 > Â_2"))

    # Three actions through the vertices of the LP polytope.
    total = sp.Symbol("T_s", positive=True)
    adv = sp.symbols("A_1:4", real=True)
    y, vertices = _vertices(3, total)
    vertex_ok = all(v is not None and same(v[i], total / 2) and same(v[j], -total / 2) for (i, j), v in vertices.items())
    steps.append(Step(sp.Symbol("y^{(i,j)}"), sp.Symbol(r"\tfrac{T_s}{2}(e_i - e_j)"), "the six vertices, y_a = n_a Δ_a, solved from the active constraints"))
    value = {key: sum(v * a for v, a in zip(vert, adv)) for key, vert in vertices.items()}
    # Order Â_1 >= Â_2 >= Â_3 through non-negative gaps; the best vertex is (1, 3).
    low, gap1, gap2 = sp.Symbol("c", real=True), *sp.symbols("g_1 g_2", nonnegative=True)
    order = {adv[0]: low + gap1 + gap2, adv[1]: low + gap2, adv[2]: low}
    best = value[(0, 2)]
    margins = [sp.expand((best - v).subs(order)) for v in value.values()]
    best_ok = all(nonnegative(m) for m in margins)
    steps.append(Step(best, total * (adv[0] - adv[2]) / 2, "value of the vertex (max, min)"))
    steps.append(Step(sp.Symbol(r"\min_{(i,j)} \left(v_{13} - v_{ij}\right)"), 0, "with Â_1 >= Â_2 >= Â_3 every other vertex is worse", relation=">="))
    closed_ok = same(best, total * (adv[0] - adv[2]) / 2)

    a_max, a_min = sp.symbols(r"\hat{A}_{\max} \hat{A}_{\min}", real=True)
    n_top, n_bottom = sp.symbols(r"n_{\top} n_{\bot}", positive=True)
    steps.append(Step(sp.Symbol(r"\hat\Delta^*_{s,\top}"), total / (2 * n_top), "mass T_s/2 on the largest advantage"))
    steps.append(Step(sp.Symbol(r"\hat\Delta^*_{s,\bot}"), -total / (2 * n_bottom), "mass -T_s/2 on the smallest"))
    return Derivation(
        id="eq-69",
        title="Per-state unit-TV maximizer in closed form",
        paper_ref="Eq. 69, Eq. 70",
        statement=(
            "For two or three sampled actions, the per-state problem of Eq. 69 puts ratio mass T_s/2 on the action "
            "with the largest advantage and -T_s/2 on the one with the smallest, so M(s) = T_s (max Â - min Â)/2."
        ),
        assumptions=["distinct largest and smallest advantages (otherwise every split of the mass over the tied actions is optimal)"],
        steps=steps,
        conclusion="M(s) = T_s (max_a Â_{s,a} - min_a Â_{s,a}) / 2.",
        verified=two_ok and vertex_ok and best_ok and closed_ok,
        results={
            "state_value": total * (a_max - a_min) / 2,
            "top": total / (2 * n_top),
            "bottom": -total / (2 * n_bottom),
            "symbols": {"T_s": total, "A_max": a_max, "A_min": a_min, "n_top": n_top, "n_bottom": n_bottom},
        },
    )
