"""The fused FiberPO gate (closed-form backward) against the autograd reference, and the layout fast paths."""

import pytest
import torch

from fiberpo_theory.core import gates, objectives as obj
from fiberpo_theory.core.diagnostics import channel_regimes
from fiberpo_theory.core.segments import Segments

HYPER = dict(eps=0.1, c_pos=0.12, c_neg=0.2)
KINK = 1e-4  # finite differences need this much room from every kink of the gate


def _batches(n_batches=80, seed=0, zeros=False):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        n_traj = int(torch.randint(1, 5, (1,), generator=gen))
        lengths = torch.randint(1, 7, (n_traj,), generator=gen)
        traj = torch.repeat_interleave(torch.randperm(n_traj, generator=gen) * 11 + 3, lengths)
        scale = float(torch.empty(1).uniform_(0.02, 0.6, generator=gen))
        x = torch.randn(traj.numel(), generator=gen, dtype=torch.float64) * scale
        if zeros:
            x[torch.rand(traj.numel(), generator=gen) < 0.15] = 0.0
        yield x, traj


def _groups(traj):
    """Prompt groups of two trajectories, domains of two groups (nested by construction)."""
    dense = Segments.from_ids(traj).index
    return dense // 2 + 100, dense // 4


def _away_from_kinks(x, parts):
    k = parts.length
    s = torch.cat([parts.log_s_pos, parts.log_s_neg])
    c = torch.cat([torch.full_like(k, HYPER["c_pos"]), torch.full_like(k, HYPER["c_neg"])])
    zero_at = c * (1 + 1 / torch.cat([k, k]))
    gaps = [x.abs(), (parts.u.abs() - HYPER["eps"]).abs(), (parts.v.abs() - HYPER["eps"]).abs(),
            (s - c).abs(), (s - zero_at).abs()]
    return all(bool((g > KINK).all()) for g in gaps)


def test_gradcheck_float64_in_every_regime():
    reached = {f"{ch}:{r}": 0 for ch in ("pos", "neg") for r in "PRZ"}
    reached.update({"u-clipped": 0, "u-free": 0, "v-clipped": 0, "v-free": 0})
    checked = 0
    for x, traj in _batches(200):
        parts = obj.fiberpo_parts(x, traj, **HYPER)
        if not _away_from_kinks(x, parts):
            continue
        checked += 1
        for name, regime in zip(("pos", "neg"), channel_regimes(parts, c_pos=HYPER["c_pos"], c_neg=HYPER["c_neg"])):
            for code, label in enumerate("PRZ"):
                reached[f"{name}:{label}"] += int((regime == code).sum())
        for name, values in (("u", parts.u), ("v", parts.v)):
            reached[f"{name}-clipped"] += int((values.abs() > HYPER["eps"]).sum())
            reached[f"{name}-free"] += int((values.abs() <= HYPER["eps"]).sum())
        leaf = x.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda z: obj.fiberpo_gated_ratio(z, traj, **HYPER), (leaf,))
        group, domain = _groups(traj)
        assert torch.autograd.gradcheck(
            lambda z: obj.fiberpo_domain_gated_ratio(z, traj, group, domain, **HYPER), (leaf,)
        )
    missing = [name for name, count in reached.items() if count == 0]
    assert checked >= 20 and not missing, (checked, missing)


@pytest.mark.parametrize("k", [None, 3.0])
def test_fused_equals_autograd_reference_with_exact_zeros(k):
    for x, traj in _batches(60, seed=1, zeros=True):
        weight = torch.randn(x.numel(), dtype=torch.float64)
        fused_leaf, ref_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        fused = obj.fiberpo_gated_ratio(fused_leaf, traj, k=k, **HYPER)
        reference = obj.fiberpo_parts(ref_leaf, traj, k=k, **HYPER).gated_ratio
        (fused * weight).sum().backward()
        (reference * weight).sum().backward()
        assert (fused - reference).abs().max() <= 1e-10
        assert (fused_leaf.grad - ref_leaf.grad).abs().max() <= 1e-10


def test_fused_domain_equals_autograd_reference():
    for x, traj in _batches(60, seed=2, zeros=True):
        group, domain = _groups(traj)
        weight = torch.randn(x.numel(), dtype=torch.float64)
        fused_leaf, ref_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        fused = obj.fiberpo_domain_gated_ratio(fused_leaf, traj, group, domain, **HYPER)
        reference = obj.fiberpo_domain_parts(ref_leaf, traj, group, domain, **HYPER).gated_ratio
        (fused * weight).sum().backward()
        (reference * weight).sum().backward()
        assert (fused - reference).abs().max() <= 1e-10
        assert (fused_leaf.grad - ref_leaf.grad).abs().max() <= 1e-10


def test_domain_jacobian_by_batched_cotangents_equals_the_autograd_reference():
    # jacobian(vectorize=True) batches the cotangent: the backward then takes the torch vjp on the slopes the
    # forward chain wrote (in C where the loops run)
    for x, traj in _batches(8, seed=12, zeros=True):
        group, domain = _groups(traj)
        got = torch.autograd.functional.jacobian(
            lambda z: obj.fiberpo_domain_gated_ratio(z, traj, group, domain, **HYPER), x, vectorize=True)
        expected = torch.autograd.functional.jacobian(
            lambda z: obj.fiberpo_domain_parts(z, traj, group, domain, **HYPER).gated_ratio, x)
        assert (got - expected).abs().max() <= 1e-10


def test_the_public_gated_ratios_run_the_fused_backward():
    x = torch.tensor([0.1, -0.2, 0.3], requires_grad=True)
    traj = torch.tensor([0, 0, 1])
    assert type(obj.fiberpo_gated_ratio(x, traj, **HYPER).grad_fn).__name__ == "FiberGateBackward"
    assert type(obj.fiberpo_domain_gated_ratio(x, traj, traj, traj, **HYPER).grad_fn).__name__ == "FiberGateBackward"


def test_fused_saves_less_for_backward_than_autograd():
    def saved(fn):
        total = [0]

        def pack(tensor):
            total[0] += tensor.numel() * tensor.element_size()
            return tensor

        x = (torch.randn(4096) * 0.1).requires_grad_(True)
        traj = torch.arange(64).repeat_interleave(64)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, traj)
        return total[0]

    fused = saved(lambda x, t: obj.fiberpo_gated_ratio(x, t, **HYPER))
    reference = saved(lambda x, t: obj.fiberpo_parts(x, t, **HYPER).gated_ratio)
    # G (4 bytes), the int32 key (4) and a bool flag (1) per token
    assert fused <= 9 * 4096 + 4096 and fused < reference / 3, (fused, reference)


# --- layouts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ids",
    [
        torch.tensor([0, 0, 1, 1, 1, 4]),  # sorted: boundary pass
        torch.tensor([5, 5, 2, 9, 9, 2]),  # small range, unsorted: bincount ranking
        torch.tensor([10**12, 3, 3, 10**12, 7]),  # huge range: sort
        torch.tensor([6]),
        torch.tensor([0, 0, 1, 1, 0]),  # runs 0, 1, 0: the run values do not increase, so not sorted
        torch.arange(5000).repeat_interleave(3).roll(-1),  # one descent where the neighbour probes do not look
        torch.tensor([3, 3, 8, 8, 8], dtype=torch.int32),
    ],
)
def test_segments_from_ids_equals_torch_unique_on_every_path(ids):
    seg = Segments.from_ids(ids)
    unique, inverse, count = torch.unique(ids.long(), sorted=True, return_inverse=True, return_counts=True)
    assert torch.equal(seg.ids, unique) and torch.equal(seg.index, inverse) and torch.equal(seg.count, count)
    assert seg.contiguous == bool((ids[1:] >= ids[:-1]).all())
    assert seg.index.dtype == torch.long and seg.narrow_index.dtype == torch.int32
    assert torch.equal(seg.narrow_index.long(), inverse) and seg.elements == ids.numel()


@pytest.mark.parametrize(
    "ids",
    [torch.tensor([-3, -3, 0, 2]), torch.tensor([4, -1, 4, 0]), torch.tensor([10**12, -5, 3]), torch.tensor([-2])],
    ids=["sorted", "counted", "sorted by unique", "one"],
)
def test_negative_ids_are_named_on_every_path(ids):
    with pytest.raises(ValueError, match="traj_id must be non-negative, found -"):
        obj.fiberpo_gated_ratio(torch.zeros(ids.numel()), ids, **HYPER)


@pytest.mark.parametrize(
    "ids, message",
    [(torch.tensor([0.0, 1.0]), "integer dtype"), (torch.tensor([True, False]), "integer dtype"),
     (torch.tensor([[0, 1]]), "1-D"), ([0, 1], "torch.Tensor")],
)
def test_segments_built_directly_name_bad_ids(ids, message):
    # Segments.from_ids is the documented way to index a batch once; it must refuse what segments_for refuses
    with pytest.raises(ValueError, match=f"traj_id .*{message}"):
        Segments.from_ids(ids, name="traj_id")


def test_sign_key_is_twice_the_index_plus_the_negative_sign():
    traj = Segments.from_ids(torch.tensor([2, 2, 5, 5, 9]))
    x = torch.tensor([0.0, -0.0, -0.1, 0.3, -2.0])
    key = traj.sign_key(x)
    assert key.dtype == torch.int32 and key.tolist() == [0, 0, 3, 2, 5]  # l = +1 at x = ±0 (Eq. 13)


def test_segments_from_lengths_is_the_padded_layout():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    seg = Segments.from_lengths(mask.sum(1))
    rows = torch.arange(3).unsqueeze(1).expand_as(mask)[mask]
    assert torch.equal(seg.index, rows) and seg.contiguous
    values = torch.arange(8, dtype=torch.float64)
    assert torch.equal(seg.sum(values), Segments.from_ids(rows * 5 + 1).sum(values))
    for bad in (torch.tensor([2, 0]), torch.tensor([1.0]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="lengths"):
            Segments.from_lengths(bad)


def test_every_layout_gives_the_same_gate_and_gradient():
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(1, 9, (12,), generator=gen)
    x = torch.randn(int(lengths.sum()), generator=gen, dtype=torch.float64) * 0.2
    sorted_ids = torch.arange(12).repeat_interleave(lengths)
    perm = torch.randperm(x.numel(), generator=gen)
    layouts = {
        "lengths": (x, Segments.from_lengths(lengths), None),
        "sorted": (x, sorted_ids, None),
        "shuffled": (x[perm], sorted_ids[perm] * 3, perm),
        "shuffled-large-ids": (x[perm], sorted_ids[perm] + 10**12, perm),
    }
    results = {}
    for name, (values, traj, order) in layouts.items():
        leaf = values.clone().requires_grad_(True)
        gated = obj.fiberpo_gated_ratio(leaf, traj, **HYPER)
        gated.pow(2).sum().backward()
        back = torch.empty_like(x)
        if order is None:
            results[name] = (gated.detach(), leaf.grad)
        else:
            back[order] = gated.detach()
            grad = torch.empty_like(x)
            grad[order] = leaf.grad
            results[name] = (back, grad)
    base = results["lengths"]
    for name, (gated, grad) in results.items():
        assert torch.allclose(gated, base[0], atol=1e-12) and torch.allclose(grad, base[1], atol=1e-12), name


def test_ready_segments_must_cover_the_log_ratios():
    with pytest.raises(ValueError, match="traj_id"):
        obj.fiberpo_gated_ratio(torch.zeros(3), Segments.from_lengths(torch.tensor([2])), **HYPER)


def test_non_finite_log_ratio_still_named_with_its_index():
    x = torch.tensor([0.1, float("nan"), 0.2])
    with pytest.raises(ValueError, match="log_ratio has a non-finite value at index 1"):
        obj.fiberpo_gated_ratio(x, torch.tensor([0, 0, 1]), **HYPER)
    # finite entries whose sum overflows are not mistaken for a non-finite input
    big = torch.tensor([3e38, 3e38], dtype=torch.float32)
    assert obj.fiberpo_gated_ratio(big, torch.tensor([0, 1]), **HYPER).isfinite().all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_fused_on_cuda_matches_cpu():
    x = torch.randn(1000, dtype=torch.float64) * 0.2
    traj = torch.arange(10).repeat_interleave(100)
    cpu = obj.fiberpo_gated_ratio(x, traj, **HYPER)
    gpu = obj.fiberpo_gated_ratio(x.cuda(), traj.cuda(), **HYPER)
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-12)


def test_fast_channel_means_equal_the_shared_sign_split():
    from fiberpo_theory.core.fused import channel_means
    from fiberpo_theory.core.gates import sign_split

    x = torch.tensor([0.3, 0.0, -0.2, -0.0, 0.1, 0.4, 0.5], dtype=torch.float64)  # trajectory 2 has no negative
    traj = Segments.from_ids(torch.tensor([1, 1, 1, 1, 2, 2, 2]))
    fast, reference = channel_means(x, traj), traj.mean(sign_split(x))
    assert torch.equal(fast, reference) and torch.equal(fast.signbit(), reference.signbit())  # +0.0, as the reference
    leaf = x.clone().requires_grad_(True)  # the graph-keeping branch gives the same values
    assert torch.equal(channel_means(leaf, traj).detach(), fast)
    assert sign_split(x)[:, 1].tolist() == [0.0, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0]


def test_nesting_read_off_the_runs_of_sorted_trajectories_matches_the_scatter_path():
    from fiberpo_theory.core.segments import nested_segments

    traj = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    group = torch.tensor([5, 5, 5, 5, 5, 9, 9, 9])
    domain = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0])
    perm = torch.tensor([3, 0, 7, 5, 1, 6, 2, 4])
    labels = ["domain", "prompt group", "trajectory"]
    runs, runs_parent = nested_segments([domain, group], Segments.from_ids(traj), labels)
    scattered, scattered_parent = nested_segments([domain[perm], group[perm]], Segments.from_ids(traj[perm]), labels)
    assert Segments.from_ids(traj).contiguous and not Segments.from_ids(traj[perm]).contiguous
    for a, b in zip(runs, scattered):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.count, b.count)
    assert all(torch.equal(a, b) for a, b in zip(runs_parent, scattered_parent))
    group[4] = 6  # trajectory 1 now spans two groups; the change is not at a run start
    with pytest.raises(ValueError, match="trajectory does not nest in prompt group: trajectory 1"):
        nested_segments([domain, group], Segments.from_ids(traj), labels)


def test_chunked_token_passes_equal_one_chunk_bit_for_bit_also_under_vmap(monkeypatch):
    import fiberpo_theory.core.fused as fused

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(50, generator=gen, dtype=torch.float64) * 0.3
    traj = torch.arange(5).repeat_interleave(10)[torch.randperm(50, generator=gen)]
    weight = torch.randn(50, generator=gen, dtype=torch.float64)

    def run():
        leaf = x.clone().requires_grad_(True)
        gated = obj.fiberpo_gated_ratio(leaf, traj, **HYPER)
        (gated * weight).sum().backward()
        jac = torch.autograd.functional.jacobian(lambda z: obj.fiberpo_gated_ratio(z, traj, **HYPER), x, vectorize=True)
        return gated.detach(), leaf.grad, jac

    whole = run()
    monkeypatch.setattr(fused, "_CHUNK", 7)  # 8 chunks, the last one short
    chunked = run()
    assert all(torch.equal(a, b) for a, b in zip(whole, chunked))


def test_closed_form_channel_chain_equals_autograd_also_on_every_kink():
    """FiberPO's per-trajectory chain in closed form (γ of Eq. 20) against autograd of the same tables.

    Channels sit exactly on 0, ±ε, C, C* = (1 + 1/k)C and between them, where a
    wrong one-sided convention would show as a difference of a whole slope.
    """
    import fiberpo_theory.core.fused as fused

    eps, c_pos, c_neg = HYPER["eps"], HYPER["c_pos"], HYPER["c_neg"]
    k = torch.tensor([3.0, 5.0, 2.0, 7.0, 4.0, 1.0, 6.0, 9.0], dtype=torch.float64)
    pos = torch.tensor([0.0, eps, c_pos, c_pos * (1 + 1 / 2.0), 0.05, 0.3, c_pos * 1.05, 0.0], dtype=torch.float64)
    neg = torch.tensor([eps, 0.0, c_neg * (1 + 1 / 5.0), c_neg, 0.4, 0.0, 0.17, c_neg * 1.1], dtype=torch.float64)
    for pos_col, neg_col in ((pos, neg), (neg, pos)):
        channels = torch.stack([pos_col, neg_col], dim=1).requires_grad_(True)
        log_base = obj._FiberPOLogBase(c_pos, c_neg, k)
        same, offset = fused._sign_tables(channels, log_base(channels), eps)
        gen = torch.Generator().manual_seed(0)
        grad_same, grad_offset = (torch.randn(16, generator=gen, dtype=torch.float64) for _ in range(2))
        (expected,) = torch.autograd.grad((same, offset), channels, (grad_same, grad_offset))
        slopes = log_base.slopes(channels.detach())
        got = fused._channel_grad(channels.detach(), lambda base: base.unsqueeze(-1) * slopes, grad_same, grad_offset,
                                  eps)
        assert torch.allclose(got, expected, rtol=0, atol=1e-14), (got - expected).abs().max()


def test_domain_base_weight_vjp_equals_autograd_in_every_regime_of_every_level():
    """FiberPO-Domain's base weight (Eq. 31, 33): the closed-form vector-Jacobian product against autograd.

    Random channels over 40 trajectories in groups of 1 to 4 and 3 domains, at scales that put the domain
    means, the group deviations and the trajectory deviations in g_agg's pass, rollback and zero regimes;
    batched cotangents (leading dimensions, as vmap and jacobian give) included.
    """
    gen = torch.Generator().manual_seed(7)
    sizes = torch.randint(1, 5, (40,), generator=gen)  # more than enough groups for 40 trajectories
    group_of_traj = torch.arange(40).repeat_interleave(sizes)[:40]
    lengths = torch.randint(1, 6, (40,), generator=gen)
    traj = torch.arange(40).repeat_interleave(lengths)
    group, domain = group_of_traj[traj], (group_of_traj % 3)[traj]
    x = torch.zeros(traj.numel(), dtype=torch.float64)
    lv = obj._domain_levels(x, traj, group, domain)
    base = obj._DomainLogBase(lv, 0.05, 0.08)
    reached = set()
    # the domain level's rollback band (C, (1 + 1/T_D)C) is narrow: channels equal within each domain, inside it
    t_domain = lv.domain_tokens.to(torch.float64)[lv.traj_domain]
    in_band = torch.stack([0.05 * (1 + 0.5 / t_domain), 0.08 * (1 + 0.5 / t_domain)], dim=1)
    samples = [torch.rand(40, 2, generator=gen, dtype=torch.float64) * scale for scale in (0.01, 0.05, 0.2, 1.0)]
    for channels in samples + [in_band]:
        channels = channels.clone().requires_grad_(True)
        cotangent = torch.randn(3, 40, generator=gen, dtype=torch.float64)
        out = base(channels)
        expected = torch.stack([torch.autograd.grad(out, channels, c, retain_graph=True)[0] for c in cotangent])
        value, vjp = base.with_vjp(channels.detach())
        assert torch.equal(value, out.detach())  # the value with_vjp gives is the base weight itself
        got = vjp(cotangent)
        assert torch.allclose(got, expected, rtol=0, atol=1e-13), (got - expected).abs().max()
        args, budget, ks, _ = obj._domain_terms(channels.detach(), lv, 0.05, 0.08, None)
        for level, (arg, k) in enumerate(zip(args, ks)):
            reached |= {(level, int(r)) for r in gates.g_agg_regime(arg, budget, k).unique()}
    assert reached == {(level, r) for level in range(3) for r in (gates.PASS, gates.ROLLBACK, gates.ZEROED)}
