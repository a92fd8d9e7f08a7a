"""The FiberPO-side derivations of ``proofs/``: each is verified, and each is compared numerically with the torch code.

The derivations check the code and the code checks the derivations: every
symbolic result that has a torch counterpart is turned into numbers
(``symbolic.lambdify``, or exact evaluation of the region formulas) and
compared with the implementation on seeded random float64 inputs, including
the edges where the piecewise definitions switch.
"""

from __future__ import annotations

import importlib
import math
from functools import lru_cache

import numpy as np
import pytest
import sympy as sp
import torch

from fiberpo_theory import symbolic as S
from fiberpo_theory.core.gates import budget_clip, g_agg, logclip, symmetric_clip
from fiberpo_theory.core.objectives import (
    fiberpo_domain_gated_ratio,
    fiberpo_gated_ratio,
    fiberpo_gated_residual_eq11,
    fiberpo_parts,
)

MODULES = [
    "channel_split", "claim35", "e7_fiberpo_domain", "eq16", "eq77_rewriting", "eq77_stricter", "eq79_approx", "g_regimes",
    "kl_bias", "log_approximation", "logclip_asymmetry", "prop52_jacobian", "ratio_decoupling", "remark63_fbg",
]
RNG_SEED = 20260308


@lru_cache(maxsize=None)
def derivation(name):
    return importlib.import_module(f"fiberpo_theory.proofs.{name}").derive()


def rng():
    return np.random.default_rng(RNG_SEED)


@pytest.mark.parametrize("name", MODULES)
def test_derivation_is_verified_and_printable(name):
    from fiberpo_theory.symbolic.latex import to_latex

    d = derivation(name)
    assert d.verified, d.conclusion
    assert d.steps and d.statement and d.paper_ref
    tex = to_latex(d)
    assert tex.isascii() and r"\begin{align*}" in tex


def _random_trajectories(gen, n, *, max_len=6, scale=0.4):
    """Random single trajectories with exact zeros and repeated values mixed in."""
    out = []
    for _ in range(n):
        T = int(gen.integers(1, max_len + 1))
        x = gen.normal(0, scale, T)
        x[gen.random(T) < 0.2] = 0.0
        if T > 1 and gen.random() < 0.3:
            x[1] = x[0]
        out.append(x)
    return out


def _flat(x):
    t = torch.tensor(x, dtype=torch.float64)
    return t, torch.zeros(len(x), dtype=torch.long)


# --- eq-16 -----------------------------------------------------------------


def test_eq16_lambdified_matches_both_torch_forms():
    args, log11, log16 = derivation("eq16").results["full_domain"]
    f11, f16 = S.lambdify(args, log11), S.lambdify(args, log16)
    gen = rng()
    for x in _random_trajectories(gen, 60):
        eps = float(gen.choice([0.01, 0.05, 0.2, 1.0]))
        xt, tid = _flat(x)
        p = fiberpo_parts(xt, tid, eps=eps, c_pos=0.3, c_neg=0.2)
        lsp, lsn = p.traj.gather(p.log_s_pos).numpy(), p.traj.gather(p.log_s_neg).numpy()
        for f in (f11, f16):
            np.testing.assert_allclose(np.asarray(f(x, lsp, lsn, eps), dtype=float), p.log_gated_residual.numpy(), atol=1e-12)
        np.testing.assert_allclose(np.log(fiberpo_gated_residual_eq11(xt, tid, eps=eps).numpy()), p.log_gated_residual.numpy(), atol=1e-12)


# --- ratio decoupling --------------------------------------------------------


def test_ratio_decoupling_region_formula_and_counterexample_against_torch():
    m = importlib.import_module("fiberpo_theory.proofs.ratio_decoupling")
    gen = rng()
    hits = 0
    for x in _random_trajectories(gen, 80, scale=0.05):
        xt, tid = _flat(x)
        p = fiberpo_parts(xt, tid, eps=0.2, c_pos=1.0, c_neg=1.0)
        both_in = (p.u.abs() <= 0.2) & (p.v.abs() <= 0.2)
        hits += int(both_in.sum())
        centred = xt - xt.mean()
        assert torch.allclose(p.log_gated_residual[both_in], centred[both_in], atol=1e-14)
    assert hits > 50
    xs, eps, u, v, r1, c1 = m.counterexample()
    xt, tid = _flat([float(v_) for v_ in xs])
    p = fiberpo_parts(xt, tid, eps=float(eps), c_pos=1.0, c_neg=1.0)
    assert bool((p.u.abs() < float(eps)).all())  # L-I as the paper defines it
    assert float(p.log_gated_residual[0]) == pytest.approx(float(r1), abs=1e-14)
    assert float(xt[0] - xt.mean()) == pytest.approx(float(c1), abs=1e-14)
    assert float(c1 - r1) == pytest.approx(abs(float(v[0])) - float(eps), abs=1e-14)


# --- g-regimes ---------------------------------------------------------------


def test_g_regimes_log_w_matches_torch_base_weight_on_every_regime():
    d = derivation("g_regimes")
    a, b, cp, cn, k = d.results["symbols"]
    f = S.lambdify((a, b, cp, cn, k), d.results["log_w"])
    gen = rng()
    C_POS, C_NEG, K = 0.12, 0.05, 7.0
    edges = [0.0, C_POS, C_NEG, (1 + 1 / K) * C_POS, (1 + 1 / K) * C_NEG]
    av = np.concatenate([gen.uniform(0, 0.3, 400), edges, gen.uniform(C_POS, (1 + 1 / K) * C_POS, 50)])
    bv = np.concatenate([gen.uniform(0, 0.3, 400), edges[::-1], gen.uniform(C_NEG, (1 + 1 / K) * C_NEG, 50)])
    ta, tb = torch.tensor(av), torch.tensor(bv)
    ref = g_agg(ta, C_POS, K) - g_agg(tb, C_NEG, K)
    np.testing.assert_allclose(np.asarray(f(av, bv, C_POS, C_NEG, K), dtype=float), ref.numpy(), atol=1e-14)
    # and the sup over G-II computed symbolically is what the torch gate attains at log s⁺ = C⁺, log s⁻ zeroed
    peak = float(g_agg(torch.tensor([C_POS]), C_POS, K) - g_agg(torch.tensor([1.0]), C_NEG, K))
    table = {r["pos"] + r["neg"]: r for r in d.results["table"]}
    assert peak == pytest.approx(float(table["PZ"]["sup_abs"].subs(cp, C_POS)))


# --- logclip asymmetry --------------------------------------------------------


def test_logclip_rooms_match_torch():
    d = derivation("logclip_asymmetry")
    (eps,) = d.results["symbols"]
    up, lo = S.lambdify((eps,), d.results["upper"]), S.lambdify((eps,), d.results["lower"])
    for e in (1e-3, 0.04, 0.2, 1.0, 3.0):
        out = logclip(torch.tensor([1e-20, 1e20], dtype=torch.float64), e)
        assert float(out[1]) - 1 == pytest.approx(float(up(np.float64(e))), rel=1e-12)
        assert 1 - float(out[0]) == pytest.approx(float(lo(np.float64(e))), rel=1e-12)
        assert float(out[1]) - 1 > 1 - float(out[0])


# --- kl bias -------------------------------------------------------------------


def test_kl_bias_identity_in_torch_and_expectation_numerically():
    gen = rng()
    for x in _random_trajectories(gen, 30):
        xt, tid = _flat(x)
        p = fiberpo_parts(xt, tid, eps=0.1, c_pos=0.2, c_neg=0.2)
        assert float(p.log_s_neg[0] - p.log_s_pos[0]) == pytest.approx(-float(xt.mean()), abs=1e-15)
    d = derivation("kl_bias")
    P, Q = d.results["symbols"]
    f = S.lambdify((*P, *Q), d.results["expected_gap"])
    for _ in range(50):
        p, q = gen.dirichlet(np.ones(3)), gen.dirichlet(np.ones(3))
        val = float(f(*p, *q))
        assert val == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-12)
        assert val >= 0


# --- claim 3.5 -------------------------------------------------------------------


def test_claim35_pinsker_and_bound_numerically():
    d = derivation("claim35")
    eps, p, q = d.results["symbols"]
    kl = S.lambdify((p, q), d.results["binary_kl"])
    grid = np.linspace(0.01, 0.99, 99)
    P, Q = np.meshgrid(grid, grid)
    assert (kl(P, Q) - 2 * (P - Q) ** 2 >= -1e-15).all()
    exact = S.lambdify((eps,), d.results["tv_bound_exact"])
    paper = S.lambdify((eps,), d.results["tv_bound_paper"])
    assert float(paper(4e-4)) == pytest.approx(math.sqrt(2e-4))
    assert float(exact(4e-4)) > float(paper(4e-4))


# --- log approximation -------------------------------------------------------------


def test_log_approximation_gap_matches_torch_and_respects_the_bound():
    d = derivation("log_approximation")
    r_s, b_s = d.results["symbols"]
    f = S.lambdify((r_s, b_s), d.results["gap"])
    gen = rng()
    for b in (0.01, 0.1, 0.5, 0.9):
        r = np.concatenate([np.exp(gen.uniform(-2, 2, 500)), [1 - b, math.exp(-b), 1.0, 1 + b, math.exp(b)]])
        rt = torch.tensor(r)
        torch_gap = logclip(rt, b) - (1 + budget_clip(rt - 1, torch.full_like(rt, b)))
        np.testing.assert_allclose(np.asarray(f(r, b), dtype=float), torch_gap.numpy(), atol=1e-14)
        assert float(torch_gap.abs().max()) <= math.exp(b) - 1 - b + 1e-15
        assert float(torch_gap.abs().max()) == pytest.approx(math.exp(b) - 1 - b, rel=1e-9)  # attained (r >= e^b)


# --- channel split ----------------------------------------------------------------------


def test_channel_split_bounds_match_direct_sums_and_counterexample_in_torch():
    m = importlib.import_module("fiberpo_theory.proofs.channel_split")
    gen = rng()
    for x in _random_trajectories(gen, 30):
        xt, tid = _flat(x)
        p = fiberpo_parts(xt, tid, eps=0.1, c_pos=0.2, c_neg=0.1)
        T = len(x)
        direct = T * (0.2 + 0.1) - (xt.abs().sum() - xt.abs())
        for i in range(T):
            l = 1 if x[i] >= 0 else -1
            bound = m.unsplit_bound(l, float(xt[i]), float(p.log_s_pos[0]), float(p.log_s_neg[0]), 0.2, 0.1, T)
            assert float(bound) == pytest.approx(float(direct[i]), abs=1e-12)
    ce = m.counterexample()
    xt = torch.tensor([float(v) for v in ce["xs"]], dtype=torch.float64)
    T, c = 2, float(ce["c_pos"])
    lsp, lsn = float(ce["log_s_pos"]), float(ce["log_s_neg"])
    unsplit = budget_clip(xt[:1], torch.tensor([T * 2 * c - T * lsp - T * lsn + float(xt[0])]))
    split = budget_clip(xt[:1], torch.tensor([T * c - T * lsp + float(xt[0])]))
    assert float(unsplit) == pytest.approx(float(ce["unsplit"])) and float(split) == pytest.approx(float(ce["split"]))
    assert abs(float(split)) > abs(float(unsplit))


# --- eq-77 identity and eq-79 ----------------------------------------------------------


def test_eq77_clip_form_and_g_agg_agree_in_torch_and_sympy():
    m = importlib.import_module("fiberpo_theory.proofs.eq77_rewriting")
    s_s, c_s, k_s = m.s_, m.Cs, m.K
    f_clip = S.lambdify((s_s, c_s, k_s), m.clip_form(s_s, c_s, k_s))
    f_g = S.lambdify((s_s, c_s, k_s), S.g_agg(s_s, c_s, k_s))
    gen = rng()
    for C in (-0.1, 0.0, 0.05, 0.2):
        for k in (1.0, 3.0, 64.0):
            star = (1 + 1 / k) * abs(C)
            s = np.concatenate([gen.uniform(0, 0.5, 200), [0.0, abs(C), star, (abs(C) + star) / 2]])
            st = torch.tensor(s)
            torch_clip = budget_clip(st, (k + 1) * C - k * st)
            torch_g = g_agg(st, C, k)
            np.testing.assert_allclose(torch_clip.numpy(), torch_g.numpy(), atol=1e-12)
            np.testing.assert_allclose(np.asarray(f_clip(s, C, k), dtype=float), torch_clip.numpy(), atol=1e-12)
            np.testing.assert_allclose(np.asarray(f_g(s, C, k), dtype=float), torch_g.numpy(), atol=1e-12)


def test_eq77_stricter_sympy_terms_match_the_torch_terms_of_the_check():
    from fiberpo_theory.checks.identities import _clip_terms

    m = importlib.import_module("fiberpo_theory.proofs.eq77_stricter")
    gen = rng()
    for x in _random_trajectories(gen, 40):
        eps, c = float(gen.choice([0.05, 0.2])), float(gen.choice([0.02, 0.3]))
        xt, tid = _flat(x)
        for channel in (1.0, -1.0):
            A, D, mask = _clip_terms(xt, tid, eps, c, channel, g_agg=g_agg, budget_clip=budget_clip, symmetric_clip=symmetric_clip)
            for a, d_, i in zip(A.tolist(), D.tolist(), mask.nonzero().flatten().tolist()):
                _, A_s, D_s = m.instance([sp.Rational(v) for v in x.tolist()], sp.Rational(c), sp.Rational(eps), i)
                assert a == pytest.approx(float(A_s), abs=1e-12) and d_ == pytest.approx(float(D_s), abs=1e-12)
    rev = derivation("eq77_stricter").results["reversal"]
    xt, tid = _flat([float(v) for v in rev["log_ratio"]])
    A, D, _ = _clip_terms(xt, tid, float(rev["eps"]), float(rev["C"]), 1.0, g_agg=g_agg, budget_clip=budget_clip, symmetric_clip=symmetric_clip)
    assert abs(float(D[0])) > abs(float(A[0]))


def test_eq79_delta_matches_torch_and_does_not_decay():
    d = derivation("eq79_approx")
    inst = d.results["instance"]
    T, C, Ct, s = int(inst["T"]), float(inst["C"]), float(inst["C"] + inst["d"] / (inst["T"] + 1)), float(inst["s"])
    st = torch.tensor([s], dtype=torch.float64)
    torch_delta = float(g_agg(st, Ct, float(T)) - g_agg(st, C, float(T)))
    assert torch_delta == pytest.approx(float(inst["eq77"] - inst["eq79"]), abs=1e-9)
    # the derived sup |Δ| = |d| holds at every T in the implementation too
    for Tv in (10, 1000, 100000):
        Ctv = C + float(inst["d"]) / (Tv + 1)
        pts = torch.tensor([C, Ct, (1 + 1 / Tv) * C, (1 + 1 / Tv) * Ctv], dtype=torch.float64)
        sup = float((g_agg(pts, Ctv, float(Tv)) - g_agg(pts, C, float(Tv))).abs().max())
        assert sup == pytest.approx(abs(float(inst["d"])), rel=1e-6)


# --- Proposition 5.2 ---------------------------------------------------------------------


def test_prop52_derived_jacobian_matches_autograd_and_eq20_code():
    m = importlib.import_module("fiberpo_theory.proofs.prop52_jacobian")
    from fiberpo_theory.core.objectives import fiberpo_jacobian

    gen = rng()
    n = 0
    for x in _random_trajectories(gen, 60, max_len=4, scale=0.3):
        for eps, cp, cn in ((0.05, 0.1, 0.08), (0.3, 0.02, 0.3)):
            xt, tid = _flat(x)
            hyper = dict(eps=eps, c_pos=cp, c_neg=cn)
            p = fiberpo_parts(xt, tid, **hyper)
            derived = torch.tensor(dtype=torch.float64, data=[[float(e) for e in row] for row in m.derived_log_jacobian_at(
                x.tolist(), float(p.log_s_pos[0]), float(p.log_s_neg[0]), p.u.tolist(), p.v.tolist(), **hyper)])
            auto = torch.autograd.functional.jacobian(lambda y: torch.log(fiberpo_gated_ratio(y, tid, **hyper)), xt)
            eq20 = fiberpo_jacobian(xt, tid, **hyper) * torch.exp(xt).unsqueeze(0) / p.gated_ratio.unsqueeze(1)
            torch.testing.assert_close(derived.double(), auto, atol=1e-12, rtol=0)
            torch.testing.assert_close(derived.double(), eq20, atol=1e-12, rtol=0)
            n += 1
    assert n == 120


def test_prop52_full_domain_value_lambdified_matches_torch():
    m = importlib.import_module("fiberpo_theory.proofs.prop52_jacobian")
    T = 2  # printing the full Piecewise for lambdify grows fast with T; regions cover longer T
    xs = m.token_symbols(T)
    fp = S.fiberpo_trajectory(xs, eps=sp.Rational(1, 10), c_pos=sp.Rational(3, 10), c_neg=sp.Rational(1, 5))
    f = S.lambdify(xs, fp["log_gated"])
    gen = rng()
    X = gen.normal(0, 0.3, (T, 300))
    X[:, :5] = 0.0
    vals = np.asarray(f(*X), dtype=float)
    tid = torch.zeros(T, dtype=torch.long)
    ref = np.stack([torch.log(fiberpo_gated_ratio(torch.tensor(X[:, n]), tid, eps=0.1, c_pos=0.3, c_neg=0.2)).numpy()
                    for n in range(X.shape[1])], 1)
    np.testing.assert_allclose(vals, ref, atol=1e-13)


# --- App. E.7 and Remark 6.3 ----------------------------------------------------------------


def test_e7_fgh_objects_match_torch_fiberpo_domain_and_fgh():
    from fiberpo_theory.hierarchy.fgh import fiberpo_hierarchy_gated_ratio

    m = importlib.import_module("fiberpo_theory.proofs.e7_fiberpo_domain")
    eps_s, cp_s, cn_s = m.EPS, m.C_POS, m.C_NEG
    a = sp.symbols("a_1:7", positive=True)
    traj = torch.tensor(m.TRAJ)
    group = torch.tensor([m.GROUP[t] for t in m.TRAJ])
    domain = torch.tensor([m.DOMAIN[m.GROUP[t]] for t in m.TRAJ])
    gen = rng()
    for signs in [("+",) * 6, ("+", "-", "+", "+", "-", "-"), ("-",) * 6]:
        xs = [ai if s == "+" else -ai for ai, s in zip(a, signs)]
        expr = m.fgh_log_gated(xs, gagg=S.g_agg, clip=S.symmetric_clip, parts=list(signs))
        f = S.lambdify((*a, eps_s, cp_s, cn_s), expr)
        for _ in range(20):
            mag = np.abs(gen.normal(0, 0.2, 6)) + 1e-9
            x = np.array([v if s == "+" else -v for v, s in zip(mag, signs)])
            hyper = dict(eps=0.1, c_pos=0.12, c_neg=0.08)
            vals = np.asarray(f(*mag, 0.1, 0.12, 0.08), dtype=float)
            xt = torch.tensor(x)
            ref = torch.log(fiberpo_domain_gated_ratio(xt, traj, group, domain, **hyper)).numpy()
            ref_fgh = torch.log(fiberpo_hierarchy_gated_ratio(xt, [domain, group, traj], **hyper)).numpy()
            np.testing.assert_allclose(vals, ref, atol=1e-12)
            np.testing.assert_allclose(vals, ref_fgh, atol=1e-12)


def test_remark63_operators_agree_numerically_with_concrete_gates():
    m = importlib.import_module("fiberpo_theory.proofs.remark63_fbg")
    P, K = m.bundle()
    vals = {k: v for k, v in zip(m.KAPPA, (0.3, 0.2, 0.5))}
    Pn, Kn = np.array(P.subs(vals), dtype=float), np.array(K.subs(vals), dtype=float)
    gen = rng()
    sigma = gen.normal(0, 1, 5)
    gb = S.elementwise(lambda v: sp.tanh(v))
    gf = S.elementwise(lambda v: v**3)
    sym_sigma = sp.Matrix(sigma)
    fbg = np.array(S.fbg_operator(sym_sigma, P.subs(vals), K.subs(vals), gb, gf), dtype=float).ravel()
    base = Pn @ sigma
    direct = Kn @ np.tanh(base) + (sigma - Kn @ base) ** 3  # Eq. 4 written out with NumPy
    np.testing.assert_allclose(fbg, direct, atol=1e-12)
