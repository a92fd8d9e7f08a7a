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
the base weight) is M-sized: taken in closed form where the base weight
carries its slopes (FiberPO: γ of Eq. 20), else by autograd over that
M-sized graph (FiberPO-Domain, hierarchies).
Saved for backward: G, the int32 (trajectory, sign) key and a one-byte
flag per token; the token-level passes are two segment sums, two table
gathers and a handful of elementwise ops each way, run over chunks of
``_CHUNK`` tokens so that each chain of them works in cache and needs no
N-sized temporary: the forward writes the key, G and the flag, the backward
its products straight into the gradient (out of place only under vmap,
whose batched gradients cannot be written into our buffers).  On CPU
the same passes run as C loops (:mod:`fiberpo_theory.core.native`); for
contiguous trajectories those walk the trajectories by their lengths and
save G and one byte per token (the clip flag and the sign), the key being
implied by the run.  With those loops, FiberPO's M-sized chain (k = T_τ:
means, base weight, slopes and tables, and its backward) is one C loop each
way too (:func:`_compiled_chain`), doing the torch ops' operations in their
order: at micro-batch sizes those sixty-odd small ops cost more than the
token passes.
"""

from __future__ import annotations

import threading
from typing import Callable, NamedTuple

import torch
from torch.autograd.function import once_differentiable

from . import native as _native
from .segments import Segments

def channel_means(x: torch.Tensor, traj: Segments) -> torch.Tensor:
    """``(M, 2)`` per-trajectory means of max(x, 0) and max(-x, 0): log s⁺_τ and log s⁻_τ (Eq. 9).

    Two 1-D segment sums (no stacked token-length temporary) of the values
    :func:`fiberpo_theory.core.gates.sign_split` gives the autograd reference, up
    to an exact negation, so both round alike and agree on which regime a
    trajectory is in.
    """
    part = x.clamp(min=0)
    positive = traj.sum(part)
    # Σ max(-x, 0) = -Σ min(x, 0) exactly (negation commutes with rounding); without a graph min(x, 0) reuses
    # the buffer of max(x, 0): one fresh N-sized tensor and no negated copy of x
    part = x.clamp(max=0) if x.requires_grad else torch.clamp(x, max=0, out=part)
    return _means_of_sums(positive, traj.sum(part), traj)


def _means_of_sums(positive: torch.Tensor, nonpositive: torch.Tensor, traj: Segments) -> torch.Tensor:
    """``(M, 2)`` (log s⁺, log s⁻) from the per-trajectory sums of max(x, 0) and min(x, 0), whichever path made them."""
    count = traj.count.to(positive.dtype)
    negative = 0.0 - nonpositive  # not -Σ: an all-positive trajectory keeps log s⁻ = +0.0, as the reference
    return torch.stack([positive / count, negative / count], dim=1)


def sign_tables(channels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(2M,)`` per-(trajectory, sign) tables of l·log s^(l) and l·v = -l·log s^(-l) (Eq. 14, 15).

    Entry 2τ is l = +1, entry 2τ + 1 is l = -1, so :meth:`Segments.sign_key`
    indexes them: a token's l·u is ``x - same[key]`` and its l·v is
    ``opposite[key]``.  The autograd reference reads the same tables.
    """
    same = channels.clone()  # (log s⁺, -log s⁻) per row; negation is exact, so either sign of zero is kept
    same[:, 1].neg_()
    opposite = channels.flip(1)  # (-log s⁻, log s⁺)
    opposite[:, 0].neg_()
    return same.reshape(-1), opposite.reshape(-1)


def _sign_tables(channels: torch.Tensor, log_base: torch.Tensor, eps: float):
    """``(2M,)`` tables S and A of the module docstring, entry 2τ for l = +1 and 2τ + 1 for l = -1."""
    same, opposite = sign_tables(channels)
    offset = log_base.unsqueeze(1) - opposite.view(-1, 2).clamp(-eps, eps)  # log w shared by both signs
    return same, offset.reshape(-1)


# tokens per chunk of the token-level chain: its few live buffers stay in a core's L2 cache
_CHUNK = 1 << 16


def _gate_tokens(x, narrow, same, offset, eps, gated, inside, key) -> None:
    """``key = 2τ + 1[x < 0]``, ``gated = exp(A[key] + clip(x - S[key], ε))`` and ``inside = |x - S[key]| <= ε``.

    Chunk by chunk, so each chunk's key is built while its log-ratios are in
    cache; ``gated`` carries S, the residual, A and G in turn and the clipped
    residual lives in one chunk-sized scratch buffer: no N-sized temporary.
    The key is :meth:`Segments.sign_key`'s, written in place.
    """
    clipped = torch.empty(min(_CHUNK, x.numel()), dtype=x.dtype, device=x.device)
    for start in range(0, x.numel(), _CHUNK):
        part = slice(start, start + _CHUNK)
        k, work, xs = key[part], gated[part], x[part]
        torch.lt(xs, 0, out=k)
        k.add_(narrow[part], alpha=2)
        clip = clipped[: work.numel()]
        torch.index_select(same, 0, k, out=work)
        torch.sub(xs, work, out=work)
        torch.clamp(work, -eps, eps, out=clip)
        torch.eq(clip, work, out=inside[part])  # |x - S| <= ε, one comparison
        torch.index_select(offset, 0, k, out=work)
        work.add_(clip).exp_()


class GateCounts:
    """What a fused pass on contiguous trajectories leaves for the training metrics, when one is asked to.

    :func:`fiberpo_theory.core.diagnostics.counting_gate` installs one for
    the next fused gate or objective of this thread; that pass fills it
    from the flags and G it writes anyway (one C loop,
    ``tally_flags_runs``), so the metrics need no second chain and no
    second token pass.  ``tallies`` ``(M, 4)``: per trajectory the tokens
    with x < 0, |u| >= ε, |u| > ε, |v| > ε; ``gated_sum`` Σ G (float64);
    ``channels`` ``(M, 2)`` and ``log_base`` ``(M,)`` from the chain;
    ``source`` names the log-ratios counted (storage, length, version), so
    that counts are only used for those same values (:meth:`counts_for`).
    Left empty (``filled`` false) where the run loops do not run.
    """

    def __init__(self):
        self.tallies = self.gated_sum = self.channels = self.log_base = self.source = None
        self.filled = False

    def counts_for(self, x: torch.Tensor) -> bool:
        """Whether these counts were taken of ``x`` as it is now (its storage, length and in-place writes)."""
        return self.filled and self.source == _source(x)


def _source(x: torch.Tensor) -> tuple[int, int, int]:
    return x.data_ptr(), x.numel(), -1 if x.is_inference() else x._version


_COUNTING = threading.local()  # the GateCounts the next fused pass of this thread fills, if any


def _claim_counts() -> GateCounts | None:
    """The installed :class:`GateCounts`, taken off the thread: the next fused pass fills it or leaves it empty."""
    counts = getattr(_COUNTING, "counts", None)
    _COUNTING.counts = None
    return counts


def _counting_runs(counts: GateCounts | None, m: int, x: torch.Tensor) -> GateCounts | None:
    """``counts`` with buffers for ``m`` trajectories, for a pass of the run loops over ``x``."""
    if counts is not None:
        counts.tallies, counts.gated_sum = torch.empty(m, 4, dtype=torch.long), torch.zeros(1, dtype=torch.float64)
        counts.source = _source(x)
    return counts


def count_runs(counts: GateCounts, x, runs, same, eps, gated, flags, first: int, last: int, start: int) -> None:
    """Add the trajectories ``first..last-1`` (tokens from ``start``) to ``counts`` by the C loop."""
    lib, real, suffix = _native.loops(x.dtype)
    ptr = _native.ptr
    getattr(lib, f"tally_flags_runs_{suffix}")(last - first, ptr(runs, first), ptr(x, start), ptr(same, 2 * first),
                                              ptr(flags, start), ptr(gated, start), real(eps),
                                              ptr(counts.tallies, 4 * first), ptr(counts.gated_sum))


class FiberGate(torch.autograd.Function):
    """``G = exp(A + clip(x - S, ε))`` from raw log-ratios, with the closed-form backward above.

    Three ways through the tokens, all giving the same bits: compiled loops
    walking contiguous trajectories by their lengths (saving G and one flag
    byte per token), compiled loops over the per-token index (saving G, the
    key and the flag), and the chunked torch ops (the same, and the only way
    on CUDA, under vmap or without a C compiler).
    """

    @staticmethod
    def forward(ctx, x, traj: Segments, log_base_fn: Callable[[torch.Tensor], torch.Tensor], eps: float):
        counts = _claim_counts()
        runs = traj.runs if _native.kernels_for(x) else None
        indexed = None
        if runs is None and traj.narrow_index.dtype == torch.int32:
            indexed = _native.kernels_for(x, traj.narrow_index)  # range-checked once when built by hand
        chain = trajectory_chain(x, traj, runs, bool(indexed), log_base_fn, eps)
        tables = chain.same.detach(), chain.offset.detach()
        native_tables = chain.same.dtype == x.dtype == chain.offset.dtype
        gated = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if runs is not None and native_tables:
            flags = torch.empty(x.shape, dtype=torch.uint8)  # inside | negative << 1
            counts = _counting_runs(counts, traj.size, x)
            _runs_gate_tokens(x, runs, *tables, eps, gated, flags, counts)
            ctx.save_for_backward(gated, flags)
            if counts is not None:
                _finish_counts(counts, chain.channels, chain.log_base)
        else:
            narrow = traj.narrow_index
            inside = torch.empty(x.shape, dtype=torch.bool, device=x.device)
            key = torch.empty(x.shape, dtype=narrow.dtype, device=x.device)  # (trajectory, sign); l = +1 at x = 0
            gate = _native_gate_tokens if indexed and native_tables else _gate_tokens
            gate(x, narrow, *tables, eps, gated, inside, key)
            ctx.save_for_backward(gated, key, inside)
        ctx.traj, ctx.chain, ctx.eps = traj, chain, eps
        return gated

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gated):
        saved = ctx.saved_tensors
        traj, chain = ctx.traj, ctx.chain
        gated = saved[0]
        native = grad_gated.dtype == gated.dtype and _native.plain_cpu(grad_gated)
        if native:
            grad_gated = grad_gated.contiguous()  # a broadcast gradient (of a plain sum) is materialised once
        key = indexed = None
        if len(saved) == 2 and native:  # the run loops saved one flag byte per token
            flags = saved[1]
            grad_x, grad_offset, grad_same = _runs_reduce_tokens(grad_gated, gated, flags, traj.runs)
        else:
            key, inside = saved[1:] if len(saved) == 3 else _key_and_inside(saved[1], traj)
            indexed = native and key.dtype == torch.int32 and _native.kernels_for(gated, key)
            reduce = _native_reduce_tokens if indexed else (
                _reduce_tokens_batched if _is_batched(grad_gated) else _reduce_tokens)
            grad_x, grad_offset, grad_same = reduce(grad_gated, gated, key, inside, chain.offset.numel())
        per_channel = chain_grad(chain, traj, ctx.eps, grad_same, grad_offset, compiled=key is None or bool(indexed))
        same_dtype = per_channel.dtype == grad_x.dtype
        if key is None and same_dtype:
            return _runs_add_channel_terms(grad_x, per_channel, flags, traj.runs), None, None, None
        if key is None:
            key = _key_and_inside(flags, traj)[0]
        add = _native_add_channel_terms if indexed and same_dtype else _add_channel_terms
        return add(grad_x, per_channel, key), None, None, None


def _finish_counts(counts: GateCounts, channels: torch.Tensor, log_base: torch.Tensor) -> None:
    """Complete ``counts`` with the chain's channels and log w (never the base weight evaluated again: across
    ranks it makes collectives)."""
    counts.channels, counts.log_base, counts.filled = channels.detach(), log_base.detach(), True


class Chain(NamedTuple):
    """The per-trajectory part of the gate: channels (M, 2), tables S and A (2M,), and what its backward needs.

    ``slopes`` (M, 2) where the base weight is diagonal in the trajectories
    (FiberPO), ``vjp`` where it has a closed-form vector-Jacobian product
    (FiberPO-Domain on one process), neither where the M-sized graph from
    ``channels`` to the tables is differentiated by autograd; ``compiled``:
    made by the C loop, whose backward is its C loop too.
    """

    channels: torch.Tensor
    same: torch.Tensor
    offset: torch.Tensor
    slopes: torch.Tensor | None
    vjp: Callable | None
    compiled: bool
    log_base: torch.Tensor  # (M,) log w
    grad: Callable | None = None  # the compiled backward of a compiled chain other than FiberPO's


def trajectory_chain(x, traj: Segments, runs, indexed: bool, log_base_fn, eps) -> Chain:
    """Channel means (Eq. 9), base weight and the tables of the module docstring, by the cheapest path.

    ``runs`` (the trajectory lengths) or ``indexed`` say which compiled
    token loops may take the channel sums; without either, torch ops.
    """
    # the base weight's derivative is known (slopes, or a vector-Jacobian product): no M-sized graph
    closed_form = hasattr(log_base_fn, "slopes") or hasattr(log_base_fn, "with_vjp")
    compiled = vjp = None
    with torch.enable_grad() if not closed_form else torch.no_grad():
        if runs is not None or indexed:
            sums = _runs_channel_sums(x, traj, runs) if runs is not None else _native_channel_sums(x, traj)
            compiled = _compiled_chain(sums, traj, log_base_fn, eps) if closed_form else None
            means = _means_of_sums(sums[0], sums[1], traj) if compiled is None else None
        else:
            means = channel_means(x.detach(), traj)
        if compiled is not None:
            return compiled
        channels = means.requires_grad_(not closed_form)
        if hasattr(log_base_fn, "with_vjp"):
            log_base, vjp = log_base_fn.with_vjp(channels)
        else:
            log_base = log_base_fn(channels)
        same, offset = _sign_tables(channels, log_base, eps)
    # ∂ log w/∂ channels, (M, 2), where the base weight is diagonal in the trajectories
    slopes = log_base_fn.slopes(channels) if hasattr(log_base_fn, "slopes") else None
    return Chain(channels, same, offset, slopes, vjp, compiled=False, log_base=log_base)


def chain_grad(chain: Chain, traj: Segments, eps, grad_same, grad_offset, *, compiled: bool) -> torch.Tensor:
    """``(2M,)`` each token's share of its trajectory's channel gradient, entry 2τ + 1[x < 0].

    ``compiled``: the caller's tables are plain CPU buffers the C loop may
    read (then a chain the C loop made is differentiated by its C loop).
    """
    if compiled and chain.compiled and grad_offset.dtype == chain.channels.dtype:
        if chain.grad is not None:
            return chain.grad(grad_same, grad_offset)
        return _compiled_chain_grad(chain.channels, chain.slopes, grad_same, grad_offset, traj, eps)
    channels = chain.channels
    if chain.slopes is not None:
        grad_channels = _channel_grad(channels, lambda base: base.unsqueeze(-1) * chain.slopes, grad_same,
                                      grad_offset, eps)
    elif chain.vjp is not None:
        grad_channels = _channel_grad(channels, chain.vjp, grad_same, grad_offset, eps)
    else:  # retain: gradcheck and retain_graph users call backward more than once (the graph is M-sized)
        (grad_channels,) = torch.autograd.grad((chain.same, chain.offset), channels, (grad_same, grad_offset),
                                               retain_graph=True)
    # ∂ log s⁺/∂x_j = 1[x_j >= 0]/T, ∂ log s⁻/∂x_j = -1[x_j < 0]/T
    per_channel = grad_channels / traj.count.to(grad_offset.dtype).unsqueeze(1)
    per_channel[..., 1].neg_()
    return per_channel.reshape(-1)


def _compiled_chain(sums, traj: Segments, log_base_fn, eps) -> Chain | None:
    """The M-sized forward chain by one C loop, or ``None`` where it does not apply.

    It applies on CPU to FiberPO's base weight of Eq. 8 with k = T_τ
    (``length_budgets`` set) and to FiberPO-Domain's on one process
    (``packed_levels``): the loop does, trajectory by trajectory, the
    operations of :func:`_means_of_sums`, the base weight's value and slopes
    (g_agg and γ of Eq. 10, 20) and :func:`_sign_tables`, in their order, so
    the tables, channels and slopes are those bits; its backward is a C loop too.
    """
    count = traj.count
    if count.dtype != torch.long or not (_native.plain_cpu(count) and count.is_contiguous()):
        return None
    if hasattr(log_base_fn, "packed_levels"):
        return _compiled_domain_chain(sums, traj, log_base_fn, eps)
    budgets = getattr(log_base_fn, "length_budgets", None)
    if budgets is None:
        return None
    lib, real, suffix = _native.loops(sums.dtype)
    m = traj.size
    channels, slopes = (torch.empty(m, 2, dtype=sums.dtype) for _ in range(2))
    same, offset = (torch.empty(2 * m, dtype=sums.dtype) for _ in range(2))
    log_base = torch.empty(m, dtype=sums.dtype)
    ptr = _native.ptr
    getattr(lib, f"fiber_chain_{suffix}")(m, ptr(traj.count), ptr(sums[0]), ptr(sums[1]), real(budgets[0]),
                                          real(budgets[1]), real(eps), ptr(channels), ptr(same), ptr(offset),
                                          ptr(slopes), ptr(log_base))
    return Chain(channels, same, offset, slopes, vjp=None, compiled=True, log_base=log_base)


def _compiled_domain_chain(sums, traj: Segments, log_base_fn, eps) -> Chain:
    """FiberPO-Domain's chain (Eq. 30-33) by ``domain_chain``; the slopes it writes serve both backwards.

    ``vjp`` is the torch vector-Jacobian product on those slopes (batched cotangents); ``grad`` the C one.
    """
    levels, groups, domains = log_base_fn.packed_levels()
    c_pos, c_neg = log_base_fn.c_pos, log_base_fn.c_neg
    lib, real, suffix = _native.loops(sums.dtype)
    m, dtype, ptr = traj.size, sums.dtype, _native.ptr
    channels, gamma = torch.empty(m, 2, dtype=dtype), torch.empty(3, m, 2, dtype=dtype)
    same, offset = (torch.empty(2 * m, dtype=dtype) for _ in range(2))
    work, log_base = torch.empty(2 * (groups + domains), dtype=dtype), torch.empty(m, dtype=dtype)
    getattr(lib, f"domain_chain_{suffix}")(m, groups, domains, ptr(traj.count), ptr(levels), ptr(sums[0]),
                                           ptr(sums[1]), real(c_pos), real(c_neg), real(eps), ptr(work),
                                           ptr(channels), ptr(same), ptr(offset), ptr(gamma), ptr(log_base))

    def grad(grad_same, grad_offset):
        per_channel = torch.empty(2 * m, dtype=dtype)
        getattr(lib, f"domain_chain_grad_{suffix}")(m, groups, domains, ptr(traj.count), ptr(levels), ptr(channels),
                                                    ptr(gamma), ptr(grad_offset.contiguous()),
                                                    ptr(grad_same.contiguous()), real(eps), ptr(work), ptr(per_channel))
        return per_channel

    return Chain(channels, same, offset, None, log_base_fn.vjp_of(list(gamma)), compiled=True, grad=grad,
                 log_base=log_base)


def _compiled_chain_grad(channels, slopes, grad_same, grad_offset, traj: Segments, eps):
    """:func:`chain_grad` of the closed-form chain by one C loop, on the tables the compiled loops made."""
    lib, real, suffix = _native.loops(grad_offset.dtype)
    per_channel = torch.empty(grad_offset.shape, dtype=grad_offset.dtype)
    ptr = _native.ptr
    getattr(lib, f"fiber_chain_grad_{suffix}")(traj.size, ptr(traj.count), ptr(channels), ptr(slopes),
                                               ptr(grad_offset), ptr(grad_same), real(eps), ptr(per_channel))
    return per_channel


def _key_and_inside(flags: torch.Tensor, traj: Segments):
    """The (trajectory, sign) key and the flag of the index path, from the run loops' flag bytes."""
    key = torch.bitwise_right_shift(flags, 1).to(traj.narrow_index.dtype).add_(traj.narrow_index, alpha=2)
    return key, torch.bitwise_and(flags, 1).bool()


def _channel_grad(channels, through_base, grad_same, grad_offset, eps):
    """∂L/∂(log s⁺, log s⁻) from the table gradients, in closed form: the chain of :func:`_sign_tables`.

    With S_(τ,+) = log s⁺, S_(τ,-) = -log s⁻, A_(τ,+) = log w + clip(log s⁻, ε) and
    A_(τ,-) = log w - clip(log s⁺, ε), each channel collects its S entry, the
    log w share of both A entries, and the clip of the A entry that reads it
    (derivative 1 inside [-ε, ε], ends included, as ``clamp``'s).
    ``through_base`` maps ∂L/∂ log w ``(..., M)`` to its share of the channel
    gradient ``(..., M, 2)``: the slopes times it for FiberPO ((γ⁺, -γ⁻) of
    Eq. 20), the base weight's vector-Jacobian product for FiberPO-Domain.
    """
    pairs = (*grad_same.shape[:-1], channels.shape[0], 2)  # reshape, not unflatten: vmap has no rule for that
    grad_same, grad_offset = grad_same.reshape(pairs), grad_offset.reshape(pairs)
    base = grad_offset[..., 0] + grad_offset[..., 1]  # ∂L/∂ log w_τ
    signs = channels.new_tensor([1.0, -1.0])  # S_(τ,-) and the clip in A_(τ,+) read their channel negated
    inside = (channels.abs() <= eps).to(base.dtype)  # |log s| <= ε: the clip of the A entry that reads it is open
    crossed = grad_offset.flip(-1) * inside * signs  # each channel's clip sits in the other sign's A entry
    return grad_same * signs + through_base(base) - crossed


def _is_batched(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a vmap-batched gradient (``jacobian(vectorize=True)``): no writes into our buffers then."""
    functorch = torch._C._functorch  # jacobian(vectorize=True) batches with the legacy wrapper, torch.func with the new
    return bool(functorch.is_legacy_batchedtensor(tensor) or functorch.is_batchedtensor(tensor))


def _reduce_tokens(grad_gated, gated, key, inside, size):
    """a·1u written into the gradient buffer, and the (2M,) sums ∂L/∂A = Σ a and ∂L/∂S = -Σ a·1u.

    Chunk by chunk so that each chunk's products stay in cache; the tables
    accumulate in token order, as one ``index_add`` would.
    """
    dtype = torch.promote_types(grad_gated.dtype, gated.dtype)
    grad_offset, grad_inside = (torch.zeros(size, dtype=dtype, device=gated.device) for _ in range(2))
    grad_x = torch.empty(gated.shape, dtype=dtype, device=gated.device)
    for start in range(0, gated.numel(), _CHUNK):
        part, k = slice(start, start + _CHUNK), key[start : start + _CHUNK]
        a = torch.mul(grad_gated[part], gated[part], out=grad_x[part])
        grad_offset.index_add_(0, k, a)
        a.mul_(inside[part].view(torch.uint8))  # a uint8 factor multiplies without the bool promotion copy
        grad_inside.index_add_(0, k, a)
    return grad_x, grad_offset, -grad_inside


def _reduce_tokens_batched(grad_gated, gated, key, inside, size):
    """:func:`_reduce_tokens` for a vmap-batched gradient: the same sums, out of place.

    Under vmap nothing may be written into a buffer made here from batched
    values, so each chunk's a·1u is a fresh tensor and the tables are
    rebuilt by out-of-place ``index_add``; the chunks are joined at the end.
    """
    dtype = torch.promote_types(grad_gated.dtype, gated.dtype)
    grad_offset = grad_inside = torch.zeros(size, dtype=dtype, device=gated.device)
    kept = []
    for start in range(0, gated.numel(), _CHUNK):
        part, k = slice(start, start + _CHUNK), key[start : start + _CHUNK]
        a = grad_gated[part] * gated[part]
        grad_offset = grad_offset.index_add(0, k, a)
        a = a * inside[part]
        grad_inside = grad_inside.index_add(0, k, a)
        kept.append(a)
    return torch.cat(kept) if len(kept) > 1 else kept[0], grad_offset, -grad_inside


def _add_channel_terms(grad_x, per_channel, key):
    """``grad_x += per_channel[key]``: each token's share of its trajectory's channel-mean gradient.

    In place, chunk by chunk through one scratch buffer, unless ``grad_x``
    is vmap-batched (then out of place).
    """
    if _is_batched(grad_x) or _is_batched(per_channel):
        return grad_x + per_channel.index_select(0, key)
    scratch = torch.empty(min(_CHUNK, key.numel()), dtype=per_channel.dtype, device=per_channel.device)
    for start in range(0, key.numel(), _CHUNK):
        k = key[start : start + _CHUNK]
        grad_x[start : start + _CHUNK].add_(torch.index_select(per_channel, 0, k, out=scratch[: k.numel()]))
    return grad_x


def _native_channel_sums(x, traj: Segments) -> torch.Tensor:
    """``(2, M)`` sums of max(x, 0) and min(x, 0) per trajectory (:func:`channel_means` before the division), one C loop in token order."""
    lib, _, suffix = _native.loops(x.dtype)
    sums = torch.zeros(2, traj.size, dtype=x.dtype)
    getattr(lib, f"channel_sums_{suffix}")(x.numel(), _native.ptr(x), _native.ptr(traj.narrow_index),
                                          _native.ptr(sums[0]), _native.ptr(sums[1]))
    return sums


def _native_gate_tokens(x, narrow, same, offset, eps, gated, inside, key) -> None:
    """:func:`_gate_tokens` by one C loop per chunk, each chunk exponentiated by torch while it is in cache."""
    lib, real, suffix = _native.loops(x.dtype)
    gate, same, offset, ptr = getattr(lib, f"gate_tokens_{suffix}"), same.contiguous(), offset.contiguous(), _native.ptr
    for start in range(0, x.numel(), _CHUNK):
        size = min(_CHUNK, x.numel() - start)
        gate(size, ptr(x, start), ptr(narrow, start), ptr(same), ptr(offset), real(eps),
             ptr(gated, start), ptr(inside, start), ptr(key, start))
        gated[start : start + size].exp_()


def _native_reduce_tokens(grad_gated, gated, key, inside, size):
    """:func:`_reduce_tokens` by one C loop over the tokens."""
    lib, _, suffix = _native.loops(gated.dtype)
    grad_offset, grad_inside = (torch.zeros(size, dtype=gated.dtype) for _ in range(2))
    grad_x = torch.empty_like(gated)
    ptr = _native.ptr
    getattr(lib, f"reduce_tokens_{suffix}")(gated.numel(), ptr(grad_gated), ptr(gated), ptr(key), ptr(inside),
                                           ptr(grad_offset), ptr(grad_inside), ptr(grad_x))
    return grad_x, grad_offset, -grad_inside


def _native_add_channel_terms(grad_x, per_channel, key):
    """:func:`_add_channel_terms` by one C loop over the tokens, in place."""
    lib, _, suffix = _native.loops(grad_x.dtype)
    per_channel = per_channel.contiguous()
    getattr(lib, f"add_channel_{suffix}")(key.numel(), _native.ptr(key), _native.ptr(per_channel), _native.ptr(grad_x))
    return grad_x


def _runs_channel_sums(x, traj: Segments, runs: torch.Tensor) -> torch.Tensor:
    """:func:`_native_channel_sums` by one C loop walking the trajectories by their lengths."""
    lib, _, suffix = _native.loops(x.dtype)
    sums = torch.zeros(2, traj.size, dtype=x.dtype)
    getattr(lib, f"channel_sums_runs_{suffix}")(traj.size, _native.ptr(runs), _native.ptr(x),
                                               _native.ptr(sums[0]), _native.ptr(sums[1]))
    return sums


def run_chunks(n: int, runs: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """``(first run, end run, first token, end token)`` of chunks of whole trajectories, about ``_CHUNK`` tokens each.

    Each chunk ends with the trajectory that crosses a multiple of
    ``_CHUNK`` tokens, so a chunk's buffers are still in cache when torch
    exponentiates it.
    """
    if n <= _CHUNK:
        return [(0, runs.numel(), 0, n)]
    ends = runs.cumsum(0)
    targets = torch.arange(1, (n - 1) // _CHUNK + 1, dtype=torch.long) * _CHUNK
    cuts = sorted(set((torch.searchsorted(ends, targets) + 1).tolist()) | {runs.numel()})
    chunks, first, start = [], 0, 0
    for last in cuts:
        stop = int(ends[last - 1])
        chunks.append((first, last, start, stop))
        first, start = last, stop
    return chunks


def _runs_gate_tokens(x, runs, same, offset, eps, gated, flags, counts: GateCounts | None = None) -> None:
    """The token gate by the run loop, a chunk of whole trajectories at a time, each chunk exponentiated (and
    counted for ``counts``) while in cache."""
    lib, real, suffix = _native.loops(x.dtype)
    gate, same, offset, ptr = getattr(lib, f"gate_runs_{suffix}"), same.contiguous(), offset.contiguous(), _native.ptr
    for first, last, start, stop in run_chunks(x.numel(), runs):
        gate(last - first, ptr(runs, first), ptr(x, start), ptr(same, 2 * first), ptr(offset, 2 * first), real(eps),
             ptr(gated, start), ptr(flags, start))
        gated[start:stop].exp_()
        if counts is not None:
            count_runs(counts, x, runs, same, eps, gated, flags, first, last, start)


def _runs_reduce_tokens(grad_gated, gated, flags, runs):
    """:func:`_reduce_tokens` by the run loop (tables in registers per trajectory)."""
    lib, _, suffix = _native.loops(gated.dtype)
    grad_offset, grad_inside = (torch.zeros(2 * runs.numel(), dtype=gated.dtype) for _ in range(2))
    grad_x = torch.empty_like(gated)
    ptr = _native.ptr
    getattr(lib, f"reduce_runs_{suffix}")(runs.numel(), ptr(runs), ptr(grad_gated), ptr(gated), ptr(flags),
                                         ptr(grad_offset), ptr(grad_inside), ptr(grad_x))
    return grad_x, grad_offset, -grad_inside


def _runs_add_channel_terms(grad_x, per_channel, flags, runs):
    """:func:`_add_channel_terms` by the run loop, in place."""
    lib, _, suffix = _native.loops(grad_x.dtype)
    per_channel = per_channel.contiguous()
    getattr(lib, f"add_channel_runs_{suffix}")(runs.numel(), _native.ptr(runs), _native.ptr(flags),
                                              _native.ptr(per_channel), _native.ptr(grad_x))
    return grad_x


def fiber_gated_ratio(x: torch.Tensor, traj: Segments, log_base_fn, eps: float) -> torch.Tensor:
    """G(r) of the FiberPO family by :class:`FiberGate`; ``log_base_fn`` maps ``(M, 2)`` channels to ``(M,)`` log w."""
    return FiberGate.apply(x, traj, log_base_fn, eps)
