"""Each claim check of checks/fiberpo_properties.py and checks/population.py, on the package and on planted defects.

A check that cannot fail is a defect, so every check is shown to return
``fails`` on an implementation with a planted bug, with a counterexample that
re-checks.
"""

import contextlib
from unittest import mock

import pytest
import torch

import fiberpo_theory.checks.fiberpo_properties as props
import fiberpo_theory.checks.population as population
from fiberpo_theory.core import gates, objectives
from fiberpo_theory.theory.claims import Profile
from fiberpo_theory.core.segments import segments_for

PROFILE = Profile("quick", max_examples=80, seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors on a shared CPU: one intra-op thread is far faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# Planted defects (flat layout, same signatures as the package's functions)
# ---------------------------------------------------------------------------


def fiberpo_torch_sign(log_ratio, traj_id, *, eps, c_pos, c_neg, k=None):
    """A hand port of Eq. 7-16 with torch.sign labels and relu channels."""
    traj = segments_for("traj_id", traj_id, log_ratio)
    length = traj.gather(traj.count.to(log_ratio.dtype))
    k = length if k is None else k
    s_pos = traj.gather(traj.mean(torch.relu(log_ratio)))
    s_neg = traj.gather(traj.mean(torch.relu(-log_ratio)))
    sign = torch.sign(log_ratio)
    same, opposite = torch.where(sign > 0, s_pos, s_neg), torch.where(sign > 0, s_neg, s_pos)
    log_residual = gates.symmetric_clip(sign * (sign * log_ratio - same), eps) - gates.symmetric_clip(-sign * opposite, eps)
    return torch.exp(gates.g_agg(s_pos, c_pos, k) - gates.g_agg(s_neg, c_neg, k) + log_residual)


def _patched(replacements, fn):
    """``fn`` with ``objectives``' torch formulas replaced; the compiled loops, which do not call them, are off."""
    from fiberpo_theory.core import native

    def wrapped(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for name, replacement in replacements.items():
                stack.enter_context(mock.patch.object(objectives, name, replacement))
            stack.enter_context(mock.patch.object(native, "library", lambda: None))
            return fn(*args, **kwargs)

    return wrapped


# FiberPO with the base weight's sign flipped: log w = −g(log s⁺) + g(log s⁻), value and slope alike (the fused
# gate takes the base weight's derivative from g_agg_slope)
_FLIPPED = {"g_agg": lambda x, c, k: -gates.g_agg(x, c, k), "g_agg_slope": lambda x, c, k: -gates.g_agg_slope(x, c, k)}
flipped_base = _patched(_FLIPPED, objectives.fiberpo_gated_ratio)
flipped_base_domain = _patched(_FLIPPED, objectives.fiberpo_domain_gated_ratio)


def batch_coupled(log_ratio, traj_id, **hyper):
    """FiberPO times a factor that depends on the batch mean: couples trajectories."""
    return objectives.fiberpo_gated_ratio(log_ratio, traj_id, **hyper) * torch.exp(1e-3 * log_ratio.mean())


def sum_coupled(log_ratio, traj_id, **hyper):
    """FiberPO times exp(sin(Σ_τ x − mean_τ x)): bounded values, an O(1) coupling in every regime."""
    traj = segments_for("traj_id", traj_id, log_ratio)
    extra = traj.gather(traj.sum(log_ratio) - traj.mean(log_ratio))
    return objectives.fiberpo_gated_ratio(log_ratio, traj_id, **hyper) * torch.exp(torch.sin(extra))


def swapped_channels(log_ratio, traj_id, **hyper):
    parts = objectives.fiberpo_parts(log_ratio, traj_id, **hyper)
    return parts._replace(log_s_pos=parts.log_s_neg, log_s_neg=parts.log_s_pos)


def gspo_length_scaled_clip(log_ratio, traj_id, *, eps, advantages=None):
    """GSPO whose clip width is ε·T_τ (a sum-budget convention applied to a mean): far too loose."""
    traj = segments_for("traj_id", traj_id, log_ratio)
    s = objectives.gspo_gated_ratio(log_ratio, traj_id, eps=1e30)
    width = eps * traj.gather(traj.count.to(log_ratio.dtype)) if eps < 1e29 else eps
    return torch.clamp(s, min=1 - width, max=1 + width) if isinstance(width, float) else torch.minimum(torch.maximum(s, 1 - width), 1 + width)


# ---------------------------------------------------------------------------
# thm-4.5
# ---------------------------------------------------------------------------


def test_thm_4_5_holds_for_the_package():
    outcome = props.check_thm_4_5(PROFILE)
    assert outcome.verdict == "holds", outcome.details
    assert outcome.examples >= 80
    assert {"T=1", "T>=64", "several groups"} <= set(outcome.regimes)


def test_thm_4_5_catches_torch_sign():
    outcome = props.check_thm_4_5(PROFILE, fiberpo=fiberpo_torch_sign)
    assert outcome.verdict == "fails"
    witness = outcome.counterexample
    assert witness["objective"] == "fiberpo"
    assert witness["value"] == witness["linear_value"]  # the value agrees; the gradient does not
    assert witness["recheck"]["max_gap_to_closed_form"] > 1e-3
    # relu'(0) = 0 and torch.sign(0) = 0 cut every path: the surrogate's gradient at θ = θold is exactly 0
    assert all(g == 0.0 for row in witness["gradient"] for g in row)


def test_thm_4_5_catches_flipped_base_weight_in_fiberpo_domain():
    outcome = props.check_thm_4_5(PROFILE, fiberpo_domain=flipped_base_domain)
    assert outcome.verdict == "fails"
    assert outcome.counterexample["objective"] == "fiberpo_domain"


# ---------------------------------------------------------------------------
# prop-5.3 / prop-5.4
# ---------------------------------------------------------------------------


def test_prop_5_3_holds_for_the_package_across_regimes():
    outcome = props.check_prop_5_3(PROFILE)
    assert outcome.verdict == "holds", outcome.details
    assert {"channel+ R", "channel- Z", "T>=64"} <= set(outcome.regimes)


def test_prop_5_3_catches_cross_trajectory_coupling():
    outcome = props.check_prop_5_3(PROFILE, fiberpo=batch_coupled)
    assert outcome.verdict == "fails"
    assert outcome.counterexample["recheck"]["finite_difference_cross_max"] > 0
    assert len(set(outcome.counterexample["traj_id"])) == 2  # shrunk to the smallest coupled batch


def test_prop_5_4_holds_for_the_package():
    outcome = props.check_prop_5_4(PROFILE)
    assert outcome.verdict == "holds", outcome.details
    assert {"float32", "float64", "k=given", "T>=64"} <= set(outcome.regimes)


@pytest.mark.parametrize("defect", [fiberpo_torch_sign, flipped_base], ids=["torch.sign", "flipped-base"])
def test_prop_5_4_catches_defects(defect):
    outcome = props.check_prop_5_4(PROFILE, fiberpo=defect)
    assert outcome.verdict == "fails"
    assert outcome.counterexample["recheck"]["float64_max_abs_J_minus_I"] > 0.1


def test_prop_5_4_catches_a_wrong_eq20_jacobian():
    def jacobian_with_dropped_diagonal(x, traj_id, **hyper):
        jac = objectives.fiberpo_jacobian(x, traj_id, **hyper)
        return jac - torch.diag(torch.diagonal(jac)) * 0.5

    outcome = props.check_prop_5_4(PROFILE, jacobian=jacobian_with_dropped_diagonal)
    assert outcome.verdict == "fails"
    assert outcome.counterexample["source"] == "Eq. 20 (jacobian)"


# ---------------------------------------------------------------------------
# prop-5.5
# ---------------------------------------------------------------------------


def test_prop_5_5_is_conditional_rollback_coupling_is_order_one():
    outcome = props.check_prop_5_5(PROFILE)
    assert outcome.verdict == "conditional", outcome.details
    assert "pass-through or zeroed" in outcome.condition
    witness = outcome.counterexample
    assert witness["T_times_coupling"] > 1  # beyond what the pass regime allows
    assert witness["recheck"]["T_times_coupling"] > 1  # finite differences agree


def test_prop_5_5_fails_when_every_regime_couples_at_order_one():
    outcome = props.check_prop_5_5(PROFILE, fiberpo=sum_coupled)
    assert outcome.verdict == "fails"
    assert "slope -1.00" not in outcome.details
    assert outcome.counterexample["recheck"]["reproduced"]


# ---------------------------------------------------------------------------
# kl-bias / claim-3.5
# ---------------------------------------------------------------------------


def test_kl_bias_is_conditional_on_fixed_length():
    outcome = population.check_kl_bias(PROFILE)
    assert outcome.verdict == "conditional", outcome.details
    witness = outcome.counterexample
    assert witness["expected_bias"] < 0
    assert float(witness["recheck"]["expected_bias_mp40"]) < 0
    assert len(set(witness["trajectory_lengths"])) > 1  # only variable lengths break it
    assert float(witness["recheck"]["token_pooled_kl_mp40"]) >= 0


def test_kl_bias_counterexample_by_hand():
    """The shrunk counterexample's shape, recomputed independently: terminate-or-continue at one state."""
    episode = dict(n_states=1, n_actions=2, horizon=2, next_state=[0, -1], logits_old=[0.0, 0.0], logits_new=[0.0, 1.0])
    bias, pooled, _ = population.expected_kl_bias(episode, objectives.fiberpo_parts)
    p = torch.softmax(torch.tensor([0.0, 1.0], dtype=torch.float64), 0)
    log_r = torch.log(p / 0.5)
    by_hand = 0.5 * -log_r[1] + 0.25 * -(log_r[0] + log_r[0]) / 2 + 0.25 * -(log_r[0] + log_r[1]) / 2
    assert bias == pytest.approx(float(by_hand), abs=1e-15)
    assert bias < 0 < pooled


def test_kl_bias_catches_swapped_channels():
    outcome = population.check_kl_bias(PROFILE, parts=swapped_channels)
    assert outcome.verdict == "fails"
    assert outcome.counterexample["part"] == "identity"


def test_claim_3_5_holds_and_remark_arithmetic():
    outcome = population.check_claim_3_5(PROFILE)
    assert outcome.verdict == "holds", outcome.details
    assert {"fixed length", "variable length"} <= set(outcome.regimes)
    assert "0.014142" in outcome.details
    assert population._remark_3_6_arithmetic()["agrees_to_quoted_digits"]


def test_claim_3_5_catches_a_too_loose_gspo_clip():
    # the planted clip is only T_τ-fold too wide (T_τ <= 4 here), so this search gets the quick budget
    outcome = population.check_claim_3_5(Profile.named("quick"), gspo=gspo_length_scaled_clip)
    assert outcome.verdict == "fails"
    witness = outcome.counterexample
    assert witness["avg_tv_tj"] > witness["sqrt_eps_over_2"]
    assert float(witness["recheck"]["avg_tv_mp40"]) > witness["sqrt_eps_over_2"]
    assert witness["recheck"]["implementation_clip_inactive"]
    assert not witness["recheck"]["inside_1_pm_eps"]  # the recheck sees why: the clip range is wrong


def test_prop_5_3_catches_an_eq20_jacobian_that_leaks_across_trajectories():
    def leaky_jacobian(x, traj_id, **hyper):
        return objectives.fiberpo_jacobian(x, traj_id, **hyper) + 1e-3

    outcome = props.check_prop_5_3(PROFILE, jacobian=leaky_jacobian)
    assert outcome.verdict == "fails"
    assert outcome.counterexample["source"] == "Eq. 20 (jacobian)"
    assert outcome.counterexample["recheck"]["eq20_cross_max"] >= 1e-3
