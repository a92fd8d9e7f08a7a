"""The claim checks of ``checks/identities.py``: the verdict each gets on the package, and planted defects they catch.

The verdicts asserted here are what the checks *found* on this package (see
the report in docs); a check never receives the verdict it should give.  Each
planted defect is a small, plausible implementation bug passed through the
check's keyword arguments; a check that cannot fail on it would be a defect.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from fiberpo_theory.checks import identities as I
from fiberpo_theory.theory.claims import Profile, registry
from fiberpo_theory.core.gates import g_agg, symmetric_clip
from fiberpo_theory.core.objectives import fiberpo_parts
from fiberpo_theory.core.segments import Segments

QUICK = Profile.named("quick")
PLANTED = Profile(name="quick", max_examples=80, seed=3)


def test_all_nine_ids_are_registered_with_paper_references():
    reg = registry()
    for cid in ("eq-16", "ratio-decoupling", "g-regimes", "logclip-asymmetry", "eq-10", "eq-77-identity",
                "eq-77-stricter", "eq-79-approx", "prop-5.2"):
        assert cid in reg and reg[cid].paper_ref and reg[cid].statement


# --- planted implementations ---------------------------------------------------------------


def g_agg_wrong_slope(x, c, k):
    """Rollback with slope −(k + 1) instead of −k: discontinuous at |x| = C."""
    ax = x.abs()
    rollback = torch.sign(x) * (k + 1) * c - (k + 1) * x
    inner = torch.where(ax < (1 + 1 / k) * c, rollback, torch.zeros_like(x))
    return torch.where(ax <= c, x, inner)


def budget_clip_without_positive_part(a, bound):
    """clip(a, -B, B) with no B⁺: torch.clamp returns B (< 0) when the bound is negative."""
    return torch.minimum(torch.maximum(a, -bound), bound)


def hard_clip_gate(x, c, k):
    """A plain hard clip at ±C (no rollback): a different gate, for which Eq. 79 really is O(1/T)."""
    return torch.clamp(x, -c, c)


def fiberpo_with_torch_sign(log_ratio, traj_id, *, eps, c_pos, c_neg, k=None):
    """FiberPO written with torch.sign and relu: the same values off x = 0, a different gradient at it."""
    x = log_ratio
    traj = Segments.from_ids(traj_id)
    label = torch.sign(x)
    lsp, lsn = traj.mean(torch.relu(x)), traj.mean(torch.relu(-x))
    T = traj.count.to(x.dtype)
    log_base = g_agg(lsp, c_pos, T) - g_agg(lsn, c_neg, T)
    same = torch.where(label > 0, traj.gather(lsp), traj.gather(lsn))
    opposite = torch.where(label > 0, traj.gather(lsn), traj.gather(lsp))
    residual = symmetric_clip(label * (label * x - same), eps) - symmetric_clip(label * (-opposite), eps)
    return torch.exp(traj.gather(log_base) + residual)


def eq11_without_denominator(log_ratio, traj_id, *, eps):
    """Eq. 11 that forgets the opposite-channel logclip in the denominator."""
    p = fiberpo_parts(log_ratio, traj_id, eps=eps, c_pos=1.0, c_neg=1.0)
    return torch.exp(symmetric_clip(p.sign * p.u, eps))


def parts_without_v_clip(log_ratio, traj_id, **kw):
    p = fiberpo_parts(log_ratio, traj_id, **kw)
    return p._replace(log_gated_residual=symmetric_clip(p.sign * p.u, kw["eps"]))


def parts_with_flipped_base(log_ratio, traj_id, **kw):
    p = fiberpo_parts(log_ratio, traj_id, **kw)
    k = p.traj.gather(p.length)
    flipped = g_agg(p.traj.gather(p.log_s_pos), kw["c_pos"], k) + g_agg(p.traj.gather(p.log_s_neg), kw["c_neg"], k)
    return p._replace(log_base_weight=flipped)


def symmetric_ratio_clip(x, eps):
    """Clipping the ratio to [1 − ε, 1 + ε] instead of [e^−ε, e^ε]."""
    return torch.clamp(x, 1 - eps, 1 + eps)


# --- verdicts on the package and on planted defects -------------------------------------------


def test_eq16_holds_and_catches_a_missing_denominator():
    assert I.check_eq_16(QUICK).verdict == "holds"
    bad = I.check_eq_16(PLANTED, eq11=eq11_without_denominator)
    assert bad.verdict == "fails" and bad.counterexample["source"].startswith("Eq. 11 vs Eq. 16")


def test_ratio_decoupling_is_conditional_with_an_exact_counterexample():
    out = I.check_ratio_decoupling(QUICK)
    assert out.verdict == "conditional" and "|v_i| <= ε" in out.condition
    recheck = out.counterexample["recheck"]
    assert recheck["all_u_below_eps"] and recheck["gap_equals_|v_i|-eps"]
    # independent re-check of the witness with the package's parts
    x = torch.tensor(out.counterexample["log_ratio"], dtype=torch.float64)
    p = fiberpo_parts(x, torch.zeros_like(x, dtype=torch.long), eps=out.counterexample["eps"], c_pos=1.0, c_neg=1.0)
    i = out.counterexample["token"]
    assert float(x[i] - x.mean() - p.log_gated_residual[i]) > 0
    assert I.check_ratio_decoupling(PLANTED, parts=parts_without_v_clip).verdict == "fails"


def test_g_regimes_holds_and_catches_a_flipped_base_weight():
    out = I.check_g_regimes(QUICK)
    assert out.verdict == "holds" and out.regimes.get("G-II", 0) > 0 and out.regimes.get("G-III", 0) > 0
    assert I.check_g_regimes(PLANTED, parts=parts_with_flipped_base).verdict == "fails"


def test_logclip_asymmetry_holds_and_catches_a_ratio_space_clip():
    assert I.check_logclip_asymmetry(QUICK).verdict == "holds"
    assert I.check_logclip_asymmetry(PLANTED, logclip=symmetric_ratio_clip).verdict == "fails"


def test_eq10_is_conditional_on_the_meaning_of_hard_clip_and_catches_a_wrong_slope():
    out = I.check_eq_10(QUICK)
    assert out.verdict == "conditional"
    cex = out.counterexample
    assert all(v == 0.0 for _, v in cex["g_agg at k"]) and cex["hard clip clip(x, ±C)"] == pytest.approx(0.2)
    assert all(v == pytest.approx(0.1, abs=1e-6) for _, v in cex["g_agg at x = C(1 + 1/(2k))"])
    assert I.check_eq_10(PLANTED, g_agg=g_agg_wrong_slope).verdict == "fails"


def test_eq77_identity_holds_and_needs_the_positive_part():
    assert I.check_eq_77_identity(QUICK).verdict == "holds"
    assert I.check_eq_77_identity(PLANTED, g_agg=g_agg_wrong_slope).verdict == "fails"
    assert I.check_eq_77_identity(PLANTED, budget_clip=budget_clip_without_positive_part).verdict == "fails"


def test_eq77_stricter_fails_with_exactly_rechecked_counterexamples():
    out = I.check_eq_77_stricter(QUICK)
    assert out.verdict == "fails"
    assert not out.counterexample["strict"]["exact"]["|D| < |A|"]
    rev = out.counterexample["reversed"]["exact"]
    assert not rev["|D| <= |A|"]
    assert abs(Fraction(rev["D"])) > abs(Fraction(rev["A"]))


def test_eq79_is_conditional_and_a_gate_without_rollback_would_make_it_hold():
    out = I.check_eq_79_approx(QUICK)
    assert out.verdict == "conditional"
    sups = out.counterexample["sup_delta"]
    assert sups[-1] > sups[0] / 10  # no decay from T = 10 to T = 10^4
    assert I.check_eq_79_approx(PLANTED, g_agg=hard_clip_gate).verdict == "holds"


def test_prop52_holds_and_catches_torch_sign():
    out = I.check_prop_5_2(QUICK)
    assert out.verdict == "holds"
    for regime in ("channel+ R", "channel+ Z", "|u|>ε", "|v|>ε", "r=1", "T=1", "T>=64"):
        assert out.regimes.get(regime, 0) > 0, regime
    bad = I.check_prop_5_2(PLANTED, gated_ratio=fiberpo_with_torch_sign)
    assert bad.verdict == "fails"
    assert 0.0 in bad.counterexample["log_ratio"]
