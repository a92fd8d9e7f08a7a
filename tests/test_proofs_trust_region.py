"""Trust-region derivations (proofs/tr_*.py): each verifies, and its results agree with the numeric code."""

import importlib
import pkgutil

import numpy as np
import pytest
import sympy as sp

from fiberpo_theory import proofs
from fiberpo_theory.theory import trust_region as tr
from fiberpo_theory.symbolic import Derivation, lambdify
from fiberpo_theory.proofs import (
    _tr_common,
    tr_bound_m,
    tr_clip_bound,
    tr_lemma_d11,
    tr_maximizer,
    tr_objective_equivalence,
    tr_reduced_objective,
    tr_regimes,
    tr_state_lp,
    tr_vanishing,
)

MODULES = sorted(info.name for info in pkgutil.iter_modules(proofs.__path__) if info.name.startswith("tr_"))


@pytest.mark.parametrize("name", MODULES)
def test_every_trust_region_derivation_verifies(name):
    derivation = importlib.import_module(f"fiberpo_theory.proofs.{name}").derive()
    assert isinstance(derivation, Derivation)
    assert derivation.verified is True, derivation.id
    assert derivation.steps and derivation.statement and derivation.paper_ref


def test_verification_is_computed_not_asserted():
    # The helpers the derivations rely on reject a wrong identity and an undecidable sign.
    assert _tr_common.same(_tr_common.t_star_expr(), 2 * _tr_common.t_star_expr()) is False
    x = sp.Symbol("x", real=True)
    assert _tr_common.nonnegative(x) is False and _tr_common.nonnegative(x**2 + 1) is True


def random_instances(count, seed, gamma=0.8):
    rng = np.random.default_rng(seed)
    return [tr.random_instance(rng, gamma=gamma) for _ in range(count)]


def test_eq76_matches_delta_trpo():
    d = tr_vanishing.derive()
    f = lambdify(d.results["gamma"], d.results["delta_trpo"])
    for g in np.random.default_rng(0).uniform(1e-3, 1.0, 50):
        assert np.isclose(f(g), tr.delta_trpo(g), rtol=1e-14)


def test_thm_d3_quadratic_matches_reduced_objective_along_the_ray():
    d = tr_maximizer.derive()
    r = d.results
    j_of_t = lambdify((r["t"], r["M"], r["A"], r["gamma"]), r["j_of_t"])
    t_star = lambdify((r["M"], r["A"], r["gamma"]), r["t_star"])
    rng = np.random.default_rng(1)
    for inst in random_instances(10, 1):
        m = tr.aggregate_value(inst, tr.state_values(inst))
        unit = tr.unit_tv_maximizer(inst)
        for t in rng.uniform(0, 0.1, 3):
            assert np.isclose(j_of_t(t, m, inst.adv_norm, inst.gamma), tr.reduced_objective(inst, t * unit), rtol=1e-9, atol=1e-14)
        assert np.isclose(t_star(m, inst.adv_norm, inst.gamma), tr.t_star(m, inst.adv_norm, inst.gamma))


def test_eq68_difference_is_the_constant_numerically():
    d = tr_reduced_objective.derive()
    sym = d.results["symbols"]
    args = (*sym["n"], *sym["A"], *sym["Delta"], *sym["Gamma"], sym["J_old"], sym["gamma"], sym["adv_norm"])
    full, reduced = lambdify(args, d.results["full"]), lambdify(args, d.results["reduced"])
    rng = np.random.default_rng(2)
    counts = np.array([2, 3, 1, 4])
    state = np.array([0, 0, 1, 1])
    adv = tr.center_advantages(state, counts, rng.standard_normal(4))
    mass = np.array([1.5, 0.7])
    inst = tr.TabularInstance(state, counts, adv, 0.9, mass)
    dev = rng.uniform(-0.3, 0.3, 4)
    values = (*counts, *adv, *dev, *mass, 0.25, 0.9, inst.adv_norm)
    assert np.isclose(reduced(*values), tr.reduced_objective(inst, dev), rtol=1e-12)
    assert np.isclose(full(*values) - reduced(*values), 0.25, rtol=1e-9)  # J(θ_old) when Eq. 66 holds


def test_eq69_closed_form_and_lemma_d2_bound_match_the_lp():
    d = tr_state_lp.derive()
    sym = d.results["symbols"]
    value = lambdify((sym["T_s"], sym["A_max"], sym["A_min"]), d.results["state_value"])
    top = lambdify((sym["T_s"], sym["n_top"]), d.results["top"])
    bound = tr_bound_m.derive()
    per_state = lambdify((sym["A_max"], sym["A_min"]), bound.results["per_state"])
    for inst in random_instances(15, 3):
        lp = tr.solve_state_lp(inst)
        for s in range(inst.n_states):
            at = inst.state == s
            a, n = inst.advantages[at], inst.counts[at]
            assert np.isclose(value(inst.state_count[s], a.max(), a.min()), lp.value[s], rtol=1e-9, atol=1e-12)
            assert per_state(a.max(), a.min()) <= inst.adv_norm + 1e-12
            if at.sum() >= 2 and np.sum(a == a.max()) == 1 and a.max() > a.min():
                k = np.argmax(a)
                assert np.isclose(top(inst.state_count[s], n[k]), lp.deviation[at][k], rtol=1e-9)


def test_lemma_d11_expressions_match_the_radii():
    d = tr_lemma_d11.derive()
    sym = d.results["symbols"]
    apc = lambdify((sym["M"], sym["adv_norm"], sym["gamma"]), d.results["delta_apc"])
    printed = lambdify((sym["M"], sym["adv_norm"], sym["gamma"], sym["T"]), d.results["delta_printed"])
    gap = lambdify((sym["M"], sym["adv_norm"], sym["gamma"]), d.results["difference"])
    for inst in random_instances(10, 4, gamma=0.6):
        m = tr.aggregate_value(inst, tr.state_values(inst))
        assert np.isclose(apc(m, inst.adv_norm, inst.gamma), tr.delta_apc_obj(inst))
        assert np.isclose(printed(m, inst.adv_norm, inst.gamma, inst.total), tr.delta_apc_obj_printed(inst))
        assert np.isclose(gap(m, inst.adv_norm, inst.gamma), tr.delta_trpo(inst.gamma) - tr.delta_apc_obj(inst))


def test_clip_bound_identity_gives_the_gate_output():
    d = tr_clip_bound.derive()
    sym = d.results["symbols"]
    args = (*sym["n"], *sym["Delta"], sym["delta"])
    bound = lambdify(args, d.results["token_bound"])
    rng = np.random.default_rng(5)
    for _ in range(20):
        counts = rng.integers(1, 5, 3)
        inst = tr.TabularInstance([0, 0, 0], counts, [0.0, 0.0, 0.0])
        raw = rng.uniform(-0.5, 0.5, 3)
        dev = raw - (counts * raw).sum() / counts.sum()
        delta = rng.uniform(0.01, 0.3)
        b = max(bound(*counts, *dev, delta), 0.0)
        expected = np.clip(dev[0], -b, b)
        assert np.isclose(tr.apc_obj_gated_deviation(inst, dev, delta)[0], expected, atol=1e-15)


def test_regime_edges_predict_the_gate():
    d = tr_regimes.derive()
    sym = d.results["symbols"]
    zero_edge = lambdify((sym["delta"], sym["size"], sym["T_s"]), d.results["zero_edge"])
    rng = np.random.default_rng(6)
    for _ in range(30):
        counts = rng.integers(1, 4, 3)
        inst = tr.TabularInstance([0, 0, 0], counts, [0.0, 0.0, 0.0])
        dev = rng.uniform(-0.6, 0.6, 3)
        delta = rng.uniform(0.01, 0.4)
        tv = tr.tv_per_state(inst, dev)[0]
        out = tr.apc_obj_gated_deviation(inst, dev, delta)
        for a in range(3):
            if tv <= delta:
                assert np.isclose(out[a], dev[a])
            elif tv >= zero_edge(delta, abs(dev[a]), inst.total):
                assert out[a] == 0
            else:
                assert 0 < abs(out[a]) < abs(dev[a])


def test_lemma_d6_difference_matches_the_numeric_surrogate():
    d = tr_objective_equivalence.derive()
    sym = d.results["symbols"]
    args = (*sym["n"], *sym["A"], *sym["g"])
    eq73, eq72 = lambdify(args, d.results["eq73"]), lambdify(args, d.results["eq72"])
    rng = np.random.default_rng(7)
    counts = np.array([1, 4, 2])
    adv = tr.center_advantages([0, 0, 0], counts, rng.standard_normal(3))
    inst = tr.TabularInstance([0, 0, 0], counts, adv)
    dev = np.array([0.4, -0.2, 0.2])
    g = tr.apc_obj_gated_deviation(inst, dev, 0.2)  # D̂TV = 1.6/7 > 0.2: only the first action survives
    assert tr.apc_obj_correction(inst, g)[0] != 0
    assert np.isclose(eq73(*counts, *adv, *g) / inst.total, tr.apc_obj_surrogate(inst, dev, 0.2), rtol=1e-12)
    assert np.isclose(eq73(*counts, *adv, *g), eq72(*counts, *adv, *g), atol=1e-12)
    uncentred = adv + 0.3
    assert not np.isclose(eq73(*counts, *uncentred, *g), eq72(*counts, *uncentred, *g))
