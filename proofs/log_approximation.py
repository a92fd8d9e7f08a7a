"""Derivation II (App. E.5.2): the logarithmic approximations, with remainder bounds.

Two replacements turn APC-Obj into log space: |r - 1| -> |log r| in the TV
budget, and 1 + clip(r - 1, ±b) -> exp(clip(log r, ±b)) = logclip(r, b).
We give each as a series and with an explicit remainder bound:

* 0 <= (r - 1) - log r <= (r - 1)² / (2 min(r, 1)²) for every r > 0;
* for 0 < b < 1 and every r > 0,
  |logclip(r, b) - (1 + clip(r - 1, ±b))| <= e^b - 1 - b = b²/2 + O(b³),
  with equality for r >= e^b (the bound is sharp).
The second is proved region by region along the r axis, whose break points
are ordered 0 < 1 - b < e^-b < 1 < 1 + b < e^b by the lemma e^z > 1 + z.
"""

from __future__ import annotations

import sympy as sp

from fiberpo_theory import symbolic as S
from fiberpo_theory.symbolic import Derivation, Step

R = sp.Symbol("r", positive=True)
B = sp.Symbol("b", positive=True)
Z = sp.Symbol("z", real=True)


def h(z):
    """e^z − 1 − z (the exponential remainder)."""
    return sp.exp(z) - 1 - z


def approximation_gap(r=R, b=B):
    """logclip(r, b) − (1 + clip(r − 1, ±b)) over the whole domain (Piecewise)."""
    return S.logclip(r, b) - (1 + S.symmetric_clip(r - 1, b))


# r-regions, in order, with the branch each clip takes there (see the module docstring)
REGIONS = [
    ("(0, 1-b]", "low", "low"),
    ("(1-b, e^{-b})", "low", "in"),
    ("[e^{-b}, 1+b]", "in", "in"),
    ("(1+b, e^{b})", "in", "high"),
    ("[e^{b}, \\infty)", "high", "high"),
]


def _log_remainder_steps() -> tuple[list[Step], bool]:
    """(1)-(4): the series of log r at r = 1 and the two-sided remainder bounds."""
    steps = []
    # (1) series of log r around r = 1
    series = sp.series(sp.log(R), R, 1, 5).removeO()
    steps.append(Step(sp.log(R), series, "Taylor series at r = 1", relation="approx"))
    # (2) 0 <= (r − 1) − log r: ψ(1) = 0, ψ'(r) = (r − 1)/r has the sign of r − 1
    psi = (R - 1) - sp.log(R)
    dpsi = sp.simplify(sp.diff(psi, R))
    ok_psi = psi.subs(R, 1) == 0 and sp.simplify(dpsi - (R - 1) / R) == 0
    steps.append(Step(S.Tex(r"\tfrac{d}{dr}[(r-1) - \log r]"), dpsi, "zero at r = 1, negative before, positive after: minimum 0"))
    # (3) upper bound for r >= 1: φ = (r−1)²/2 − ψ, φ(1) = 0, φ' = (r − 1)²/r >= 0
    phi = (R - 1) ** 2 / 2 - psi
    dphi = sp.factor(sp.diff(phi, R))
    ok_phi = phi.subs(R, 1) == 0 and sp.simplify(dphi - (R - 1) ** 2 / R) == 0
    steps.append(Step(S.Tex(r"\tfrac{d}{dr}\left[\tfrac{(r-1)^2}{2} - ((r-1) - \log r)\right]"), dphi,
                      ">= 0, zero at r = 1: the bound (r − 1)²/2 holds for r >= 1"))
    # (4) upper bound for 0 < r < 1: χ = (r−1)²/(2r²) − ψ, χ(1) = 0, χ' = −(r−1)²(r+1)/r³ <= 0
    chi = (R - 1) ** 2 / (2 * R**2) - psi
    dchi = sp.factor(sp.diff(chi, R))
    ok_chi = chi.subs(R, 1) == 0 and sp.simplify(dchi + (R - 1) ** 2 * (R + 1) / R**3) == 0
    steps.append(Step(S.Tex(r"\tfrac{d}{dr}\left[\tfrac{(r-1)^2}{2r^2} - ((r-1) - \log r)\right]"), dchi,
                      "<= 0 and zero at r = 1: the bound (r − 1)²/(2r²) holds for 0 < r < 1"))
    return steps, bool(ok_psi and ok_phi and ok_chi)


def _h_lemma_steps() -> tuple[list[Step], bool]:
    """(5): h(z) = e^z − 1 − z >= 0 and h(b) >= h(−b) for b >= 0."""
    steps = []
    # (5) lemma h(z) = e^z − 1 − z >= 0, and h(b) >= h(−b) for b >= 0
    dh = sp.diff(h(Z), Z)
    ok_h = h(Z).subs(Z, 0) == 0 and dh == sp.exp(Z) - 1
    steps.append(Step(S.Tex(r"\tfrac{d}{dz}(e^z - 1 - z)"), dh, "sign of z: h >= 0 with h = 0 only at z = 0, so 1 − b < e^{−b} and 1 + b < e^{b}"))
    asym = sp.simplify(h(B) - h(-B) - 2 * (sp.sinh(B) - B).rewrite(sp.exp))
    d_asym = sp.simplify(sp.diff(2 * (sp.sinh(B) - B), B))
    steps.append(Step(h(B) - h(-B), 2 * (sp.sinh(B) - B), "rewrite; derivative 2(cosh b − 1) >= 0 and value 0 at b = 0, so h(b) >= h(−b)"))
    ok_asym = asym == 0 and sp.simplify(d_asym - 2 * (sp.cosh(B) - 1)) == 0
    return steps, bool(ok_h and ok_asym)


def _region_gap_steps() -> tuple[list[Step], list, bool]:
    """(6): logclip against 1 + clip, region by region, checked against the full Piecewise."""
    steps = []
    # (6) the uniform bound on logclip versus 1 + clip, region by region
    region_gaps = []
    for name, lc, cl in REGIONS:
        gap = sp.simplify(S.logclip(R, B, lc) - (1 + S.symmetric_clip(R - 1, B, cl)))
        region_gaps.append((name, gap))
        steps.append(Step(S.Tex(rf"\mathrm{{logclip}}(r,b) - (1 + \mathrm{{clip}}(r-1, \pm b)),\ r \in {name}"), gap,
                          f"logclip branch '{lc}', clip branch '{cl}'"))
    g = dict(region_gaps)
    checks = [
        sp.simplify(g["(0, 1-b]"] - h(-B)) == 0,  # constant h(−b) <= h(b)
        sp.diff(g["(1-b, e^{-b})"], R) == -1 and sp.simplify(g["(1-b, e^{-b})"].subs(R, 1 - B) - h(-B)) == 0,
        g["[e^{-b}, 1+b]"] == 0,
        sp.diff(g["(1+b, e^{b})"], R) == 1 and sp.simplify(g["(1+b, e^{b})"].subs(R, sp.exp(B)) - h(B)) == 0,
        sp.simplify(g["[e^{b}, \\infty)"] - h(B)) == 0,
    ]
    # the region table agrees with the full Piecewise at interior points (b = 1/10, 1/2, 9/10)
    full = approximation_gap()
    agree = True
    for bv in (sp.Rational(1, 10), sp.Rational(1, 2), sp.Rational(9, 10)):
        cuts = [0, 1 - bv, sp.exp(-bv), 1 + bv, sp.exp(bv), sp.exp(bv) + 1]
        for (name, gap), lo, hi in zip(region_gaps, cuts[:-1], cuts[1:]):
            rv = (lo + hi) / 2
            diff = (full - gap).subs({B: bv, R: rv})
            agree &= abs(sp.N(diff, 30)) < sp.Float("1e-25")
    checks.append(agree)
    return steps, region_gaps, all(checks)


def derive() -> Derivation:
    remainder_steps, ok_remainder = _log_remainder_steps()
    h_steps, ok_h = _h_lemma_steps()
    gap_steps, region_gaps, ok_gaps = _region_gap_steps()
    steps = remainder_steps + h_steps + gap_steps
    steps.append(Step(S.Tex(r"\sup_{r > 0} |\mathrm{logclip}(r,b) - (1 + \mathrm{clip}(r-1,\pm b))|"), h(B),
                      "each region's gap is a constant or monotone with end values h(−b) or h(b); h(b) >= h(−b); attained for r >= e^b"))
    steps.append(Step(h(B), sp.series(h(B), B, 0, 4).removeO(), "series", relation="approx"))
    ok = bool(ok_remainder and ok_h and ok_gaps)
    return Derivation(
        id="log-approximation",
        title="Derivation II: logarithmic approximations with remainder bounds",
        paper_ref="App. E.5.2 (Derivation II), Eq. 12; Sec. 5, step 2",
        statement=(
            "log r = (r − 1) + O((r − 1)²) with $0 \\le (r-1) - \\log r \\le (r-1)^2/(2\\min(r,1)^2)$, and "
            "$|\\mathrm{logclip}(r, b) - (1 + \\mathrm{clip}(r-1, \\pm b))| \\le e^{b} - 1 - b$ for all r > 0, 0 < b < 1."
        ),
        assumptions=["r > 0; clip bound 0 < b < 1 (so 1 − b > 0)."],
        steps=steps,
        conclusion=(
            "Both replacements of Derivation II are second order: the TV-budget terms change by at most "
            "(r − 1)²/(2 min(r, 1)²) per token, and the gated ratio changes by at most e^b − 1 − b ≈ b²/2, uniformly in r, "
            "and by nothing at all when e^{−b} <= r <= 1 + b. Summed over a budget of T tokens the first error is not "
            "small unless every |r − 1| is: the approximation is local."
        ),
        verified=ok,
        results={"gap": approximation_gap(), "uniform_bound": h(B), "region_gaps": region_gaps, "symbols": (R, B)},
    )
