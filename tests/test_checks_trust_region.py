"""Trust-region claim checks: they run, their counterexamples re-check, and planted defects make them fail."""

import numpy as np
import pytest
import torch

import fiberpo_theory.checks.trust_region as checks
from fiberpo_theory.theory import claims
from fiberpo_theory.theory import trust_region as tr
from fiberpo_theory.theory.claims import METHODS, Profile
from fiberpo_theory.core.gates import budget_clip
from fiberpo_theory.core.segments import segments_for

PROFILE = Profile("test", max_examples=25, seed=0)
IDS = ("thm-2.1", "lemma-d.2", "eq-70", "thm-d.3", "lemma-d.6", "eq-61-63", "lemma-d.9", "thm-d.10", "lemma-d.11", "lemma-d.12")


def instance(data):
    return tr.TabularInstance(data["state"], data["counts"], data["advantages"], data["gamma"], data["discount_mass"])


# --- planted defects ---------------------------------------------------------------------


def flipped_gate(ratio, state_id, *, delta):
    """APC-Obj gate whose budget has the wrong sign (a planted defect)."""
    state = segments_for("state_id", state_id, ratio)
    deviation = ratio - 1
    consumed = state.gather(state.sum(deviation.abs()))
    bound = state.gather(state.count.to(ratio.dtype)) * delta - (consumed - deviation.abs())
    return 1 + budget_clip(deviation, -bound)


def flipped_retraction(inst, u, delta):
    """Def. D.8 with T_s(D̂TV - δ) in place of T_s(δ - D̂TV) (a planted defect)."""
    budget = (inst.state_count * (tr.tv_per_state(inst, u) - delta))[inst.state] + np.abs(u)
    clipped = budget_clip(torch.from_numpy(np.asarray(u, dtype=float)), torch.from_numpy(budget)).numpy()
    return tr.centred_projection(inst, clipped)


def surrogate_with(gate):
    return lambda inst, deviation, delta: tr.apc_obj_surrogate(inst, deviation, delta, gate=gate)


PLANTED = {
    "thm-2.1": (checks.check_thm_2_1, dict(delta_trpo=lambda g: (1 - g) / (4 * g))),
    "lemma-d.2": (checks.check_lemma_d2, dict(state_values=lambda inst: tr.solve_state_lp(inst, 2.0).value)),  # TV with a factor 1/2
    "eq-70": (checks.check_eq_70, dict(solve=lambda inst, radius=1.0, **kw: tr.solve_state_lp(inst, np.sqrt(radius), **kw))),
    "thm-d.3": (checks.check_thm_d3, dict(maximizer=lambda inst: 2 * tr.tv_trpo_maximizer(inst))),  # t* with 4γ for 8γ
    "lemma-d.6": (checks.check_lemma_d6, dict(gate=flipped_gate)),
    "eq-61-63": (checks.check_eq_61_63, dict(gate=flipped_gate)),
    "lemma-d.9": (checks.check_lemma_d9, dict(retraction=flipped_retraction)),
    "thm-d.10": (checks.check_thm_d10, dict(surrogate=surrogate_with(flipped_gate))),
    "lemma-d.11": (checks.check_lemma_d11, dict(delta_apc=lambda inst: 2 * tr.delta_apc_obj(inst))),
    "lemma-d.12": (checks.check_lemma_d12, dict(trpo_maximizer=lambda inst: 3 * tr.tv_trpo_maximizer(inst))),
}


@pytest.mark.parametrize("claim_id", IDS)
def test_planted_defect_is_caught(claim_id):
    check, defect = PLANTED[claim_id]
    outcome = check(PROFILE, **defect)
    assert outcome.verdict == "fails", outcome.details
    assert outcome.counterexample


def test_thm_d10_catches_a_wrong_radius():
    outcome = checks.check_thm_d10(PROFILE, delta_apc=lambda inst: 2 * tr.delta_apc_obj(inst))
    assert outcome.verdict == "fails"
    witness = outcome.counterexample
    inst = instance(witness["instance"])
    better = np.array(witness["better_for_apc"])
    delta = 2 * tr.delta_apc_obj(inst)
    assert tr.apc_obj_surrogate(inst, better, delta) > tr.apc_obj_surrogate(inst, tr.tv_trpo_maximizer(inst), delta)


# --- the real implementation ---------------------------------------------------------------


def test_registry_has_the_trust_region_claims():
    for claim_id in IDS:
        entry = claims._REGISTRY[claim_id]
        assert entry.method in METHODS and entry.statement and entry.paper_ref


@pytest.mark.parametrize("claim_id", IDS)
def test_check_runs_and_reports_what_it_searched(claim_id):
    report = claims.run_claim(claims._REGISTRY[claim_id], PROFILE)
    assert report.verdict in ("holds", "fails", "conditional"), report.details
    assert report.examples >= PROFILE.max_examples
    assert report.regimes
    if report.verdict != "holds":
        assert report.counterexample
    if report.verdict == "conditional":
        assert report.condition


def test_eq70_counterexample_rechecks():
    outcome = checks.check_eq_70(PROFILE)
    assert outcome.verdict == "conditional", f"the relaxed-form witness (published verdict conditional) is gone: {outcome.verdict}, {outcome.details}"
    w = outcome.counterexample
    inst = instance(w["instance"])
    at = inst.state == w["state"]
    other = np.array(w["maximizer_with_smaller_tv"])
    value = float((inst.counts[at] * inst.advantages[at] * other).sum())
    optimum = tr.solve_state_lp(inst, w["c"]).value[w["state"]]
    assert np.isclose(value, optimum, atol=1e-12)
    assert (inst.counts[at] * np.abs(other)).sum() / inst.state_count[w["state"]] < w["c"]


def test_thm_d3_counterexample_rechecks():
    outcome = checks.check_thm_d3(PROFILE)
    assert outcome.verdict == "conditional", f"the equalization witness (published verdict conditional) is gone: {outcome.verdict}, {outcome.details}"
    w = outcome.counterexample
    inst = instance(w["instance"])
    least = np.array(w["least_norm_maximizer"])
    assert np.isclose(tr.reduced_objective(inst, least), tr.reduced_objective(inst, tr.tv_trpo_maximizer(inst)))
    assert tr.tv_per_state(inst, least)[w["state"]] == 0 < w["t_star"]
    if w["other_maximizer_at_tv_t_star"] is not None:
        other = np.array(w["other_maximizer_at_tv_t_star"])
        assert np.isclose(tr.reduced_objective(inst, other), tr.reduced_objective(inst, least), rtol=1e-12)
        assert np.isclose(tr.tv_per_state(inst, other)[w["state"]], w["t_star"])
        assert (other**2).sum() > (least**2).sum()


def test_thm_d10_witnesses_recheck():
    outcome = checks.check_thm_d10(PROFILE)
    assert outcome.verdict == "conditional", f"the witnesses outside the paper's model (published verdict conditional) are gone: {outcome.verdict}, {outcome.details}"
    for name, w in outcome.counterexample.items():
        inst = instance(w["instance"])
        if name == "positivity":
            first, second = np.array(w["trpo_best_valid"]), np.array(w["apc_candidate_valid"])
            delta = tr.delta_apc_obj(inst)
            assert np.any(np.array(w["unconstrained_maximizer_t_star_dhat"]) <= -1)
            assert np.all(first > -1) and np.all(second > -1)
        else:
            first, second = np.array(w["trpo_maximizer"]), np.array(w["apc_maximizer_with_printed_delta"])
            delta = tr.delta_apc_obj_printed(inst)
            assert np.isclose(delta, w["delta_def32_printed"])
        # TV-TRPO ranks the pair one way, APC-Obj the other: their maximizers cannot coincide.
        assert tr.reduced_objective(inst, first) > tr.reduced_objective(inst, second)
        assert tr.apc_obj_surrogate(inst, second, delta) > tr.apc_obj_surrogate(inst, first, delta)
