"""Distributed FGH: FiberPO on a hierarchy of any depth over data-parallel shards equals one process.

Several processes (torch.multiprocessing, spawn) on the gloo backend on CPU each hold a shard of one
random batch with four levels above the tokens (domain → task → prompt group → trajectory), split by
whole trajectories: prompt groups span ranks, domain 23 lives on rank 0 only and task 31 on the last rank
only, ids are non-contiguous, and trajectory ids are renumbered per rank.  Gated ratios and gradients
must equal those of the single-process :func:`fiberpo_hierarchy_gated_ratio` on the concatenated batch
up to round-off (float64).  Every test name contains "distributed" so that ``pytest -k distributed``
selects them.

Process start-up dominates the cost, so each spawn runs every distributed check at once; the workers
only compute and save, and the parent process asserts.
"""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fiberpo_theory.hierarchy import fgh
from fiberpo_theory import hierarchy as hier
from fiberpo_theory.core import objectives as obj

from _gloo import run_rank, value_error_of

ATOL = 1e-12
EPS = 0.1
C_NEG = (0.2, 0.1, 0.12, 0.15)  # domain, task, group, trajectory; C⁺ is set by _rollback_budgets
HYPER = dict(eps=EPS, c_pos=0.12, c_neg=0.2)  # scalar budgets, for the comparison with FiberPO-Domain
NAMES = ["domain", "task", "group", "trajectory"]
TREE = {"trajectory": "token", "domain": "trajectory", "modality": "trajectory"}

# (group id, task id, domain id): domain 23 is put on rank 0 only, task 31 on the last rank only
GROUPS = [(3, 7, 9), (11, 7, 9), (12, 8, 5), (40, 8, 5), (1000, 8, 5),
          (41, 20, 23), (77, 20, 23), (5, 30, 9), (60, 31, 5), (61, 31, 5)]
DOMAIN_SHIFT = {5: 0.02, 9: -0.25, 23: 0.3}  # mixes the g_agg regimes at the domain level


def _batch(world: int, seed: int):
    """A global flat batch (4 levels, a modality per trajectory) and its split over ``world`` ranks."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    group_id, task_id, domain_id = (torch.tensor(column) for column in zip(*GROUPS))
    per_group = torch.randint(2, 6, (len(GROUPS),), generator=gen)
    traj_group = torch.repeat_interleave(torch.arange(len(GROUPS)), per_group)  # dense group of each trajectory
    n_traj = traj_group.numel()
    traj_rank = torch.randint(0, world, (n_traj,), generator=gen)
    traj_rank[:world] = torch.arange(world)  # every rank holds a trajectory
    traj_rank[domain_id[traj_group] == 23] = 0
    traj_rank[task_id[traj_group] == 31] = world - 1
    shift = torch.tensor([DOMAIN_SHIFT[d] for d in domain_id.tolist()], dtype=torch.float64)
    shift = shift + 0.1 * randn(len(GROUPS))  # + a task-and-group shift
    traj_level = shift[traj_group] + 0.1 * randn(n_traj)

    traj = torch.repeat_interleave(torch.arange(n_traj), torch.randint(1, 10, (n_traj,), generator=gen))
    n = traj.numel()
    x = traj_level[traj] + 0.2 * randn(n)
    perm = torch.randperm(n, generator=gen)  # flat layout: token order is arbitrary
    traj = traj[perm]
    batch = dict(
        x=x[perm], adv=randn(n), weight=randn(n),
        domain=domain_id[traj_group[traj]], task=task_id[traj_group[traj]], group=group_id[traj_group[traj]],
        traj=traj * 7 + 2,  # non-contiguous global trajectory ids
        modality=100 + traj % 2, rank=traj_rank[traj],
    )
    shards = []
    for r in range(world):
        mine = batch["rank"] == r
        shard = {key: value[mine] for key, value in batch.items() if key not in ("traj", "rank")}
        shard["traj"] = torch.unique(batch["traj"][mine], return_inverse=True)[1] * 3  # per-rank numbering
        shards.append(shard)
    return batch, shards


def _rollback_budgets(batch):
    """C⁺ per level such that, above the trajectories, a large element sits mid-way in the rollback band.

    In the rollback regime g_agg depends on its slope k = the element's token count (Eq. 10, 31), so a
    shard-local token count would change the gated ratio there; elsewhere k hardly matters.
    """
    h = hier.from_ids(_levels(batch), names=NAMES)
    inst = fgh.fiberpo_fgh(h, trajectory="trajectory", eps=EPS, c_pos=1.0, c_neg=C_NEG)
    parts = inst.parts(batch["x"])
    c_pos = []
    for v in range(3):
        gate = inst.fgh.gates[v]
        a = gate.normalised(parts.residuals[v])[:, 0].abs()
        e = int(torch.where(a > 0.01, gate.tokens, 0).argmax())  # the most tokens among clear deviations
        c_pos.append(float(a[e] / (1 + 0.5 / gate.tokens[e])))
    return dict(eps=EPS, c_pos=tuple(c_pos) + (0.15,), c_neg=C_NEG)


def _levels(data, depth=4):
    return [data["domain"], data["task"], data["group"], data["traj"]] if depth == 4 else \
        [data["domain"], data["group"], data["traj"]]


def _tree_columns(data):
    return {"trajectory": data["traj"], "domain": data["domain"], "modality": data["modality"]}


def _weighted_grad(f, data):
    """Gated ratio and d/dx of Σ_i w_i G_i."""
    x = data["x"].clone().requires_grad_(True)
    gated = f(x)
    (data["weight"] * gated).sum().backward()
    return gated.detach(), x.grad


def _worker(rank, world, init_file, shards, budgets, out_dir):
    s = shards[rank]

    def body(result, pg):
        # 1. four levels above the tokens, per-level budgets
        result["chain"] = _weighted_grad(lambda x: fgh.fiberpo_hierarchy_gated_ratio(
            x, _levels(s), process_group=pg, **budgets), s)
        result["local_only"] = fgh.fiberpo_hierarchy_gated_ratio(s["x"], _levels(s), **budgets)

        # 2. the surrogate Eq. 29 with default μ = 1/(|Tj| T_τ), built with validate=True (global reflecting check)
        h = hier.from_ids(_levels(s), names=NAMES)
        inst = fgh.fiberpo_fgh(h, trajectory="trajectory", process_group=pg, **budgets)
        x = s["x"].clone().requires_grad_(True)
        value = fgh.fgh_surrogate(x, s["adv"], inst)
        value.backward()
        result["surrogate"] = (value.detach(), x.grad)

        # 3. n = 3 through the FGH operator and the closed form of FiberPO-Domain, both distributed
        result["n3"] = fgh.fiberpo_hierarchy_gated_ratio(s["x"], _levels(s, 3), process_group=pg, **HYPER)
        result["domain"] = obj.fiberpo_domain_gated_ratio(s["x"], s["traj"], s["group"], s["domain"],
                                                          process_group=pg, **HYPER)

        # 4. the tree of Remark 6.5: domain and modality side by side above the trajectories
        result["tree"] = _weighted_grad(lambda x: fgh.fiberpo_tree_gated_ratio(
            x, _tree_columns(s), TREE, process_group=pg, **HYPER), s)

        # 5. a task that belongs to two domains on two ranks must fail on every rank
        one = torch.ones(2, dtype=torch.long)
        bad = [one * (1 if rank == 1 else 0), one * 500, one * 7, one * 0]
        result["nesting_error"] = value_error_of(lambda: fgh.fiberpo_hierarchy_gated_ratio(
            torch.tensor([0.1, -0.2], dtype=torch.float64), bad, process_group=pg, **HYPER))
        # ... and on a tree, a group that belongs to two modalities (its second coarsening stratum)
        columns = {"trajectory": one * 0, "group": one * 500, "domain": one * 3, "modality": bad[0]}
        finer = {"trajectory": "token", "group": "trajectory", "domain": "group", "modality": "group"}
        result["tree_nesting_error"] = value_error_of(lambda: fgh.fiberpo_tree_gated_ratio(
            torch.tensor([0.1, -0.2], dtype=torch.float64), columns, finer, process_group=pg, **HYPER))

        # 6. a kernel that is not reflecting on rank 0 only (over the shared task stratum) fails on every rank
        kernels = list(inst.fgh.kernels)
        kernels[0] = kernels[0] * (1.5 if rank == 0 else 1.0)
        result["kernel_error"] = value_error_of(lambda: fgh.FGH(h, tuple(kernels), inst.fgh.gates, process_group=pg,
                                                        shared=inst.fgh.shared))

    run_rank(rank, world, init_file, out_dir, body)


def _close(got, want):
    return torch.allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_hierarchy_matches_single_process(world, tmp_path):
    batch, shards = _batch(world, seed=10 + world)
    # the split really is distributed: some group spans ranks, some ids live on one rank only
    spans = torch.zeros(max(g for g, _, _ in GROUPS) + 1, world, dtype=torch.bool)
    spans[batch["group"], batch["rank"]] = True
    assert bool((spans.sum(1) > 1).any())
    assert set(batch["rank"][batch["domain"] == 23].tolist()) == {0}
    assert set(batch["rank"][batch["task"] == 31].tolist()) == {world - 1}

    # the single-process reference on the concatenated batch; above the trajectories its gates are in
    # all three regimes (P, R, Z), away from the regime boundaries (where gradients jump)
    budgets = _rollback_budgets(batch)
    chain = _weighted_grad(lambda x: fgh.fiberpo_hierarchy_gated_ratio(x, _levels(batch), **budgets), batch)
    inst = fgh.fiberpo_fgh(hier.from_ids(_levels(batch), names=NAMES), trajectory="trajectory", **budgets)
    parts = inst.parts(batch["x"])
    assert inst.regime_margin(parts) > 1e-8
    for name in NAMES[:3]:
        assert 1 in set(inst.regimes(parts)[name].flatten().tolist()), name
    above = torch.cat([inst.regimes(parts)[name].flatten() for name in NAMES[:3]])
    assert {0, 1, 2} <= set(above.tolist())
    x = batch["x"].clone().requires_grad_(True)
    surrogate = fgh.fgh_surrogate(x, batch["adv"], inst)
    surrogate.backward()
    tree = _weighted_grad(lambda x: fgh.fiberpo_tree_gated_ratio(x, _tree_columns(batch), TREE, **HYPER), batch)

    mp.spawn(_worker, args=(world, str(tmp_path / "store"), shards, budgets, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    for r, res in enumerate(results):
        mine = batch["rank"] == r
        for key, want in [("chain", chain), ("tree", tree)]:
            assert _close(res[key][0], want[0][mine]), f"{key} ratio, rank {r}"
            assert _close(res[key][1], want[1][mine]), f"{key} gradient, rank {r}"
        assert _close(res["surrogate"][1], x.grad[mine]), f"surrogate gradient, rank {r}"
        assert _close(res["n3"], res["domain"]), f"n = 3 vs FiberPO-Domain, rank {r}"
        assert res["nesting_error"] is not None and "500" in res["nesting_error"], res["nesting_error"]
        assert "modality 0" in str(res["tree_nesting_error"]) and "modality 1" in res["tree_nesting_error"]
        assert res["kernel_error"] is not None and "not reflecting" in res["kernel_error"], res["kernel_error"]
    assert _close(sum(res["surrogate"][0] for res in results), surrogate.detach())
    # the aggregates matter: shard-local ones give different ratios on some rank
    assert max(float((res["local_only"] - res["chain"][0]).abs().max()) for res in results) > 1e-3


def test_distributed_hierarchy_none_is_the_single_process_path(monkeypatch):
    """process_group=None makes no torch.distributed call and gives the local results."""
    batch, _ = _batch(1, seed=0)
    x = batch["x"]
    budgets = _rollback_budgets(batch)
    want = fgh.fiberpo_hierarchy_gated_ratio(x, _levels(batch), **budgets)
    want_n3 = obj.fiberpo_domain_gated_ratio(x, batch["traj"], batch["group"], batch["domain"], **HYPER)
    want_tree = fgh.fiberpo_tree_gated_ratio(x, _tree_columns(batch), TREE, **HYPER)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed was called with process_group=None")

    for name in ["all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
                 "get_world_size", "get_rank", "is_initialized", "is_available", "barrier"]:
        monkeypatch.setattr(dist, name, forbidden)
    got = fgh.fiberpo_hierarchy_gated_ratio(x, _levels(batch), process_group=None, **budgets)
    assert torch.equal(got, want)
    n3 = fgh.fiberpo_hierarchy_gated_ratio(x, _levels(batch, 3), process_group=None, **HYPER)
    assert _close(n3, want_n3)
    assert torch.equal(fgh.fiberpo_tree_gated_ratio(x, _tree_columns(batch), TREE, process_group=None, **HYPER),
                       want_tree)
    h = hier.from_ids(_levels(batch), names=NAMES)
    inst = fgh.fiberpo_fgh(h, trajectory="trajectory", process_group=None, **budgets)
    assert inst.fgh.shared == () and torch.equal(inst.gated_ratio(x), want)
    fgh.fgh_surrogate(x, batch["adv"], inst)


def test_distributed_hierarchy_shared_strata():
    """Strata above the trajectory are shared; turns stay local; a side branch over the tokens is refused."""
    traj, turn = torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2])
    h = hier.from_ids([torch.tensor([4, 4, 5]), traj, turn], names=["group", "trajectory", "turn"])
    assert hier.shared_strata(h, 1) == ()
    assert hier.shared_strata(h, 1, process_group=object()) == (0,)
    side = hier.from_tree({"trajectory": traj, "tool": turn}, {"trajectory": "token", "tool": "token"})
    with pytest.raises(ValueError, match="'tool' does not coarsen the trajectory stratum"):
        hier.shared_strata(side, side.index("trajectory"), process_group=object())
