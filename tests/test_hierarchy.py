"""Fibration hierarchies: tensor form, NetworkX form, maps and reflecting kernels."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fiberpo_theory import hierarchy as hier
from fiberpo_theory.theory import strategies as fst
from fiberpo_theory.core.segments import Segments

from _loops import needs_loops

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]


def _same(a: hier.CompiledHierarchy, b: hier.CompiledHierarchy) -> bool:
    tensors = lambda h: [t for t in h.projection + h.ids + h.token_count if t is not None]  # noqa: E731
    return (
        a.names == b.names
        and a.sizes == b.sizes
        and a.finer == b.finer
        and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(tensors(a), tensors(b)))
    )


# ---------------------------------------------------------------------------
# Building from ids
# ---------------------------------------------------------------------------


def test_from_ids_small_example():
    traj = torch.tensor([7, 7, 3, 9, 9, 9])
    group = torch.tensor([50, 50, 50, 20, 20, 20])
    h = hier.from_ids([group, traj], names=["group", "trajectory"])
    assert h.names == ("group", "trajectory", "token")
    assert h.sizes == (2, 3, 6)
    assert h.ids[0].tolist() == [20, 50] and h.ids[1].tolist() == [3, 7, 9]
    assert h.projection[0].tolist() == [1, 1, 0]  # traj 3, 7 in group 50; traj 9 in group 20
    assert h.projection[1].tolist() == [1, 1, 0, 2, 2, 2]
    assert h.token_count[0].tolist() == [3, 3] and h.token_count[1].tolist() == [1, 2, 3]
    assert h.is_chain and h.total == 2


@pytest.mark.parametrize("device", DEVICES)
@given(sample=fst.hierarchies())
def test_token_counts_and_composition(device, sample):
    h = hier.from_ids([i.to(device) for i in sample.level_ids])
    for k, ids in enumerate(sample.level_ids):
        seg = Segments.from_ids(ids)
        assert torch.equal(h.token_index(k).cpu(), seg.index)
        assert torch.equal(h.token_count[k].cpu(), seg.count)
    # functoriality of Eq. 24: π_{k←m} ∘ π_{m←n} = π_{k←n}
    for k in range(h.total):
        for m in range(k, h.total + 1):
            assert torch.equal(hier.compose(h, k, m)[h.token_index(m)], h.token_index(k))


@given(sample=fst.hierarchies(), data=st.data())
def test_pushforward_is_segment_sum(sample, data):
    h = hier.from_ids(list(sample.level_ids))
    sigma = torch.tensor(
        data.draw(st.lists(st.floats(-3, 3), min_size=2 * h.sizes[-1], max_size=2 * h.sizes[-1])), dtype=torch.float64
    ).view(-1, 2)
    for k, ids in enumerate(sample.level_ids):
        direct = Segments.from_ids(ids).sum(sigma)
        torch.testing.assert_close(hier.pushforward(h, sigma, k, h.total), direct, rtol=1e-12, atol=1e-12)
        stepwise = sigma
        for v in reversed(range(k, h.total)):
            stepwise = hier.sum_children(stepwise, h.projection[v], h.sizes[v])
        torch.testing.assert_close(stepwise, direct, rtol=1e-12, atol=1e-12)


def test_from_ids_rejects_bad_input():
    t = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="level_ids must be a non-empty list"):
        hier.from_ids([])
    with pytest.raises(ValueError, match="level_ids must be a non-empty list"):
        hier.from_ids(t)
    with pytest.raises(ValueError, match=r"level_ids\[1\] must have an integer dtype"):
        hier.from_ids([t, t.float()])
    with pytest.raises(ValueError, match=r"level_ids\[0\] must be non-negative"):
        hier.from_ids([-t])
    with pytest.raises(ValueError, match=r"level_ids\[1\] has length 3"):
        hier.from_ids([t, t[:3]])
    with pytest.raises(ValueError, match=r"level_ids\[0\] must be a torch.Tensor"):
        hier.from_ids([[0, 1]])
    with pytest.raises(ValueError, match=r"level_ids\[0\] is empty"):
        hier.from_ids([torch.tensor([], dtype=torch.long)])
    with pytest.raises(ValueError, match="names must be"):
        hier.from_ids([t], names=["a", "b", "c"])


def test_from_ids_keeps_the_trajectory_segments():
    """The Segments the finest ids were indexed with are kept (and their counts reused) as the finest stratum's."""
    traj = torch.tensor([4, 4, 9, 9, 9, 11])
    h = hier.from_ids([traj // 5, traj])
    t = h.total - 1
    assert h.segments[:t] == (None,) * t and h.segments[h.total] is None
    seg = h.segments[t]
    assert seg.contiguous and seg.count is h.token_count[t]
    assert torch.equal(seg.index, h.projection[t]) and torch.equal(seg.ids, h.ids[t])
    assert h.token_count[h.total].tolist() == [1] * 6
    assert h.element_ids[h.total] is None and h.ids[h.total].tolist() == list(range(6))  # positions on demand
    assert h.to("cpu").segments == ()  # Segments of another device are not carried over
    shuffled = hier.from_ids([torch.tensor([1, 0, 1]), torch.tensor([8, 2, 8])])
    assert not shuffled.segments[1].contiguous and shuffled.token_count[1].tolist() == [1, 2]


def test_negative_finest_ids_are_named():
    """The finest column's sign is checked by its indexing, which still names the argument."""
    good = torch.tensor([0, 0, 1, 1])
    for bad in (torch.tensor([-3, -3, 1, 1]), torch.tensor([1, -3, 1, 2])):  # the sorted and the unsorted path
        with pytest.raises(ValueError, match=r"level_ids\[1\] must be non-negative"):
            hier.from_ids([good, bad])
        with pytest.raises(ValueError, match=r"columns\['trajectory'\] must be non-negative"):
            hier.from_tree({"trajectory": bad}, {"trajectory": "token"})


def test_ids_that_do_not_nest_are_rejected():
    group = torch.tensor([0, 0, 1, 1])
    traj = torch.tensor([5, 6, 6, 7])  # trajectory 6 has tokens in groups 0 and 1
    with pytest.raises(ValueError, match=r"does not nest.*6"):
        hier.from_ids([group, traj])


# ---------------------------------------------------------------------------
# NetworkX form
# ---------------------------------------------------------------------------


@given(sample=fst.hierarchies(max_tokens=25))
def test_graph_round_trip_and_counts(sample):
    h = hier.from_ids(list(sample.level_ids))
    graph = hier.to_graph(h)
    assert nx.is_directed_acyclic_graph(graph)
    assert graph.number_of_nodes() == sum(h.sizes)
    assert graph.number_of_edges() == sum(h.sizes[1:])  # every non-coarsest element has one image
    assert _same(hier.from_graph(graph), h)
    for v, name in enumerate(h.names):
        nodes = [(name, e) for e in h.ids[v].tolist()]
        tokens = [sum(1 for a in nx.ancestors(graph, n) if a[0] == hier.TOTAL) or 1 for n in nodes]
        assert tokens == h.token_count[v].tolist()
        if v < h.total:
            fibre = [graph.in_degree(n) for n in nodes]
            assert fibre == torch.bincount(h.projection[v], minlength=h.sizes[v]).tolist()


def _small_graph() -> nx.DiGraph:
    return hier.to_graph(hier.from_ids([torch.tensor([1, 1, 2]), torch.tensor([4, 5, 6])], names=["group", "trajectory"]))


def test_graph_rejects_token_with_two_parents():
    g = _small_graph()
    g.add_edge(("token", 0), ("trajectory", 5))
    with pytest.raises(ValueError, match=r"\('token', 0\).*two parents"):
        hier.from_graph(g)


def test_graph_rejects_empty_fibre():
    g = _small_graph()
    g.add_node(("trajectory", 99), stratum="trajectory", element=99)
    g.add_edge(("trajectory", 99), ("group", 1))
    with pytest.raises(ValueError, match=r"\('trajectory', 99\) has an empty fibre"):
        hier.from_graph(g)


def test_graph_rejects_missing_image():
    g = _small_graph()
    g.remove_edge(("trajectory", 6), ("group", 2))
    with pytest.raises(ValueError, match=r"\('trajectory', 6\) has no image"):
        hier.from_graph(g)


def test_graph_rejects_cycle():
    g = _small_graph()
    g.add_edge(("group", 1), ("token", 0))
    with pytest.raises(ValueError, match="cycle"):
        hier.from_graph(g)


def test_graph_rejects_bad_structure():
    g = _small_graph()
    g.nodes[("group", 1)].pop("stratum")
    with pytest.raises(ValueError, match="'stratum' name"):
        hier.from_graph(g)
    g = _small_graph()
    g.add_node(("other", 0), stratum="other", element=0)
    with pytest.raises(ValueError, match="exactly one finest stratum"):
        hier.from_graph(g)
    g = _small_graph()
    g.add_edge(("token", 0), ("group", 1))  # group would coarsen both trajectory and token
    with pytest.raises(ValueError, match="image of two strata"):
        hier.from_graph(g)
    with pytest.raises(ValueError, match="graph must be a networkx.DiGraph"):
        hier.from_graph({})


# ---------------------------------------------------------------------------
# Trees (Remark 6.5)
# ---------------------------------------------------------------------------


def _tree_columns():
    traj = torch.tensor([3, 3, 8, 8, 8, 1])
    domain = torch.tensor([0, 0, 0, 0, 0, 4])
    modality = torch.tensor([2, 2, 9, 9, 9, 2])
    return {"domain": domain, "modality": modality, "trajectory": traj}


TREE = {"trajectory": "token", "domain": "trajectory", "modality": "trajectory"}


def test_from_tree_domain_and_modality_side_by_side():
    h = hier.from_tree(_tree_columns(), TREE)
    assert h.names[-2:] == ("trajectory", "token")
    assert set(h.names[:2]) == {"domain", "modality"}
    assert not h.is_chain
    assert h.coarser[h.index("trajectory")] == (0, 1)
    assert all(h.finer[v] > v for v in range(h.total))
    assert _same(hier.from_graph(hier.to_graph(h)), h)
    d = h.index("domain")
    assert h.token_count[d].tolist() == [5, 1]
    t = h.index("trajectory")
    assert h.segments[t].count is h.token_count[t] and h.segments[d] is None
    assert hier.compose(h, d, h.total).tolist() == [0, 0, 0, 0, 0, 1]


def test_from_tree_rejects_bad_trees():
    cols = _tree_columns()
    with pytest.raises(ValueError, match="finer has a cycle"):
        hier.from_tree(cols, {"trajectory": "domain", "domain": "modality", "modality": "trajectory"})
    with pytest.raises(ValueError, match="unknown stratum 'turn'"):
        hier.from_tree(cols, {**TREE, "modality": "turn"})
    with pytest.raises(ValueError, match="finer must name"):
        hier.from_tree(cols, {"trajectory": "token"})
    bad = dict(cols, modality=torch.tensor([2, 5, 9, 9, 9, 2]))  # trajectory 3 under two modalities
    with pytest.raises(ValueError, match="does not nest"):
        hier.from_tree(bad, TREE)


# ---------------------------------------------------------------------------
# Reflecting kernels
# ---------------------------------------------------------------------------


@given(sample=fst.hierarchies(max_tokens=30), data=st.data())
def test_kernels_are_reflecting_and_residuals_push_forward_to_zero(sample, data):
    h = hier.from_ids(list(sample.level_ids))
    mass = hier.trajectory_mass(h, h.total - 1)
    weights = data.draw(st.lists(st.floats(0.01, 100), min_size=h.sizes[-1], max_size=h.sizes[-1]))
    families = {
        "mass": hier.mass_kernels(h, mass),
        "uniform": tuple(hier.uniform_kernel(h, v) for v in range(h.total)) + (None,),
    }
    families["weighted"] = families["uniform"][:-2] + (
        hier.weighted_kernel(h, h.total - 1, torch.tensor(weights, dtype=torch.float64)),
        None,
    )
    sigma = torch.randn(h.sizes[-1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for kernels in families.values():
        hier.check_reflecting(h, kernels, atol=1e-12)
        for v in range(h.total):
            f = h.finer[v]
            eye = hier.projection_matrix(h, v) @ hier.kernel_matrix(h, v, kernels[v])
            torch.testing.assert_close(eye, torch.eye(h.sizes[v], dtype=torch.float64), rtol=0, atol=1e-12)
            sigma_f = hier.pushforward(h, sigma, f, h.total)
            base = hier.sum_children(sigma_f, h.projection[v], h.sizes[v])
            residual = sigma_f - hier.reflect(h, v, kernels[v], base)
            pushed = hier.sum_children(residual, h.projection[v], h.sizes[v])
            assert float(pushed.abs().max()) <= 1e-12 * (1 + float(sigma.abs().sum()))


@given(sample=fst.hierarchies(min_depth=3, max_depth=3, max_tokens=30))
def test_mass_kernels_are_the_kernels_of_app_e7(sample):
    domain, group, traj = sample.level_ids
    h = hier.from_ids([domain, group, traj])
    k0, k1, k2, _ = hier.mass_kernels(h, hier.trajectory_mass(h, 2))
    # counts computed independently from the id columns
    traj_seg, group_seg, dom_seg = (Segments.from_ids(c) for c in (traj, group, domain))
    first = torch.zeros(traj_seg.size, dtype=torch.long).scatter_(0, traj_seg.index, torch.arange(traj.numel()))
    tj_group = torch.bincount(group_seg.index[first], minlength=group_seg.size).double()
    tj_domain = torch.bincount(dom_seg.index[first], minlength=dom_seg.size).double()
    g_first = torch.zeros(group_seg.size, dtype=torch.long).scatter_(0, group_seg.index, torch.arange(traj.numel()))
    expect_k0 = tj_group / tj_domain[dom_seg.index[g_first]]
    expect_k1 = 1.0 / tj_group[group_seg.index[first]]
    expect_k2 = 1.0 / traj_seg.count.double()[traj_seg.index]
    torch.testing.assert_close(k0, expect_k0, rtol=1e-15, atol=0)
    torch.testing.assert_close(k1, expect_k1, rtol=1e-15, atol=0)
    torch.testing.assert_close(k2, expect_k2, rtol=1e-15, atol=0)


def test_check_reflecting_rejects_bad_kernels():
    h = hier.from_ids([torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])])
    good = hier.mass_kernels(h, hier.trajectory_mass(h, 1))
    hier.check_reflecting(h, good)
    leaky = (good[0] * 0.9,) + good[1:]
    with pytest.raises(ValueError, match=r"kernels\[0\].*not reflecting"):
        hier.check_reflecting(h, leaky)
    negative = (torch.tensor([1.5, -0.5, 1.0], dtype=torch.float64),) + good[1:]
    with pytest.raises(ValueError, match=r"kernels\[0\].*not reflecting"):
        hier.check_reflecting(h, negative)
    with pytest.raises(ValueError, match=r"kernels\[1\].*must be a \(3,\) tensor"):
        hier.check_reflecting(h, (good[0], torch.ones(2), None))
    with pytest.raises(ValueError, match="one entry per stratum"):
        hier.check_reflecting(h, good[:2])
    with pytest.raises(ValueError, match="weight must be strictly positive"):
        hier.weighted_kernel(h, 0, torch.tensor([1.0, 0.0, 1.0]))


def test_turn_stratum_masses():
    """Turns between trajectory and token carry mass T_turn / T_τ; kernels compose to 1/T_τ."""
    traj = torch.tensor([0, 0, 0, 1, 1])
    turn = torch.tensor([0, 0, 1, 2, 3])
    h = hier.from_ids([traj, turn], names=["trajectory", "turn"])
    mass = hier.trajectory_mass(h, 0)
    torch.testing.assert_close(mass[1], torch.tensor([2 / 3, 1 / 3, 0.5, 0.5], dtype=torch.float64))
    k = hier.mass_kernels(h, mass)
    composed = k[1] * k[0][h.projection[1]]
    torch.testing.assert_close(composed, torch.tensor([1 / 3] * 3 + [0.5] * 2, dtype=torch.float64))


def test_ready_trajectory_segments_give_the_same_hierarchy_and_gate():
    from fiberpo_theory.core.segments import Segments
    from fiberpo_theory.hierarchy.fgh import fiberpo_hierarchy_gated_ratio

    traj = torch.tensor([3, 3, 5, 5, 5, 8, 9, 9])
    group, domain = traj // 4, traj // 8
    x = torch.linspace(-0.2, 0.25, 8, dtype=torch.float64)
    ready = Segments.from_ids(traj)
    a, b = hier.from_ids([domain, group, traj], like=x), hier.from_ids([domain, group, ready], like=x)
    assert a.sizes == b.sizes and all(torch.equal(p, q) for p, q in zip(a.projection[:-1], b.projection[:-1]))
    assert all(torch.equal(p, q) for p, q in zip(a.token_count, b.token_count))
    hyper = dict(eps=0.1, c_pos=0.12, c_neg=0.2)
    assert torch.equal(fiberpo_hierarchy_gated_ratio(x, [domain, group, traj], **hyper),
                       fiberpo_hierarchy_gated_ratio(x, [domain, group, ready], **hyper))
    with pytest.raises(ValueError, match=r"level_ids\[2\] segments index 8 elements"):
        hier.from_ids([domain[:5], group[:5], ready], like=x[:5])


@needs_loops  # the torch path reads the index
def test_fused_hierarchy_gate_never_builds_the_token_index():
    """Sorted trajectory ids reach the gate as runs: no N-sized index is made, yet projection still reads as one."""
    from fiberpo_theory.core.segments import segments_for
    from fiberpo_theory.hierarchy.fgh import fiberpo_hierarchy_gated_ratio

    traj_ids = torch.arange(6).repeat_interleave(torch.tensor([3, 1, 4, 2, 5, 2]))
    x = torch.linspace(-0.2, 0.25, traj_ids.numel(), dtype=torch.float64).requires_grad_()
    traj = segments_for("traj_id", traj_ids, x)
    gated = fiberpo_hierarchy_gated_ratio(x, [traj_ids // 4, traj_ids // 2, traj], eps=0.1, c_pos=0.12, c_neg=0.2)
    gated.sum().backward()
    assert traj._narrow is None and traj._index is None
    h = hier.from_ids([traj_ids // 2, traj], like=x)
    assert torch.equal(h.projection[h.total - 1], traj_ids) and h.projection[h.total] is None
    assert len(h.projection) == 3 and isinstance(h.projection + (), tuple)
