"""Clip baselines in Ratio Gating Formalism (paper Eq. 2): PPO, GRPO and GSPO (App. C.4-C.5).

They share the flat token layout and the input checks of :mod:`fiberpo_theory.core.objectives`,
which re-exports them.  Besides the paper's symmetric clip they carry the
variants trainers ship: an asymmetric clip ``[1 - eps_low, 1 + eps_high]``
(DAPO's clip-higher), PPO's dual clip ``clip_ratio_c`` for negative advantages,
GSPO's token-level form, and bounds on the log-ratio before it is exponentiated
so that a far off-policy token cannot overflow (the constants are verl's).
"""

from __future__ import annotations

import torch

from . import _validate
from .gates import sign_channel
from .segments import segments_for

__all__ = [
    "LOG_RATIO_BOUND",
    "GSPO_LOG_RATIO_MAX",
    "clip_bounds",
    "bounded_ratio",
    "ppo_gated_ratio",
    "grpo_gated_ratio",
    "gspo_gated_ratio",
]

# exp(±20) keeps a token ratio finite in float32; beyond it the value is held and its gradient is 0
LOG_RATIO_BOUND = 20.0
# GSPO's sequence ratio is capped at exp(10) from above (a sequence mean below any bound underflows to 0 safely)
GSPO_LOG_RATIO_MAX = 10.0


def _advantage_sign(advantages: torch.Tensor) -> torch.Tensor:
    return sign_channel(advantages)


def clip_bounds(eps=None, eps_low=None, eps_high=None) -> tuple[float, float]:
    """The clip interval half-widths ``(eps_low, eps_high)``; each defaults to ``eps``."""
    low = eps if eps_low is None else eps_low
    high = eps if eps_high is None else eps_high
    if low is None or high is None:
        raise ValueError("eps is required (or both eps_low and eps_high)")
    return _validate.positive("eps_low" if eps_low is not None else "eps", low), _validate.positive(
        "eps_high" if eps_high is not None else "eps", high
    )


def bounded_ratio(log_ratio: torch.Tensor, bound: float = LOG_RATIO_BOUND) -> torch.Tensor:
    """r = exp(clamp(x, ±bound)): the token ratio with an overflow guard (gradient 0 outside the bound)."""
    bound = _validate.positive("bound", bound)
    return torch.exp(torch.clamp(log_ratio, -bound, bound))


def _min_form(value: torch.Tensor, clipped: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """sign·min(clip·sign, value·sign): the pessimistic branch for each advantage sign (App. C.5.1)."""
    return sign * torch.minimum(clipped * sign, value * sign)


def ppo_gated_ratio(
    ratio, *, eps=None, advantages=None, eps_low=None, eps_high=None, clip_ratio_c=None
) -> torch.Tensor:
    """PPO/GRPO gated ratio (App. C.4, C.5.1): clip(r, 1 − ε_low, 1 + ε_high), ε_low = ε_high = ε by default.

    With ``advantages`` the "min" form ``sign(Â)·min(clip(r)·sign(Â), r·sign(Â))``
    is returned (sign(0) taken as +1, which only matters where Â = 0).
    ``clip_ratio_c`` (> 1, needs ``advantages``) is the dual clip: where Â < 0
    the gated ratio is further capped at ``clip_ratio_c``.
    """
    r = _validate.positive_values("ratio", ratio)
    low, high = clip_bounds(eps, eps_low, eps_high)
    clipped = torch.clamp(r, 1 - low, 1 + high)
    if advantages is None:
        if clip_ratio_c is not None:
            raise ValueError("clip_ratio_c (dual clip) needs advantages: it acts only where the advantage is negative")
        return clipped
    adv = _validate.same_shape("advantages", advantages, r)
    gated = _min_form(r, clipped, _advantage_sign(adv))
    if clip_ratio_c is None:
        return gated
    c = _validate.positive("clip_ratio_c", clip_ratio_c)
    if c <= 1:
        raise ValueError(f"clip_ratio_c must be greater than 1, got {clip_ratio_c!r}")
    return torch.where(adv < 0, torch.clamp(gated, max=c), gated)


grpo_gated_ratio = ppo_gated_ratio  # GRPO differs from PPO only in μ (App. C.4)


def _gspo_log_ratio(x: torch.Tensor, traj, token_level: bool) -> torch.Tensor:
    """log s_τ = mean_t x_t per token, capped at :data:`GSPO_LOG_RATIO_MAX`.

    The token-level form keeps the value of log s_τ but lets each token's
    gradient flow only through its own x_t: log s_τ,t = sg(log s_τ) + x_t − sg(x_t).
    """
    if token_level:
        log_s = traj.gather(traj.mean(x.detach())) + x - x.detach()
    else:
        log_s = traj.gather(traj.mean(x))
    return torch.clamp(log_s, max=GSPO_LOG_RATIO_MAX)


def gspo_gated_ratio(
    log_ratio, traj_id, *, eps=None, advantages=None, eps_low=None, eps_high=None, token_level=False
) -> torch.Tensor:
    """GSPO gated ratio (App. C.4, C.5.3): clip(s_τ, 1 − ε_low, 1 + ε_high), s_τ = exp(mean_t x_t).

    With ``advantages`` the "min" form is returned with l_τ = sign(Σ_t Â_t);
    ``token_level=True`` is GSPO-token: the sign is taken per token, sign(Â_t),
    and the gradient of s_τ reaches token t only through x_t (see
    :func:`_gspo_log_ratio`).  s_τ is capped at exp(10), where its gradient is 0,
    so a far off-policy trajectory gives a finite value and gradient.
    """
    x = _validate.flat_values("log_ratio", log_ratio)
    low, high = clip_bounds(eps, eps_low, eps_high)
    traj = segments_for("traj_id", traj_id, x)
    s = torch.exp(_gspo_log_ratio(x, traj, token_level))
    clipped = torch.clamp(s, 1 - low, 1 + high)
    if advantages is None:
        return clipped
    adv = _validate.same_shape("advantages", advantages, x)
    sign = _advantage_sign(adv) if token_level else traj.gather(_advantage_sign(traj.sum(adv)))
    return _min_form(s, clipped, sign)
