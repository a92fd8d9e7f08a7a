"""The verl adapter, called through verl's own registry, against verl's losses and this package's objectives."""

import os
import subprocess
import sys

import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
actor_config = pytest.importorskip("verl.workers.config.actor")

from fiberpo_theory import objectives as obj  # noqa: E402
from fiberpo_theory.integrations import verl as fv  # noqa: E402
from fiberpo_theory.losses import POLICY_LOSSES  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
B, L = 6, 7
FIBERPO_KEYS = dict(fiberpo_eps=0.04, fiberpo_c_pos=0.12, fiberpo_c_neg=0.05)


@pytest.fixture(autouse=True)
def no_registered_hyper(monkeypatch):
    """register(...) elsewhere (e.g. the guide) must not fill in the keys these tests leave out."""
    monkeypatch.setattr(fv, "_registered_hyper", {})


def config(rollout_n=2, policy_keys=FIBERPO_KEYS, **overrides):
    c = actor_config.ActorConfig(strategy="fsdp", rollout_n=rollout_n, ppo_micro_batch_size_per_gpu=2, **overrides)
    for key, value in policy_keys.items():
        setattr(c.policy_loss, key, value)
    return c


def batch(seed=0, empty_row=False):
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(B, L, generator=gen, dtype=torch.float64)
    new = old + 0.3 * torch.randn(B, L, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, L, generator=gen, dtype=torch.float64)
    mask = torch.ones(B, L)
    mask[0, 3:] = 0
    mask[4, 5:] = 0
    if empty_row:
        mask[3, :] = 0
    pad = mask == 0
    new = torch.where(pad, 40 * torch.randn(B, L, generator=gen, dtype=torch.float64), new)
    adv = torch.where(pad, 40 * torch.randn(B, L, generator=gen, dtype=torch.float64), adv)
    return old, new, adv, mask


def loss_and_grad(fn, old, new, adv, mask, **kwargs):
    new = new.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, **kwargs)
    (grad,) = torch.autograd.grad(loss, new)
    return loss.detach(), grad, metrics


def test_register_puts_every_loss_into_verls_registry():
    fv.register()
    for name, fn in fv.LOSSES.items():
        assert core_algos.get_policy_loss_fn(name) is fn


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("ours,theirs", [("rgf_vanilla", "vanilla"), ("rgf_gspo", "gspo")])
@pytest.mark.parametrize("overrides", [{}, dict(clip_ratio_low=0.1, clip_ratio_high=0.28, clip_ratio_c=2.0,
                                                 global_batch_info=dict(dp_size=2, global_batch_size=9,
                                                                        batch_num_tokens=50))])
def test_baselines_equal_verls_own_losses(mode, ours, theirs, overrides):
    c = config(**overrides)
    old, new, adv, mask = batch(seed=3, empty_row=True)
    new = new.clone()
    new[1, 0] = old[1, 0] + 2.0  # ratio e² above the dual clip 2.0
    adv[1, 0] = -1.0
    want, want_grad, want_metrics = loss_and_grad(core_algos.get_policy_loss_fn(theirs), old, new, adv, mask,
                                                  loss_agg_mode=mode, config=c)
    got, got_grad, metrics = loss_and_grad(core_algos.get_policy_loss_fn(ours), old, new, adv, mask,
                                           loss_agg_mode=mode, config=c)
    assert abs(float(got - want)) <= 1e-6
    assert float((got_grad - want_grad).abs().max()) <= 1e-6
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_rollout_is_weights_scale_the_token_loss():
    c = config()
    old, new, adv, mask = batch()
    w = torch.rand(B, L, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for ours, theirs in [("rgf_vanilla", "vanilla"), ("rgf_gspo", "gspo")]:
        want, *_ = loss_and_grad(core_algos.get_policy_loss_fn(theirs), old, new, adv, mask, config=c,
                                 rollout_is_weights=w)
        got, *_ = loss_and_grad(core_algos.get_policy_loss_fn(ours), old, new, adv, mask, config=c,
                                rollout_is_weights=w)
        assert abs(float(got - want)) <= 1e-6


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("name", ["fiberpo", "fiberpo_domain", "apc_obj"])
def test_fiberpo_losses_equal_the_package_registry(mode, name):
    c = config(policy_keys=dict(FIBERPO_KEYS, apc_delta=0.1))
    old, new, adv, mask = batch()
    uid = ["p0", "p0", "p1", "p1", "p2", "p2"]
    source = ["math", "math", "code", "code", "math", "math"]
    states = torch.arange(B * L).view(B, L) % 5
    extra = {"fiberpo_domain": dict(group_ids=torch.tensor([0, 0, 1, 1, 2, 2]), domain_ids=torch.tensor([0, 0, 1, 1, 0, 0])),
             "apc_obj": dict(delta=0.1, state_ids=states)}.get(name, {})
    want, want_grad, _ = loss_and_grad(POLICY_LOSSES[name], old, new, adv, mask, loss_agg_mode=mode, **extra)
    with fv.batch_ids(uid=uid, data_source=source, state_ids=states):
        got, got_grad, metrics = loss_and_grad(core_algos.get_policy_loss_fn(name), old, new, adv, mask,
                                               loss_agg_mode=mode, config=c)
    assert abs(float(got - want)) <= 1e-10
    assert float((got_grad - want_grad).abs().max()) <= 1e-10
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(metrics)


def test_fiberpo_on_policy_is_the_policy_gradient():
    """At r = 1 the gate is the identity, so the loss is -Σ μ Â and its gradient -μ Â (Eq. 2)."""
    c = config()
    old, _, adv, mask = batch()
    loss, grad, _ = loss_and_grad(fv.fiberpo, old, old, adv, mask, config=c)
    n = mask.sum()
    assert torch.allclose(loss, -(adv * mask).sum() / n)
    assert torch.allclose(grad, -adv * mask / n)


def test_empty_rows_follow_verl():
    c = config()
    old, new, adv, mask = batch(empty_row=True)
    keep = mask.any(1)
    for mode in AGG_MODES:
        full, *_ = loss_and_grad(fv.fiberpo, old, new, adv, mask, loss_agg_mode=mode, config=c)
        dropped, *_ = loss_and_grad(fv.fiberpo, old[keep], new[keep], adv[keep], mask[keep], loss_agg_mode=mode, config=c)
        assert torch.allclose(full, dropped), mode  # verl leaves fully masked rows out of every mean


def test_missing_key_is_named():
    c = config(policy_keys={})
    old, new, adv, mask = batch()
    with pytest.raises(ValueError, match="policy_loss.fiberpo_c_pos"):
        fv.fiberpo(old, new, adv, mask, config=config(policy_keys=dict(fiberpo_eps=0.04, fiberpo_c_neg=0.05)))
    with pytest.raises(ValueError, match="apc_delta"):
        fv.apc_obj(old, new, adv, mask, config=c, state_ids=torch.zeros(B, L, dtype=torch.long))
    with pytest.raises(ValueError, match="uid"):
        fv.fiberpo_domain(old, new, adv, mask, config=config())
    with pytest.raises(ValueError, match="Invalid loss_agg_mode"):
        fv.fiberpo(old, new, adv, mask, loss_agg_mode="token-median", config=config())


def test_split_prompt_group_is_refused():
    old, new, adv, mask = batch()
    with fv.batch_ids(uid=["a", "a", "b", "b", "b", "c"], data_source=["d"] * B):
        with pytest.raises(ValueError, match=r"group \(uid\) 1 has 3 responses .* expected 2"):
            fv.fiberpo_domain(old, new, adv, mask, config=config(rollout_n=2))


def test_loaded_through_verls_external_module_variable():
    code = ("from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as r; "
            "print(all(k in r for k in ['fiberpo', 'fiberpo_domain', 'apc_obj']))")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="fiberpo_theory.integrations.verl", VERL_USE_EXTERNAL_PLUGINS="none")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"
