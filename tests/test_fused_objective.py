"""The objective fused into the gate's pass (Eq. 2 with FiberPO / FiberPO-Domain) against the composed reference."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fiberpo_theory.core import native, objectives as obj
from fiberpo_theory.core.diagnostics import channel_regimes
from fiberpo_theory.core.segments import Segments

from _loops import needs_loops

HYPER = dict(eps=0.1, c_pos=0.12, c_neg=0.2)


def _batches(n_batches, seed, zeros=False, longest=6):
    """Sorted trajectory ids (contiguous, increasing) with log-ratios at scales from pass to zeroed."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        lengths = torch.randint(1, longest + 1, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen)
        traj = torch.repeat_interleave(torch.arange(lengths.numel()) * 3 + 1, lengths)
        scale = float(torch.empty(1).uniform_(0.02, 0.6, generator=gen))
        x = torch.randn(traj.numel(), generator=gen, dtype=torch.float64) * scale
        if zeros:
            x[torch.rand(traj.numel(), generator=gen) < 0.15] = 0.0
        yield x, traj, torch.randn(traj.numel(), generator=gen, dtype=torch.float64)


def _groups(traj):
    dense = Segments.from_ids(traj).index
    return dense // 2 + 100, dense // 4


def _composed(x, traj, adv, weights, k=None):
    gated = obj.fiberpo_gated_ratio(x, traj, k=k, **HYPER)
    return obj.rgf_objective(gated, adv, obj.aggregation_weights(weights, gated, traj))


def _value_and_grad(fn, x):
    leaf = x.clone().requires_grad_(True)
    value = fn(leaf)
    value.backward()
    return value, leaf.grad, type(value.grad_fn).__name__


@needs_loops
@pytest.mark.parametrize("k", [None, 3.0])
@pytest.mark.parametrize("weights", ["trajectory", "token"])
def test_fused_objective_equals_the_gate_composed_with_eq2_in_every_regime(k, weights):
    reached = set()
    for x, traj, adv in _batches(80, seed=3, zeros=True):
        value, grad, node = _value_and_grad(lambda z: obj.fiberpo_objective(z, traj, adv, k=k, weights=weights,
                                                                            **HYPER), x)
        expected, expected_grad, _ = _value_and_grad(lambda z: _composed(z, traj, adv, weights, k), x)
        assert node == "FiberObjectiveBackward"
        assert abs(float(value.detach() - expected.detach())) <= 1e-12 * max(1.0, abs(float(expected.detach())))
        assert (grad - expected_grad).abs().max() <= 1e-10
        parts = obj.fiberpo_parts(x, traj, k=k, **HYPER)
        for channel, regime in zip("+-", channel_regimes(parts, c_pos=HYPER["c_pos"], c_neg=HYPER["c_neg"], k=k)):
            reached |= {(channel, int(r)) for r in regime.unique()}
        reached |= {"u-clipped"} if bool((parts.u.abs() > HYPER["eps"]).any()) else set()
        reached |= {"v-clipped"} if bool((parts.v.abs() > HYPER["eps"]).any()) else set()
    assert reached >= {(c, r) for c in "+-" for r in range(3)} | {"u-clipped", "v-clipped"}, reached


@needs_loops
@pytest.mark.parametrize("weights", ["trajectory", "token"])
def test_runs_longer_than_the_pass_lanes_sum_to_the_composed_objective(weights):
    # the objective's pass sums each run in 16 lanes plus a tail: lengths around and past multiples of 16
    lengths_seen = set()
    for x, traj, adv in _batches(60, seed=11, zeros=True, longest=70):
        lengths_seen |= set(Segments.from_ids(traj).count.tolist())
        value, grad, node = _value_and_grad(lambda z: obj.fiberpo_objective(z, traj, adv, weights=weights, **HYPER), x)
        expected, expected_grad, _ = _value_and_grad(lambda z: _composed(z, traj, adv, weights), x)
        assert node == "FiberObjectiveBackward"
        assert abs(float(value.detach() - expected.detach())) <= 1e-12 * max(1.0, abs(float(expected.detach())))
        assert (grad - expected_grad).abs().max() <= 1e-10
    assert {n for n in lengths_seen if n > 32 and n % 16} and {n for n in lengths_seen if n < 16}


@needs_loops
def test_fused_objective_passes_gradcheck_in_float64():
    checked = 0
    for x, traj, adv in _batches(40, seed=4):
        parts = obj.fiberpo_parts(x, traj, **HYPER)
        if not bool((parts.u.abs() - HYPER["eps"]).abs().min() > 1e-4):  # finite differences across a clip kink
            continue
        leaf = x.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda z: obj.fiberpo_objective(z, traj, adv, **HYPER), (leaf,))
        checked += 1
    assert checked >= 10


@needs_loops
def test_fused_domain_objective_equals_the_composed_domain_gate():
    for x, traj, adv in _batches(40, seed=5, zeros=True):
        group, domain = _groups(traj)
        value, grad, node = _value_and_grad(
            lambda z: obj.fiberpo_domain_objective(z, traj, group, domain, adv, **HYPER), x)
        gated = lambda z: obj.fiberpo_domain_gated_ratio(z, traj, group, domain, **HYPER)  # noqa: E731
        expected, expected_grad, _ = _value_and_grad(
            lambda z: obj.rgf_objective(gated(z), adv, obj.aggregation_weights("fiberpo_domain", z, traj)), x)
        assert node == "FiberObjectiveBackward"
        assert abs(float(value.detach() - expected.detach())) <= 1e-12 * max(1.0, abs(float(expected.detach())))
        assert (grad - expected_grad).abs().max() <= 1e-10


@needs_loops
def test_float32_and_several_chunks_agree_with_the_composed_path():
    gen = torch.Generator().manual_seed(6)
    lengths = torch.randint(1, 900, (400,), generator=gen)  # about 180k tokens: several chunks of whole runs
    traj = Segments.from_lengths(lengths)
    x = torch.randn(int(lengths.sum()), generator=gen) * 0.1
    adv = torch.randn(x.numel(), generator=gen)
    value, grad, node = _value_and_grad(lambda z: obj.fiberpo_objective(z, traj, adv, **HYPER), x)
    expected, expected_grad, _ = _value_and_grad(lambda z: _composed(z, traj, adv, "trajectory"), x)
    assert node == "FiberObjectiveBackward"
    assert abs(float(value.detach() - expected.detach())) <= 1e-5 * abs(float(expected))
    assert (grad - expected_grad).abs().max() <= 1e-6 * expected_grad.abs().max()


def test_paths_the_fused_pass_does_not_take_give_the_composed_objective():
    gen = torch.Generator().manual_seed(8)
    traj = torch.randint(0, 6, (40,), generator=gen)  # shuffled ids: no runs to walk
    x, adv = torch.randn(40, generator=gen, dtype=torch.float64) * 0.2, torch.randn(40, dtype=torch.float64)
    value, grad, node = _value_and_grad(lambda z: obj.fiberpo_objective(z, traj, adv, **HYPER), x)
    expected, expected_grad, _ = _value_and_grad(lambda z: _composed(z, traj, adv, "trajectory"), x)
    assert node != "FiberObjectiveBackward"
    assert torch.equal(value, expected) and torch.equal(grad, expected_grad)
    learnable = adv.clone().requires_grad_(True)  # a gradient through the advantages: the composed path carries it
    obj.fiberpo_objective(x, torch.sort(traj).values, learnable, **HYPER).backward()
    assert learnable.grad is not None and bool(learnable.grad.abs().sum() > 0)


@needs_loops
def test_a_batched_cotangent_gets_the_same_gradient_rows():
    x, traj, adv = next(_batches(1, seed=9))
    def objective(z):
        return obj.fiberpo_objective(z, traj, adv, **HYPER) * torch.tensor([1.0, -2.0], dtype=torch.float64)
    rows = torch.autograd.functional.jacobian(objective, x, vectorize=True)
    single = _value_and_grad(lambda z: obj.fiberpo_objective(z, traj, adv, **HYPER), x)[1]
    assert torch.allclose(rows[0], single, rtol=0, atol=1e-14) and torch.allclose(rows[1], -2 * single, atol=1e-14)


@pytest.mark.parametrize("advantages, message", [
    (torch.zeros(4), "advantages has shape"),
    (torch.tensor([0.0, float("nan"), 1.0]), "advantages has non-finite"),
    (torch.tensor([0, 1, 2]), "advantages must be a floating-point"),
])
def test_bad_advantages_are_named(advantages, message):
    x, traj = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match=message):
        obj.fiberpo_objective(x, traj, advantages, **HYPER)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 3, 5])  # a trajectory's first token, a lone token, the last one
def test_a_non_finite_log_ratio_is_named_by_every_objective(dtype, bad, where):
    # the fused pass skips the finiteness scan: its J must come out non-finite so the checked path names x_i,
    # also where that token's advantage is 0 and for a given k and for FiberPO-Domain
    traj = torch.tensor([0, 0, 0, 1, 2, 2])
    x = torch.tensor([0.1, -0.2, 0.3, 0.05, -0.1, 0.2], dtype=dtype)
    x[where] = bad
    adv = torch.ones(6, dtype=dtype)
    adv[where] = 0.0
    group, domain = torch.tensor([0, 0, 0, 0, 1, 1]), torch.tensor([0, 0, 0, 0, 0, 0])
    calls = [
        lambda: obj.fiberpo_objective(x, traj, adv, **HYPER),
        lambda: obj.fiberpo_objective(x, traj, adv, k=2.0, weights="token", **HYPER),
        lambda: obj.fiberpo_domain_objective(x, traj, group, domain, adv, **HYPER),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=f"log_ratio has a non-finite value at index {where}"):
            call()


def test_an_unknown_weighting_is_named():
    with pytest.raises(ValueError, match="weights must be"):
        obj.fiberpo_objective(torch.tensor([0.1, 0.2]), torch.tensor([0, 0]), torch.ones(2), weights="seq", **HYPER)


@needs_loops
def test_the_fused_objective_saves_q_and_one_flag_byte_per_token_only():
    traj = Segments.from_lengths(torch.full((50,), 40))
    x, adv = torch.randn(2000) * 0.1, torch.randn(2000)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
        fused = obj.fiberpo_objective(x.clone().requires_grad_(True), traj, adv, **HYPER)
    assert type(fused.grad_fn).__name__ == "FiberObjectiveBackward"
    assert sum(saved) == 2000 * (4 + 1)
    composed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: composed.append(t.numel() * t.element_size()) or t, lambda t: t):
        _composed(x.clone().requires_grad_(True), traj, adv, "trajectory")
    assert sum(composed) > sum(saved)


class _HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor back to the host: each is a host-device sync on CUDA.

    ``segment_reduce`` without ``unsafe`` tests its lengths by two scalars read back inside the op, so it
    counts twice; the scalar reads themselves are ``_local_scalar_dense`` (``float``, ``bool``, ``item``).
    """

    READS = {"_local_scalar_dense", "nonzero", "_unique2", "unique_consecutive", "unique_dim", "masked_select"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[1]
        if name in self.READS:
            self.reads.append(name)
        if name == "segment_reduce" and not kwargs.get("unsafe", False):
            self.reads += ["segment_reduce lengths check"] * 2
        return func(*args, **kwargs)


def test_a_step_on_the_torch_path_reads_one_scalar_back_with_the_trajectories_indexed_once(monkeypatch):
    """The path CUDA takes (the loops off): with a ready Segments the objective's forward and backward read back
    only J's finiteness; the gate composed with Eq. 2 reads back x's finiteness too."""
    monkeypatch.setattr(native, "library", lambda: None)
    lengths = torch.tensor([5, 9, 3, 7])
    traj = Segments.from_lengths(lengths)
    _ = traj.narrow_index  # built once per batch, with the Segments
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(int(lengths.sum()), generator=gen, dtype=torch.float64) * 0.3).requires_grad_(True)
    adv = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    with _HostReads() as fused:
        obj.fiberpo_objective(x, traj, adv, **HYPER).backward()
    with _HostReads() as composed:
        _composed(x, traj, adv, "trajectory").backward()
    assert fused.reads == ["_local_scalar_dense"], fused.reads
    assert composed.reads == ["_local_scalar_dense"] * 2, composed.reads
