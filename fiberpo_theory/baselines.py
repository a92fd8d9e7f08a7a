"""Clip baselines in Ratio Gating Formalism (paper Eq. 2): PPO, GRPO and GSPO (App. C.4-C.5).

They share the flat token layout and the input checks of :mod:`fiberpo_theory.objectives`,
which re-exports them.
"""

from __future__ import annotations

import torch

from . import _validate
from .gates import sign_channel
from .segments import segments_for

__all__ = ["ppo_gated_ratio", "grpo_gated_ratio", "gspo_gated_ratio"]


def _advantage_sign(advantages: torch.Tensor) -> torch.Tensor:
    return sign_channel(advantages)


def ppo_gated_ratio(ratio, *, eps, advantages=None) -> torch.Tensor:
    """PPO/GRPO gated ratio (App. C.4, C.5.1): clip(r, 1±ε).

    With ``advantages`` the "min" form ``sign(Â)·min(clip(r)·sign(Â), r·sign(Â))``
    is returned (sign(0) taken as +1, which only matters where Â = 0).
    """
    r = _validate.positive_values("ratio", ratio)
    eps = _validate.positive("eps", eps)
    clipped = torch.clamp(r, 1 - eps, 1 + eps)
    if advantages is None:
        return clipped
    s = _advantage_sign(_validate.same_shape("advantages", advantages, r))
    return s * torch.minimum(clipped * s, r * s)


grpo_gated_ratio = ppo_gated_ratio  # GRPO differs from PPO only in μ (App. C.4)


def gspo_gated_ratio(log_ratio, traj_id, *, eps, advantages=None) -> torch.Tensor:
    """GSPO gated ratio (App. C.4, C.5.3): clip(s_τ, 1±ε), s_τ = exp(mean_t x_t).

    With ``advantages`` the "min" form with l_τ = sign(Σ_t Â_t) is returned.
    """
    x = _validate.flat_values("log_ratio", log_ratio)
    eps = _validate.positive("eps", eps)
    traj = segments_for("traj_id", traj_id, x)
    s = traj.gather(torch.exp(traj.mean(x)))
    clipped = torch.clamp(s, 1 - eps, 1 + eps)
    if advantages is None:
        return clipped
    adv = _validate.same_shape("advantages", advantages, x)
    l_tau = traj.gather(_advantage_sign(traj.sum(adv)))
    return l_tau * torch.minimum(clipped * l_tau, s * l_tau)
