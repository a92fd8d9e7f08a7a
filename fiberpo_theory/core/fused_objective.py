"""Eq. 2 for the FiberPO family in the gate's own pass: J = Σ_τ w_τ Σ_{i∈τ} Â_i G_i, with its closed-form backward.

The gate of :mod:`fiberpo_theory.core.fused` writes G for every token, and
Eq. 2 then reads G, the advantages and a per-token μ back to form a dot
product, whose backward writes ∂J/∂G for the gate's backward to read.  When
μ is constant on each trajectory (FiberPO's 1/(|Tj| T_τ), or 1/N) and the
advantages carry no gradient, all of that folds into the gate: with
q_i = Â_i G_i the forward accumulates, per trajectory τ and sign l,

    ∂J/∂A_(τ,l) = w_τ Σ_{i∈(τ,l)} q_i,   ∂J/∂S_(τ,l) = -w_τ Σ_{i∈(τ,l)} q_i 1u_i,

and J = Σ_τ w_τ Σ_{i∈τ} q_i, so the backward needs only the per-trajectory
chain (the same as the gate's) and one token pass,

    ∂J/∂x_j = w_τ q_j 1u_j + (∂J/∂ log s^(l_j)_τ) · l_j / T_τ,

reading q and the gate's flag byte.  Saved for backward: q and one byte per
token; nothing μ-sized or G-sized is written besides q.  This runs where the
gate's compiled run loops do (contiguous trajectories on CPU: packed sorted
ids, padded rows); elsewhere the objectives compose the gate with
:func:`~fiberpo_theory.core.objectives.rgf_objective`, which is also the
reference the tests hold this path to.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from . import native as _native
from .fused import _is_batched, chain_grad, run_chunks, trajectory_chain
from .segments import Segments


def applies(x: torch.Tensor, traj: Segments, advantages: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether :class:`FiberObjective` takes these inputs (else the gate composed with Eq. 2 does)."""
    if advantages.requires_grad or weights.requires_grad or not (x.dtype == advantages.dtype == weights.dtype):
        return False
    return _native.kernels_for(x, advantages, weights) is not None and traj.runs is not None


class FiberObjective(torch.autograd.Function):
    """``J = Σ_τ weights_τ Σ_{i∈τ} advantages_i G_i`` with G the FiberPO-family gate of ``log_base_fn``."""

    @staticmethod
    def forward(ctx, x, traj: Segments, log_base_fn, eps: float, advantages, weights):
        runs = traj.runs
        chain = trajectory_chain(x, traj, runs, False, log_base_fn, eps)
        same, offset = (table.detach().to(x.dtype).contiguous() for table in (chain.same, chain.offset))
        lib, real, suffix = _native.loops(x.dtype)
        gate, weigh, ptr = getattr(lib, f"gate_runs_{suffix}"), getattr(lib, f"weigh_runs_{suffix}"), _native.ptr
        q, flags = torch.empty_like(x), torch.empty(x.shape, dtype=torch.uint8)  # flags: inside | negative << 1
        grad_offset, grad_same = torch.empty(offset.shape, dtype=x.dtype), torch.empty(offset.shape, dtype=x.dtype)
        total = torch.zeros((), dtype=x.dtype)
        for first, last, start, stop in run_chunks(x.numel(), runs):
            gate(last - first, ptr(runs, first), ptr(x, start), ptr(same, 2 * first), ptr(offset, 2 * first),
                 real(eps), ptr(q, start), ptr(flags, start))
            q[start:stop].exp_()  # G, while the chunk is in cache; weigh turns it into q = Â·G
            weigh(last - first, ptr(runs, first), ptr(weights, first), ptr(advantages, start), ptr(flags, start),
                  ptr(q, start), ptr(grad_offset, 2 * first), ptr(grad_same, 2 * first), ptr(total))
        ctx.save_for_backward(q, flags)
        ctx.traj, ctx.chain, ctx.eps, ctx.weights = traj, chain, eps, weights
        ctx.table_grads = grad_same, grad_offset
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        q, flags = ctx.saved_tensors
        traj, weights = ctx.traj, ctx.weights
        grad_same, grad_offset = (g.to(ctx.chain.channels.dtype) for g in ctx.table_grads)
        per_channel = chain_grad(ctx.chain, traj, ctx.eps, grad_same, grad_offset, compiled=True)
        per_channel = per_channel.detach().to(q.dtype).contiguous()
        plain = _native.plain_cpu(grad_total) and not _is_batched(grad_total)
        scale = float(grad_total) if plain else 1.0  # a batched gradient (jacobian(vectorize=True)) scales after
        lib, real, suffix = _native.loops(q.dtype)
        grad_x = torch.empty_like(q)
        ptr = _native.ptr
        getattr(lib, f"objective_grad_runs_{suffix}")(traj.size, ptr(traj.runs), ptr(weights), ptr(q), ptr(flags),
                                                      ptr(per_channel), real(scale), ptr(grad_x))
        grad_x = grad_x if plain else grad_total * grad_x
        return grad_x, None, None, None, None, None


def fiber_objective(x, traj: Segments, log_base_fn, eps: float, advantages, weights) -> torch.Tensor | None:
    """J by :class:`FiberObjective`, or ``None`` where it does not apply; ``weights`` is ``(M,)`` per trajectory."""
    if not applies(x, traj, advantages, weights):
        return None
    objective = FiberObjective.apply(x, traj, log_base_fn, eps, advantages, weights)
    return objective if math.isfinite(objective.detach()) else None  # the composed path reports why
