"""FiberPO-Domain's levels indexed once per batch: the same gate, objective, parts and metrics as the raw ids,
and a torch-path step that reads back only J's finiteness."""

import pytest
import torch

import fiberpo_theory.core.native as native
from fiberpo_theory.core import diagnostics, objectives as obj

from _loops import LOOPS_ON
from test_fused_objective import _HostReads

HYPER = dict(eps=0.2, c_pos=0.12, c_neg=0.05)


def _batch(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (24,), generator=gen)
    traj_id = torch.arange(24).repeat_interleave(lengths) * 5 + 2
    rows = torch.arange(24).repeat_interleave(lengths)
    group, domain = rows // 3 * 7, rows // 6 + 40  # 3 trajectories per group, 2 groups per domain
    x = torch.randn(int(lengths.sum()), generator=gen, dtype=torch.float64).mul_(0.3).to(dtype)
    adv = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)
    return x, adv, traj_id, group, domain


@pytest.fixture(params=["compiled", "torch"])
def path(request, monkeypatch):
    if request.param == "compiled" and not LOOPS_ON:
        pytest.skip("the compiled loops are off")
    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    return request.param


def test_ready_levels_give_the_gate_objective_parts_and_metrics_of_the_raw_ids(path):
    x, adv, traj_id, group, domain = _batch()
    levels = obj.domain_levels(traj_id, group, domain, like=x)
    ids = (traj_id, group, domain)
    ready = (levels, None, None)

    def gate_and_grad(args):
        leaf = x.clone().requires_grad_(True)
        gated = obj.fiberpo_domain_gated_ratio(leaf, *args, **HYPER)
        return gated.detach(), torch.autograd.grad((gated * adv).sum(), leaf)[0]

    def objective_and_grad(args):
        leaf = x.clone().requires_grad_(True)
        value = obj.fiberpo_domain_objective(leaf, *args, adv, **HYPER)
        return value.detach(), torch.autograd.grad(value, leaf)[0]

    for run in (gate_and_grad, objective_and_grad):
        got, want = run(ready), run(ids)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), run.__name__
    assert torch.equal(obj.fiberpo_domain_parts(x, *ready, **HYPER).gated_ratio,
                       obj.fiberpo_domain_parts(x, *ids, **HYPER).gated_ratio)
    want = diagnostics.fiberpo_domain_loss_metrics(x, *ids, **HYPER)
    assert diagnostics.fiberpo_domain_loss_metrics(x, *ready, **HYPER) == want
    with diagnostics.counting_gate() as counted:
        obj.fiberpo_domain_objective(x, *ready, adv, **HYPER)
    assert counted.filled == (path == "compiled")
    assert diagnostics.fiberpo_domain_loss_metrics(x, *ready, counted=counted, **HYPER) == pytest.approx(want, rel=1e-12)
    assert 0 < want["global/G-I"] < 1  # the batch reaches more than one regime


def test_a_domain_step_with_ready_levels_reads_back_only_js_finiteness(monkeypatch):
    """The torch path (CUDA's): indexing three id columns reads scalars back and calls nonzero; with the levels
    indexed once per batch, forward and backward read back J's finiteness and nothing else."""
    monkeypatch.setattr(native, "library", lambda: None)
    x, adv, traj_id, group, domain = _batch(1)
    levels = obj.domain_levels(traj_id, group, domain, like=x)
    _ = levels.traj.narrow_index  # built once per batch, with the levels
    leaf = x.clone().requires_grad_(True)
    with _HostReads() as ready:
        obj.fiberpo_domain_objective(leaf, levels, None, None, adv, **HYPER).backward()
    with _HostReads() as raw:
        obj.fiberpo_domain_objective(leaf, traj_id, group, domain, adv, **HYPER).backward()
    assert ready.reads == ["_local_scalar_dense"], ready.reads
    assert "nonzero" in raw.reads and len(raw.reads) > len(ready.reads)


def test_levels_are_checked_against_the_values_and_the_ids_they_replace():
    x, adv, traj_id, group, domain = _batch(2)
    levels = obj.domain_levels(traj_id, group, domain, like=x)
    with pytest.raises(ValueError, match="group_id and domain_id must be None"):
        obj.fiberpo_domain_gated_ratio(x, levels, group, None, **HYPER)
    with pytest.raises(ValueError, match="group_id and domain_id must be None"):
        diagnostics.fiberpo_domain_loss_metrics(x, levels, None, domain, **HYPER)
    with pytest.raises(ValueError, match=f"traj_id segments index {x.numel()} elements but the values have"):
        obj.fiberpo_domain_objective(x[:-1], levels, None, None, adv[:-1], **HYPER)
    with pytest.raises(ValueError, match="already DomainLevels"):
        obj.domain_levels(levels, None, None, like=x)
    with pytest.raises(ValueError, match="does not nest|nest"):
        obj.domain_levels(traj_id, torch.arange(x.numel()), domain, like=x)  # a group per token splits trajectories
