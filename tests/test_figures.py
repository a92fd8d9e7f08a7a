"""Figures 2-4: the plotted data sits where the paper's definitions put it.

These tests read the arrays the plots are drawn from (never pixels): g_agg
kinks at C and (1 + 1/k) C, base-weight heatmap = g_agg difference (Eq. 8),
regime labels inside their regions, simplex points on (1/T) Σ r = 1, Figure 4
markers where max|u_i| = ε or log s^± reach their thresholds, and the total
objective's limits (linear surrogate in L-I ∩ G-I, fiber-only baseline in
G-III).  Independent references are computed here with numpy.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from fiberpo_theory.tools import figure_data as D
from fiberpo_theory.tools import figures as F
from fiberpo_theory.tools.cli import main
from fiberpo_theory.core.gates import PASS, ROLLBACK, ZEROED, g_agg
from fiberpo_theory.core.objectives import fiberpo_parts

GLOBAL = D.GLOBAL_REGIMES
LOCAL = D.LOCAL_REGIMES


@pytest.fixture(scope="module")
def drift():
    return D.drift_data(num=801, heatmap_num=101)


@pytest.fixture(scope="module")
def base_map():
    return D.base_weight_map(num=201)


@pytest.fixture(scope="module")
def simplex():
    return D.simplex_map(num=161)


def _np_channels(r):
    """log s⁺, log s⁻ (Eq. 9) and |u_i| (Eq. 14) of ratio rows r (M, T), in numpy."""
    x = np.log(r)
    pos = np.where(x >= 0, x, 0.0).mean(axis=1)
    neg = np.where(x >= 0, 0.0, -x).mean(axis=1)
    same = np.where(x >= 0, pos[:, None], neg[:, None])
    u = np.abs(np.where(x >= 0, x, -x) - same)
    return pos, neg, u


def _np_channel_regime(s, c, k):
    return np.where(s <= c, PASS, np.where(s < (1 + 1 / k) * c, ROLLBACK, ZEROED))


def _np_global(rp, rn):
    out = np.full(rp.shape, GLOBAL.index("G-III,r"))
    out[(rp == PASS) & (rn == PASS)] = GLOBAL.index("G-I")
    one_pass = (rp == PASS) ^ (rn == PASS)
    out[one_pass & ((rp == ROLLBACK) | (rn == ROLLBACK))] = GLOBAL.index("G-II,r")
    out[one_pass & ((rp == ZEROED) | (rn == ZEROED))] = GLOBAL.index("G-II")
    out[(rp == ZEROED) & (rn == ZEROED)] = GLOBAL.index("G-III")
    return out


# --- Figure 2 -------------------------------------------------------------------------


def test_gate_curves_have_kinks_at_c_and_zeroing_threshold():
    curves = D.gate_curves(c=0.15, k_values=(1, 2, 3, 8, 32))
    x = curves.x
    for k, y in zip(curves.k_values, curves.values):
        c_star = (1 + 1 / k) * 0.15
        i_c, i_star = np.flatnonzero(x == 0.15), np.flatnonzero(x == c_star)
        assert i_c.size == 1 and i_star.size == 1, "kinks must be grid points"
        assert y[i_c[0]] == pytest.approx(0.15, abs=1e-15)  # the peak is C, at x = C
        assert y.max() == pytest.approx(0.15, abs=1e-15)
        assert y[i_star[0]] == pytest.approx(0.0, abs=1e-15)
        assert np.all(y[np.abs(x) >= c_star] == 0.0)
        np.testing.assert_allclose(y[np.abs(x) <= 0.15], x[np.abs(x) <= 0.15], atol=0)
        roll = (x > 0.15) & (x < c_star)
        if roll.sum() >= 2:
            slope = np.diff(y[roll]) / np.diff(x[roll])
            np.testing.assert_allclose(slope, -k, rtol=1e-6)
        np.testing.assert_allclose(y, -y[::-1], atol=1e-14)  # odd (the grid is symmetric)


def test_base_weight_heatmap_is_the_g_agg_difference(base_map):
    p = torch.as_tensor(base_map.log_s_pos, dtype=torch.float64)[None, :]
    n = torch.as_tensor(base_map.log_s_neg, dtype=torch.float64)[:, None]
    expected = (g_agg(p, 0.20, 2.0) - g_agg(n, 0.10, 2.0)).numpy()
    assert base_map.log_w.shape == (base_map.log_s_neg.size, base_map.log_s_pos.size)
    np.testing.assert_allclose(base_map.log_w, expected, atol=1e-15, rtol=0)


def test_base_weight_boundaries_at_c_and_one_plus_one_over_k_c(base_map):
    b = base_map.boundaries
    assert b == pytest.approx({"C+": 0.20, "C*+": 0.30, "C-": 0.10, "C*-": 0.15}, abs=1e-15)
    p, n = base_map.log_s_pos, base_map.log_s_neg
    step = p[1] - p[0]
    expected_pos = _np_channel_regime(p, 0.20, 2.0)
    expected_neg = _np_channel_regime(n, 0.10, 2.0)
    def away(v, cuts):  # grid points not on a boundary
        return np.min(np.abs(v[:, None] - np.array(cuts)[None, :]), axis=1) > 1e-12

    cols, rows = away(p, [0.2, 0.3]), away(n, [0.1, 0.15])
    np.testing.assert_array_equal(base_map.regime_pos[0, cols], expected_pos[cols])
    np.testing.assert_array_equal(base_map.regime_neg[rows, 0], expected_neg[rows])
    # the first rolling-back / zeroed column lies within one grid step above C⁺ / C*⁺
    first_roll = p[np.argmax(base_map.regime_pos[0] == ROLLBACK)]
    first_zero = p[np.argmax(base_map.regime_pos[0] == ZEROED)]
    assert 0.20 < first_roll <= 0.20 + step + 1e-12
    assert 0.30 - 1e-12 <= first_zero <= 0.30 + step + 1e-12
    # global regimes: G-I is exactly both-pass, G-III both-zeroed
    gi = base_map.global_regime == GLOBAL.index("G-I")
    np.testing.assert_array_equal(gi[np.ix_(rows, cols)], np.outer(n[rows] <= 0.1, p[cols] <= 0.2))
    np.testing.assert_allclose(base_map.log_w[gi], (p[None, :] - n[:, None])[gi], atol=1e-15)
    giii = base_map.global_regime == GLOBAL.index("G-III")
    assert giii.any() and np.all(base_map.log_w[giii] == 0.0)
    # G-II: with the negative channel zeroed, |log w| peaks at C⁺, at P = C⁺
    zeroed_row = base_map.regime_neg[:, 0] == ZEROED
    assert np.abs(base_map.log_w[zeroed_row]).max() == pytest.approx(0.20, abs=1e-12)


def test_base_weight_labels_sit_in_their_regions(base_map):
    assert len(base_map.labels) == 9
    for px, py, text in base_map.labels:
        j = int(np.argmin(np.abs(base_map.log_s_pos - px)))
        i = int(np.argmin(np.abs(base_map.log_s_neg - py)))
        name = text.split("\n")[0]
        assert GLOBAL[base_map.global_regime[i, j]] == name, (px, py, text)


# --- Figure 3 -------------------------------------------------------------------------


def test_simplex_points_are_positive_ratios_with_mean_one(simplex):
    r = simplex.ratios[simplex.inside]
    assert r.shape[1] == 3 and r.shape[0] > 5000
    np.testing.assert_allclose(r.mean(axis=1), 1.0, atol=1e-12)
    assert np.all(r > 0)
    assert np.all(np.isnan(simplex.ratios[~simplex.inside]))
    np.testing.assert_allclose(D.simplex_to_ratios(simplex.vertices), 3.0 * np.eye(3), atol=1e-12)
    # isometric: plane distances are ratio-space distances
    a, b = r[0], r[-1]
    assert np.linalg.norm(D.ratios_to_simplex(a) - D.ratios_to_simplex(b)) == pytest.approx(np.linalg.norm(a - b))


def test_simplex_regimes_match_an_independent_computation(simplex):
    r = simplex.ratios[simplex.inside]
    pos, neg, u = _np_channels(r)
    np.testing.assert_allclose(simplex.log_s_pos[simplex.inside], pos, atol=1e-12)
    np.testing.assert_allclose(simplex.log_s_neg[simplex.inside], neg, atol=1e-12)
    np.testing.assert_allclose(simplex.max_abs_u[simplex.inside], u.max(axis=1), atol=1e-12)
    n_over = (u >= 0.025).sum(axis=1)
    local = np.where(n_over == 0, 0, np.where(n_over == 3, 2, 1))
    glob = _np_global(_np_channel_regime(pos, 0.15, 3.0), _np_channel_regime(neg, 0.09, 3.0))
    near = (np.abs(u - 0.025).min(axis=1) < 1e-9)
    cuts = np.array([0.15, 0.2, 0.09, 0.12])
    near_g = np.minimum(np.abs(pos[:, None] - cuts).min(axis=1), np.abs(neg[:, None] - cuts).min(axis=1)) < 1e-9
    np.testing.assert_array_equal(simplex.local_regime[simplex.inside][~near], local[~near])
    np.testing.assert_array_equal(simplex.global_regime[simplex.inside][~near_g], glob[~near_g])
    assert set(np.unique(glob)) == set(range(5)), "all five global regimes appear on the simplex"
    assert simplex.boundaries == pytest.approx(
        {"eps": 0.025, "C+": 0.15, "C*+": 0.15 * 4 / 3, "C-": 0.09, "C*-": 0.12}, abs=1e-15)


def test_simplex_centroid_is_l1_g1_and_negative_channel_dominates():
    zoom = D.simplex_map(half_width=0.54, num=81)
    c = 40  # odd grid, symmetric around the centroid
    assert zoom.x[c] == 0.0 and zoom.y[c] == 0.0
    assert LOCAL[zoom.local_regime[c, c]] == "L-I" and GLOBAL[zoom.global_regime[c, c]] == "G-I"
    assert zoom.log_w[c, c] == pytest.approx(0.0, abs=1e-15)
    # Jensen on (1/T) Σ r = 1: mean log r <= 0, so log s⁻ >= log s⁺ everywhere (the KL bias)
    inside = zoom.inside
    assert np.all(zoom.log_s_neg[inside] - zoom.log_s_pos[inside] >= -1e-15)
    assert set(np.unique(zoom.local_regime[inside])) == {0, 1, 2}


def test_simplex_labels_sit_in_their_regions(simplex):
    zoom = D.simplex_map(half_width=0.54, num=41)
    for m, names, field in ((simplex, GLOBAL, "global_regime"), (zoom, LOCAL, "local_regime")):
        assert [text for _, _, text in m.labels] == list(names)
        pts = np.array([(px, py) for px, py, _ in m.labels])
        r = torch.as_tensor(D.simplex_to_ratios(pts), dtype=torch.float64)
        codes = D._simplex_fields(r, eps=m.eps, c_pos=m.c_pos, c_neg=m.c_neg, k=m.k)[field]
        assert codes.tolist() == list(range(len(names)))


# --- Figure 4 -------------------------------------------------------------------------


def _parts_at(d, t):
    x = torch.log1p(t * torch.as_tensor(d.delta))
    return fiberpo_parts(x, torch.zeros(x.numel(), dtype=torch.long), eps=d.eps, c_pos=d.c_pos, c_neg=d.c_neg, k=d.k)


def test_drift_direction_is_seeded_and_sign_aligned(drift):
    delta, adv = D.drift_direction()
    np.testing.assert_array_equal(delta.numpy(), drift.delta)
    assert drift.delta.shape == (10,)
    assert np.all(np.sign(drift.delta) == np.sign(drift.advantages))
    assert (drift.eps, drift.c_pos, drift.c_neg, drift.k) == (0.04, 0.12, 0.05, 32.0)
    assert np.any(drift.t == 0.0)
    assert np.all(1 + drift.t[:, None] * drift.delta[None, :] > 0)


def test_eps_markers_sit_where_max_abs_u_equals_eps(drift):
    eps_marks = [m.t for m in drift.markers if m.kind == "eps"]
    assert len(eps_marks) == 2 and eps_marks[0] < 0 < eps_marks[1]
    for t in eps_marks:
        assert float(_parts_at(drift, t).u.abs().max()) == pytest.approx(drift.eps, abs=1e-10)
    between = (drift.t > eps_marks[0]) & (drift.t < eps_marks[1])
    assert np.all(drift.max_abs_u[between] < drift.eps)
    assert np.all(drift.local_regime[between] == LOCAL.index("L-I"))
    assert np.all(drift.local_regime[~between] != LOCAL.index("L-I"))
    for m in drift.markers:
        if m.kind == "eps-token":
            assert float(_parts_at(drift, m.t).u.abs()[m.token]) == pytest.approx(drift.eps, abs=1e-10)
    for side in (-1, 1):  # the L-I -> L-II marker is the first token crossing on each side
        tok = [m.t for m in drift.markers if m.kind == "eps-token" and m.t * side > 0]
        assert min(tok, key=abs) == pytest.approx(eps_marks[side > 0], abs=1e-12)


def test_channel_markers_sit_at_the_budget_and_zeroing_thresholds(drift):
    thresholds = {"C-": 0.05, "C*-": 0.05 * 33 / 32, "C+": 0.12, "C*+": 0.12 * 33 / 32}
    kinds = {m.kind for m in drift.markers}
    assert {"C-", "C*-", "C+", "C*+"} <= kinds
    for m in drift.markers:
        if m.kind in thresholds:
            parts = _parts_at(drift, m.t)
            channel = parts.log_s_neg if m.kind.endswith("-") else parts.log_s_pos
            assert float(channel[0]) == pytest.approx(thresholds[m.kind], abs=1e-10), m
    # rollback starts before zeroing on each side and channel
    for ch in ("-", "+"):
        for side in (-1, 1):
            on = [m.t for m in drift.markers if m.kind == "C" + ch and m.t * side > 0]
            off = [m.t for m in drift.markers if m.kind == "C*" + ch and m.t * side > 0]
            if off:
                assert on and abs(on[0]) < abs(off[0])


def test_total_objective_is_the_linear_surrogate_in_l1_and_g1(drift):
    r = 1 + drift.t[:, None] * drift.delta[None, :]
    linear = (r * drift.advantages).mean(axis=1)  # μ = 1/T for one trajectory
    np.testing.assert_allclose(drift.linear_total, linear, atol=1e-14)
    zero = int(np.flatnonzero(drift.t == 0.0)[0])
    assert drift.fiberpo_total[zero] == pytest.approx(drift.advantages.mean(), abs=1e-15)
    assert drift.grpo_total[zero] == pytest.approx(drift.advantages.mean(), abs=1e-15)
    # Ratio decoupling (|u|, |v| <= ε) with a transparent base gate (G-I): G(r) = r exactly
    decoupled = (
        (drift.max_abs_u <= drift.eps)
        & (np.maximum(drift.log_s_pos, drift.log_s_neg) <= drift.eps)
        & (drift.global_regime == GLOBAL.index("G-I"))
    )
    assert decoupled.sum() > 20
    np.testing.assert_allclose(drift.fiberpo_total[decoupled], linear[decoupled], atol=1e-13)
    assert np.abs(drift.fiberpo_total - linear).max() > 1e-3  # gating matters away from t = 0


def test_total_objective_returns_to_fiber_only_baseline_when_both_channels_zeroed(drift):
    giii = drift.global_regime == GLOBAL.index("G-III")
    assert giii.sum() > 5, "the drift must reach G-III"
    assert np.all(drift.log_base_weight[giii] == 0.0)
    np.testing.assert_allclose(drift.fiberpo_total[giii], drift.unweighted_total[giii], atol=1e-15)
    gii = drift.global_regime == GLOBAL.index("G-II")
    assert gii.any()
    assert np.abs(drift.fiberpo_total[gii] - drift.unweighted_total[gii]).max() > 1e-4


def test_grpo_curves_are_the_min_form_clip(drift):
    r = 1 + drift.t[:, None] * drift.delta[None, :]
    a = drift.advantages[None, :]
    clipped = np.clip(r, 1 - drift.eps, 1 + drift.eps)
    expected = np.where(a >= 0, np.minimum(r, clipped), np.maximum(r, clipped)) * a
    np.testing.assert_allclose(drift.grpo_token, expected, atol=1e-14)
    np.testing.assert_allclose(drift.grpo_total, expected.mean(axis=1), atol=1e-14)


def test_fiber_correction_bars_stack_to_the_gated_log_ratio(drift):
    parts = _parts_at(drift, drift.t_bar)
    np.testing.assert_allclose(drift.bar_log_ratio, np.log1p(drift.t_bar * drift.delta), atol=1e-15)
    np.testing.assert_allclose(drift.bar_numerator + drift.bar_base_minus_denominator, drift.bar_log_gated, atol=1e-14)
    np.testing.assert_allclose(drift.bar_log_gated, torch.log(parts.gated_ratio).numpy(), atol=1e-14)
    assert np.all(np.abs(drift.bar_numerator) <= drift.eps + 1e-15)
    i, j = drift.tokens
    assert drift.delta[i] == drift.delta.max() and drift.delta[j] == drift.delta.min()
    # the per-token curves are G(r)_i Â_i from the core at any sampled t
    k = int(np.argmin(np.abs(drift.t - 2.5)))
    np.testing.assert_allclose(
        drift.fiberpo_token[k], _parts_at(drift, drift.t[k]).gated_ratio.numpy() * drift.advantages, atol=1e-14)


# --- command line ---------------------------------------------------------------------


def test_cli_writes_png_and_pdf_of_every_figure(tmp_path):
    out = tmp_path / "figs"
    assert main(["figures", "--out", str(out), "--dpi", "50", "--resolution", "81"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(f"{n}.{e}" for n in F.FIGURE_NAMES for e in ("png", "pdf"))
    for name in F.FIGURE_NAMES:
        png, pdf = (out / f"{name}.png").read_bytes(), (out / f"{name}.pdf").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
        assert pdf[:5] == b"%PDF-" and len(pdf) > 5000


def test_figure_data_computes_without_matplotlib():
    # The data module is what other code (and these tests) check; it must not pull in the plotting stack.
    code = ("import sys; from fiberpo_theory.tools import figure_data as D; D.gate_curves(num=11); "
            "print('matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
