"""Ratio Gating Formalism objectives (paper Eq. 2) in the flat token layout.

Every method is a gating map ``G`` from the ratio tuple to gated ratios plus
aggregation weights ``μ``; the objective is ``J = Σ_i μ_i G(r)_i Â_i``.
Inputs are 1-D tensors of length N with integer segment ids (trajectory,
prompt group, domain, state).  Everything is vectorised with segment
reductions, runs on any device, and is differentiable by autograd.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _validate
from .distributed import global_segment_sums
from .fused import channel_means, fiber_gated_ratio, sign_tables
from .fused_apc import apc_gated_ratio
from .fused_objective import fiber_objective
from .gates import budget_clip, g_agg, g_agg_slope, sign_channel, sign_split, symmetric_clip
from .segments import Segments, nested_segments, segments_for
# the clip baselines live in their own module; re-exported under the names users import from here
from .baselines import grpo_gated_ratio, gspo_gated_ratio, ppo_gated_ratio  # noqa: E402

__all__ = [
    "FiberPOParts",
    "fiberpo_parts",
    "fiberpo_gated_ratio",
    "fiberpo_domain_parts",
    "fiberpo_domain_gated_ratio",
    "DomainLevels",
    "domain_levels",
    "fiberpo_objective",
    "fiberpo_domain_objective",
    "fiberpo_gated_residual_eq11",
    "fiberpo_jacobian",
    "apc_obj_gated_ratio",
    "gspo_gated_ratio",
    "ppo_gated_ratio",
    "grpo_gated_ratio",
    "aggregation_weights",
    "rgf_objective",
    "METHOD_WEIGHTS",
]


# ---------------------------------------------------------------------------
# FiberPO (Eq. 6-16) and FiberPO-Domain (Eq. 30-33)
# ---------------------------------------------------------------------------


class FiberPOParts(NamedTuple):
    """Every intermediate quantity of the FiberPO gating map, per token unless noted.

    ``log_s_pos``/``log_s_neg``/``length`` are per trajectory (dense index
    ``traj.index``); the rest are per token.  ``signed_u`` = l·u and
    ``signed_v`` = l·v are what the fiber clip sees (Eq. 16); ``u`` and ``v``
    (Eq. 14, 15) are derived on access.  ``gated_ratio`` is Eq. 7.
    """

    traj: Segments
    sign: torch.Tensor  # l_i, Eq. 13 (+1 at x = 0)
    log_s_pos: torch.Tensor  # log s⁺_τ, Eq. 9 (per trajectory)
    log_s_neg: torch.Tensor  # log s⁻_τ, Eq. 9 (per trajectory)
    length: torch.Tensor  # T_τ (per trajectory, float)
    signed_u: torch.Tensor  # l_i u_i
    signed_v: torch.Tensor  # l_i v_i
    log_base_weight: torch.Tensor  # log w, Eq. 8 (Eq. 31 for FiberPO-Domain)
    log_gated_residual: torch.Tensor  # log r̃^fiber, Eq. 16
    gated_ratio: torch.Tensor  # G(r)_i, Eq. 7

    @property
    def u(self) -> torch.Tensor:
        """Fiber residual u_i = l_i x_i - log s_τ^(l_i) (Eq. 14)."""
        return self.sign * self.signed_u

    @property
    def v(self) -> torch.Tensor:
        """Opposite-sign aggregate v_i = -log s_τ^(-l_i) (Eq. 15)."""
        return self.sign * self.signed_v


def _check_budgets(eps, c_pos, c_neg) -> tuple[float, float, float]:
    return (
        _validate.positive("eps", eps),
        _validate.positive("c_pos", c_pos),
        _validate.positive("c_neg", c_neg),
    )


def _trajectory_channels(x: torch.Tensor, traj: Segments):
    """Sign labels and the signed trajectory means of Eq. 9 as an ``(M, 2)`` tensor, columns log s⁺, log s⁻.

    With a graph the channels come from :func:`sign_split`, whose derivative
    at x = 0 is 1 in the positive channel and 0 in the negative one; without
    one (metrics, checks on values) from :func:`~fiberpo_theory.core.fused.channel_means`,
    which gives the same values bit for bit without the N-sized ``where``.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return sign_channel(x), traj.mean(sign_split(x))
    return sign_channel(x), channel_means(x, traj)


def _assemble(traj, sign, channels, log_base, x, eps) -> FiberPOParts:
    """Token-level assembly shared by FiberPO and FiberPO-Domain: G = w · r̃ (Eq. 7 / Eq. 30).

    l·u = x - l·log s^(l) and l·v = -l·log s^(-l) (Eq. 14, 15) are read off
    the per-(trajectory, sign) tables the fused gate reads
    (:func:`~fiberpo_theory.core.fused.sign_tables`, by the same key), so the two
    agree bit for bit on which side of ±ε a token lies, also where a search
    puts it on the kink; log r̃^fiber = clip(l u, ε) - clip(l v, ε) (Eq. 16).
    """
    key = traj.sign_key(x)
    same, opposite = sign_tables(channels)
    signed_u = x - same.index_select(0, key)
    signed_v = opposite.index_select(0, key)
    log_residual = symmetric_clip(signed_u, eps) - symmetric_clip(signed_v, eps)
    log_base_tok = traj.gather(log_base)
    gated = torch.exp(log_base_tok + log_residual)
    length = traj.count.to(x.dtype)
    return FiberPOParts(
        traj, sign, channels[:, 0], channels[:, 1], length, signed_u, signed_v, log_base_tok, log_residual, gated
    )


class _FiberPOLogBase:
    """log w_τ = g_agg(log s⁺_τ, C⁺, k) - g_agg(log s⁻_τ, C⁻, k) (Eq. 8) as a function of the ``(M, 2)`` channels.

    ``slopes`` is its derivative by channel, (γ⁺, -γ⁻) with γ = g_agg' of
    Eq. 20, which lets the fused gate take the per-trajectory chain in
    closed form instead of through an M-sized autograd graph.
    """

    def __init__(self, c_pos, c_neg, k, *, lengths_of=None):
        self.c_pos, self.c_neg, self._k, self._lengths_of = c_pos, c_neg, k, lengths_of
        # k = T_τ: the fused gate may run this chain as its compiled loop (the same operations, in C)
        self.length_budgets = (c_pos, c_neg) if lengths_of is not None else None

    @property
    def k(self):
        """The rollback slope: a float, or T_τ per trajectory (built on first use: the compiled chain reads the lengths)."""
        if self._k is None:
            count, dtype = self._lengths_of
            self._k = count.to(dtype)
        return self._k

    def _both(self, fn, channels: torch.Tensor) -> torch.Tensor:
        """``fn(channel, C, k)`` of both channels as ``(M, 2)``.

        With k = T_τ (a tensor) one call broadcasts over both columns: the
        thresholds round in the channels' dtype either way.  A float k keeps
        one call per column, so that (1 + 1/k)·C rounds as a float.
        """
        if isinstance(self.k, torch.Tensor):
            return fn(channels, channels.new_tensor([self.c_pos, self.c_neg]), self.k.unsqueeze(1))
        return torch.stack([fn(channels[:, 0], self.c_pos, self.k), fn(channels[:, 1], self.c_neg, self.k)], dim=1)

    def __call__(self, channels: torch.Tensor) -> torch.Tensor:
        both = self._both(g_agg, channels)
        return both[:, 0] - both[:, 1]

    def slopes(self, channels: torch.Tensor) -> torch.Tensor:
        slopes = self._both(g_agg_slope, channels)
        slopes[:, 1].neg_()
        return slopes


def _fiberpo_inputs(log_ratio, traj_id, eps, c_pos, c_neg, k, *, finite=True):
    x = _validate.flat_values("log_ratio", log_ratio, finite=finite)
    eps, c_pos, c_neg = _check_budgets(eps, c_pos, c_neg)
    traj = segments_for("traj_id", traj_id, x)
    if k is None:
        return x, traj, eps, _FiberPOLogBase(c_pos, c_neg, None, lengths_of=(traj.count, x.dtype))
    return x, traj, eps, _FiberPOLogBase(c_pos, c_neg, _validate.positive("k", k))


def fiberpo_parts(log_ratio, traj_id, *, eps, c_pos, c_neg, k=None) -> FiberPOParts:
    """FiberPO gating map with all its intermediate quantities (Eq. 7-16), differentiated by autograd.

    Base weight (Eq. 8): ``log w_τ = g_agg(log s⁺_τ, C⁺, k) - g_agg(log s⁻_τ, C⁻, k)``
    with ``k = T_τ`` unless given.  Gated residual: Eq. 16.  This is the
    reference the fused :func:`fiberpo_gated_ratio` is tested against.
    ``traj_id``: ``(N,)`` ids, or ready ``Segments`` (see :mod:`fiberpo_theory.core.segments`).
    """
    x, traj, eps, log_base_fn = _fiberpo_inputs(log_ratio, traj_id, eps, c_pos, c_neg, k)
    sign, channels = _trajectory_channels(x, traj)
    return _assemble(traj, sign, channels, log_base_fn(channels), x, eps)


def fiberpo_gated_ratio(log_ratio, traj_id, *, eps, c_pos, c_neg, k=None) -> torch.Tensor:
    """FiberPO gated ratio G(r)_i = w_τ^base · r̃_i^fiber (Eq. 7, objective Eq. 6 / 80).

    Computed by the fused gate of :mod:`fiberpo_theory.core.fused` (closed-form
    backward, Eq. 20); equal to ``fiberpo_parts(...).gated_ratio`` and its
    autograd gradient.

    Args:
        log_ratio: ``(N,)`` x_i = log π_θ(a_i|s_i) - log π_old(a_i|s_i).
        traj_id: ``(N,)`` integer trajectory id of each token, or ready
            ``Segments`` (e.g. ``Segments.from_lengths(mask.sum(1))`` for a
            padded batch: no sort).  Sorted ids are detected in one pass.
        eps: fiber clip ε > 0 (Eq. 12).
        c_pos, c_neg: per-channel budgets C⁺, C⁻ > 0 (Eq. 8, 10).
        k: rollback slope of g_agg; ``None`` means the trajectory length T_τ.
    """
    x, traj, eps, log_base_fn = _fiberpo_inputs(log_ratio, traj_id, eps, c_pos, c_neg, k)
    return fiber_gated_ratio(x, traj, log_base_fn, eps)


def fiberpo_gated_residual_eq11(log_ratio, traj_id, *, eps) -> torch.Tensor:
    """The gated residual in its ratio-space form, Eq. 11.

    ``logclip((s^(l))^(-l) r, ε) / logclip((s^(-l))^(-l), ε)``.  Kept only so
    that the claim ``eq-16`` can compare it with the log-space form used by
    :func:`fiberpo_parts`.
    """
    x = _validate.flat_values("log_ratio", log_ratio)
    eps = _validate.positive("eps", eps)
    traj = segments_for("traj_id", traj_id, x)
    sign, channels = _trajectory_channels(x, traj)
    s_pos, s_neg = traj.gather(torch.exp(channels[:, 0])), traj.gather(torch.exp(channels[:, 1]))
    positive = sign > 0
    same = torch.where(positive, s_pos, s_neg)
    opposite = torch.where(positive, s_neg, s_pos)
    ratio = torch.exp(x)
    from .gates import logclip

    return logclip(same.pow(-sign) * ratio, eps) / logclip(opposite.pow(-sign), eps)


class DomainLevels(NamedTuple):
    """FiberPO-Domain's trajectory → prompt group → domain structure of one batch, indexed once.

    Made by :func:`domain_levels`; pass it as ``traj_id`` (with ``group_id``
    and ``domain_id`` left ``None``) to the FiberPO-Domain functions to skip
    indexing the three id columns on every call, as a ready ``Segments``
    does for FiberPO.  Read-only: the tensors are the indexing's own.
    """

    traj: Segments
    traj_group: torch.Tensor  # (M_traj,) dense group index
    group_ids: torch.Tensor  # (M_group,) original group ids
    group_count: torch.Tensor  # (M_group,) trajectories per group
    group_tokens: torch.Tensor  # (M_group,) T_g
    group_domain: torch.Tensor  # (M_group,) dense domain index
    domain_ids: torch.Tensor  # (M_domain,) original domain ids
    domain_count: torch.Tensor  # (M_domain,) trajectories per domain
    domain_tokens: torch.Tensor  # (M_domain,) T_D
    traj_domain: torch.Tensor  # (M_traj,) dense domain index


def domain_levels(traj_id, group_id, domain_id, like: torch.Tensor) -> DomainLevels:
    """Index FiberPO-Domain's levels once per batch (Eq. 30-33: trajectory, prompt group, domain).

    ``traj_id``, ``group_id``, ``domain_id``: ``(N,)`` integer ids per token
    of the log-ratios ``like`` (or a ready ``Segments`` for the trajectories).
    Trajectories must nest in groups and groups in domains (``ValueError``
    otherwise).  The result stands in for the three ids in
    :func:`fiberpo_domain_gated_ratio`, :func:`fiberpo_domain_objective`,
    :func:`fiberpo_domain_parts` and the FiberPO-Domain metrics, for any
    log-ratios of the same length and device::

        levels = domain_levels(traj_id, group_id, domain_id, like=log_ratio)
        for epoch in range(ppo_epochs):
            gated = fiberpo_domain_gated_ratio(log_ratio, levels, None, None, eps=..., c_pos=..., c_neg=...)
    """
    x = _validate.as_float("like", like)
    if isinstance(traj_id, DomainLevels):
        raise ValueError("traj_id is already DomainLevels: pass it to the FiberPO-Domain functions as it is")
    return _domain_levels(x, traj_id, group_id, domain_id)


def _domain_levels(x, traj_id, group_id, domain_id) -> DomainLevels:
    """The local trajectory → group → domain structure and its counts (this rank's tokens only).

    Only the trajectory ids are indexed per token; group and domain are
    indexed over the trajectories (:func:`~fiberpo_theory.core.segments.nested_segments`,
    the same indexing the FGH operator's chain hierarchies use).  Ready
    :class:`DomainLevels` are checked against ``x`` and returned as they are.
    """
    if isinstance(traj_id, DomainLevels):
        return _ready_levels(traj_id, group_id, domain_id, x)
    traj = segments_for("traj_id", traj_id, x)
    names = ["domain_id", "group_id"]  # their signs are read off the carried ids (nested_segments)
    coarser = [_validate.ids(name, ids, x, sign=False) for name, ids in zip(names, (domain_id, group_id))]
    (domain, group, _), (group_domain, _) = nested_segments(coarser, traj, ["domain", "prompt group", "trajectory"],
                                                           id_names=names)
    return DomainLevels(
        traj, group.index, group.ids, group.count, group.sum(traj.count), group_domain,
        domain.ids, domain.count, domain.sum(traj.count), group_domain[group.index],
    )


def _ready_levels(levels: DomainLevels, group_id, domain_id, x) -> DomainLevels:
    if group_id is not None or domain_id is not None:
        raise ValueError("group_id and domain_id must be None when traj_id is DomainLevels (they are indexed in it)")
    segments_for("traj_id", levels.traj, x)  # covers these log-ratios, on their device
    return levels


def fiberpo_domain_parts(
    log_ratio, traj_id, group_id, domain_id, *, eps, c_pos, c_neg, process_group=None
) -> FiberPOParts:
    """FiberPO-Domain gating map with its intermediate quantities (Eq. 30-33).

    Group and domain aggregates are trajectory-count weighted means of
    log s_τ^(l) (Eq. 33); each level's g_agg uses that element's token count
    (T_D, T_g, T_τ) as k and gates the deviation from the level above (Eq. 31).
    The gated residual is FiberPO's (Eq. 32).

    With a ``process_group`` the inputs are this rank's shard of a
    data-parallel batch: the group and domain sums of log s_τ^(l), their
    trajectory counts and token counts are summed over the ranks by group /
    domain id (:func:`fiberpo_theory.core.distributed.global_segment_sums`), so the
    result equals the single-process one on the concatenated batch.  Each
    trajectory must lie on one rank (trajectory ids are only compared within
    a rank); a group must belong to the same domain on every rank (checked).
    ``None`` (default) means a single process and makes no distributed call.
    """
    x, lv, eps, log_base_fn = _domain_inputs(log_ratio, traj_id, group_id, domain_id, eps, c_pos, c_neg, process_group)
    sign, channels = _trajectory_channels(x, lv.traj)  # (M_traj, 2)
    return _assemble(lv.traj, sign, channels, log_base_fn(channels), x, eps)


def _domain_inputs(log_ratio, traj_id, group_id, domain_id, eps, c_pos, c_neg, process_group, *, finite=True):
    x = _validate.flat_values("log_ratio", log_ratio, finite=finite)
    eps, c_pos, c_neg = _check_budgets(eps, c_pos, c_neg)
    lv = _domain_levels(x, traj_id, group_id, domain_id)
    if process_group is None:  # one process: the base weight's chain rule in closed form
        return x, lv, eps, _DomainLogBase(lv, c_pos, c_neg)
    return x, lv, eps, lambda channels: _domain_log_base(channels, lv, c_pos, c_neg, process_group)


class _DomainLogBase:
    """log w_τ of Eq. 31 on one process, with its vector-Jacobian product in closed form.

    Per channel l (sign s_l), log w_τ collects s_l·g_agg at three deviations:
    the domain mean d̄ (k = T_D), the group mean's deviation ḡ - d̄ (k = T_g)
    and the trajectory's c_τ - ḡ (k = T_τ), the means being over trajectories
    (Eq. 33).  With slopes γ1, γ2, γ3 of g_agg there (γ of Eq. 20) and
    v_τ = s_l ∂L/∂ log w_τ, the channel of trajectory σ receives

        v_σ γ3_σ + mean over σ's group of v (γ2 - γ3) + mean over σ's domain of v (γ1 - γ2)

    (each mean is a sum over the trajectories of that group or domain divided
    by their number): the function :meth:`with_vjp` returns, which the fused
    gate calls instead of differentiating an M-sized graph.
    """

    def __init__(self, lv: DomainLevels, c_pos, c_neg):
        self.lv, self.c_pos, self.c_neg = lv, c_pos, c_neg

    def packed_levels(self) -> tuple[torch.Tensor, int, int]:
        """``(levels, groups, domains)`` for the compiled chain: traj_group, traj_domain, group_domain,
        group_count, group_tokens, domain_count, domain_tokens as one int64 buffer."""
        lv = self.lv
        parts = (lv.traj_group, lv.traj_domain, lv.group_domain, lv.group_count, lv.group_tokens, lv.domain_count,
                 lv.domain_tokens)
        return torch.cat([part.long() for part in parts]), lv.group_count.numel(), lv.domain_count.numel()

    def vjp_of(self, gamma: list[torch.Tensor]):
        """The closed-form vector-Jacobian product at slopes ``gamma`` (domain, group, trajectory level)."""
        sign_of_channel = torch.tensor([1.0, -1.0], dtype=gamma[0].dtype, device=gamma[0].device)
        return lambda grad_log_base: self._vjp(gamma, sign_of_channel, grad_log_base)

    def __call__(self, channels: torch.Tensor) -> torch.Tensor:
        return _weighted_g_agg(*_domain_terms(channels, self.lv, self.c_pos, self.c_neg, None))

    def with_vjp(self, channels: torch.Tensor):
        """``(log w, vjp)``: the value and ``vjp(∂L/∂ log w (..., M)) -> ∂L/∂channels (..., M, 2)``.

        The slopes are taken here, with the values (as FiberPO's are), so the
        backward differentiates the base weight this call evaluated.
        """
        args, budget, ks, _ = terms = _domain_terms(channels, self.lv, self.c_pos, self.c_neg, None)
        gamma = [g_agg_slope(arg, budget, k) for arg, k in zip(args, ks)]  # domain, group, trajectory level
        return _weighted_g_agg(*terms), self.vjp_of(gamma)

    def _vjp(self, gamma, sign_of_channel, grad_log_base: torch.Tensor) -> torch.Tensor:
        lv = self.lv
        v = grad_log_base.unsqueeze(-1) * sign_of_channel
        domain_of_traj = lv.traj_domain
        per_group = v * (gamma[1] - gamma[2])
        per_domain = v * (gamma[0] - gamma[1])
        pairs = (*v.shape[:-2], lv.group_count.numel(), 2)
        group_mean = v.new_zeros(pairs).index_add(-2, lv.traj_group, per_group)
        group_mean = group_mean / lv.group_count.to(v.dtype).unsqueeze(1)
        domain_mean = v.new_zeros((*v.shape[:-2], lv.domain_count.numel(), 2)).index_add(-2, domain_of_traj, per_domain)
        domain_mean = domain_mean / lv.domain_count.to(v.dtype).unsqueeze(1)
        return (v * gamma[2] + group_mean.index_select(-2, lv.traj_group)
                + domain_mean.index_select(-2, domain_of_traj))


def _domain_terms(channels, lv: DomainLevels, c_pos, c_neg, process_group):
    """The three g_agg arguments of Eq. 31 (domain mean, group deviation, trajectory deviation), their k, the budgets."""
    group_sum = channels.new_zeros((lv.group_count.numel(), 2)).index_add(0, lv.traj_group, channels)
    domain_sum = channels.new_zeros((lv.domain_count.numel(), 2)).index_add(0, lv.group_domain, group_sum)
    # Eq. 33 is over the whole batch: sum numerators and counts over the ranks (identity without a group).
    # Both levels are reduced from local sums; reducing domain sums built from already-global group sums
    # would count a group that spans r ranks r times.
    group_sum, group_count, group_tokens = global_segment_sums(
        lv.group_ids, group_sum, lv.group_count, lv.group_tokens, process_group=process_group,
        parent_ids=lv.domain_ids[lv.group_domain], name="prompt group", parent_name="domain",
    )
    domain_sum, domain_count, domain_tokens = global_segment_sums(
        lv.domain_ids, domain_sum, lv.domain_count, lv.domain_tokens, process_group=process_group, name="domain"
    )
    dtype, device = channels.dtype, channels.device
    log_s_group = group_sum / group_count.to(dtype).unsqueeze(1)
    log_s_domain = domain_sum / domain_count.to(dtype).unsqueeze(1)
    budget = torch.tensor([c_pos, c_neg], dtype=dtype, device=device)
    sign_of_channel = torch.tensor([1.0, -1.0], dtype=dtype, device=device)

    domain_of_traj = lv.traj_domain
    t_domain = domain_tokens.to(dtype)[domain_of_traj].unsqueeze(1)
    t_group = group_tokens.to(dtype)[lv.traj_group].unsqueeze(1)
    t_traj = lv.traj.count.to(dtype).unsqueeze(1)
    d_agg = log_s_domain[domain_of_traj]
    g_agg_ = log_s_group[lv.traj_group]
    args = (d_agg, g_agg_ - d_agg, channels - g_agg_)
    return args, budget, (t_domain, t_group, t_traj), sign_of_channel


def _domain_log_base(channels, lv: DomainLevels, c_pos, c_neg, process_group):
    """log w_τ of Eq. 31 from the ``(M_traj, 2)`` channel means, with the aggregates of Eq. 33."""
    return _weighted_g_agg(*_domain_terms(channels, lv, c_pos, c_neg, process_group))


def _weighted_g_agg(args, budget, ks, sign_of_channel) -> torch.Tensor:
    """Σ over the levels and channels of s_l · g_agg (Eq. 31), from :func:`_domain_terms`."""
    gated = g_agg(args[0], budget, ks[0]) + g_agg(args[1], budget, ks[1]) + g_agg(args[2], budget, ks[2])
    return (gated * sign_of_channel).sum(dim=1)


def fiberpo_domain_gated_ratio(
    log_ratio, traj_id, group_id, domain_id, *, eps, c_pos, c_neg, process_group=None
) -> torch.Tensor:
    """FiberPO-Domain gated ratio G(r)_i = w_i^Base · r̃_i^Fiber (Eq. 30-33).

    Trajectories must nest in prompt groups and groups in domains; ids that
    do not nest raise ``ValueError``.  ``process_group``: see
    :func:`fiberpo_domain_parts` (data-parallel shards; ``None`` = one process).
    Computed by the fused gate of :mod:`fiberpo_theory.core.fused` (closed-form
    token-level backward); equal to ``fiberpo_domain_parts(...).gated_ratio``.
    """
    x, lv, eps, log_base_fn = _domain_inputs(log_ratio, traj_id, group_id, domain_id, eps, c_pos, c_neg, process_group)
    return fiber_gated_ratio(x, lv.traj, log_base_fn, eps)


def fiberpo_objective(log_ratio, traj_id, advantages, *, eps, c_pos, c_neg, k=None, weights="trajectory"):
    """J = Σ_i μ_i G(r)_i Â_i (Eq. 2) with FiberPO's gate (Eq. 7, 16): the objective to maximise, a scalar.

    Equal to ``rgf_objective(fiberpo_gated_ratio(...), advantages,
    aggregation_weights(weights, ...))`` and its gradient (up to the order of
    the sums), but on contiguous trajectories on CPU (sorted ids, padded rows)
    it runs in the gate's own pass (:mod:`fiberpo_theory.core.fused_objective`):
    G, μ and the product are never written.

    Args:
        log_ratio, traj_id, eps, c_pos, c_neg, k: as in :func:`fiberpo_gated_ratio`.
        advantages: ``(N,)`` Â_i, finite; a gradient through them takes the composed path.
        weights: ``"trajectory"`` for μ_i = 1/(|Tj| T_τ) (FiberPO's, Eq. 2) or ``"token"`` for 1/N.
    """
    x, traj, eps, log_base_fn = _fiberpo_inputs(log_ratio, traj_id, eps, c_pos, c_neg, k, finite=False)
    return _gate_objective(x, traj, log_base_fn, eps, advantages, weights)


def fiberpo_domain_objective(
    log_ratio, traj_id, group_id, domain_id, advantages, *, eps, c_pos, c_neg, weights="trajectory",
    process_group=None,
):
    """J of Eq. 2 with FiberPO-Domain's gate (Eq. 30-33), as :func:`fiberpo_objective` is for FiberPO.

    Ids and ``process_group`` as in :func:`fiberpo_domain_gated_ratio`; μ stays per process.
    """
    x, lv, eps, log_base_fn = _domain_inputs(log_ratio, traj_id, group_id, domain_id, eps, c_pos, c_neg, process_group,
                                             finite=process_group is not None)  # ranks check before collectives
    return _gate_objective(x, lv.traj, log_base_fn, eps, advantages, weights)


def _gate_objective(x, traj: Segments, log_base_fn, eps, advantages, weights: str) -> torch.Tensor:
    """The fused J where it applies, else the composed one; a non-finite J names the input that made it.

    ``x`` arrives unchecked for finiteness: a non-finite x_i makes its own
    token's residual NaN (its channel sum, hence S, is non-finite too), so
    J is NaN on either path, and only then is x scanned, to name the index:
    a finite J costs one scalar read back (one host-device sync on CUDA).
    """
    adv = _validate.same_shape("advantages", advantages, x, finite=False)
    per_trajectory = _per_trajectory_weights(weights, traj, x)
    objective = fiber_objective(x, traj, log_base_fn, eps, adv, per_trajectory)
    if objective is None:
        objective = _weighted_sum(fiber_gated_ratio(x, traj, log_base_fn, eps), adv, traj.gather(per_trajectory))
    if not math.isfinite(objective.detach()):
        _validate.finite_values("log_ratio", x)
        _validate.same_shape("advantages", adv, x)
    return objective


def fiberpo_jacobian(log_ratio, traj_id, *, eps, c_pos, c_neg, k=None) -> torch.Tensor:
    """The analytic Ratio Gating Jacobian J_ij = ∂G_i/∂r_j of Proposition 5.2 (Eq. 20).

    Returns a dense ``(N, N)`` tensor, meant for checks on small inputs:

        J_ij = G_i / r_j · 1[τ_i = τ_j] · ( 1[|u_i| <= ε] 1[i = j]
               + (γ^(l_j) - 1[|u_i| <= ε] 1[l_i = l_j] - 1[|v_i| <= ε] 1[l_i != l_j]) / T_τ )

    with γ^(l) = g_agg'(log s^(l)_τ, C^(l), k).
    """
    from .gates import g_agg_slope

    with torch.no_grad():
        parts = fiberpo_parts(log_ratio, traj_id, eps=eps, c_pos=c_pos, c_neg=c_neg, k=k)
        x = _validate.as_float("log_ratio", log_ratio)
        traj = parts.traj
        k_traj = parts.length if k is None else float(k)
        gamma_pos = traj.gather(g_agg_slope(parts.log_s_pos, c_pos, k_traj))
        gamma_neg = traj.gather(g_agg_slope(parts.log_s_neg, c_neg, k_traj))
        gamma_j = torch.where(parts.sign > 0, gamma_pos, gamma_neg)  # γ^(l_j), indexed by column
        same_traj = traj.index.unsqueeze(1) == traj.index.unsqueeze(0)
        same_sign = parts.sign.unsqueeze(1) == parts.sign.unsqueeze(0)
        u_in = (parts.signed_u.abs() <= eps).to(x.dtype).unsqueeze(1)
        v_in = (parts.signed_v.abs() <= eps).to(x.dtype).unsqueeze(1)
        eye = torch.eye(x.numel(), dtype=x.dtype, device=x.device)
        length_i = traj.gather(parts.length).unsqueeze(1)
        coupling = (gamma_j.unsqueeze(0) - u_in * same_sign - v_in * (~same_sign)) / length_i
        dlog = same_traj.to(x.dtype) * (u_in * eye + coupling)
        return parts.gated_ratio.unsqueeze(1) / torch.exp(x).unsqueeze(0) * dlog


# ---------------------------------------------------------------------------
# Baselines: APC-Obj (Eq. 59), PPO / GRPO (App. C.4), GSPO (App. C.4)
# ---------------------------------------------------------------------------


def apc_obj_gated_ratio(ratio, state_id, *, delta, fused: bool = True) -> torch.Tensor:
    """APC-Obj gated ratio (Eq. 59): ``1 + clip(r_i - 1, B_i)``.

    ``B_i = T_s δ - Σ_{j at s, j≠i} |r_j - 1|`` couples every token at the
    same state s (T_s tokens); ``clip(a, B) = clip(a, -B⁺, B⁺)``.  The budget
    is summed as ``Σ_{j at s} (δ - |r_j - 1|) + |r_i - 1|`` (same value, one
    segment sum).  ``state_id`` is ``(N,)`` ids or a ``Segments``.  ``fused``
    runs the closed-form backward of :mod:`fiberpo_theory.core.fused_apc`;
    ``fused=False`` differentiates this formula by autograd (its reference).
    """
    r = _validate.positive_values("ratio", ratio)
    delta = _validate.positive("delta", delta)
    if fused:
        return apc_gated_ratio(r, state_id, delta)
    state = segments_for("state_id", state_id, r)
    deviation = r - 1
    bound = state.gather(state.sum(delta - deviation.abs())) + deviation.abs()
    return 1 + budget_clip(deviation, bound)


# ---------------------------------------------------------------------------
# Aggregation weights μ and the RGF objective (Eq. 2)
# ---------------------------------------------------------------------------

METHOD_WEIGHTS = {
    "ppo": "token",
    "apc_obj": "token",
    "grpo": "trajectory",
    "gspo": "trajectory",
    "fiberpo": "trajectory",
    "fiberpo_domain": "trajectory",
}


def aggregation_weights(kind: str, like: torch.Tensor, traj_id=None) -> torch.Tensor:
    """μ_i of Eq. 2: ``"token"`` gives 1/N, ``"trajectory"`` gives 1/(|Tj| T_τ).

    ``kind`` may also be a method name from :data:`METHOD_WEIGHTS`.
    ``traj_id`` is the ``(N,)`` trajectory ids, or the ``Segments`` an
    objective already built from them (``fiberpo_parts(...).traj``), which
    saves sorting the ids a second time.
    """
    kind = METHOD_WEIGHTS.get(kind, kind)
    x = _validate.as_float("like", like)
    if kind == "token":
        return torch.full_like(x, 1.0 / x.numel())
    if kind == "trajectory":
        if traj_id is None:
            raise ValueError("traj_id is required for trajectory-normalised weights")
        traj = traj_id if isinstance(traj_id, Segments) else segments_for("traj_id", traj_id, x)
        if x.dim() != 1 or traj.elements != x.numel():
            raise ValueError(f"traj_id segments index {traj.elements} tokens but like has {x.numel()}")
        return traj.gather(_per_trajectory_weights("trajectory", traj, x))
    raise ValueError(f"kind must be 'token', 'trajectory' or a method name, got {kind!r}")


def _per_trajectory_weights(kind: str, traj: Segments, x: torch.Tensor) -> torch.Tensor:
    """``(M,)`` μ of Eq. 2 for weightings constant on each trajectory: 1/(|Tj| T_τ) or 1/N."""
    if kind == "trajectory":
        return traj.count.to(x.dtype, copy=True).mul_(traj.size).reciprocal_()  # one buffer
    if kind == "token":
        return torch.full((traj.size,), 1.0 / x.numel(), dtype=x.dtype, device=x.device)
    raise ValueError(f"weights must be 'trajectory' or 'token', got {kind!r}")


def rgf_objective(gated_ratio, advantages, weights) -> torch.Tensor:
    """J = Σ_i μ_i G(r)_i Â_i (Eq. 2).

    When neither μ nor Â needs a gradient (the usual case) their product is
    taken outside the graph, so the backward is one product with G's
    gradient and autograd saves one tensor instead of two; for a contiguous
    ``(N,)`` G the sum is one ``dot`` (no token-length product buffer).
    """
    g = _validate.as_float("gated_ratio", gated_ratio)
    adv = _validate.same_shape("advantages", advantages, g, finite=False)
    mu = _validate.same_shape("weights", weights, g, finite=False)
    objective = _weighted_sum(g, adv, mu)
    # a non-finite μ_i Â_i makes its term non-finite whatever G_i is (inf·0 is NaN), hence J: the result checks both
    if not math.isfinite(objective.detach()):
        _validate.same_shape("advantages", adv, g), _validate.same_shape("weights", mu, g)
    return objective


def _weighted_sum(g: torch.Tensor, adv: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Σ_i μ_i G_i Â_i, with μ_i Â_i taken outside the graph when neither needs a gradient; no input checks."""
    if mu.requires_grad or adv.requires_grad:
        return (mu * g * adv).sum()
    with torch.no_grad():
        coef = mu * adv
    flat = g.dim() == 1 and g.dtype == coef.dtype and g.is_contiguous() and coef.is_contiguous()
    return torch.dot(g, coef) if flat else (g * coef).sum()
