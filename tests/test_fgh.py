"""The general FGH operator and FiberPO on hierarchies of any depth (issue 3 §4)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fiberpo_theory.hierarchy import fgh
from fiberpo_theory import hierarchy as hier
from fiberpo_theory.core import objectives as ob
from fiberpo_theory.theory import strategies as fst
from fiberpo_theory.core.gates import g_agg, symmetric_clip
from fiberpo_theory.core.segments import Segments

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-13), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def _scalar(c):
    return c if isinstance(c, float) else c[0]


def _instance(example: fst.FGHExample, c_pos=None, c_neg=None, levels=None):
    levels = levels or example.level_ids
    h = hier.from_ids(levels)
    return fgh.fiberpo_fgh(
        h,
        trajectory=h.total - 1,
        eps=example.eps,
        c_pos=example.c_pos if c_pos is None else c_pos,
        c_neg=example.c_neg if c_neg is None else c_neg,
    )


def _jacobian(f, x):
    return torch.autograd.functional.jacobian(f, x, vectorize=True)


# ---------------------------------------------------------------------------
# Closed form = operator (n = 1, n = 3), values and gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(example=fst.fgh_examples(min_depth=1, max_depth=1))
def test_n1_equals_closed_form_fiberpo(device, dtype, example):
    x = example.log_ratio.to(device, dtype)
    (traj,) = [i.to(device) for i in example.level_ids]
    c_pos, c_neg = _scalar(example.c_pos), _scalar(example.c_neg)
    got = fgh.fiberpo_hierarchy_gated_ratio(x, [traj], eps=example.eps, c_pos=c_pos, c_neg=c_neg)
    want = ob.fiberpo_gated_ratio(x, traj, eps=example.eps, c_pos=c_pos, c_neg=c_neg)
    assert got.dtype == dtype and got.device == x.device
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(example=fst.fgh_examples(min_depth=3, max_depth=3))
def test_n3_equals_closed_form_fiberpo_domain(device, dtype, example):
    x = example.log_ratio.to(device, dtype)
    domain, group, traj = [i.to(device) for i in example.level_ids]
    c_pos, c_neg = _scalar(example.c_pos), _scalar(example.c_neg)
    got = fgh.fiberpo_hierarchy_gated_ratio(x, [domain, group, traj], eps=example.eps, c_pos=c_pos, c_neg=c_neg)
    want = ob.fiberpo_domain_gated_ratio(x, traj, group, domain, eps=example.eps, c_pos=c_pos, c_neg=c_neg)
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("depth", [1, 3])
@given(data=st.data())
def test_closed_form_gradients_agree(depth, data):
    example = data.draw(fst.fgh_examples(min_depth=depth, max_depth=depth, max_tokens=30))
    c_pos, c_neg = _scalar(example.c_pos), _scalar(example.c_neg)
    instance = _instance(example, c_pos, c_neg)
    # gradients jump at regime boundaries; two round-off-different evaluations must not straddle one
    assume(instance.regime_margin(instance.parts(example.log_ratio)) > 1e-9)
    adv = torch.linspace(-1, 1, example.log_ratio.numel(), dtype=torch.float64)
    levels = example.level_ids

    def closed(x):
        if depth == 1:
            return ob.fiberpo_gated_ratio(x, levels[0], eps=example.eps, c_pos=c_pos, c_neg=c_neg)
        return ob.fiberpo_domain_gated_ratio(x, levels[2], levels[1], levels[0], eps=example.eps, c_pos=c_pos, c_neg=c_neg)

    grads = []
    for f in (closed, lambda x: fgh.fiberpo_hierarchy_gated_ratio(x, levels, eps=example.eps, c_pos=c_pos, c_neg=c_neg)):
        x = example.log_ratio.clone().requires_grad_()
        (f(x) * adv).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


def _reference_chain(x, levels, eps, c_pos, c_neg):
    """FiberPO with per-level budgets on a chain, written from Eq. 31-33 extended level by level.

    Each level's aggregate is the trajectory-count weighted mean of log s_τ
    below it; level k gates (its aggregate − its parent's) with its token
    count as k; tokens keep the FiberPO fiber gate (Eq. 16).
    """
    traj = Segments.from_ids(levels[-1])
    parts = ob.fiberpo_parts(x, levels[-1], eps=eps, c_pos=1.0, c_neg=1.0)
    channels = torch.stack([parts.log_s_pos, parts.log_s_neg], 1)
    first = torch.zeros(traj.size, dtype=torch.long).scatter_(0, traj.index, torch.arange(x.numel()))
    log_w = torch.zeros(traj.size, dtype=x.dtype)
    parent_agg = torch.zeros_like(channels)
    for k, ids in enumerate(levels):
        seg = Segments.from_ids(ids)
        of_traj = seg.index[first]
        n_traj = torch.bincount(of_traj, minlength=seg.size).to(x.dtype).unsqueeze(1)
        agg = torch.zeros(seg.size, 2, dtype=x.dtype).index_add(0, of_traj, channels) / n_traj
        budget = torch.tensor([c_pos[k], c_neg[k]], dtype=x.dtype)
        tokens = seg.count.to(x.dtype)[of_traj].unsqueeze(1)
        gated = g_agg(agg[of_traj] - parent_agg, budget, tokens)
        log_w = log_w + gated[:, 0] - gated[:, 1]
        parent_agg = agg[of_traj]
    return torch.exp(traj.gather(log_w) + parts.log_gated_residual)


@given(example=fst.fgh_examples(min_depth=1, max_depth=6))
def test_per_level_budgets_any_depth_match_level_by_level_reference(example):
    depth = example.sample.depth
    c_pos = example.c_pos if isinstance(example.c_pos, tuple) else (example.c_pos,) * depth
    c_neg = example.c_neg if isinstance(example.c_neg, tuple) else (example.c_neg,) * depth
    got = fgh.fiberpo_hierarchy_gated_ratio(example.log_ratio, example.level_ids, eps=example.eps, c_pos=c_pos, c_neg=c_neg)
    want = _reference_chain(example.log_ratio, example.level_ids, example.eps, c_pos, c_neg)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-13)


# ---------------------------------------------------------------------------
# First order at r = 1, pass-through, block structure
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@given(example=fst.fgh_examples(max_tokens=24, styles=["on-policy"]))
def test_identity_value_and_jacobian_at_r_equal_one(device, example):
    x = torch.zeros(example.log_ratio.numel(), dtype=torch.float64, device=device)
    levels = [i.to(device) for i in example.level_ids]
    f = lambda z: fgh.fiberpo_hierarchy_gated_ratio(z, levels, eps=example.eps, c_pos=example.c_pos, c_neg=example.c_neg)  # noqa: E731
    value = f(x)
    assert bool((value == 1).all())  # exact: every gate maps 0 to 0 and exp(0) = 1
    jac = _jacobian(f, x)
    eye = torch.eye(x.numel(), dtype=torch.float64, device=device)
    assert float((jac - eye).abs().max()) <= 1e-12


def test_sign_zero_convention_matters():
    """With torch.sign (0 at 0) the decomposition loses the token at r = 1 (the identity Jacobian there is required)."""
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    length = torch.full((3,), 3.0, dtype=torch.float64)
    fgh.recover(fgh.decompose(x, length), length).sum().backward()
    assert torch.equal(x.grad, torch.ones(3, dtype=torch.float64))
    y = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    s = torch.sign(y)
    relu_form = torch.stack([torch.relu(s * y), torch.relu(-s * y)], 1) / length.unsqueeze(1)
    fgh.recover(relu_form, length).sum().backward()
    assert torch.equal(y.grad, torch.zeros(3, dtype=torch.float64))


@given(example=fst.fgh_examples())
def test_g_equals_r_where_every_gate_passes(example):
    instance = _instance(example)
    parts = instance.parts(example.log_ratio)
    gated = fgh.recover(parts.output, instance.length)
    h = instance.hierarchy
    all_pass = torch.ones(h.sizes[-1], dtype=torch.bool)
    for v, codes in enumerate(instance.regimes(parts).values()):
        all_pass &= (codes == 0).all(dim=1)[h.token_index(v)]
    ratio = torch.exp(example.log_ratio)
    torch.testing.assert_close(gated[all_pass], ratio[all_pass], rtol=1e-12, atol=0)


@given(example=fst.fgh_examples())
def test_huge_budgets_give_g_equals_r(example):
    x = example.log_ratio
    got = fgh.fiberpo_hierarchy_gated_ratio(x, example.level_ids, eps=1e6, c_pos=1e6, c_neg=1e6)
    torch.testing.assert_close(got, torch.exp(x), rtol=1e-12, atol=0)


@given(example=fst.fgh_examples(max_tokens=24))
def test_jacobian_block_diagonal_over_coarsest_stratum(example):
    f = lambda z: fgh.fiberpo_hierarchy_gated_ratio(z, example.level_ids, eps=example.eps, c_pos=example.c_pos, c_neg=example.c_neg)  # noqa: E731
    jac = _jacobian(f, example.log_ratio)
    coarsest = Segments.from_ids(example.level_ids[0]).index
    outside = coarsest.unsqueeze(1) != coarsest.unsqueeze(0)
    assert bool((jac[outside] == 0).all())  # exact zeros, not small numbers


@given(example=fst.fgh_examples(), data=st.data())
def test_invariant_under_relabelling_and_permutation(example, data):
    n = example.log_ratio.numel()
    perm = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.long)
    relabelled = []
    for ids in example.level_ids:
        seg = Segments.from_ids(ids)
        fresh = data.draw(st.lists(st.integers(0, 10**9), min_size=seg.size, max_size=seg.size, unique=True))
        relabelled.append(torch.tensor(fresh, dtype=torch.long)[seg.index][perm])
    kwargs = dict(eps=example.eps, c_pos=example.c_pos, c_neg=example.c_neg)
    base = fgh.fiberpo_hierarchy_gated_ratio(example.log_ratio, example.level_ids, **kwargs)
    moved = fgh.fiberpo_hierarchy_gated_ratio(example.log_ratio[perm], relabelled, **kwargs)
    torch.testing.assert_close(moved, base[perm], rtol=1e-12, atol=1e-14)


@given(example=fst.fgh_examples(max_depth=5), data=st.data())
def test_inserting_a_trivial_level_leaves_g_unchanged(example, data):
    depth = example.sample.depth
    k = data.draw(st.integers(0, depth - 1))
    c_pos = example.c_pos if isinstance(example.c_pos, tuple) else (example.c_pos,) * depth
    c_neg = example.c_neg if isinstance(example.c_neg, tuple) else (example.c_neg,) * depth
    levels = example.level_ids
    copy = Segments.from_ids(levels[k]).index * 7 + 3  # same partition, different ids
    new_levels = levels[: k + 1] + [copy] + levels[k + 1 :]
    new_pos, new_neg = c_pos[: k + 1] + (c_pos[k],) + c_pos[k + 1 :], c_neg[: k + 1] + (c_neg[k],) + c_neg[k + 1 :]
    base = fgh.fiberpo_hierarchy_gated_ratio(example.log_ratio, levels, eps=example.eps, c_pos=c_pos, c_neg=c_neg)
    h = hier.from_ids(new_levels)
    kernels = hier.mass_kernels(h, hier.trajectory_mass(h, h.total - 1))
    assert bool((kernels[k] == 1).all())  # the copy's kernel is the identity
    got = fgh.fiberpo_hierarchy_gated_ratio(example.log_ratio, new_levels, eps=example.eps, c_pos=new_pos, c_neg=new_neg)
    torch.testing.assert_close(got, base, rtol=1e-12, atol=1e-14)


@given(example=fst.fgh_examples())
def test_residuals_push_forward_to_zero(example):
    instance = _instance(example)
    parts = instance.parts(example.log_ratio)
    h = instance.hierarchy
    scale = 1 + float(parts.pushforwards[0].abs().max())
    for v in range(1, h.total + 1):
        parent = v - 1  # chain: stratum v is coarsened by v - 1
        pushed = hier.sum_children(parts.residuals[v], h.projection[parent], h.sizes[parent])
        assert float(pushed.abs().max()) <= 1e-12 * scale


# ---------------------------------------------------------------------------
# The general operator with arbitrary gates; FBG (Eq. 4) and trees
# ---------------------------------------------------------------------------


def _identity(residual, context):
    return residual


@given(sample=fst.hierarchies(max_tokens=30), data=st.data())
def test_identity_gates_give_identity_operator(sample, data):
    h = hier.from_ids(list(sample.level_ids))
    weights = [
        torch.tensor(data.draw(st.lists(st.floats(0.1, 10), min_size=h.sizes[h.finer[v]], max_size=h.sizes[h.finer[v]])), dtype=torch.float64)
        for v in range(h.total)
    ]
    kernels = tuple(hier.weighted_kernel(h, v, w) for v, w in enumerate(weights)) + (None,)
    sigma = torch.randn(h.sizes[-1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = fgh.FGH(h, kernels, (_identity,) * len(h.names))(sigma)
    torch.testing.assert_close(out, sigma, rtol=1e-12, atol=1e-12)


@given(sample=fst.hierarchies(min_depth=1, max_depth=1), data=st.data())
def test_n1_operator_is_fbg_eq4(sample, data):
    h = hier.from_ids(list(sample.level_ids))
    n = h.sizes[-1]
    weight = torch.tensor(data.draw(st.lists(st.floats(0.1, 10), min_size=n, max_size=n)), dtype=torch.float64)
    kernel = hier.weighted_kernel(h, 0, weight)
    a, b = data.draw(st.floats(-2, 2)), data.draw(st.floats(0.05, 1))
    base_gate = lambda p: torch.tanh(a * p) + p  # noqa: E731
    fiber_gate = lambda r, p: symmetric_clip(r, b) * (1 + p.index_select(0, h.projection[0]) ** 2)  # noqa: E731
    gates = (lambda r, ctx: base_gate(r), lambda r, ctx: fiber_gate(r, ctx.pushforwards[0]))
    sigma = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got = fgh.fgh_operator(sigma, h, (kernel, None), gates).output
    want = fgh.fbg_operator(sigma, h.projection[0], h.sizes[0], kernel, base_gate, fiber_gate)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _tree_example(x_scale=0.3):
    gen = torch.Generator().manual_seed(3)
    n = 40
    traj = torch.randint(0, 10, (n,), generator=gen) * 11 + 5
    domain = (traj // 11) % 3
    modality = (traj // 11) % 2 + 100
    x = torch.randn(n, dtype=torch.float64, generator=gen) * x_scale
    return x, {"trajectory": traj, "domain": domain, "modality": modality}


TREE = {"trajectory": "token", "domain": "trajectory", "modality": "trajectory"}


def test_tree_identity_and_pass_through():
    x, cols = _tree_example()
    f = lambda z: fgh.fiberpo_tree_gated_ratio(z, cols, TREE, eps=0.3, c_pos=0.05, c_neg=0.04)  # noqa: E731
    zero = torch.zeros_like(x)
    assert bool((f(zero) == 1).all())
    torch.testing.assert_close(_jacobian(f, zero), torch.eye(x.numel(), dtype=torch.float64), rtol=0, atol=1e-12)
    big = fgh.fiberpo_tree_gated_ratio(x, cols, TREE, eps=1e6, c_pos=1e6, c_neg=1e6)
    torch.testing.assert_close(big, torch.exp(x), rtol=1e-12, atol=0)


def test_tree_gates_each_branch_and_the_trajectory_against_both():
    """On the tree the trajectory residual is log s_τ − log s_D − log s_M (both branches subtracted)."""
    x, cols = _tree_example()
    budgets = {"domain": 0.02, "modality": 0.03, "trajectory": 0.05}
    got = fgh.fiberpo_tree_gated_ratio(x, cols, TREE, eps=0.3, c_pos=budgets, c_neg=budgets)
    parts = ob.fiberpo_parts(x, cols["trajectory"], eps=0.3, c_pos=1.0, c_neg=1.0)
    traj = parts.traj
    channels = torch.stack([parts.log_s_pos, parts.log_s_neg], 1)
    first = torch.zeros(traj.size, dtype=torch.long).scatter_(0, traj.index, torch.arange(x.numel()))
    log_w = torch.zeros(traj.size, 2, dtype=torch.float64)
    subtract = torch.zeros_like(channels)
    for name in ("domain", "modality"):
        seg = Segments.from_ids(cols[name])
        of_traj = seg.index[first]
        n_traj = torch.bincount(of_traj, minlength=seg.size).double().unsqueeze(1)
        agg = (torch.zeros(seg.size, 2, dtype=torch.float64).index_add(0, of_traj, channels) / n_traj)[of_traj]
        tokens = seg.count.double()[of_traj].unsqueeze(1)
        log_w += g_agg(agg, budgets[name], tokens)
        subtract += agg
    log_w += g_agg(channels - subtract, budgets["trajectory"], traj.count.double().unsqueeze(1))
    want = torch.exp(traj.gather(log_w[:, 0] - log_w[:, 1]) + parts.log_gated_residual)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_tree_residual_does_not_push_forward_to_zero_on_each_branch():
    """On a tree the reflecting argument of Def. 6.2 (i) holds per edge, not for the combined residual.

    The trajectory residual subtracts both branches' reflections, so pushed
    onto the domains it leaves minus the modality reflection's pushforward.
    """
    x, cols = _tree_example()
    h = hier.from_tree(cols, TREE)
    inst = fgh.fiberpo_fgh(h, trajectory="trajectory", eps=0.3, c_pos=0.05, c_neg=0.04)
    parts = inst.parts(x)
    t, d, m = h.index("trajectory"), h.index("domain"), h.index("modality")
    onto_domain = hier.sum_children(parts.residuals[t], h.projection[d], h.sizes[d])
    modality_reflection = hier.reflect(h, m, inst.fgh.kernels[m], parts.pushforwards[m])
    torch.testing.assert_close(onto_domain, -hier.sum_children(modality_reflection, h.projection[d], h.sizes[d]))
    assert float(onto_domain.abs().max()) > 1e-3
    one_branch = parts.pushforwards[t] - hier.reflect(h, d, inst.fgh.kernels[d], parts.pushforwards[d])
    assert float(hier.sum_children(one_branch, h.projection[d], h.sizes[d]).abs().max()) < 1e-15


def test_turns_between_trajectory_and_token():
    """A turn level below trajectories: identity at r = 1, G = r in pass-through, one turn per trajectory = FiberPO."""
    gen = torch.Generator().manual_seed(4)
    traj = torch.tensor([0] * 5 + [1] * 3 + [2])
    turn = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])
    x = torch.randn(9, dtype=torch.float64, generator=gen)
    h = hier.from_ids([traj, turn], names=["trajectory", "turn"])
    inst = fgh.fiberpo_fgh(h, trajectory="trajectory", eps=0.2, c_pos=(0.1, 0.2), c_neg=(0.1, 0.05))
    zero = torch.zeros(9, dtype=torch.float64)
    torch.testing.assert_close(_jacobian(inst.gated_ratio, zero), torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-12)
    wide = fgh.fiberpo_fgh(h, trajectory="trajectory", eps=1e6, c_pos=1e6, c_neg=1e6)
    torch.testing.assert_close(wide.gated_ratio(x), torch.exp(x), rtol=1e-12, atol=0)
    trivial = hier.from_ids([traj, traj + 10], names=["trajectory", "turn"])
    one_turn = fgh.fiberpo_fgh(trivial, trajectory="trajectory", eps=0.2, c_pos=0.1, c_neg=0.05)
    want = ob.fiberpo_gated_ratio(x, traj, eps=0.2, c_pos=0.1, c_neg=0.05)
    torch.testing.assert_close(one_turn.gated_ratio(x), want, rtol=1e-12, atol=1e-14)


def test_surrogate_eq29_value_and_gradient_at_on_policy():
    gen = torch.Generator().manual_seed(5)
    traj = torch.tensor([3, 3, 3, 8, 8, 1])
    group = torch.tensor([0, 0, 0, 0, 0, 2])
    adv = torch.randn(6, dtype=torch.float64, generator=gen)
    h = hier.from_ids([group, traj])
    inst = fgh.fiberpo_fgh(h, trajectory=1, eps=0.2, c_pos=0.1, c_neg=0.1)
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    value = fgh.fgh_surrogate(x, adv, inst)
    value.backward()
    mu = ob.aggregation_weights("trajectory", x.detach(), traj)
    torch.testing.assert_close(value.detach(), (mu * adv).sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(x.grad, mu * adv, rtol=1e-12, atol=0)  # d/dx of Σ μ e^x Â at x = 0


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


def test_bad_inputs_are_rejected():
    x = torch.zeros(4, dtype=torch.float64)
    t = torch.tensor([0, 0, 1, 1])
    call = lambda **kw: fgh.fiberpo_hierarchy_gated_ratio(**{"log_ratio": x, "level_ids": [t], "eps": 0.2, "c_pos": 0.1, "c_neg": 0.1, **kw})  # noqa: E731
    with pytest.raises(ValueError, match="eps must be a positive"):
        call(eps=-1.0)
    with pytest.raises(ValueError, match=r"c_pos must have one value per level \(1"):
        call(c_pos=(0.1, 0.2))
    with pytest.raises(ValueError, match=r"c_neg\[0\] must be a positive"):
        call(c_neg=(0.0,))
    with pytest.raises(ValueError, match="log_ratio has a non-finite value"):
        call(log_ratio=torch.tensor([0.0, float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match=r"level_ids\[0\] has length 3 but log_ratio has length 4"):
        call(level_ids=[t[:3]])
    with pytest.raises(ValueError, match="level_ids must be a non-empty list"):
        call(level_ids=[])
    with pytest.raises(ValueError, match="does not nest"):
        call(level_ids=[torch.tensor([0, 1, 1, 1]), t])
    h = hier.from_ids([t])
    with pytest.raises(ValueError, match=r"kernels\[0\].*not reflecting"):
        fgh.FGH(h, (torch.full((4,), 0.3, dtype=torch.float64), None), (_identity, _identity))
    with pytest.raises(ValueError, match="gates must be 2 callables"):
        fgh.FGH(h, (hier.uniform_kernel(h, 0), None), (_identity,))
    with pytest.raises(ValueError, match="sigma must be a tensor with 4 rows"):
        fgh.fgh_operator(torch.zeros(3, 2), h, (hier.uniform_kernel(h, 0), None), (_identity, _identity))
    with pytest.raises(ValueError, match="trajectory must name a stratum above the tokens"):
        fgh.fiberpo_fgh(h, trajectory=1, eps=0.1, c_pos=0.1, c_neg=0.1)
    with pytest.raises(ValueError, match="c_pos must give a budget for each of"):
        fgh.fiberpo_fgh(h, trajectory=0, eps=0.1, c_pos={"domain": 0.1}, c_neg=0.1)


# ---------------------------------------------------------------------------
# The fused engine (fused.FiberGate around the operator above the tokens) = the token-level operator
# ---------------------------------------------------------------------------


def _engines_agree(instance, x, adv):
    """Fused and operator gated ratios and their gradients agree to 1e-10 (float64)."""
    grads, values = [], []
    for f in (lambda z: fgh.fused_gated_ratio(instance, z), instance.operator_gated_ratio):
        z = x.clone().requires_grad_()
        value = f(z)
        (value * adv).sum().backward()
        values.append(value.detach())
        grads.append(z.grad)
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)
    return values[0], grads[0]


@given(example=fst.fgh_examples(min_depth=1, max_depth=6))
def test_fused_engine_equals_operator_on_chains(example):
    instance = _instance(example)
    assume(instance.regime_margin(instance.parts(example.log_ratio)) > 1e-9)
    adv = torch.linspace(-1, 1, example.log_ratio.numel(), dtype=torch.float64)
    value, _ = _engines_agree(instance, example.log_ratio, adv)
    assert torch.equal(instance.gated_ratio(example.log_ratio), value)  # chains dispatch to the fused engine


@pytest.mark.parametrize("seed", range(6))
def test_fused_engine_equals_operator_on_trees(seed):
    """Remark 6.5: two or three strata side by side above the trajectories, the trajectory residual subtracts each."""
    gen = torch.Generator().manual_seed(seed)
    n = 60
    traj = torch.randint(0, 14, (n,), generator=gen) * 7 + 3
    cols = {"trajectory": traj, "domain": (traj // 7) % 3, "modality": (traj // 7) % 2 + 100}
    finer = dict(TREE)
    if seed % 2:  # a deeper branch: a super-domain above the domains
        cols["family"], finer["family"] = cols["domain"] % 2, "domain"
    x = torch.randn(n, dtype=torch.float64, generator=gen) * 0.3
    h = hier.from_tree(cols, finer)
    budgets = {name: 0.02 + 0.01 * k for k, name in enumerate(h.names[:-1])}
    instance = fgh.fiberpo_fgh(h, trajectory="trajectory", eps=0.3, c_pos=budgets, c_neg=budgets)
    assert instance.regime_margin(instance.parts(x)) > 1e-9  # fixed seeds: no gradient compared on a kink
    _, grad = _engines_agree(instance, x, torch.randn(n, dtype=torch.float64, generator=gen))
    assert float(grad.abs().max()) > 0
    got = fgh.fiberpo_tree_gated_ratio(x, cols, finer, eps=0.3, c_pos=budgets, c_neg=budgets)
    assert torch.equal(got, instance.gated_ratio(x))


def test_fused_engine_identity_jacobian_at_r_equal_one():
    x, cols = _tree_example()
    h = hier.from_tree(cols, TREE)
    instance = fgh.fiberpo_fgh(h, trajectory="trajectory", eps=0.3, c_pos=0.05, c_neg=0.04)
    zero = torch.zeros_like(x)
    jac = _jacobian(lambda z: fgh.fused_gated_ratio(instance, z), zero)
    torch.testing.assert_close(jac, torch.eye(x.numel(), dtype=torch.float64), rtol=0, atol=1e-12)


def test_turns_and_side_branches_run_the_operator():
    """Where the tokens' residual is not FiberPO's fiber gate the instance keeps the token-level operator."""
    gen = torch.Generator().manual_seed(8)
    traj = torch.tensor([0] * 5 + [1] * 3 + [2])
    x = torch.randn(9, dtype=torch.float64, generator=gen)
    turns = hier.from_ids([traj, torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4])], names=["trajectory", "turn"])
    side = hier.from_tree({"trajectory": traj, "source": torch.tensor([0, 1] * 4 + [0])},
                          {"trajectory": "token", "source": "token"})
    for h in (turns, side):
        instance = fgh.fiberpo_fgh(h, trajectory="trajectory", eps=0.2, c_pos=0.1, c_neg=0.05)
        assert torch.equal(instance.gated_ratio(x), instance.operator_gated_ratio(x))
        with pytest.raises(ValueError, match="instance"):
            fgh.fused_gated_ratio(instance, x)
    chain = fgh.fiberpo_fgh(hier.from_ids([traj]), trajectory=0, eps=0.2, c_pos=0.1, c_neg=0.05)
    with pytest.raises(ValueError, match="log_ratio has 8 tokens"):
        fgh.fused_gated_ratio(chain, x[:8])


def test_fused_engine_builds_no_token_level_pieces():
    """The fused engine reads only the strata above the tokens: T_τ per token and the token kernel stay unbuilt."""
    gen = torch.Generator().manual_seed(10)
    traj = torch.randint(0, 9, (40,), generator=gen).sort().values
    x = torch.randn(40, dtype=torch.float64, generator=gen) * 0.2
    h = hier.from_ids([traj // 4, traj // 2, traj])
    lazy = fgh.fiberpo_fgh(h, trajectory=h.total - 1, eps=0.2, c_pos=0.03, c_neg=0.05, validate=False)
    value = lazy.gated_ratio(x)
    assert "length" not in vars(lazy) and "fgh" not in vars(lazy) and "ids" not in vars(h)
    eager = fgh.fiberpo_fgh(h, trajectory=h.total - 1, eps=0.2, c_pos=0.03, c_neg=0.05)  # validating builds it
    assert "fgh" in vars(eager)
    torch.testing.assert_close(value, lazy.operator_gated_ratio(x), rtol=0, atol=1e-12)
    moved = fgh.fiberpo_fgh(h.to("cpu"), trajectory=h.total - 1, eps=0.2, c_pos=0.03, c_neg=0.05)
    assert h.to("cpu").segments == () and torch.equal(moved.gated_ratio(x), value)  # Segments rebuilt
    for bad in (lambda: lazy.gated_ratio(x.clone().fill_(float("nan"))), lambda: fgh.fused_gated_ratio(lazy, x[None])):
        with pytest.raises(ValueError, match="log_ratio"):
            bad()


def test_fused_engine_equals_operator_with_a_process_group(tmp_path):
    """The shared strata's sums over the ranks (a one-rank gloo group: the distributed code path, exact sums)."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed with no default group yet")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        gen = torch.Generator().manual_seed(9)
        traj = torch.randint(0, 12, (50,), generator=gen)
        levels = [traj // 6, traj // 3, traj]
        x = torch.randn(50, dtype=torch.float64, generator=gen) * 0.2
        h = hier.from_ids(levels)
        instance = fgh.fiberpo_fgh(h, trajectory=h.total - 1, eps=0.2, c_pos=0.03, c_neg=0.05,
                                   process_group=dist.group.WORLD)
        assert instance.fgh.shared == (0, 1)
        _engines_agree(instance, x, torch.randn(50, dtype=torch.float64, generator=gen))
    finally:
        dist.destroy_process_group()
