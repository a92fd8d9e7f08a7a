"""Atomic gates used by the objectives (paper Sec. 5.1, 5.2, App. C.1, E.5.4).

Every gate here is a pure elementwise torch function, differentiable almost
everywhere, and exists once: the objectives, the FGH operator, the symbolic
cross-checks and the figures all call these.
"""

from __future__ import annotations

import torch

# Regime codes of g_agg (Eq. 10) and of the APC-Obj clip (Eq. 61-63).
PASS, ROLLBACK, ZEROED = 0, 1, 2
REGIME_NAMES = ("P", "R", "Z")


def sign_channel(x: torch.Tensor) -> torch.Tensor:
    """Sign label l_i of Eq. 13 with the convention l = +1 at x = 0.

    ``torch.sign`` returns 0 at 0, which would drop an exactly on-policy token
    from both channels and break the identity Jacobian at r = 1, where every PPO-style epoch takes its first step.
    """
    return (x >= 0).to(x.dtype) * 2 - 1


def sign_split(x: torch.Tensor) -> torch.Tensor:
    """``(N, 2)`` channels ``(1[l = +1] x, 1[l = -1] (-x))`` with l from :func:`sign_channel` (Eq. 9, 13).

    Values are ``max(x, 0)`` and ``max(-x, 0)``; the split goes by ``where``
    on l so that at exactly x = 0 the derivative is 1 in the positive channel
    and 0 in the negative one (autograd of ``relu`` would give 0 in both and
    break the identity Jacobian at r = 1).  Shared by the closed-form FiberPO
    objectives and the FGH decomposition.
    """
    positive = x >= 0  # l = +1, as sign_channel
    zero = torch.zeros_like(x)
    return torch.stack([torch.where(positive, x, zero), torch.where(positive, zero, -x)], dim=1)


def symmetric_clip(x: torch.Tensor, bound) -> torch.Tensor:
    """clip(x, ±b) for a float or tensor bound b >= 0, differentiable in both."""
    if isinstance(bound, torch.Tensor):
        return torch.minimum(torch.maximum(x, -bound), bound)
    return torch.clamp(x, -bound, bound)


def budget_clip(a: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """clip(a, B) := clip(a, -B⁺, B⁺) with B⁺ = max(B, 0) (Eq. 3 / Eq. 59)."""
    return symmetric_clip(a, torch.clamp(bound, min=0))


def logclip(x: torch.Tensor, eps: float) -> torch.Tensor:
    """logclip(x, ε) = exp(clip(log x, ±ε)) for x > 0 (Eq. 12)."""
    return torch.exp(torch.clamp(torch.log(x), -eps, eps))


def g_agg_thresholds(c, k):
    """(C, C*) with C* = (1 + 1/k) C: where g_agg's rollback starts and where it reaches zero (Eq. 10)."""
    return c, (1 + 1 / k) * c


def _g_agg_sides(x: torch.Tensor, c, k) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|x| <= C, |x| < (1 + 1/k)C)``: the two comparisons that place x in g_agg's regimes, ends as Eq. 10."""
    ax = x.abs()
    _, zero_at = g_agg_thresholds(c, k)
    return ax <= c, ax < zero_at


def g_agg(x: torch.Tensor, c, k) -> torch.Tensor:
    """Aggregate gate g_agg(x, C, k) of Eq. 10 / Eq. 78.

    Identity for |x| <= C, rollback ``sign(x)(k+1)C - kx`` for
    C < |x| < (1 + 1/k)C, zero beyond.  ``c`` and ``k`` may be floats or
    tensors broadcastable against ``x``; ``k`` is the trajectory length in
    FiberPO but is kept separate (the paper's Fig. 4 uses k != T).
    """
    passing, live = _g_agg_sides(x, c, k)
    rollback = torch.sign(x) * (k + 1) * c - k * x
    return torch.where(passing, x, torch.where(live, rollback, 0.0))


def g_agg_regime(x: torch.Tensor, c, k) -> torch.Tensor:
    """Regime of g_agg at x: PASS (0), ROLLBACK (1) or ZEROED (2), as int64."""
    passing, live = _g_agg_sides(x, c, k)
    rollback = torch.full_like(x, ROLLBACK, dtype=torch.long)
    code = torch.where(live, rollback, torch.full_like(rollback, ZEROED))
    return torch.where(passing, torch.full_like(rollback, PASS), code)


def g_agg_slope(x: torch.Tensor, c, k) -> torch.Tensor:
    """Derivative γ = g_agg'(x) used in Eq. 20: 1, -k or 0 by regime (no regime codes built: this runs every step)."""
    passing, live = _g_agg_sides(x, c, k)
    rollback = torch.where(live, -torch.as_tensor(k, dtype=x.dtype, device=x.device), 0.0)
    return torch.where(passing, 1.0, rollback)
