"""Regime labels and clip fractions to log during training.

The labels take the ``FiberPOParts`` returned by
:func:`fiberpo_theory.core.objectives.fiberpo_parts` (or ``fiberpo_domain_parts``).
The metrics dict is made from a :class:`GateTally`, the few per-trajectory
tables and token counts it needs: :func:`tally_of_parts` reads them off the
parts, and on contiguous trajectories on CPU :func:`fiberpo_loss_metrics` /
:func:`fiberpo_domain_loss_metrics` count them in one compiled token pass
instead of building the parts (``tests/test_diagnostics.py`` holds the two
tallies equal in every regime).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch

from . import fused as _fused
from . import native as _native
from . import objectives
from .fused import GateCounts, run_chunks, trajectory_chain
from .gates import PASS, REGIME_NAMES, ROLLBACK, ZEROED, g_agg_regime
from .objectives import FiberPOParts
from .segments import segments_for

GLOBAL_REGIMES = ("G-I", "G-II,r", "G-II", "G-III,r", "G-III")
LOCAL_REGIMES = ("L-I", "L-II", "L-III")


def channel_regimes(parts: FiberPOParts, *, c_pos, c_neg, k=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-trajectory regime (P=0, R=1, Z=2) of g_agg on each sign channel (Eq. 10)."""
    return _channel_regimes(parts.log_s_pos, parts.log_s_neg, parts.length, c_pos, c_neg, k)


def _channel_regimes(log_s_pos, log_s_neg, length, c_pos, c_neg, k):
    k_traj = length if k is None else float(k)
    return g_agg_regime(log_s_pos, c_pos, k_traj), g_agg_regime(log_s_neg, c_neg, k_traj)


def global_regime(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Five-way trajectory label (index into ``GLOBAL_REGIMES``) from the two channel regimes (Sec. 5.1).

    G-I: both pass; G-II,r: one rolls back, the other passes; G-II: one is
    zeroed, the other passes; G-III,r: both are past their budget and at
    least one still rolls back; G-III: both zeroed.
    """
    passing = (pos == PASS).long() + (neg == PASS).long()
    rolling = (pos == ROLLBACK).long() + (neg == ROLLBACK).long()
    zeroed = (pos == ZEROED).long() + (neg == ZEROED).long()
    label = torch.full_like(pos, 3)  # G-III,r unless a rule below applies
    label = torch.where(zeroed == 2, torch.full_like(label, 4), label)
    label = torch.where((passing == 1) & (zeroed == 1), torch.full_like(label, 2), label)
    label = torch.where((passing == 1) & (rolling == 1), torch.full_like(label, 1), label)
    return torch.where(passing == 2, torch.zeros_like(label), label)


def local_regime(parts: FiberPOParts, *, eps) -> torch.Tensor:
    """Per-trajectory L-I (0) / L-II (1) / L-III (2) by how many |u_i| >= ε (Sec. 5.2)."""
    over = (parts.signed_u.abs() >= eps).to(parts.length.dtype)  # |u| = |l·u|
    return _local_label(parts.traj.sum(over), parts.length)


def _local_label(n_over: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """L-I (0) / L-II (1) / L-III (2) from each trajectory's count of tokens with |u_i| >= ε and its length."""
    label = torch.ones_like(n_over, dtype=torch.long)
    label = torch.where(n_over == 0, torch.zeros_like(label), label)
    return torch.where(n_over == length, torch.full_like(label, 2), label)


def _share(mask: torch.Tensor) -> float:
    """Fraction of True entries (exact count over N, no float copy of the mask)."""
    return int(torch.count_nonzero(mask)) / max(mask.numel(), 1)


class GateTally(NamedTuple):
    """What :func:`fiberpo_metrics` is made of: per-trajectory tables ``(M,)`` and token totals.

    ``reaching`` counts each trajectory's tokens with |u_i| >= ε (the local
    regimes, Sec. 5.2); ``numerator_clipped`` / ``denominator_clipped`` count
    the tokens with |u_i| > ε / |v_i| > ε (the two clips of Eq. 16);
    ``abs_log_base_sum`` is Σ_i |log w_τ(i)| and ``gated_sum`` Σ_i G_i, both in float64.
    """

    log_s_pos: torch.Tensor
    log_s_neg: torch.Tensor
    length: torch.Tensor  # T_τ, float
    reaching: torch.Tensor
    numerator_clipped: int
    denominator_clipped: int
    abs_log_base_sum: float
    gated_sum: float
    tokens: int


def tally_of_parts(parts: FiberPOParts, *, eps) -> GateTally:
    """The tally read off the gate's parts: the reference for :func:`runs_tally`."""
    size_u = parts.signed_u.abs()  # |u| = |l·u|, |v| = |l·v|
    return GateTally(
        parts.log_s_pos, parts.log_s_neg, parts.length, parts.traj.sum((size_u >= eps).to(parts.length.dtype)),
        int(torch.count_nonzero(size_u > eps)), int(torch.count_nonzero(parts.signed_v.abs() > eps)),
        float(parts.log_base_weight.double().abs().sum()), float(parts.gated_ratio.double().sum()),
        parts.signed_u.numel(),
    )


_SECTIONS = (("channel_pos", REGIME_NAMES), ("channel_neg", REGIME_NAMES), ("global", GLOBAL_REGIMES),
             ("local", LOCAL_REGIMES))
_BINS = sum(len(names) for _, names in _SECTIONS)  # 14: the counts label_counts_* in _kernels.c writes


def label_counts(tally: GateTally, *, c_pos, c_neg, k=None) -> torch.Tensor:
    """How many trajectories carry each label, ``(14,)`` int64: the channel regimes (P, R, Z) of log s⁺ and of
    log s⁻, the global regime (``GLOBAL_REGIMES``) and the local one (``LOCAL_REGIMES``), in that order.

    The labels of :func:`channel_regimes`, :func:`global_regime` and :func:`local_regime`, counted by one
    bincount over offset labels; the reference of the compiled count :func:`metrics_of_tally` uses.
    """
    pos, neg = _channel_regimes(tally.log_s_pos, tally.log_s_neg, tally.length, c_pos, c_neg, k)
    labels = [pos, neg, global_regime(pos, neg), _local_label(tally.reaching, tally.length)]
    sizes = [len(names) for _, names in _SECTIONS]
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.long, device=pos.device)
    return torch.bincount(torch.stack(labels).add_(starts.unsqueeze(1)).reshape(-1), minlength=_BINS)


def _native_label_counts(tally: GateTally, c_pos, c_neg, k) -> torch.Tensor | None:
    """:func:`label_counts` by the C loop ``label_counts``, or ``None`` where the loops do not take the tables."""
    if k is not None and not float(k) > 0:  # the loop reads k <= 0 as k = T_τ
        return None
    pos, neg = tally.log_s_pos, tally.log_s_neg
    length, reaching = tally.length.contiguous(), tally.reaching.contiguous()
    if pos.dim() != 1 or neg.dim() != 1 or not (pos.dtype == neg.dtype == length.dtype == reaching.dtype):
        return None
    if _native.kernels_for(length, reaching) is None or not (_native.plain_cpu(pos) and _native.plain_cpu(neg)):
        return None
    lib, _, suffix = _native.loops(pos.dtype)
    counts = torch.empty(_BINS, dtype=torch.long)
    ptr = _native.ptr
    getattr(lib, f"label_counts_{suffix}")(pos.numel(), ptr(pos), pos.stride(0), ptr(neg), neg.stride(0), ptr(length),
                                           ptr(reaching), float(c_pos), float(c_neg), 0.0 if k is None else float(k),
                                           ptr(counts))
    return counts


def metrics_of_tally(tally: GateTally, *, c_pos, c_neg, k=None) -> dict[str, float]:
    """The metrics dict of :func:`fiberpo_metrics` from a tally, however it was counted."""
    counts = _native_label_counts(tally, c_pos, c_neg, k)
    if counts is None:
        counts = label_counts(tally, c_pos=c_pos, c_neg=c_neg, k=k)
    means = torch.stack([tally.log_s_pos.double().mean(), tally.log_s_neg.double().mean()]).tolist()
    return _metrics_dict(counts.tolist(), *means, tally.numerator_clipped, tally.denominator_clipped,
                         tally.abs_log_base_sum, tally.gated_sum, tally.log_s_pos.numel(), tally.tokens)


def _metrics_dict(counts, mean_pos, mean_neg, numerator, denominator, abs_log_base_sum, gated_sum, m, tokens):
    """The named metrics: label shares over the ``m`` trajectories, clip fractions and means over the tokens."""
    names = [f"{prefix}/{name}" for prefix, names in _SECTIONS for name in names]
    metrics = {name: count / max(m, 1) for name, count in zip(names, counts)}
    tokens = max(tokens, 1)
    metrics["clipfrac/numerator"] = numerator / tokens
    metrics["clipfrac/denominator"] = denominator / tokens
    metrics["log_s_pos/mean"], metrics["log_s_neg/mean"] = mean_pos, mean_neg
    metrics["log_base_weight/abs_mean"] = abs_log_base_sum / tokens
    metrics["gated_ratio/mean"] = gated_sum / tokens
    return metrics


def fiberpo_metrics(parts: FiberPOParts, *, eps, c_pos, c_neg, k=None) -> dict[str, float]:
    """A flat dict of scalars for a training logger.

    Channel and global regime fractions are over trajectories; clip
    fractions are over tokens (numerator clip |u| > ε, denominator clip
    |v| > ε, as in Eq. 16); the means of log s± are over trajectories, those
    of |log w| and G over tokens.
    """
    return metrics_of_tally(tally_of_parts(parts, eps=eps), c_pos=c_pos, c_neg=c_neg, k=k)


class _Counts(NamedTuple):
    """A pass's per-trajectory counts: what :func:`_tally` and :func:`_metrics_of_counts` are made from."""

    channels: torch.Tensor  # (M, 2) log s⁺, log s⁻
    log_base: torch.Tensor  # (M,) log w
    tallies: torch.Tensor  # (M, 4) int64: x < 0, |u| >= ε, |u| > ε, |v| > ε
    gated_sum: float  # Σ G


def runs_tally(x: torch.Tensor, traj, log_base_fn, eps: float) -> GateTally | None:
    """The tally of the gate of ``log_base_fn`` in one compiled token pass, or ``None`` where the loops do not run.

    For contiguous trajectories on CPU (``traj.runs``): the per-trajectory
    chain of the fused gate, then per chunk of whole trajectories the C loop
    counts x < 0, |u| >= ε, |u| > ε and |v| > ε per trajectory (|v| is
    per (trajectory, sign): the tokens of each sign count at once) and
    writes the exponent of G, which torch exponentiates and sums in cache.
    Nothing N-sized is kept.
    """
    counts = _runs_counts(x, traj, log_base_fn, eps)
    return None if counts is None else _tally(*counts, traj, x)


def _runs_counts(x: torch.Tensor, traj, log_base_fn, eps: float) -> _Counts | None:
    runs = traj.runs
    if runs is None or _native.kernels_for(x) is None:
        return None
    lib, real, suffix = _native.loops(x.dtype)
    with torch.no_grad():
        chain = trajectory_chain(x, traj, runs, False, log_base_fn, eps)
        same, offset = (t.detach().to(x.dtype).contiguous() for t in (chain.same, chain.offset))
        m, size, ptr = traj.size, x.element_size(), _native.ptr
        tallies = torch.empty(m, 4, dtype=torch.long)  # per trajectory: x < 0, |u| >= ε, |u| > ε, |v| > ε
        chunks = run_chunks(x.numel(), runs)
        exponent = torch.empty(max(stop - start for _, _, start, stop in chunks), dtype=x.dtype)
        gated_sum = 0.0
        for first, last, start, stop in chunks:
            tables = 2 * first * size
            getattr(lib, f"tally_runs_{suffix}")(last - first, ptr(runs, first), ptr(x, start), ptr(same) + tables,
                                                 ptr(offset) + tables, real(eps), ptr(exponent),
                                                 ptr(tallies) + 4 * first * 8)
            gated_sum += float(exponent[: stop - start].exp_().sum(dtype=torch.float64))
        return _Counts(chain.channels.detach(), chain.log_base.detach(), tallies, gated_sum)


def _tally(channels, log_base, tallies, gated_sum: float, traj, x) -> GateTally:
    """The :class:`GateTally` of per-trajectory counts ``(M, 4)`` (x < 0, |u| >= ε, |u| > ε, |v| > ε)."""
    channels = channels.to(x.dtype)
    past_u, past_v = tallies[:, 2:].sum(0).tolist()
    return GateTally(
        channels[:, 0], channels[:, 1], traj.count.to(x.dtype), tallies[:, 1].to(x.dtype), past_u, past_v,
        float((log_base.double().abs() * traj.count).sum()), gated_sum, x.numel(),
    )


def _metrics_of_counts(counts: _Counts, traj, x, *, c_pos, c_neg, k=None) -> dict[str, float]:
    """``metrics_of_tally(_tally(...))`` in one C call (``summarize_counts``) where the loops take the counts."""
    channels, log_base, tallies, gated_sum = counts
    length = traj.count
    usable = channels.dim() == 2 and channels.dtype == log_base.dtype == x.dtype  # k: validated positive or None
    if not usable or length.dtype != torch.long or _native.kernels_for(log_base, length, tallies) is None \
            or not _native.plain_cpu(channels):
        return metrics_of_tally(_tally(*counts, traj, x), c_pos=c_pos, c_neg=c_neg, k=k)
    lib, _, suffix = _native.loops(x.dtype)
    m, ptr = traj.size, _native.ptr
    out = torch.empty(19, dtype=torch.float64)
    stride = channels.stride(0)
    getattr(lib, f"summarize_counts_{suffix}")(m, ptr(channels[:, 0]), stride, ptr(channels[:, 1]), stride,
                                               ptr(log_base), ptr(length), ptr(tallies), float(c_pos), float(c_neg),
                                               0.0 if k is None else float(k), ptr(out))
    summary = out.tolist()
    means = (summary[14] / m, summary[15] / m) if m else (float("nan"),) * 2
    return _metrics_dict(summary[:14], *means, *summary[16:19], float(gated_sum), m, x.numel())


@contextmanager
def counting_gate(enabled: bool = True) -> Iterator[GateCounts | None]:
    """Count the training metrics inside the next fused FiberPO / FiberPO-Domain gate or objective of this thread.

    The pass that runs the compiled loops on contiguous trajectories fills
    the :class:`~fiberpo_theory.core.fused.GateCounts` it yields from the
    flags and G it writes anyway; pass it as ``counted`` to
    :func:`fiberpo_loss_metrics` / :func:`fiberpo_domain_loss_metrics`,
    which then make no second chain and no second token pass.  They count
    as before where the counts stayed empty, or were taken of other values
    than the log-ratios they are given (another tensor, or the same one
    written to since)::

        with counting_gate() as counted:
            gated = objectives.fiberpo_gated_ratio(x, traj, **hyper)
        metrics = fiberpo_loss_metrics(x, traj, counted=counted, **hyper)

    ``enabled=False`` yields ``None`` and installs nothing (for a caller whose metrics will not use the
    counts, e.g. FiberPO-Domain across ranks).
    """
    if not enabled:
        yield None
        return
    counts, before = GateCounts(), getattr(_fused._COUNTING, "counts", None)
    _fused._COUNTING.counts = counts
    try:
        yield counts
    finally:
        _fused._COUNTING.counts = before


def _counted_tally(counted: GateCounts | None, traj, x) -> GateTally | None:
    """The tally of ``counted`` when it was taken of ``x`` and these trajectories, else ``None`` (count anew)."""
    counts = _counted_counts(counted, traj, x)
    return None if counts is None else _tally(*counts, traj, x)


def _counted_counts(counted: GateCounts | None, traj, x) -> _Counts | None:
    if counted is None or not counted.counts_for(x) or counted.tallies.shape[0] != traj.size:
        return None
    return _Counts(counted.channels, counted.log_base, counted.tallies, float(counted.gated_sum))


def fiberpo_loss_metrics(log_ratio, traj_id, *, eps, c_pos, c_neg, k=None, counted=None) -> dict[str, float]:
    """``fiberpo_metrics(fiberpo_parts(log_ratio, traj_id, ...), ...)``, by :func:`runs_tally` where it runs.

    What the registry losses log: on contiguous trajectories on CPU one
    token pass instead of the parts' dozen N-sized tensors, or none when
    ``counted`` (from :func:`counting_gate` around the gate or objective of
    these log-ratios) holds their counts.
    """
    with torch.no_grad():  # counts of these values come from a pass that checked them already
        x = log_ratio.detach()
        known = counted is not None and counted.counts_for(x)
        x, traj, eps_, log_base_fn = objectives._fiberpo_inputs(x, traj_id, eps, c_pos, c_neg, k, finite=not known)
        counts = _counted_counts(counted, traj, x) or _runs_counts(x, traj, log_base_fn, eps_)
        if counts is not None:
            return _metrics_of_counts(counts, traj, x, c_pos=c_pos, c_neg=c_neg, k=k)
        tally = tally_of_parts(objectives.fiberpo_parts(x, traj, eps=eps, c_pos=c_pos, c_neg=c_neg, k=k), eps=eps)
    return metrics_of_tally(tally, c_pos=c_pos, c_neg=c_neg, k=k)


def fiberpo_domain_loss_metrics(log_ratio, traj_id, group_id, domain_id, *, eps, c_pos, c_neg,
                                process_group=None, counted=None) -> dict[str, float]:
    """:func:`fiberpo_loss_metrics` for FiberPO-Domain (Eq. 30-33); with a ``process_group`` by the parts.

    ``counted`` is used on one process only (across ranks the parts count).
    """
    hyper = dict(eps=eps, c_pos=c_pos, c_neg=c_neg)
    with torch.no_grad():
        x = log_ratio.detach()
        if process_group is None:  # across ranks the base weight makes collectives: computed once, by the parts
            if isinstance(traj_id, objectives.DomainLevels):  # checked against x; its trajectories
                traj = objectives._domain_levels(x, traj_id, group_id, domain_id).traj
            else:  # indexed once, for the counts or the levels
                traj_id = traj = segments_for("traj_id", traj_id, x)
            counts = _counted_counts(counted, traj, x)
            if counts is None:
                x, levels, eps_, log_base_fn = objectives._domain_inputs(x, traj_id, group_id, domain_id, eps, c_pos,
                                                                        c_neg, None)
                counts, traj = _runs_counts(x, levels.traj, log_base_fn, eps_), levels.traj
            if counts is not None:
                return _metrics_of_counts(counts, traj, x, c_pos=c_pos, c_neg=c_neg)
        parts = objectives.fiberpo_domain_parts(x, traj_id, group_id, domain_id, process_group=process_group, **hyper)
        tally = tally_of_parts(parts, eps=eps)
    return metrics_of_tally(tally, c_pos=c_pos, c_neg=c_neg)


def clip_fraction(ratio: torch.Tensor, gated_ratio: torch.Tensor) -> float:
    """Fraction of tokens whose gated ratio differs from the raw ratio (any method)."""
    return _share(gated_ratio != ratio)
