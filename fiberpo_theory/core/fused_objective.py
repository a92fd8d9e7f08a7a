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

import torch
from torch.autograd.function import once_differentiable

from . import native as _native
from .fused import (_claim_counts, _counting_runs, _finish_counts, _is_batched, chain_grad, count_runs, run_chunks,
                    trajectory_chain)
from .segments import Segments


def applies(x: torch.Tensor, traj: Segments, advantages: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether :class:`FiberObjective` takes these inputs (else the gate composed with Eq. 2 does)."""
    if advantages.requires_grad or weights.requires_grad or not (x.dtype == advantages.dtype == weights.dtype):
        return False
    return _native.kernels_for(x, advantages, weights) is not None and traj.runs is not None


class FiberObjective(torch.autograd.Function):
    """``J = Σ_τ weights_τ Σ_{i∈τ} advantages_i G_i`` with G the FiberPO-family gate of ``log_base_fn``.

    FiberPO with k = T_τ runs its per-trajectory chain as one C call each
    way, its M-sized buffers one workspace; other base weights take the
    gate's :func:`~fiberpo_theory.core.fused.trajectory_chain`.
    """

    @staticmethod
    def forward(ctx, x, traj: Segments, log_base_fn, eps: float, advantages, weights):
        runs, m = traj.runs, traj.size
        lib, real, suffix = _native.loops(x.dtype)
        ptr, size = _native.ptr, x.element_size()
        budgets = getattr(log_base_fn, "length_budgets", None)
        chain = None
        if budgets is not None:  # layout in _kernels.c: sums, channels, S, A, slopes, dJ/dA, dJ/dS, per channel,
            ws = torch.empty(17 * m + 1, dtype=x.dtype)  # log w, J
            getattr(lib, f"fiber_objective_chain_{suffix}")(m, ptr(runs), ptr(x), real(budgets[0]), real(budgets[1]),
                                                           real(eps), ptr(ws))
            base = ptr(ws)
            same, offset, grad_offset, grad_same = (base + k * m * size for k in (4, 6, 10, 12))
            total = ws[17 * m]
        else:
            chain = trajectory_chain(x, traj, runs, False, log_base_fn, eps)
            ws = torch.empty(4 * m + 1, dtype=x.dtype)  # S, A (in x's dtype), dJ/dA, dJ/dS, J
            ws[: 2 * m].copy_(chain.same.detach().reshape(-1))
            ws[2 * m : 4 * m].copy_(chain.offset.detach().reshape(-1))
            ws[4 * m].zero_()
            base = ptr(ws)
            same, offset = base, base + 2 * m * size
            grad_offset, grad_same = (torch.empty(2 * m, dtype=x.dtype) for _ in range(2))
            ctx.table_grads = grad_same, grad_offset
            grad_offset, grad_same = ptr(grad_offset), ptr(grad_same)
            total = ws[4 * m]
        gate, weigh = getattr(lib, f"gate_runs_{suffix}"), getattr(lib, f"weigh_runs_{suffix}")
        q, flags = torch.empty_like(x), torch.empty(x.shape, dtype=torch.uint8)  # flags: inside | negative << 1
        counts = _counting_runs(_claim_counts(), m, x)  # the training metrics' counts, if asked for: G before it is q
        same_table = (ws[4 * m : 6 * m] if chain is None else ws[: 2 * m]) if counts is not None else None
        for first, last, start, stop in run_chunks(x.numel(), runs):
            tables = 2 * first * size
            gate(last - first, ptr(runs, first), ptr(x, start), same + tables, offset + tables, real(eps),
                 ptr(q, start), ptr(flags, start))
            (q if stop - start == q.numel() else q[start:stop]).exp_()  # G, in cache; weigh makes it q = Â·G
            if counts is not None:
                count_runs(counts, x, runs, same_table, eps, q, flags, first, last, start)
            weigh(last - first, ptr(runs, first), ptr(weights, first), ptr(advantages, start), ptr(flags, start),
                  ptr(q, start), grad_offset + tables, grad_same + tables, ptr(total))
        if counts is not None:  # the channels and log w of the compiled chain's workspace, else the chain's
            _finish_counts(counts, *((ws[2 * m : 4 * m].view(m, 2), ws[16 * m : 17 * m]) if chain is None
                                     else (chain.channels, chain.log_base)))
        ctx.save_for_backward(q, flags)
        ctx.traj, ctx.chain, ctx.eps, ctx.weights, ctx.ws = traj, chain, eps, weights, ws
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        q, flags = ctx.saved_tensors
        traj, weights = ctx.traj, ctx.weights
        plain = _native.plain_cpu(grad_total) and not _is_batched(grad_total)
        scale = float(grad_total) if plain else 1.0  # a batched gradient (jacobian(vectorize=True)) scales after
        lib, real, suffix = _native.loops(q.dtype)
        ptr = _native.ptr
        grad_x = torch.empty_like(q)
        if ctx.chain is None:
            getattr(lib, f"fiber_objective_grad_{suffix}")(traj.size, ptr(traj.runs), ptr(ctx.ws), real(ctx.eps),
                                                          ptr(weights), ptr(q), ptr(flags), real(scale), ptr(grad_x))
        else:
            dtype = ctx.chain.channels.dtype
            grad_same, grad_offset = (g if g.dtype == dtype else g.to(dtype) for g in ctx.table_grads)
            per_channel = chain_grad(ctx.chain, traj, ctx.eps, grad_same, grad_offset, compiled=True)
            per_channel = per_channel.detach().to(q.dtype).contiguous()
            getattr(lib, f"objective_grad_runs_{suffix}")(traj.size, ptr(traj.runs), ptr(weights), ptr(q),
                                                          ptr(flags), ptr(per_channel), real(scale), ptr(grad_x))
        return grad_x if plain else grad_total * grad_x, None, None, None, None, None


def fiber_objective(x, traj: Segments, log_base_fn, eps: float, advantages, weights) -> torch.Tensor | None:
    """J by :class:`FiberObjective`, or ``None`` where it does not apply; ``weights`` is ``(M,)`` per trajectory.

    Non-finite inputs give a non-finite J; the caller names them.
    """
    if not applies(x, traj, advantages, weights):
        return None
    return FiberObjective.apply(x, traj, log_base_fn, eps, advantages, weights)
