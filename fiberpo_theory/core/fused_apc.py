"""Fused forward/backward of the APC-Obj gate (Eq. 59) with its closed-form token-level backward.

Every token i at state s (T_s tokens) with deviation d_i = r_i - 1 is gated as

    G_i = 1 + clip(d_i, B_i),   B_i = T_s δ - Σ_{j at s, j≠i} |d_j| = b_s + |d_i|,
    b_s = Σ_{j at s} (δ - |d_j|),

with clip(a, B) = clip(a, -B⁺, B⁺).  Writing the budget as the one segment
sum b_s needs neither the state's size nor a second reduction.  The sign of
b_s (T_s times δ minus the state's sample TV, Eq. 60-63) sorts the states:

* b_s >= 0: B_i >= |d_i| for every token, G_i = r_i and ∂G_i/∂r_k = 1[k = i];
* b_s < 0 (over budget): B_i < |d_i|, so G_i = 1 + c_i B⁺_i with
  c_i = sign(d_i) where B_i > 0 (rolled back) and c_i = 0 where B_i <= 0
  (zeroed).  Since ∂B_i/∂r_i = 0 and ∂B_i/∂r_k = -sign(d_k) for the other
  tokens k at s, ∂G_i/∂r_k = -c_i sign(d_k) 1[k ≠ i].

Summing over i with g_i = ∂L/∂G_i and W_s = Σ_{i at s} g_i c_i:

    ∂L/∂r_k = g_k 1[b_s >= 0] - sign(d_k) (W_s - g_k c_k)
            = g_k m_k - sign(d_k) W_s,   m_k = 1 if b_s >= 0 else 1[B_k > 0]

(c_k sign(d_k) = |c_k|, and W_s = 0 at a state within budget).  Only the
tokens of over-budget states need more than g: forward and backward index
that subset once and run every per-token formula on it alone, so a batch
whose states mostly keep their budget costs one segment sum, one one-byte
gather and a few elementwise passes forward, a copy of g backward.

When most states are over budget the subset is everything: then every token
goes through the general per-token formula (clip = sign(d) min(|d|, B⁺),
which is the pass-through inside) and nothing is gathered.

Conventions at the kinks, where the gate has no derivative: b_s = 0 (sample
TV exactly δ) counts as within budget (autograd of ``minimum`` would split the
derivative between r_i and the bound); B_i = 0 counts as zeroed; sign(0) = 0,
so a token with r = 1 moves no other token's bound (torch's abs'(0) = 0).
Only where b_s = 0 and r_i = 1 at once do the two paths differ: the subset
path gives that token its pass-through derivative 1, the every-token path 0.
Saved for backward: the subset's positions and state slots and the float
factors sign(d), c and m (over every token on the every-token path).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from . import _validate
from .segments import _DENSE_FACTOR, Segments

# contiguous segments this long on average reduce faster by lengths than by scatter (CPU crossover 16-32)
_RUN_LENGTH = 32


def state_table(state_id, like: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """``(index, size, lengths)``: a table slot per token, the table size, and the run lengths when worth using.

    Ids in a range a few times their number, sorted or not, are the table
    slots themselves (empty slots cost nothing in the result): no ranking,
    no counts, no sortedness pass.  A ready ``Segments`` brings its index,
    and its lengths when contiguous with long runs (a padded or packed
    batch by rows).  Only ids of a wide range go through
    ``Segments.from_ids`` (which detects sorted ids in one pass).
    """
    if isinstance(state_id, Segments):
        if state_id.index.shape != like.shape or state_id.index.device != like.device:
            raise ValueError(f"state_id segments index {state_id.index.numel()} elements but the ratios have {like.numel()}")
        seg = state_id
    else:
        ids = _validate.ids("state_id", state_id, like)
        top = int(ids.max())
        if top < _DENSE_FACTOR * ids.numel() + 1024:
            return ids, top + 1, None
        seg = Segments.from_ids(ids)
    runs = seg.contiguous and seg.index.numel() >= _RUN_LENGTH * seg.size
    return seg.index, seg.size, seg.count if runs else None


def _segment_sum(values, index, size, lengths):
    if lengths is not None:
        return torch.segment_reduce(values, "sum", lengths=lengths, axis=0)
    return values.new_zeros(size).scatter_add_(0, index, values)  # faster than index_add_ on CPU


class ApcGate(torch.autograd.Function):
    """``G = 1 + clip(r - 1, B)`` of Eq. 59 with the closed-form backward of the module docstring."""

    @staticmethod
    def forward(ctx, ratio, index, size: int, lengths, delta: float):
        deviation = ratio - 1
        # b_s = Σ (δ - |d|), summed negated (the same bits): |d| - δ is one in-place pass after abs
        budget = _segment_sum(deviation.abs().sub_(delta), index, size, lengths).neg_()
        rows = _over_budget_rows(budget, index)
        if rows is None:  # most states over budget: every token, no subset to gather
            state = index
            clip, sign, clipped, live = _gate_tokens(deviation, budget.index_select(0, index))
            gated = clip.add_(1)
        else:
            state = index.index_select(0, rows)
            clip, sign, clipped, live = _gate_tokens(deviation.index_select(0, rows), budget.index_select(0, state))
            # every token of a state within budget passes (rounded as the reference)
            gated = deviation.add_(1).index_copy_(0, rows, clip.add_(1))
        ctx.save_for_backward(rows, state, sign, clipped, live)
        ctx.size = size
        return gated

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_gated):
        rows, state, sign, clipped, live = ctx.saved_tensors
        if rows is not None and rows.numel() == 0:
            return grad_gated, None, None, None, None
        grad = grad_gated if rows is None else grad_gated.index_select(0, rows)
        # out of place: under vmap (batched jacobians) grad is batched and the zero table is not
        total = clipped.new_zeros(ctx.size).scatter_add(0, state, grad * clipped)  # W_s
        grad = torch.addcmul(grad * live, sign, total.index_select(0, state), value=-1)
        return grad if rows is None else grad_gated.index_copy(0, rows, grad), None, None, None, None


def _gate_tokens(deviation: torch.Tensor, budget: torch.Tensor):
    """``(clip(d, B), sign(d), c, m)`` per token from d and its state's b_s (both overwritten).

    The float 0/1 factors are signs of non-negative values: mixed-dtype
    products in backward would cost twice a float one.
    """
    magnitude = deviation.abs()
    bound = budget.add_(magnitude).clamp_(min=0)  # B⁺
    sign = deviation.sign()
    live = bound.sign()  # m: B > 0
    clip = torch.minimum(magnitude, bound, out=magnitude).mul_(sign)  # sign(d) min(|d|, B⁺), exact
    clipped = deviation.sub_(clip).sign_().mul_(live)  # c: d - clip is 0 inside, sign(d) where clipped
    return clip, sign, clipped, live


def _over_budget_rows(budget: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
    """Positions of the tokens whose state is over budget (b_s < 0), the only ones clipped or coupled.

    ``None`` when most occupied states are over budget (empty table slots
    have b = 0): gathering the subset would then cost more than it saves.
    """
    over = budget < 0
    count = int(over.sum())
    if count == 0:
        return index.new_zeros(0)
    if 2 * count > int((budget != 0).sum()):
        return None
    return over.index_select(0, index).nonzero().squeeze(1)


def apc_gated_ratio(ratio: torch.Tensor, state_id, delta: float) -> torch.Tensor:
    """G(r) of APC-Obj (Eq. 59) by :class:`ApcGate`; ``state_id`` is ``(N,)`` ids or a ``Segments``."""
    index, size, lengths = state_table(state_id, ratio)
    return ApcGate.apply(ratio, index, size, lengths, delta)
