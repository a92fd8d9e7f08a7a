"""The FGH claim checks: what they report on the package, and that they catch planted defects."""

from __future__ import annotations

import math

import pytest
import torch

from fiberpo_theory.checks import fgh as cf
from fiberpo_theory.hierarchy import fgh
from fiberpo_theory import hierarchy as hier
from fiberpo_theory.theory.claims import Profile, registry

PROFILE = Profile(name="test", max_examples=60, seed=0)


def test_all_five_claims_are_registered():
    ids = {"reflecting", "remark-6.3", "eq-31-fgh", "fgh-first-order", "eq-e5-fbg"}
    assert ids <= set(registry())


# ---------------------------------------------------------------------------
# On the package
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("check", [cf.check_reflecting, cf.check_remark_6_3, cf.check_eq_31_fgh])
def test_checks_hold_on_the_package(check):
    outcome = check(PROFILE)
    assert outcome.verdict == "holds", outcome.details
    assert outcome.examples >= PROFILE.max_examples
    assert outcome.regimes


def test_eq31_search_reaches_every_regime_and_level():
    outcome = cf.check_eq_31_fgh(Profile(name="test", max_examples=120, seed=1))
    reached = set(outcome.regimes)
    for level in ("domain", "trajectory"):
        assert {f"{level}:P", f"{level}:R", f"{level}:Z"} <= reached, sorted(reached)
    assert {"group:P", "token:P", "token:clipped"} <= reached


def test_first_order_is_conditional_on_context_free_gates():
    outcome = cf.check_fgh_first_order(PROFILE)
    assert outcome.verdict == "conditional", outcome.details
    witness = outcome.counterexample
    assert witness["gate_family"] == "context"
    assert witness["value_minus_one_max"] == 0.0
    # autograd and finite differences agree that the Jacobian is not the identity
    assert witness["jacobian_minus_identity_max"] > 0.1
    assert witness["recheck"]["finite_difference_max_deviation"] == pytest.approx(witness["jacobian_minus_identity_max"], rel=1e-6)
    assert {"gates:fiberpo", "gates:smooth", "gates:context-vanishing"} <= set(outcome.regimes)


def test_e54_verification_line_needs_the_factor_t():
    outcome = cf.check_eq_e5_fbg(PROFILE)
    assert outcome.verdict == "conditional", outcome.details
    w = outcome.counterexample
    ratios = [r for r in w["recheck"]["ratio_G_to_eq79"] if r is not None]
    lengths = [t for t, r in zip(w["T"], w["recheck"]["ratio_G_to_eq79"]) if r is not None]
    assert ratios and all(math.isclose(r * t, 1.0, rel_tol=1e-12) for r, t in zip(ratios, lengths))
    assert any(t > 1 for t in lengths)


def test_python_reference_matches_the_package():
    x = [0.3, -0.2, 0.0, 1.5, -2.0, 0.01]
    levels = [[4, 4, 4, 9, 9, 9], [1, 1, 2, 3, 3, 7], [10, 11, 12, 13, 13, 14]]
    got = fgh.fiberpo_hierarchy_gated_ratio(
        torch.tensor(x, dtype=torch.float64), [torch.tensor(i) for i in levels], eps=0.2, c_pos=(0.1, 0.3, 0.05), c_neg=(0.2, 0.04, 0.1)
    )
    ref = cf.python_fiberpo_chain(x, levels, 0.2, (0.1, 0.3, 0.05), (0.2, 0.04, 0.1))
    assert got.tolist() == pytest.approx(ref, rel=1e-12)


# ---------------------------------------------------------------------------
# Planted defects
# ---------------------------------------------------------------------------


def _leaky_kernels(h):
    kernels = list(cf._package_kernels(h))
    kernels[0] = kernels[0] * (1 - 1e-6)
    return tuple(kernels)


def _uniform_kernels(h):
    return tuple(hier.uniform_kernel(h, v) for v in range(h.total)) + (None,)


@pytest.mark.parametrize("kernels_for", [_leaky_kernels, _uniform_kernels])
def test_reflecting_catches_wrong_kernels(kernels_for):
    outcome = cf.check_reflecting(PROFILE, kernels_for=kernels_for)
    assert outcome.verdict == "fails", outcome.details
    assert "kernel_on_fibre" in outcome.counterexample


def test_reflecting_catches_a_leaky_kernel_with_exact_recheck():
    outcome = cf.check_reflecting(PROFILE, kernels_for=_leaky_kernels)
    assert outcome.counterexample["recheck"]["fibre_sum_is_one"] is False


def _flipped_base_operator(sigma, h, kernels, gates):
    flipped = (lambda r, ctx: -gates[0](r, ctx),) + tuple(gates[1:])
    return fgh.fgh_operator(sigma, h, kernels, flipped)


def test_remark_6_3_catches_a_sign_flip():
    outcome = cf.check_remark_6_3(PROFILE, operator=_flipped_base_operator)
    assert outcome.verdict == "fails"
    w = outcome.counterexample
    assert max(abs(a - b) for ra, rb in zip(w["fgh"], w["eq4_dense"]) for a, b in zip(ra, rb)) > 1e-9


def _uniform_kernel_ratio(x, levels, *, eps, c_pos, c_neg):
    """FiberPO-Domain with the domain→group kernel uniform instead of trajectory-count weighted."""
    h = hier.from_ids(levels, like=x)
    inst = fgh.fiberpo_fgh(h, trajectory=h.total - 1, eps=eps, c_pos=c_pos, c_neg=c_neg)
    parts = fgh.fgh_operator(fgh.decompose(x, inst.length), h, _uniform_kernels(h), inst.fgh.gates)
    return fgh.recover(parts.output, inst.length)


def test_eq31_catches_uniform_domain_kernel_and_rechecks_with_python():
    outcome = cf.check_eq_31_fgh(Profile(name="test", max_examples=150, seed=0), gated_ratio=_uniform_kernel_ratio)
    assert outcome.verdict == "fails", outcome.details
    w = outcome.counterexample
    assert w["recheck"]["closed_form_agrees_with_reference"] and not w["recheck"]["fgh_agrees_with_reference"]


def _relu_decompose(log_ratio, length):
    channels = torch.stack([torch.relu(log_ratio), torch.relu(-log_ratio)], dim=1)
    return channels / length.unsqueeze(1)


def test_first_order_catches_relu_decomposition():
    outcome = cf.check_fgh_first_order(PROFILE, decompose=_relu_decompose)
    assert outcome.verdict == "fails"
    assert outcome.counterexample["gate_family"] != "context"
    assert outcome.counterexample["recheck"]["finite_difference_max_deviation"] < 1e-6  # the function itself is fine...
    assert outcome.counterexample["jacobian_minus_identity_max"] > 0.5  # ...its autograd derivative is not


def _recover_without_length(sigma, length):
    return torch.exp(sigma[:, 0] - sigma[:, 1])


def test_e54_catches_recovery_without_t():
    outcome = cf.check_eq_e5_fbg(PROFILE, recover=_recover_without_length)
    assert outcome.verdict == "fails"
    w = outcome.counterexample
    assert w["recheck"]["python_reference_eq80"] == pytest.approx(w["closed_form"], rel=1e-9)
    assert w["fgh"] != pytest.approx(w["closed_form"], rel=1e-9)
