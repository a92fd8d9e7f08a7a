"""Regime labels and clip fractions to log during training.

All functions take the ``FiberPOParts`` returned by
:func:`fiberpo_theory.core.objectives.fiberpo_parts` (or ``fiberpo_domain_parts``),
so nothing is recomputed and nothing is re-derived.
"""

from __future__ import annotations

import torch

from .gates import PASS, REGIME_NAMES, ROLLBACK, ZEROED, g_agg_regime
from .objectives import FiberPOParts

GLOBAL_REGIMES = ("G-I", "G-II,r", "G-II", "G-III,r", "G-III")
LOCAL_REGIMES = ("L-I", "L-II", "L-III")


def channel_regimes(parts: FiberPOParts, *, c_pos, c_neg, k=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-trajectory regime (P=0, R=1, Z=2) of g_agg on each sign channel (Eq. 10)."""
    k_traj = parts.length if k is None else float(k)
    return g_agg_regime(parts.log_s_pos, c_pos, k_traj), g_agg_regime(parts.log_s_neg, c_neg, k_traj)


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
    n_over = parts.traj.sum(over)
    label = torch.ones_like(n_over, dtype=torch.long)
    label = torch.where(n_over == 0, torch.zeros_like(label), label)
    return torch.where(n_over == parts.length, torch.full_like(label, 2), label)


def _share(mask: torch.Tensor) -> float:
    """Fraction of True entries (exact count over N, no float copy of the mask)."""
    return int(torch.count_nonzero(mask)) / max(mask.numel(), 1)


def _fractions(labels: torch.Tensor, names: tuple[str, ...], prefix: str) -> dict[str, float]:
    counts = torch.bincount(labels, minlength=len(names)).double() / max(labels.numel(), 1)
    return {f"{prefix}/{name}": float(c) for name, c in zip(names, counts)}


def fiberpo_metrics(parts: FiberPOParts, *, eps, c_pos, c_neg, k=None) -> dict[str, float]:
    """A flat dict of scalars for a training logger.

    Channel and global regime fractions are over trajectories; clip
    fractions are over tokens (numerator clip |u| > ε, denominator clip
    |v| > ε, as in Eq. 16).
    """
    pos, neg = channel_regimes(parts, c_pos=c_pos, c_neg=c_neg, k=k)
    metrics = {}
    metrics.update(_fractions(pos, REGIME_NAMES, "channel_pos"))
    metrics.update(_fractions(neg, REGIME_NAMES, "channel_neg"))
    metrics.update(_fractions(global_regime(pos, neg), GLOBAL_REGIMES, "global"))
    metrics.update(_fractions(local_regime(parts, eps=eps), LOCAL_REGIMES, "local"))
    metrics["clipfrac/numerator"] = _share(parts.signed_u.abs() > eps)  # |u| = |l·u|, |v| = |l·v|
    metrics["clipfrac/denominator"] = _share(parts.signed_v.abs() > eps)
    metrics["log_s_pos/mean"] = float(parts.log_s_pos.double().mean())
    metrics["log_s_neg/mean"] = float(parts.log_s_neg.double().mean())
    metrics["log_base_weight/abs_mean"] = float(parts.log_base_weight.double().abs().mean())
    metrics["gated_ratio/mean"] = float(parts.gated_ratio.double().mean())
    return metrics


def clip_fraction(ratio: torch.Tensor, gated_ratio: torch.Tensor) -> float:
    """Fraction of tokens whose gated ratio differs from the raw ratio (any method)."""
    return _share(gated_ratio != ratio)
