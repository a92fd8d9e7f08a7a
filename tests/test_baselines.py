"""PPO/GRPO/GSPO gated ratios: the clip variants trainers ship, overflow guards, and parity with verl.

The parity tests build the per-token loss ``-Â·G(r)`` from this package's gates
and aggregate it with verl's own ``agg_loss``; the reference is verl's own
``compute_policy_loss_vanilla`` / ``compute_policy_loss_gspo`` (imported from the
installed verl, never copied).  Loss and gradient must agree to 1e-6 in float64.
"""

import math

import pytest
import torch

from fiberpo_theory.core import baselines
from fiberpo_theory.core.layout import flatten_mask, to_padded
from fiberpo_theory.core.losses import POLICY_LOSSES

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
actor_config = pytest.importorskip("verl.workers.config.actor")

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
B, L = 6, 9


def verl_config(**overrides):
    return actor_config.ActorConfig(strategy="fsdp", rollout_n=2, ppo_micro_batch_size_per_gpu=2, **overrides)


def batch_with_garbage_padding(seed=0):
    """A padded fp64 batch whose padded slots hold large garbage; some tokens hit every clip and the ±20 bound."""
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(B, L, generator=gen, dtype=torch.float64)
    x = 0.4 * torch.randn(B, L, generator=gen, dtype=torch.float64)
    x[0, 1], x[1, 2], x[3, 0] = 25.0, -30.0, 1.6  # beyond ±20, and a ratio above the dual clip c = 3
    adv = torch.randn(B, L, generator=gen, dtype=torch.float64)
    adv[3, 0] = -1.0
    mask = torch.ones(B, L)
    mask[0, 4:] = 0
    mask[2, 1:] = 0
    mask[5, 6:] = 0
    pad = mask == 0
    garbage = lambda: 50 * torch.randn(B, L, generator=gen, dtype=torch.float64)  # noqa: E731
    old = torch.where(pad, garbage(), old)
    new = torch.where(pad, garbage(), old + x)
    adv = torch.where(pad, garbage(), adv)
    return old, new, adv, mask


def verl_loss_and_grad(fn, old, new, adv, mask, mode, config):
    new = new.clone().requires_grad_(True)
    loss, metrics = fn(old, new, adv, mask, loss_agg_mode=mode, config=config)
    (grad,) = torch.autograd.grad(loss, new)
    return loss.detach(), grad, metrics


def ours_loss_and_grad(gate, old, new, adv, mask, mode, config):
    """-Â·G(r) per token from our gate, aggregated by verl's own agg_loss."""
    new = new.clone().requires_grad_(True)
    batch = flatten_mask(mask)
    x = new[batch.mask] - old[batch.mask]
    a = adv[batch.mask]
    loss_mat = to_padded(-a * gate(x, batch.traj_id, a), batch)
    loss = core_algos.agg_loss(loss_mat, mask, mode, **config.global_batch_info)
    (grad,) = torch.autograd.grad(loss, new)
    return loss.detach(), grad


def ppo_gate(config):
    def gate(x, traj, a):
        return baselines.ppo_gated_ratio(
            baselines.bounded_ratio(x), advantages=a,
            eps_low=config.clip_ratio_low, eps_high=config.clip_ratio_high, clip_ratio_c=config.clip_ratio_c,
        )
    return gate


def gspo_gate(config):
    def gate(x, traj, a):
        return baselines.gspo_gated_ratio(
            x, traj, advantages=a, eps_low=config.clip_ratio_low, eps_high=config.clip_ratio_high, token_level=True
        )
    return gate


PPO_CONFIGS = {
    "default": {},
    "asymmetric-dual": dict(clip_ratio=0.2, clip_ratio_low=0.1, clip_ratio_high=0.28, clip_ratio_c=2.0),
    "normalised": dict(global_batch_info=dict(dp_size=2, batch_num_tokens=60, global_batch_size=11)),
}
GSPO_CONFIGS = {
    "default": {},
    "gspo-paper": dict(clip_ratio_low=3e-4, clip_ratio_high=4e-4),
    "normalised": dict(clip_ratio_low=0.1, clip_ratio_high=0.3,
                       global_batch_info=dict(dp_size=3, batch_num_tokens=45, global_batch_size=9)),
}


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", sorted(PPO_CONFIGS))
def test_ppo_matches_verl_vanilla(mode, name):
    config = verl_config(**PPO_CONFIGS[name])
    old, new, adv, mask = batch_with_garbage_padding()
    want, want_grad, _ = verl_loss_and_grad(core_algos.compute_policy_loss_vanilla, old, new, adv, mask, mode, config)
    got, got_grad = ours_loss_and_grad(ppo_gate(config), old, new, adv, mask, mode, config)
    assert abs(float(got - want)) <= 1e-6
    assert float((got_grad - want_grad).abs().max()) <= 1e-6
    assert bool(want_grad.abs().sum() > 0)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", sorted(GSPO_CONFIGS))
def test_gspo_token_level_matches_verl_gspo(mode, name):
    config = verl_config(**GSPO_CONFIGS[name])
    old, new, adv, mask = batch_with_garbage_padding(seed=1)
    new = new.clone()
    new[1, :] = old[1, :] + 12.0  # a trajectory past GSPO's exp(10) cap
    want, want_grad, _ = verl_loss_and_grad(core_algos.compute_policy_loss_gspo, old, new, adv, mask, mode, config)
    got, got_grad = ours_loss_and_grad(gspo_gate(config), old, new, adv, mask, mode, config)
    assert abs(float(got - want)) <= 1e-6
    assert float((got_grad - want_grad).abs().max()) <= 1e-6


def test_dual_clip_caps_negative_advantages_only():
    r = torch.tensor([5.0, 5.0, 0.5, 2.5], dtype=torch.float64)
    adv = torch.tensor([-1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    got = baselines.ppo_gated_ratio(r, eps=0.2, advantages=adv, clip_ratio_c=3.0)
    assert got.tolist() == pytest.approx([3.0, 1.2, 0.8, 2.5])


def test_asymmetric_clip_and_eps_default():
    r = torch.tensor([0.5, 1.5], dtype=torch.float64)
    assert baselines.ppo_gated_ratio(r, eps_low=0.1, eps_high=0.28).tolist() == pytest.approx([0.9, 1.28])
    assert baselines.ppo_gated_ratio(r, eps=0.2, eps_high=0.3).tolist() == pytest.approx([0.8, 1.3])
    assert baselines.ppo_gated_ratio(r, eps=0.2).tolist() == pytest.approx([0.8, 1.2])


@pytest.mark.parametrize("call,name", [
    (lambda r, a: baselines.ppo_gated_ratio(r), "eps"),
    (lambda r, a: baselines.ppo_gated_ratio(r, eps=0.2, advantages=a, clip_ratio_c=1.0), "clip_ratio_c"),
    (lambda r, a: baselines.ppo_gated_ratio(r, eps=0.2, clip_ratio_c=3.0), "clip_ratio_c"),
    (lambda r, a: baselines.ppo_gated_ratio(r, eps=0.2, eps_high=-1.0), "eps_high"),
])
def test_bad_clip_parameters_name_the_argument(call, name):
    r = torch.tensor([1.0, 1.1], dtype=torch.float64)
    with pytest.raises(ValueError, match=name):
        call(r, torch.tensor([1.0, -1.0], dtype=torch.float64))


# --- overflow (issue: exp of a far off-policy log-ratio) -----------------------------------------------


def test_gspo_far_off_policy_is_finite_with_finite_gradient():
    x = torch.tensor([100.0, 100.0, 0.1, 0.1], requires_grad=True)
    traj = torch.tensor([0, 0, 1, 1])
    adv = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    gated = baselines.gspo_gated_ratio(x, traj, eps=0.04, advantages=adv)
    assert torch.isfinite(gated).all()
    assert gated.tolist() == pytest.approx([math.exp(baselines.GSPO_LOG_RATIO_MAX)] * 2 + [1.04] * 2, rel=1e-6)
    (grad,) = torch.autograd.grad((gated * adv).sum(), x)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("name", ["ppo", "grpo", "gspo", "apc_obj"])
def test_registry_loss_is_finite_far_off_policy(name):
    old = torch.zeros(2, 2)
    new = torch.tensor([[100.0, 100.0], [0.1, 0.1]], requires_grad=True)
    adv = torch.tensor([[-1.0, -1.0], [1.0, 1.0]])
    extra = dict(delta=0.1, state_ids=torch.tensor([[0, 1], [0, 1]])) if name == "apc_obj" else {}
    loss, _ = POLICY_LOSSES[name](old, new, adv, torch.ones(2, 2), **extra)
    (grad,) = torch.autograd.grad(loss, new)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
