"""The fused APC-Obj gate (closed-form backward) against its autograd reference, in every regime and id layout."""

import pytest
import torch

from fiberpo_theory import objectives as obj
from fiberpo_theory.core.fused_apc import _over_budget_rows, state_table
from fiberpo_theory.core.segments import Segments

KINK = 1e-4  # finite differences need this much room from every kink of the gate


def _batch(gen, n_states, scale, *, zeros=False, singles=0, longest=5):
    counts = torch.randint(1, longest + 1, (n_states,), generator=gen)
    counts[:singles] = 1
    state = torch.repeat_interleave(torch.arange(n_states) * 7 + 2, counts)
    deviation = torch.randn(state.numel(), generator=gen, dtype=torch.float64) * scale
    if zeros:
        deviation[torch.rand(state.numel(), generator=gen) < 0.15] = 0.0
    return (1 + deviation).clamp(min=0.05), state


def _regimes(ratio, state, delta):
    """Per token: (b_s, B_i, d_i) of the module docstring, in float64 by plain loops."""
    d = ratio - 1
    seg = Segments.from_ids(state)
    b = seg.gather(seg.sum(delta - d.abs()))
    return b, b + d.abs(), d


def _reference_and_fused(ratio, state, delta, weight):
    leaves = [ratio.clone().requires_grad_(True) for _ in range(2)]
    fused = obj.apc_obj_gated_ratio(leaves[0], state, delta=delta)
    reference = obj.apc_obj_gated_ratio(leaves[1], state, delta=delta, fused=False)
    (fused * weight).sum().backward()
    (reference * weight).sum().backward()
    return fused, reference, leaves[0].grad, leaves[1].grad


def test_gradcheck_float64_in_every_regime():
    gen = torch.Generator().manual_seed(0)
    reached = dict.fromkeys(["inside", "upper", "lower", "zeroed", "single-token state"], 0)
    checked = 0
    for _ in range(150):
        delta = float(torch.empty(1).uniform_(0.02, 0.3, generator=gen))
        ratio, state = _batch(gen, int(torch.randint(1, 5, (1,), generator=gen)),
                              float(torch.empty(1).uniform_(0.02, 0.5, generator=gen)), singles=1)
        b, bound, d = _regimes(ratio, state, delta)
        over = b < 0
        if not all(bool((g > KINK).all()) for g in (d.abs(), b.abs(), bound.abs())):
            continue
        checked += 1
        live = over & (bound > 0)
        reached["inside"] += int((~over).sum())
        reached["upper"] += int((live & (d > 0)).sum())
        reached["lower"] += int((live & (d < 0)).sum())
        reached["zeroed"] += int((over & (bound < 0)).sum())
        reached["single-token state"] += int((over & (torch.bincount(state)[state] == 1)).sum())
        leaf = ratio.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda r: obj.apc_obj_gated_ratio(r, state, delta=delta), (leaf,))
    missing = [name for name, count in reached.items() if count == 0]
    assert checked >= 30 and not missing, (checked, reached)


@pytest.mark.parametrize("layout", ["sorted", "shuffled", "segments", "long-runs", "wide-range"])
def test_fused_equals_autograd_reference(layout):
    gen = torch.Generator().manual_seed(1)
    ties = over = 0
    for _ in range(60):
        longest = 80 if layout == "long-runs" else 5
        ratio, state = _batch(gen, int(torch.randint(1, 8, (1,), generator=gen)),
                              float(torch.empty(1).uniform_(0.01, 0.6, generator=gen)) / longest**0.5 * 2,
                              zeros=True, singles=1, longest=longest)
        if layout in ("segments", "long-runs"):  # padded rows: lengths, no ids at all (long runs reduce by them)
            state = Segments.from_lengths(torch.unique_consecutive(state, return_counts=True)[1])
        elif layout == "shuffled":
            perm = torch.randperm(state.numel(), generator=gen)
            ratio, state = ratio[perm], state[perm]
        elif layout == "wide-range":  # ids far beyond their number: the sorting path
            perm = torch.randperm(state.numel(), generator=gen)
            ratio, state = ratio[perm], state[perm] * 10**9
        weight = torch.randn(ratio.numel(), generator=gen, dtype=torch.float64)
        fused, reference, fused_grad, reference_grad = _reference_and_fused(ratio, state, 0.1, weight)
        assert (fused - reference).abs().max() <= 1e-10
        # r = 1 with B <= 0 is a double kink where autograd splits ties of min/max; there G is locally
        # constant and, with sign(0) = 0, the fused gradient is 0 (the module docstring's convention)
        b, bound, d = _regimes(ratio, state.index if isinstance(state, Segments) else state, 0.1)
        tie = (d == 0) & (bound <= 0)
        assert (fused_grad - reference_grad)[~tie].abs().max() <= 1e-10
        assert bool((fused_grad[tie] == 0).all())
        ties, over = ties + int(tie.sum()), over + int((b < 0).sum())
    assert ties and over > 100, (ties, over)


def test_a_batch_within_budget_passes_the_gradient_unchanged():
    ratio = torch.tensor([1.01, 0.99, 1.02, 1.0], dtype=torch.float64, requires_grad=True)
    out = obj.apc_obj_gated_ratio(ratio, torch.tensor([0, 0, 1, 1]), delta=0.1)
    weight = torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.float64)
    (out * weight).sum().backward()
    assert torch.equal(out, 1 + (ratio.detach() - 1)) and torch.equal(ratio.grad, weight)


def test_over_budget_by_hand():
    # one state, δ = 0.1, T = 2: b = 0.2 - 0.3 - 0.05 = -0.15; B = (0.15, -0.1): rolled back and zeroed
    ratio = torch.tensor([1.3, 0.95], dtype=torch.float64, requires_grad=True)
    out = obj.apc_obj_gated_ratio(ratio, torch.tensor([4, 4]), delta=0.1)
    assert torch.allclose(out, torch.tensor([1.15, 1.0], dtype=torch.float64))
    (grad,) = torch.autograd.grad(out @ torch.tensor([2.0, 5.0], dtype=torch.float64), ratio)
    # ∂G_0/∂r_1 = -c_0 sign(d_1) = +1; token 0 moves nothing (∂B/∂r_own = 0), token 1 is constant
    assert torch.allclose(grad, torch.tensor([0.0, 2.0], dtype=torch.float64))


def test_jacobian_by_vmap_equals_the_reference():
    gen = torch.Generator().manual_seed(3)
    ratio, state = _batch(gen, 4, 0.4)
    fused = torch.autograd.functional.jacobian(lambda r: obj.apc_obj_gated_ratio(r, state, delta=0.1), ratio,
                                               vectorize=True)
    reference = torch.autograd.functional.jacobian(
        lambda r: obj.apc_obj_gated_ratio(r, state, delta=0.1, fused=False), ratio)
    over = _regimes(ratio, state, 0.1)[0] < 0
    assert bool(over.any()) and torch.allclose(fused, reference, atol=1e-12)


def test_the_public_gated_ratio_runs_the_fused_backward():
    ratio = torch.tensor([1.1, 0.8, 1.3], requires_grad=True)
    assert type(obj.apc_obj_gated_ratio(ratio, torch.tensor([0, 0, 1]), delta=0.1).grad_fn).__name__ == "ApcGateBackward"


def test_fused_saves_less_for_backward_than_autograd():
    def saved(fused):
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        ratio = torch.exp(torch.randn(4096, generator=torch.Generator().manual_seed(4)) * 0.05).requires_grad_(True)
        state = torch.randint(0, 1024, (4096,), generator=torch.Generator().manual_seed(5))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            obj.apc_obj_gated_ratio(ratio, state, delta=0.1, fused=fused)
        return total[0]

    # only the over-budget tokens' positions, slots and three factors are kept
    assert saved(True) < saved(False) / 10


@pytest.mark.parametrize("call, name", [
    (lambda: obj.apc_obj_gated_ratio(torch.tensor([1.0, 1.1]), torch.tensor([0]), delta=0.1), "state_id"),
    (lambda: obj.apc_obj_gated_ratio(torch.tensor([1.0, 1.1]), torch.tensor([0, -1]), delta=0.1), "state_id"),
    (lambda: obj.apc_obj_gated_ratio(torch.tensor([1.0, 1.1]), torch.tensor([0.0, 1.0]), delta=0.1), "state_id"),
    (lambda: obj.apc_obj_gated_ratio(torch.tensor([1.0, 1.1]), Segments.from_lengths(torch.tensor([3])), delta=0.1),
     "state_id"),
    (lambda: obj.apc_obj_gated_ratio(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]), delta=0.1), "ratio"),
    (lambda: obj.apc_obj_gated_ratio(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), delta=0.1), "ratio"),
    (lambda: obj.apc_obj_gated_ratio(torch.tensor([1.0]), torch.tensor([0]), delta=-0.1), "delta"),
])
def test_bad_input_names_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_state_table_takes_each_layout_its_own_way():
    like = torch.ones(64)
    ids = torch.randint(0, 9, (64,), generator=torch.Generator().manual_seed(6))
    index, size, lengths = state_table(ids, like)
    assert index is ids and size == int(ids.max()) + 1 and lengths is None  # slots are the ids: nothing ranked
    wide = ids * 10**9
    index, size, lengths = state_table(wide, like)
    assert size == int(torch.unique(wide).numel()) and torch.equal(index, Segments.from_ids(wide).index)
    assert state_table(Segments.from_lengths(torch.tensor([40, 24])), like)[2].tolist() == [40, 24]
    assert state_table(Segments.from_lengths(torch.full((16,), 4)), like)[2] is None  # short runs scatter


def test_the_subset_is_the_over_budget_tokens_or_everything():
    index = torch.tensor([0, 2, 2, 0, 3])
    within = torch.tensor([0.1, 0.0, 0.2, 0.3])  # slot 1 is empty (b = 0)
    assert _over_budget_rows(within, index).numel() == 0
    assert _over_budget_rows(torch.tensor([0.1, 0.0, -0.2, 0.3]), index).tolist() == [1, 2]
    assert _over_budget_rows(torch.tensor([-0.1, 0.0, -0.2, 0.3]), index) is None  # two of three occupied


def test_every_token_path_equals_the_reference():
    gen = torch.Generator().manual_seed(7)
    ratio, state = _batch(gen, 40, 0.6, longest=3)
    b = _regimes(ratio, state, 0.05)[0]
    assert _over_budget_rows(Segments.from_ids(state).sum(0.05 - (ratio - 1).abs()), Segments.from_ids(state).index) is None
    weight = torch.randn(ratio.numel(), generator=gen, dtype=torch.float64)
    fused, reference, fused_grad, reference_grad = _reference_and_fused(ratio, state, 0.05, weight)
    assert bool((b >= 0).any()) and (fused - reference).abs().max() <= 1e-10
    assert (fused_grad - reference_grad).abs().max() <= 1e-10
