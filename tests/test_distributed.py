"""Distributed aggregates: FiberPO-Domain on data-parallel shards equals the single-process result.

Several processes (torch.multiprocessing, spawn) on the gloo backend on CPU each hold a shard of one
random batch, split by whole trajectories: ragged trajectories, prompt groups spanning ranks, a domain
present on one rank only, non-contiguous ids, and trajectory ids renumbered per rank (the same id on two
ranks names two trajectories).  The gated ratios and the gradients of Σ_ranks Σ_i μ_i G_i Â_i (global
μ = 1/(|Tj| T_τ)) must equal the single-process ones on the concatenated batch up to round-off.
Every test name contains "distributed" so that ``pytest -k distributed`` selects them.

Process start-up dominates the cost, so each spawn runs every distributed check at once; the workers
only compute and save, and the parent process asserts.
"""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fiberpo_theory.core import objectives as obj
from fiberpo_theory.core.losses import POLICY_LOSSES
from fiberpo_theory.core.distributed import global_segment_sums

from _gloo import run_rank, value_error_of

HYPER = dict(eps=0.1, c_pos=0.12, c_neg=0.2)
ATOL = 1e-12

GROUP_IDS = [3, 11, 12, 40, 41, 77, 1000, 5]
DOMAIN_OF_GROUP = [9, 9, 5, 5, 23, 23, 5, 9]  # domain 23 (groups 41, 77) is put on rank 0 only
DOMAIN_SHIFT = {5: 0.02, 9: -0.25, 23: 0.3}  # mixes the g_agg regimes at the domain level


def _batch(world: int, seed: int):
    """A global flat batch and a split of its trajectories over ``world`` ranks."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    per_group = torch.randint(2, 6, (len(GROUP_IDS),), generator=gen)
    traj_group = torch.repeat_interleave(torch.arange(len(GROUP_IDS)), per_group)  # dense group of each trajectory
    n_traj = traj_group.numel()
    lengths = torch.randint(1, 10, (n_traj,), generator=gen)
    traj_rank = torch.randint(0, world, (n_traj,), generator=gen)
    traj_rank[:world] = torch.arange(world)  # every rank holds a trajectory
    group_domain = torch.tensor(DOMAIN_OF_GROUP)
    traj_rank[group_domain[traj_group] == 23] = 0
    group_shift = 0.15 * randn(len(GROUP_IDS))
    domain_shift = torch.tensor([DOMAIN_SHIFT[d] for d in DOMAIN_OF_GROUP], dtype=torch.float64)
    traj_level = domain_shift[traj_group] + group_shift[traj_group] + 0.1 * randn(n_traj)

    traj = torch.repeat_interleave(torch.arange(n_traj), lengths)
    n = traj.numel()
    x = traj_level[traj] + 0.2 * randn(n)
    perm = torch.randperm(n, generator=gen)  # flat layout: token order is arbitrary
    traj, x = traj[perm], x[perm]
    batch = dict(
        x=x,
        adv=randn(n),
        traj=traj * 7 + 2,  # non-contiguous global trajectory ids
        group=torch.tensor(GROUP_IDS)[traj_group[traj]],
        domain=group_domain[traj_group[traj]],
        rank=traj_rank[traj],
    )
    shards = []
    for r in range(world):
        mine = batch["rank"] == r
        local_traj = torch.unique(batch["traj"][mine], return_inverse=True)[1] * 3  # per-rank numbering
        shards.append(dict(x=batch["x"][mine], adv=batch["adv"][mine], traj=local_traj,
                           group=batch["group"][mine], domain=batch["domain"][mine]))
    # the generic function: unsorted ids with duplicates, an integer and a float value; the last rank of
    # three holds no ids at all
    generic = []
    for r in range(world):
        m = 0 if (world == 3 and r == 2) else 6 + r
        generic.append(dict(ids=torch.randint(0, 5, (m,), generator=gen) * 10 + 1,
                            count=torch.randint(0, 4, (m,), generator=gen),
                            value=randn(m, 2), weight=randn(m, 2)))
    return batch, shards, generic


def _worker(rank, world, init_file, shards, generic, out_dir):
    def body(result, pg):
        result.update(_domain_on_shard(shards[rank], pg))
        result.update(_generic_sums(generic[rank], pg))
        result["nesting_error"] = value_error_of(lambda: _split_group_across_ranks(rank, pg))
        # a process_group that is not a ProcessGroup (no collective is entered)
        result["type_error"] = value_error_of(lambda: global_segment_sums(
            generic[rank]["ids"], generic[rank]["count"], process_group="world"))
        result.update(_registry_loss(rank, pg))

    run_rank(rank, world, init_file, out_dir, body)


def _domain_on_shard(shard, pg):
    """FiberPO-Domain on one shard, global μ = 1 / (|Tj| T_τ) with the global trajectory count."""
    x = shard["x"].clone().requires_grad_(True)
    parts = obj.fiberpo_domain_parts(x, shard["traj"], shard["group"], shard["domain"], process_group=pg, **HYPER)
    n_traj = torch.tensor([parts.traj.size])
    dist.all_reduce(n_traj, group=pg)
    mu = 1.0 / (n_traj.item() * parts.traj.gather(parts.traj.count.to(x.dtype)))
    (mu * parts.gated_ratio * shard["adv"]).sum().backward()
    ids = (shard["x"], shard["traj"], shard["group"], shard["domain"])
    return dict(gated=parts.gated_ratio.detach(), log_base=parts.log_base_weight.detach(), grad=x.grad,
                same_api=obj.fiberpo_domain_gated_ratio(*ids, process_group=pg, **HYPER),
                ready_levels=obj.fiberpo_domain_gated_ratio(
                    shard["x"], obj.domain_levels(*ids[1:], like=shard["x"]), None, None, process_group=pg, **HYPER),
                local_only=obj.fiberpo_domain_gated_ratio(*ids, **HYPER))


def _generic_sums(g, pg):
    """The generic function: totals per id and the gradient of Σ_ranks Σ_m weight·total."""
    value = g["value"].clone().requires_grad_(True)
    total_value, total_count = global_segment_sums(g["ids"], value, g["count"], process_group=pg)
    (g["weight"] * total_value).sum().backward()
    return dict(total_value=total_value.detach(), total_count=total_count, value_grad=value.grad)


def _split_group_across_ranks(rank, pg):
    """A group that belongs to two domains on two different ranks: must fail on every rank."""
    bad_domain = 1 if rank == 1 else 0
    obj.fiberpo_domain_gated_ratio(torch.tensor([0.1, -0.2], dtype=torch.float64), torch.tensor([0, 0]),
                                   torch.tensor([500, 500]), torch.tensor([bad_domain, bad_domain]),
                                   process_group=pg, **HYPER)


def _registry_loss(rank, pg):
    """The verl-style registry loss passes process_group through to the aggregates."""
    gen = torch.Generator().manual_seed(100 + rank)
    old_lp = -torch.rand(2, 3, generator=gen, dtype=torch.float64)
    new_lp = old_lp + 0.3 * torch.randn(2, 3, generator=gen, dtype=torch.float64)
    adv = torch.randn(2, 1, generator=gen, dtype=torch.float64).expand(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rows = dict(group_ids=torch.tensor([7, 8]), domain_ids=torch.tensor([1, 1]))  # both groups span every rank
    loss_fn = POLICY_LOSSES["fiberpo_domain"]
    on = mask.bool()
    gated = obj.fiberpo_domain_gated_ratio((new_lp - old_lp)[on], torch.tensor([0, 0, 0, 1, 1]),
                                           torch.tensor([7, 7, 7, 8, 8]), torch.tensor([1] * 5),
                                           process_group=pg, **HYPER)
    return dict(registry_loss=loss_fn(old_lp, new_lp, adv, mask, "token-mean", process_group=pg, **rows, **HYPER)[0],
                registry_local=loss_fn(old_lp, new_lp, adv, mask, "token-mean", **rows, **HYPER)[0],
                registry_expected=-(gated * adv[on]).mean())


def _reference(batch):
    x = batch["x"].clone().requires_grad_(True)
    parts = obj.fiberpo_domain_parts(x, batch["traj"], batch["group"], batch["domain"], **HYPER)
    mu = obj.aggregation_weights("trajectory", x, batch["traj"])
    (mu * parts.gated_ratio * batch["adv"]).sum().backward()
    return parts.gated_ratio.detach(), parts.log_base_weight.detach(), x.grad


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_domain_matches_single_process(world, tmp_path):
    batch, shards, generic = _batch(world, seed=world)
    # the split really is distributed: some group spans ranks, domain 23 lives on rank 0 only
    spans = torch.zeros(max(GROUP_IDS) + 1, world, dtype=torch.bool)
    spans[batch["group"], batch["rank"]] = True
    assert bool((spans.sum(1) > 1).any())
    assert set(batch["rank"][batch["domain"] == 23].tolist()) == {0}

    mp.spawn(_worker, args=(world, str(tmp_path / "store"), shards, generic, str(tmp_path)),
             nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    gated, log_base, grad = _reference(batch)
    for r, res in enumerate(results):
        mine = batch["rank"] == r
        assert torch.allclose(res["gated"], gated[mine], rtol=0, atol=ATOL), f"rank {r}"
        assert torch.allclose(res["log_base"], log_base[mine], rtol=0, atol=ATOL), f"rank {r}"
        assert torch.allclose(res["grad"], grad[mine], rtol=0, atol=ATOL), f"rank {r}"
        assert torch.allclose(res["same_api"], res["gated"], rtol=0, atol=ATOL)  # the fused fast path vs the reference
        assert torch.equal(res["ready_levels"], res["same_api"])  # levels indexed once: the same collectives
    for res in results:
        assert torch.allclose(res["registry_loss"], res["registry_expected"], rtol=0, atol=ATOL)
    assert max(abs(float(res["registry_loss"] - res["registry_local"])) for res in results) > 1e-6
    # the aggregates matter: shard-local aggregates give different ratios on some rank
    assert max(float((res["local_only"] - res["gated"]).abs().max()) for res in results) > 1e-3

    # ... and so does the backward all-reduce: the loss on rank 0's tokens has a gradient on the
    # tokens of the other ranks (through the group / domain aggregates)
    x = batch["x"].clone().requires_grad_(True)
    on_rank0 = batch["rank"] == 0
    ratio = obj.fiberpo_domain_gated_ratio(x, batch["traj"], batch["group"], batch["domain"], **HYPER)
    (ratio * batch["adv"] * on_rank0).sum().backward()
    assert float(x.grad[~on_rank0].abs().max()) > 1e-3

    # generic function: global totals per id and the gradient of the summed loss
    all_ids = torch.cat([g["ids"] for g in generic])
    all_value = torch.cat([g["value"] for g in generic])
    all_count = torch.cat([g["count"] for g in generic])
    all_weight = torch.cat([g["weight"] for g in generic])
    same = all_ids.unsqueeze(1) == all_ids.unsqueeze(0)  # (n, n): rows with equal ids anywhere
    offset = 0
    for g, res in zip(generic, results):
        rows = slice(offset, offset + g["ids"].numel())
        offset += g["ids"].numel()
        assert torch.allclose(res["total_value"], same[rows].double() @ all_value, rtol=0, atol=ATOL)
        assert torch.equal(res["total_count"], same[rows].long() @ all_count)
        assert res["total_count"].dtype == torch.long
        assert torch.allclose(res["value_grad"], same[rows].double() @ all_weight, rtol=0, atol=ATOL)

    for res in results:
        assert res["nesting_error"] is not None and "500" in res["nesting_error"], res["nesting_error"]
        assert "domain 0" in res["nesting_error"] and "domain 1" in res["nesting_error"]
        assert res["type_error"] is not None and "process_group" in res["type_error"]


def test_distributed_none_makes_no_distributed_calls(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("torch.distributed was called with process_group=None")

    for name in ["all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
                 "get_world_size", "get_rank", "is_initialized", "is_available", "barrier"]:
        monkeypatch.setattr(dist, name, forbidden)
    x = torch.tensor([0.3, -0.1, 0.05, 0.2], dtype=torch.float64)
    traj, group, domain = torch.tensor([0, 0, 1, 2]), torch.tensor([4, 4, 4, 9]), torch.tensor([1, 1, 1, 1])
    got = obj.fiberpo_domain_gated_ratio(x, traj, group, domain, process_group=None, **HYPER)
    assert torch.equal(got, obj.fiberpo_domain_gated_ratio(x, traj, group, domain, **HYPER))
    values = torch.randn(3, 2)
    (out,) = global_segment_sums(torch.tensor([5, 1, 5]), values)
    assert out is values  # identity: local sums are returned as they are


def test_distributed_process_group_without_init_raises():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="process_group.*not initialised"):
        global_segment_sums(torch.tensor([1, 2]), torch.ones(2), process_group=object())
    x = torch.tensor([0.3, -0.1], dtype=torch.float64)
    ids = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="process_group"):
        obj.fiberpo_domain_gated_ratio(x, ids, ids, ids, process_group=object(), **HYPER)


@pytest.mark.parametrize("call, match", [
    (lambda: global_segment_sums(torch.tensor([1.0, 2.0]), torch.ones(2)), "ids"),
    (lambda: global_segment_sums(torch.tensor([[1, 2]]), torch.ones(1)), "ids"),
    (lambda: global_segment_sums(torch.tensor([1, 2]), torch.ones(3)), r"values\[0\]"),
    (lambda: global_segment_sums(torch.tensor([1, 2]), torch.ones(2), torch.tensor(1.0)), r"values\[1\]"),
    (lambda: global_segment_sums(torch.tensor([1, 2]), torch.ones(2), parent_ids=torch.tensor([1])), "parent_ids"),
])
def test_distributed_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()
