"""Core objectives: hand-computed cases, Eq. 20 vs autograd, on-policy identity, invariances, bad input."""

import math

import pytest
import torch

from fiberpo_theory.core import objectives as obj
from fiberpo_theory.core.diagnostics import channel_regimes
from fiberpo_theory.core import gates
from fiberpo_theory.core.gates import g_agg, sign_channel

HYPER = dict(eps=0.1, c_pos=0.12, c_neg=0.2)


def t(values, dtype=torch.float64, device="cpu"):
    return torch.tensor(values, dtype=dtype, device=device)


def ids(values, device="cpu"):
    return torch.tensor(values, dtype=torch.long, device=device)


# --- hand-computed cases from the paper's definitions ----------------------------------


def test_g_agg_three_regimes_by_hand():
    c, k = 0.1, 2.0
    x = t([0.05, -0.1, 0.12, -0.13, 0.15, 0.2, -0.3])
    # pass-through, pass (edge), rollback 3C-2x, rollback -(3C)-2x, zeroed at (1+1/k)C, zeroed beyond
    expected = [0.05, -0.1, 0.3 - 0.24, -0.3 + 0.26, 0.0, 0.0, 0.0]
    assert torch.allclose(g_agg(x, c, k), t(expected), atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_g_agg_slope_follows_the_regime_on_both_channels_and_on_every_threshold(dtype):
    # rows: random values, then the thresholds themselves (x = ±C and x = ±(1 + 1/k)C, as rounded in dtype)
    gen = torch.Generator().manual_seed(3)
    c, k = torch.tensor([0.12, 0.05], dtype=dtype), torch.tensor([[1.0], [3.0], [10.0], [64.0]], dtype=dtype)
    _, zero_at = gates.g_agg_thresholds(c, k)
    x = torch.cat([(torch.rand(64, 4, 2, generator=gen, dtype=dtype) - 0.5) * 0.6,
                   c.expand(4, 2)[None], -c.expand(4, 2)[None], zero_at[None], -zero_at[None]])
    slope = gates.g_agg_slope(x, c, k)
    by_regime = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)[gates.g_agg_regime(x, c, k)]
    by_regime = torch.where(gates.g_agg_regime(x, c, k) == gates.ROLLBACK, -k.expand_as(x), by_regime)
    assert torch.equal(slope, by_regime)
    # Eq. 10's ends: |x| = C still passes (slope 1), |x| = (1 + 1/k)C is already zeroed (slope 0)
    assert bool((slope[-4:-2] == 1).all()) and bool((slope[-2:] == 0).all())
    leaf = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(gates.g_agg(leaf, c, k).sum(), leaf)
    assert torch.equal(grad, slope)  # autograd of g_agg takes the same side on every kink
    per_column = torch.stack([gates.g_agg_slope(x[..., j], c[j].item(), k[:, 0]) for j in range(2)], dim=-1)
    assert torch.equal(per_column, slope)


def test_sign_channel_is_plus_one_at_zero():
    assert sign_channel(t([0.0, -0.0, 1e-300, -1e-300])).tolist() == [1.0, 1.0, 1.0, -1.0]


def test_fiberpo_by_hand(device, dtype):
    # T = 2, x = (0.3, -0.1): log s+ = 0.15 (rollback: 3·0.12 − 2·0.15 = 0.06), log s− = 0.05 (pass)
    # token 0: clip(0.3−0.15) − clip(−0.05) = 0.1 + 0.05; token 1: clip(−0.1+0.05) − clip(0.15) = −0.05 − 0.1
    x = t([0.3, -0.1], dtype, device)
    got = obj.fiberpo_gated_ratio(x, ids([7, 7], device), **HYPER)
    want = t([math.exp(0.01 + 0.15), math.exp(0.01 - 0.15)], dtype, device)
    assert torch.allclose(got, want, rtol=1e-6)


def test_fiberpo_k_argument_changes_only_the_rollback():
    x = t([0.3, -0.1])
    # with k = 4: g(0.15, 0.12, 4) = 5·0.12 − 4·0.15 = 0.0 (exactly the zero edge) → log w = −0.05
    got = obj.fiberpo_gated_ratio(x, ids([0, 0]), k=4, **HYPER)
    assert torch.allclose(got, t([math.exp(-0.05 + 0.15), math.exp(-0.05 - 0.15)]))


def test_apc_obj_by_hand(device, dtype):
    r = t([1.2, 0.9, 1.0, 1.5], dtype, device)
    state = ids([3, 3, 3, 9], device)
    # state 3: budget 3δ; state 9 alone: budget δ, nothing else consumes it
    got = obj.apc_obj_gated_ratio(r, state, delta=0.1)
    assert torch.allclose(got, t([1.2, 0.9, 1.0, 1.1], dtype, device))
    got = obj.apc_obj_gated_ratio(r, state, delta=0.05)
    # B = 0.15 − 0.1 → 0.05; 0.15 − 0.2 < 0 → zeroed; 0.15 − 0.3 < 0; lone token: 0.05
    assert torch.allclose(got, t([1.05, 1.0, 1.0, 1.05], dtype, device))


def test_ppo_clip_and_min_forms_by_hand(device):
    r = t([1.5, 1.5, 0.5, 0.5], device=device)
    adv = t([1.0, -1.0, 1.0, -1.0], device=device)
    assert obj.ppo_gated_ratio(r, eps=0.2).tolist() == pytest.approx([1.2, 1.2, 0.8, 0.8])
    assert obj.ppo_gated_ratio(r, eps=0.2, advantages=adv).tolist() == pytest.approx([1.2, 1.5, 0.5, 0.8])


def test_gspo_by_hand():
    x = t([0.2, 0.0, -0.3])
    traj = ids([4, 4, 1])
    s = [math.exp(0.1), math.exp(0.1), math.exp(-0.3)]
    assert obj.gspo_gated_ratio(x, traj, eps=0.05).tolist() == pytest.approx([1.05, 1.05, 0.95])
    adv = t([-1.0, -2.0, 5.0])  # l_τ = sign(Σ Â): −1 for traj 4 keeps max(clip, s); +1 for traj 1 keeps min
    assert obj.gspo_gated_ratio(x, traj, eps=0.05, advantages=adv).tolist() == pytest.approx([s[0], s[1], s[2]])


def test_weights_and_objective_by_hand():
    x = t([0.0, 0.0, 0.0])
    traj = ids([1, 1, 2])
    mu = obj.aggregation_weights("fiberpo", x, traj)
    assert mu.tolist() == pytest.approx([0.25, 0.25, 0.5])
    assert obj.aggregation_weights("ppo", x).tolist() == pytest.approx([1 / 3] * 3)
    assert float(obj.rgf_objective(torch.ones(3, dtype=torch.float64), t([1.0, 3.0, -2.0]), mu)) == pytest.approx(0.0)


def test_fiberpo_domain_by_hand():
    # one domain, one group of two trajectories (lengths 1 and 2); C large except the trajectory level
    x = t([0.4, 0.1, -0.1])
    traj, group, domain = ids([0, 1, 1]), ids([5, 5, 5]), ids([2, 2, 2])
    eps, cp, cn = 1.0, 0.25, 1.0
    # log s+_τ = (0.4, 0.05), log s−_τ = (0, 0.05); group = domain = means (0.225, 0.025)
    # + channel: g(0.225, .25, 3) + g(0, ., 3) + g(τ − g): τ0: g(0.175, .25, 1)=0.175, τ1: g(−0.175)=−0.175
    # − channel passes everywhere: log w_τ = (Σ+) − (Σ−) telescopes to log s+_τ − log s−_τ
    got = obj.fiberpo_domain_gated_ratio(x, traj, group, domain, eps=eps, c_pos=cp, c_neg=cn)
    assert torch.allclose(got, torch.exp(x))  # every gate passes → G = r
    cp = 0.2  # now the domain-level + aggregate 0.225 rolls back with k = T_D = 3: 4·0.2 − 3·0.225 = 0.125
    got = obj.fiberpo_domain_gated_ratio(x, traj, group, domain, eps=eps, c_pos=cp, c_neg=cn)
    shift = 0.125 - 0.225
    assert torch.allclose(got, torch.exp(x + shift))


def test_domain_equals_fiberpo_when_every_trajectory_is_its_own_domain(dtype):
    torch.manual_seed(1)
    x = (torch.randn(40, dtype=torch.float64) * 0.3).to(dtype)
    traj = torch.randint(0, 6, (40,))
    got = obj.fiberpo_domain_gated_ratio(x, traj, traj * 3 + 1, traj * 7, **HYPER)
    assert torch.allclose(got, obj.fiberpo_gated_ratio(x, traj, **HYPER))


# --- Eq. 20 against autograd on inputs that reach every regime ---------------------------


def _regime_reaching_batches(n_batches=60, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        n_traj = int(torch.randint(1, 5, (1,), generator=gen))
        lengths = torch.randint(1, 7, (n_traj,), generator=gen)
        traj = torch.repeat_interleave(torch.arange(n_traj) * 11 + 3, lengths)
        scale = float(torch.empty(1).uniform_(0.02, 0.6, generator=gen))
        x = torch.randn(traj.numel(), generator=gen, dtype=torch.float64) * scale
        x[torch.rand(traj.numel(), generator=gen) < 0.15] = 0.0  # exact zeros
        yield x, traj


def test_jacobian_eq20_matches_autograd_in_every_regime():
    reached = {f"{ch}:{r}": 0 for ch in ("pos", "neg") for r in "PRZ"}
    reached.update({"u-clipped": 0, "u-free": 0, "v-clipped": 0, "v-free": 0})
    for x, traj in _regime_reaching_batches():
        parts = obj.fiberpo_parts(x, traj, **HYPER)
        pos, neg = channel_regimes(parts, c_pos=HYPER["c_pos"], c_neg=HYPER["c_neg"])
        for name, regime in (("pos", pos), ("neg", neg)):
            for code, label in enumerate("PRZ"):
                reached[f"{name}:{label}"] += int((regime == code).sum())
        clipped_u = parts.u.abs() > HYPER["eps"]
        clipped_v = parts.v.abs() > HYPER["eps"]
        reached["u-clipped"] += int(clipped_u.sum())
        reached["u-free"] += int((~clipped_u).sum())
        reached["v-clipped"] += int(clipped_v.sum())
        reached["v-free"] += int((~clipped_v).sum())
        autograd = torch.autograd.functional.jacobian(lambda z: obj.fiberpo_gated_ratio(z, traj, **HYPER), x)
        analytic = obj.fiberpo_jacobian(x, traj, **HYPER)
        # autograd differentiates in log-ratio; Eq. 20 is ∂G/∂r = ∂G/∂x / r
        assert torch.allclose(autograd / torch.exp(x).unsqueeze(0), analytic, atol=1e-12), (x, traj)
    print("regimes reached:", reached)
    missing = [name for name, count in reached.items() if count == 0]
    assert not missing, f"regimes never reached: {missing}"


# --- on-policy: exactly r = 1 ------------------------------------------------------------


@pytest.mark.parametrize("method", ["fiberpo", "fiberpo_domain"])
def test_identity_value_and_jacobian_at_exactly_on_policy(method, device, dtype):
    n = 9
    x = torch.zeros(n, dtype=dtype, device=device)
    traj = ids([0, 0, 0, 1, 1, 2, 3, 3, 3], device)
    group = ids([0, 0, 0, 0, 0, 1, 1, 1, 1], device)
    domain = ids([0] * 9, device)

    def gate(z):
        if method == "fiberpo":
            return obj.fiberpo_gated_ratio(z, traj, **HYPER)
        return obj.fiberpo_domain_gated_ratio(z, traj, group, domain, **HYPER)

    assert torch.equal(gate(x), torch.ones_like(x))
    jac = torch.autograd.functional.jacobian(gate, x)
    assert torch.equal(jac, torch.eye(n, dtype=dtype, device=device))


def test_torch_sign_would_break_the_on_policy_identity():
    """The reason for sign_channel: with sign(0) = 0 the token leaves both channels."""
    x = torch.zeros(3, dtype=torch.float64)

    def gate_with_torch_sign(z):
        l = torch.sign(z)
        ls_pos, ls_neg = torch.clamp(z, min=0).mean(), torch.clamp(-z, min=0).mean()
        same = torch.where(l > 0, ls_pos, ls_neg)
        opposite = torch.where(l > 0, ls_neg, ls_pos)
        log_res = torch.clamp(z - l * same, -0.1, 0.1) - torch.clamp(-l * opposite, -0.1, 0.1)
        return torch.exp(ls_pos - ls_neg + log_res)

    jac = torch.autograd.functional.jacobian(gate_with_torch_sign, x)
    assert not torch.equal(jac, torch.eye(3, dtype=torch.float64))
    assert torch.equal(obj.fiberpo_jacobian(x, ids([0, 0, 0]), **HYPER), torch.eye(3, dtype=torch.float64))


# --- invariances --------------------------------------------------------------------------


def test_permutation_and_relabelling_invariance(device):
    torch.manual_seed(3)
    n = 60
    x = torch.randn(n, dtype=torch.float64, device=device) * 0.4
    traj = torch.randint(0, 8, (n,), device=device)
    group = traj // 3
    domain = group // 2
    perm = torch.randperm(n, device=device)
    relabel = torch.randperm(8, device=device) * 1000 + 17
    fiber = obj.fiberpo_gated_ratio(x, traj, **HYPER)
    assert torch.allclose(obj.fiberpo_gated_ratio(x[perm], relabel[traj][perm], **HYPER), fiber[perm])
    dom = obj.fiberpo_domain_gated_ratio(x, traj, group, domain, **HYPER)
    got = obj.fiberpo_domain_gated_ratio(x[perm], relabel[traj][perm], group[perm] * 5 + 2, domain[perm] + 40, **HYPER)
    assert torch.allclose(got, dom[perm])
    state = torch.randint(0, 5, (n,), device=device)
    apc = obj.apc_obj_gated_ratio(torch.exp(x), state, delta=0.2)
    assert torch.allclose(obj.apc_obj_gated_ratio(torch.exp(x[perm]), state[perm] + 9, delta=0.2), apc[perm])


# --- numerics: long trajectories, extreme log-ratios, low precision ---------------------


def test_long_trajectory_and_extreme_log_ratios_stay_finite_in_float32():
    n = 100_000
    x = torch.empty(n).uniform_(-50, 50)
    x[:10] = torch.tensor([50.0, -50.0] * 5)
    x.requires_grad_(True)
    traj = torch.zeros(n, dtype=torch.long)
    for fn in (
        lambda z: obj.fiberpo_gated_ratio(z, traj, **HYPER),
        lambda z: obj.fiberpo_domain_gated_ratio(z, traj, traj, traj, **HYPER),
        lambda z: obj.gspo_gated_ratio(z, traj, eps=0.2),
        lambda z: obj.apc_obj_gated_ratio(torch.exp(z), traj % 7, delta=0.1),
        lambda z: obj.ppo_gated_ratio(torch.exp(z), eps=0.2),
    ):
        out = fn(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()


def test_bfloat16_inputs_are_computed_in_float32():
    x = torch.tensor([0.3, -0.1], dtype=torch.bfloat16)
    out = obj.fiberpo_gated_ratio(x, ids([0, 0]), **HYPER)
    assert out.dtype == torch.float32
    assert torch.allclose(out, obj.fiberpo_gated_ratio(x.float(), ids([0, 0]), **HYPER))


# --- bad input ------------------------------------------------------------------------------

BAD = [
    (lambda: obj.fiberpo_gated_ratio(t([0.1, 0.2]), ids([0]), **HYPER), "traj_id"),
    (lambda: obj.fiberpo_gated_ratio(t([0.1, float("nan")]), ids([0, 0]), **HYPER), "log_ratio"),
    (lambda: obj.fiberpo_gated_ratio(t([0.1, float("inf")]), ids([0, 0]), **HYPER), "log_ratio"),
    (lambda: obj.fiberpo_gated_ratio(t([]), ids([]), **HYPER), "log_ratio"),
    (lambda: obj.fiberpo_gated_ratio(t([0.1]), t([0.0]), **HYPER), "traj_id"),
    (lambda: obj.fiberpo_gated_ratio(t([0.1]), ids([-1]), **HYPER), "traj_id"),
    (lambda: obj.fiberpo_gated_ratio(t([[0.1]]), ids([0]), **HYPER), "log_ratio"),
    (lambda: obj.fiberpo_gated_ratio(t([0.1]), ids([0]), eps=0.0, c_pos=0.1, c_neg=0.1), "eps"),
    (lambda: obj.fiberpo_gated_ratio(t([0.1]), ids([0]), eps=0.1, c_pos=-1, c_neg=0.1), "c_pos"),
    (lambda: obj.fiberpo_gated_ratio(t([0.1]), ids([0]), eps=0.1, c_pos=0.1, c_neg=float("nan")), "c_neg"),
    (lambda: obj.fiberpo_gated_ratio(t([0.1]), ids([0]), k=0, **HYPER), "k"),
    (lambda: obj.apc_obj_gated_ratio(t([1.0, -0.5]), ids([0, 0]), delta=0.1), "ratio"),
    (lambda: obj.apc_obj_gated_ratio(t([1.0, 0.0]), ids([0, 0]), delta=0.1), "ratio"),
    (lambda: obj.apc_obj_gated_ratio(t([1.0]), ids([0]), delta=0), "delta"),
    (lambda: obj.ppo_gated_ratio(t([1.0]), eps=0.2, advantages=t([1.0, 2.0])), "advantages"),
    (lambda: obj.gspo_gated_ratio(t([0.1]), ids([0]), eps=-0.2), "eps"),
    (lambda: obj.fiberpo_domain_gated_ratio(t([0.1, 0.2]), ids([0, 0]), ids([0, 1]), ids([0, 0]), **HYPER), "nest"),
    (lambda: obj.fiberpo_domain_gated_ratio(t([0.1, 0.2]), ids([0, 1]), ids([0, 0]), ids([0, 1]), **HYPER), "nest"),
    (lambda: obj.fiberpo_domain_gated_ratio(t([0.1, 0.2]), ids([0, 0]), ids([0, 0]), ids([0, 1]), **HYPER), "trajectory does not nest in domain"),
    (lambda: obj.fiberpo_domain_gated_ratio(t([0.1]), ids([0]), t([0.0]), ids([0]), **HYPER), "group_id"),
]


@pytest.mark.parametrize("call,name", BAD)
def test_bad_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_aggregation_weights_reuse_the_objectives_trajectory_segments():
    x = torch.tensor([0.1, -0.2, 0.3, 0.0, 0.5], dtype=torch.float64)
    traj = torch.tensor([9, 4, 9, 9, 4])
    parts = obj.fiberpo_parts(x, traj, eps=0.2, c_pos=0.1, c_neg=0.1)
    from_ids = obj.aggregation_weights("trajectory", x, traj)
    assert torch.equal(obj.aggregation_weights("trajectory", x, parts.traj), from_ids)
    assert torch.allclose(from_ids, torch.tensor([1 / 6, 1 / 4, 1 / 6, 1 / 6, 1 / 4], dtype=torch.float64))
    with pytest.raises(ValueError, match="traj_id"):
        obj.aggregation_weights("trajectory", x[:4], parts.traj)


def test_rgf_objective_gradients_reach_whichever_inputs_ask_for_them():
    g, adv, mu = t([1.2, 0.8, 1.0]), t([1.0, 3.0, -2.0]), t([0.25, 0.25, 0.5])
    leaves = [v.clone().requires_grad_(True) for v in (g, adv, mu)]
    obj.rgf_objective(*leaves).backward()
    assert leaves[0].grad.tolist() == pytest.approx((mu * adv).tolist())
    assert leaves[1].grad.tolist() == pytest.approx((mu * g).tolist())
    assert leaves[2].grad.tolist() == pytest.approx((g * adv).tolist())
    only_g = g.clone().requires_grad_(True)  # μ and Â constant: their product is taken outside the graph
    value = obj.rgf_objective(only_g, adv, mu)
    value.backward()
    assert float(value.detach()) == pytest.approx(0.3 + 0.6 - 1.0) and torch.equal(only_g.grad, leaves[0].grad)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rgf_objective_names_a_non_finite_input_even_where_the_other_is_zero(bad):
    g, ok = t([1.0, 1.0]), t([0.0, 1.0])
    for name, adv, mu in (("advantages", t([bad, 1.0]), ok), ("weights", ok, t([bad, 0.5]))):
        with pytest.raises(ValueError, match=f"{name} has non-finite values"):
            obj.rgf_objective(g, adv, mu)
    huge = t([1e300, 1e300])  # finite inputs whose products overflow are not rejected
    assert obj.rgf_objective(g, huge, huge).isinf()
