"""Tabular TV-TRPO / APC-Obj instances: hand-computed values, LP vs closed form, identities, bad input."""

import numpy as np
import pytest
import torch

from fiberpo_theory.core import objectives
from fiberpo_theory.theory import trust_region as tr


def small():
    """Two states: s0 with actions (n=1, Â=2), (n=1, Â=-2); s1 with (n=2, Â=1), (n=1, Â=-2)."""
    return tr.TabularInstance([0, 0, 5, 5], [1, 1, 2, 1], [2.0, -2.0, 1.0, -2.0])


def random_instances(count, seed=0, gamma=0.9, **kwargs):
    rng = np.random.default_rng(seed)
    return [tr.random_instance(rng, gamma=gamma, **kwargs) for _ in range(count)]


def centred(inst, rng, scale=0.2):
    raw = rng.standard_normal(inst.n_pairs)
    raw = raw - ((inst.counts * raw) @ inst.incidence / inst.state_count)[inst.state]
    return scale * raw / np.abs(raw).max() if np.any(raw) else raw


# --- instances -------------------------------------------------------------------------


def test_instance_derived_quantities_by_hand():
    inst = small()
    assert inst.state.tolist() == [0, 0, 1, 1]  # ids 0, 5 relabelled densely
    assert inst.state_count.tolist() == [2, 3] and inst.total == 5 and inst.n_states == 2
    assert inst.adv_norm == 2.0
    assert np.allclose(inst.state_weight, [2 / 5, 3 / 5])  # γ = 1: Γ(s)/Γ = T_s/T


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(state=[0, -1], counts=[1, 1], advantages=[1.0, -1.0]), "state"),
        (dict(state=[0.5, 0], counts=[1, 1], advantages=[1.0, -1.0]), "state"),
        (dict(state=[0, 0], counts=[0, 1], advantages=[1.0, -1.0]), "counts"),
        (dict(state=[0, 0], counts=[1], advantages=[1.0, -1.0]), "counts"),
        (dict(state=[0, 0], counts=[1, 1], advantages=[1.0, -0.5]), "advantages"),
        (dict(state=[0, 0], counts=[1, 1], advantages=[np.nan, 1.0]), "advantages"),
        (dict(state=[0, 0], counts=[1, 1], advantages=[1.0, -1.0], gamma=0.0), "gamma"),
        (dict(state=[0, 0], counts=[1, 1], advantages=[1.0, -1.0], gamma=1.5), "gamma"),
        (dict(state=[0, 0], counts=[1, 1], advantages=[1.0, -1.0], gamma=0.5, discount_mass=[-1.0]), "discount_mass"),
        (dict(state=[0, 0], counts=[1, 1], advantages=[1.0, -1.0], gamma=0.5, discount_mass=[1.0, 2.0]), "discount_mass"),
    ],
)
def test_instance_rejects_bad_input_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        tr.TabularInstance(**kwargs)


def test_center_advantages_satisfies_eq66_and_keeps_within_state_differences():
    state, counts, raw = [3, 3, 3, 7, 7], [2, 1, 4, 1, 5], [1.0, 5.0, -2.0, 0.25, 0.5]
    adv = tr.center_advantages(state, counts, raw)
    inst = tr.TabularInstance(state, counts, adv)
    assert np.allclose((inst.counts * adv) @ inst.incidence, 0, atol=1e-14)
    assert np.allclose(np.diff(adv[:3]), np.diff(raw[:3])) and np.isclose(adv[4] - adv[3], 0.25)


def test_random_instance_is_seeded_and_valid():
    a = tr.random_instance(np.random.default_rng(7), n_states=4, gamma=0.8)
    b = tr.random_instance(np.random.default_rng(7), n_states=4, gamma=0.8)
    c = tr.random_instance(np.random.default_rng(8), n_states=4, gamma=0.8)
    assert np.array_equal(a.advantages, b.advantages) and np.array_equal(a.discount_mass, b.discount_mass)
    assert not (a.n_pairs == c.n_pairs and np.array_equal(a.advantages, c.advantages))
    assert a.n_states == 4 and np.all(a.discount_mass <= a.state_count)  # Γ(s) = Σ γ^t <= T_s
    undiscounted = tr.random_instance(np.random.default_rng(7), gamma=1.0)
    assert np.array_equal(undiscounted.discount_mass, undiscounted.state_count)
    with pytest.raises(ValueError, match="rng"):
        tr.random_instance(7)
    with pytest.raises(ValueError, match="n_states"):
        tr.random_instance(np.random.default_rng(0), n_states=0)


# --- divergences, LP, maximizers ---------------------------------------------------------


def test_tv_residual_and_gain_by_hand():
    inst = small()
    dev = np.array([0.5, -0.5, 0.1, -0.2])
    assert np.allclose(tr.probability_residual(inst, dev), [0.0, 0.0])
    assert np.allclose(tr.tv_per_state(inst, dev), [0.5, (2 * 0.1 + 0.2) / 3])  # Eq. 39
    # (1/Γ) Σ Γ(s)/T_s Σ n Δ Â with Γ(s) = T_s: (1/5)[(0.5·2 + 0.5·2) + (2·0.1·1 + 0.2·2)]
    assert np.isclose(tr.linear_gain(inst, dev), (2.0 + 0.6) / 5)
    batch = np.stack([dev, 2 * dev])
    assert tr.tv_per_state(inst, batch).shape == (2, 2) and np.allclose(tr.max_tv(inst, batch), [0.5, 1.0])
    with pytest.raises(ValueError, match="deviation"):
        tr.tv_per_state(inst, dev[:3])


def test_state_lp_matches_closed_form_on_random_instances():
    for inst in random_instances(25, seed=1, max_actions=5, max_count=7):
        lp = tr.solve_state_lp(inst, 1.0)
        top, bottom = tr.advantage_range(inst)
        assert np.allclose(lp.value, inst.state_count * (top - bottom) / 2, rtol=1e-9, atol=1e-12)
        assert np.allclose(tr.probability_residual(inst, lp.deviation), 0, atol=1e-9)
        assert np.all(tr.tv_per_state(inst, lp.deviation) <= 1 + 1e-9)


def test_state_lp_floor_and_bad_radius():
    inst = tr.TabularInstance([0, 0], [3, 1], [1.0, -3.0])  # unit maximizer puts Δ = -2 on the rare action
    assert tr.solve_state_lp(inst, 1.0).deviation.min() < -1
    floored = tr.solve_state_lp(inst, 1.0, floor=-1.0)
    assert floored.deviation.min() >= -1 - 1e-12 and floored.value[0] < tr.solve_state_lp(inst, 1.0).value[0]
    with pytest.raises(ValueError, match="radius"):
        tr.solve_state_lp(inst, -1.0)


def test_unit_maximizer_is_optimal_unit_tv_and_least_norm_on_ties():
    for inst in random_instances(20, seed=2):
        unit = tr.unit_tv_maximizer(inst)
        values = tr.state_values(inst)
        gain = (inst.counts * inst.advantages * unit) @ inst.incidence
        assert np.allclose(gain, values, rtol=1e-9, atol=1e-12)
        tv = tr.tv_per_state(inst, unit)
        assert np.allclose(tv[values > 1e-12], 1.0)
        assert np.allclose(tr.probability_residual(inst, unit), 0, atol=1e-12)
    # Ties: two top actions with counts 1 and 3 share the mass T_s/2 = 3 as Δ ∝ n (least Σ Δ²).
    tied = tr.TabularInstance([0, 0, 0], [1, 3, 2], [1.0, 1.0, -2.0])
    unit = tr.unit_tv_maximizer(tied)
    assert np.allclose(unit, [3 * 1 / 10, 3 * 3 / 10, -3 / 2])
    other = np.array([3.0, 0.0, -1.5])  # the LP vertex with all the mass on the first tied action
    assert np.isclose((tied.counts * tied.advantages * other).sum(), (tied.counts * tied.advantages * unit).sum())
    assert (unit**2).sum() < (other**2).sum()
    flat = tr.TabularInstance([0, 0, 1], [2, 3, 4], [0.0, 0.0, 0.0])
    assert np.all(tr.unit_tv_maximizer(flat) == 0)


def test_t_star_and_radii():
    assert np.isclose(tr.t_star(0.5, 2.0, 0.5), 0.5 * 0.5 / (8 * 0.5 * 2.0))
    assert tr.t_star(0.0, 0.0, 0.9) == 0.0
    assert tr.delta_trpo(1.0) == 0.0 and np.isclose(tr.delta_trpo(0.5), 1 / 8)
    with pytest.raises(ValueError, match="adv_norm"):
        tr.t_star(1.0, -1.0, 0.5)
    with pytest.raises(ValueError, match="gamma"):
        tr.delta_trpo(0.0)
    for inst in random_instances(10, seed=3, gamma=0.7):
        m = tr.aggregate_value(inst, tr.state_values(inst))
        assert np.isclose(tr.delta_apc_obj(inst), tr.t_star(m, inst.adv_norm, inst.gamma))
        # Def. 3.2's printed radius is Eq. 72's times (1 - γ)/T.
        assert np.isclose(tr.delta_apc_obj_printed(inst), tr.delta_apc_obj(inst) * (1 - inst.gamma) / inst.total)


def test_reduced_objective_needs_gamma_below_one_and_matches_by_hand():
    with pytest.raises(ValueError, match="gamma"):
        tr.reduced_objective(small(), np.zeros(4))
    inst = small().with_gamma(0.5)
    dev = np.array([0.5, -0.5, 0.1, -0.2])
    penalty = 4 * 0.5 * 2.0 / 0.25
    assert np.isclose(tr.reduced_objective(inst, dev), tr.linear_gain(inst, dev) / 0.5 - penalty * 0.5**2)


def test_closed_form_maximizer_matches_numeric_tv_trpo_solve():
    for inst in random_instances(8, seed=4, gamma=0.6):
        closed = tr.tv_trpo_maximizer(inst)
        numeric, cap = tr.tv_trpo_maximizer_lp(inst)
        assert np.isclose(cap, tr.max_tv(inst, closed), rtol=1e-6)
        assert np.isclose(tr.reduced_objective(inst, numeric), tr.reduced_objective(inst, closed), rtol=1e-9)
        assert np.allclose(numeric, closed, atol=1e-6 * (1 + np.abs(closed).max()))


# --- APC-Obj -----------------------------------------------------------------------------


def test_gated_deviation_is_the_def_d8_clip_pair_by_pair():
    rng = np.random.default_rng(5)
    for inst in random_instances(15, seed=5):
        dev = centred(inst, rng, scale=0.6)
        for delta in (1e-3, float(tr.tv_per_state(inst, dev).mean()) + 1e-6, 0.5):
            gate = tr.apc_obj_gated_deviation(inst, dev, delta)
            assert np.allclose(gate, tr.retraction_clip(inst, dev, delta), atol=1e-15)


def test_apc_objective_matches_core_rgf_objective_at_gamma_one_and_the_surrogate():
    rng = np.random.default_rng(6)
    for inst in random_instances(10, seed=6, gamma=1.0):
        dev, delta = centred(inst, rng, 0.5), 0.05
        pairs = tr.token_pairs(inst)
        ratio = torch.from_numpy(1 + dev[pairs])
        gated = objectives.apc_obj_gated_ratio(ratio, torch.from_numpy(inst.state[pairs]), delta=delta)
        core = objectives.rgf_objective(gated, torch.from_numpy(inst.advantages[pairs]), objectives.aggregation_weights("apc_obj", ratio))
        assert np.isclose(tr.apc_obj_objective(inst, dev, delta), float(core), rtol=1e-12, atol=1e-15)
        assert np.isclose(tr.apc_obj_surrogate(inst, dev, delta), float(core), rtol=1e-12, atol=1e-15)


def test_apc_batches_match_single_rows_and_reject_bad_input():
    inst = random_instances(1, seed=7)[0]
    rng = np.random.default_rng(7)
    batch = np.stack([centred(inst, rng, s) for s in (0.1, 0.5, 0.9)])
    together = tr.apc_obj_surrogate(inst, batch, 0.05)
    assert np.allclose(together, [tr.apc_obj_surrogate(inst, row, 0.05) for row in batch])
    with pytest.raises(ValueError, match="deviation"):
        tr.apc_obj_objective(inst, -1.5 * np.ones(inst.n_pairs), 0.1)
    with pytest.raises(ValueError, match="delta"):
        tr.apc_obj_objective(inst, batch[0], 0.0)


def test_retraction_restores_budget_and_is_identity_inside():
    rng = np.random.default_rng(8)
    for inst in random_instances(15, seed=8):
        u = centred(inst, rng, 0.8)
        delta = 0.5 * float(tr.max_tv(inst, u)) + 1e-9
        image = tr.retraction(inst, u, delta)
        assert np.allclose(tr.probability_residual(inst, image), 0, atol=1e-12)
        assert np.all(tr.tv_per_state(inst, image) <= delta + 1e-12)
        inside = tr.retraction(inst, u, float(tr.max_tv(inst, u)) + 1.0)
        assert np.allclose(inside, u, atol=1e-14)
    with pytest.raises(ValueError, match="u must satisfy"):
        tr.retraction_clip(small(), np.array([0.5, 0.0, 0.0, 0.0]), 0.1)


def test_apc_obj_maximizer_defaults_to_eq72_delta():
    inst = random_instances(1, seed=9, gamma=0.9)[0]
    assert np.allclose(tr.apc_obj_maximizer(inst), tr.tv_trpo_maximizer(inst))
    assert np.allclose(tr.apc_obj_maximizer(inst, 0.01), 0.01 * tr.unit_tv_maximizer(inst))
