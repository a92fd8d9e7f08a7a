"""Fused forward/backward of the FiberPO gate (Eq. 7, 16) with its closed-form token-level backward.

The FiberPO family factors into a per-trajectory part and a per-token part.
Every token i of trajectory τ with sign l_i (Eq. 13, l = +1 at x = 0) sees

    log G_i = A_(τ,l_i) + clip(x_i - S_(τ,l_i), ε)

where, per trajectory and sign, S_(τ,+) = log s⁺_τ, S_(τ,-) = -log s⁻_τ
(so x_i - S is l·u, Eq. 14) and A_(τ,l) = log w_τ - clip(l·v, ε) with
l·v = -log s⁻_τ for l = +1 and log s⁺_τ for l = -1 (Eq. 15, 16): the opposite
channel's clip does not depend on the token at all.  The base weight
log w_τ (Eq. 8 for FiberPO, Eq. 31 for FiberPO-Domain) is any function of the
``(M, 2)`` channel means (log s⁺_τ, log s⁻_τ) of Eq. 9.

Backward, with a_i = ∂L/∂G_i · G_i and 1u_i = 1[|l_i u_i| <= ε]:

    ∂L/∂A_(τ,l) = Σ_{i∈(τ,l)} a_i,   ∂L/∂S_(τ,l) = -Σ_{i∈(τ,l)} a_i 1u_i,
    ∂L/∂x_j     = a_j 1u_j + (∂L/∂log s^(l_j)_τ) · l_j / T_τ,

the last term because log s⁺ (log s⁻) is the mean of max(x, 0) (max(-x, 0)).
Substituting FiberPO's base weight gives exactly the Jacobian of
Proposition 5.2 (Eq. 20); the per-trajectory chain (A, S → channels through
the base weight) is a graph over M trajectories, differentiated by autograd.
Only two token-length tensors are saved for backward (G and one byte of
flags per token), and no token-length tensor is built in the forward pass
beyond what the gate needs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.autograd.function import once_differentiable

from .segments import Segments

# flag bits saved per token: the sign channel and whether the fiber clip passes the gradient
_NEGATIVE, _INSIDE = 1, 2


def channel_means(x: torch.Tensor, traj: Segments) -> torch.Tensor:
    """``(M, 2)`` per-trajectory means of max(x, 0) and max(-x, 0): log s⁺_τ and log s⁻_τ (Eq. 9)."""
    return traj.mean(torch.stack([x.clamp(min=0), (-x).clamp(min=0)], dim=1))


def _sign_table(channels: torch.Tensor, log_base: torch.Tensor, eps: float) -> torch.Tensor:
    """``(2M, 2)`` rows (S, A) for (τ, +) then (τ, -), see the module docstring."""
    s_pos, s_neg = channels[:, 0], channels[:, 1]
    same = torch.stack([s_pos, -s_neg], dim=1)
    opposite = torch.stack([-s_neg, s_pos], dim=1)
    offset = log_base.unsqueeze(1) - opposite.clamp(-eps, eps)
    return torch.stack([same, offset], dim=2).reshape(-1, 2)


class FiberGate(torch.autograd.Function):
    """``G = exp(A + clip(x - S, ε))`` from raw log-ratios, with the closed-form backward above."""

    @staticmethod
    def forward(ctx, x, traj: Segments, log_base_fn: Callable[[torch.Tensor], torch.Tensor], eps: float):
        negative = x < 0
        with torch.enable_grad():
            channels = channel_means(x.detach(), traj).requires_grad_(True)
            table = _sign_table(channels, log_base_fn(channels), eps)
        key = traj.index * 2 + negative
        per_token = table.detach().index_select(0, key)
        residual = x - per_token[:, 0]
        inside = residual.abs() <= eps
        gated = torch.exp(per_token[:, 1] + residual.clamp_(-eps, eps))
        flags = negative.to(torch.uint8) | (inside.to(torch.uint8) << 1)
        ctx.save_for_backward(gated, flags)
        ctx.traj, ctx.channels, ctx.table = traj, channels, table
        return gated

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gated):
        gated, flags = ctx.saved_tensors
        traj, channels, table = ctx.traj, ctx.channels, ctx.table
        a = grad_gated * gated
        a_inside = torch.where((flags & _INSIDE).bool(), a, torch.zeros((), dtype=a.dtype, device=a.device))
        negative = (flags & _NEGATIVE).long()
        key = traj.index * 2 + negative
        grad_table = table.new_zeros(table.shape).index_add_(0, key, torch.stack([-a_inside, a], dim=1))
        # retain: gradcheck and retain_graph users call backward more than once (the graph is M-sized)
        (grad_channels,) = torch.autograd.grad(table, channels, grad_table, retain_graph=True)
        # ∂ log s⁺/∂x_j = 1[x_j >= 0]/T, ∂ log s⁻/∂x_j = -1[x_j < 0]/T
        per_channel = grad_channels / traj.count.to(a.dtype).unsqueeze(1)
        per_channel = torch.stack([per_channel[:, 0], -per_channel[:, 1]], dim=1).reshape(-1)
        return a_inside + per_channel.index_select(0, key), None, None, None


def fiber_gated_ratio(x: torch.Tensor, traj: Segments, log_base_fn, eps: float) -> torch.Tensor:
    """G(r) of the FiberPO family by :class:`FiberGate`; ``log_base_fn`` maps ``(M, 2)`` channels to ``(M,)`` log w."""
    return FiberGate.apply(x, traj, log_base_fn, eps)
