"""A verl-style FiberPO, done right and done wrong, to show what ``fiberpo-theory audit`` catches.

verl passes padded ``(B, L)`` tensors and a 0/1 ``response_mask``; rows are
responses (trajectories).  Two gating maps with the audit signature
``fn(log_ratio[B, L], mask[B, L]) -> gated_ratio[B, L]``:

* :func:`fiberpo_gating` delegates to this package (flat layout helper +
  :func:`fiberpo_theory.core.objectives.fiberpo_gated_ratio`);
* :func:`fiberpo_gating_torch_sign` is the kind of hand port that looks right
  and trains subtly wrong: it takes the sign label with ``torch.sign`` and
  splits channels with ``relu``.  Its values agree with FiberPO wherever no
  log-ratio is exactly 0, but ``torch.sign(0) = 0`` and ``relu'(0) = 0`` zero
  the gradient at r = 1, exactly where every PPO-style epoch takes its first
  step.  (It is deliberately written as a third party would, not via the
  package's internals.)

:func:`compute_policy_loss_fiberpo` is this package's registry loss on a padded
batch (hyper-parameters as keywords).  It does not have verl's signature (verl
passes ``config=`` and ``rollout_is_weights=``); the loss to register in verl is
``fiberpo_theory.integrations.verl.fiberpo``.
"""

from __future__ import annotations

import torch

from fiberpo_theory.core.gates import g_agg, symmetric_clip
from fiberpo_theory.core.layout import flatten_mask, to_padded
from fiberpo_theory.core.losses import get_policy_loss_fn
from fiberpo_theory.core.objectives import fiberpo_gated_ratio

EPS, C_POS, C_NEG = 0.04, 0.12, 0.05  # the paper's Fig. 4 values, also the audit defaults


def fiberpo_gating(log_ratio: torch.Tensor, response_mask: torch.Tensor, *, eps=EPS, c_pos=C_POS, c_neg=C_NEG) -> torch.Tensor:
    """FiberPO gated ratio on a padded batch, via the package (padding gets 1)."""
    batch = flatten_mask(response_mask)
    flat = fiberpo_gated_ratio(log_ratio[batch.mask], batch.traj_id, eps=eps, c_pos=c_pos, c_neg=c_neg)
    return to_padded(flat, batch, fill=1.0)


def compute_policy_loss_fiberpo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=None, *, eps=EPS, c_pos=C_POS, c_neg=C_NEG):
    """FiberPO on a padded batch: returns ``(loss, metrics)`` with loss = −J (Eq. 2, 6)."""
    return get_policy_loss_fn("fiberpo")(
        old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, eps=eps, c_pos=c_pos, c_neg=c_neg
    )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's ``masked_mean`` over the sequence dimension, keeping it for broadcasting."""
    return (values * mask).sum(dim=-1, keepdim=True) / mask.sum(dim=-1, keepdim=True)


def fiberpo_gating_torch_sign(log_ratio: torch.Tensor, response_mask: torch.Tensor, *, eps=EPS, c_pos=C_POS, c_neg=C_NEG) -> torch.Tensor:
    """BUGGY hand port of Eq. 7-16: ``torch.sign`` for l_i and ``relu`` channels (gradient 0 at r = 1)."""
    mask = response_mask.to(log_ratio.dtype)
    length = mask.sum(dim=-1, keepdim=True)
    log_s_pos = _masked_mean(torch.relu(log_ratio), mask)  # Eq. 9
    log_s_neg = _masked_mean(torch.relu(-log_ratio), mask)
    sign = torch.sign(log_ratio)  # the bug: 0 at x = 0 instead of +1
    same = torch.where(sign > 0, log_s_pos, log_s_neg)
    opposite = torch.where(sign > 0, log_s_neg, log_s_pos)
    u = sign * log_ratio - same  # Eq. 14
    v = -opposite  # Eq. 15
    log_residual = symmetric_clip(sign * u, eps) - symmetric_clip(sign * v, eps)  # Eq. 16
    log_base = g_agg(log_s_pos, c_pos, length) - g_agg(log_s_neg, c_neg, length)  # Eq. 8
    gated = torch.exp(log_base + log_residual)
    return torch.where(mask > 0, gated, torch.ones_like(gated))
