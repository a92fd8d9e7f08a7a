"""A registry of policy losses with verl's uniform signature.

Every loss is called as::

    loss, metrics = fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, **hyper, **ids)

with ``(B, L)`` padded tensors (rows are trajectories) and returns the scalar
loss ``-J`` (Eq. 2, to be minimised) and a dict of float metrics.  Extra ids
(``group_ids``/``domain_ids`` per row, ``state_ids`` per token) are keyword
arguments.  ``loss_agg_mode=None`` uses the method's own μ from the paper.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from . import _validate, baselines, diagnostics, objectives
from .layout import FlatBatch, flatten_mask, to_flat, to_flat_difference, trajectory_segments

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
POLICY_LOSSES: dict[str, Callable] = {}


def register_policy_loss(name: str):
    """Add a loss to :data:`POLICY_LOSSES` under ``name``."""

    def register(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return register


def get_policy_loss_fn(name: str) -> Callable:
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; registered: {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def _mode(mode: str | None, method: str) -> str:
    """``loss_agg_mode``, or the method's own μ from the paper when ``None``; ``ValueError`` for an unknown one."""
    mode = mode or {"token": "token-mean", "trajectory": "seq-mean-token-mean"}[objectives.METHOD_WEIGHTS[method]]
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES} or None, got {mode!r}")
    return mode


# the modes whose μ is constant on each trajectory (rows with tokens), which the fused objectives take:
# seq-mean-token-sum's 1/B is the token μ 1/N times N/B (B counts every row, empty ones included)
_PER_TRAJECTORY = {"token-mean": "token", "seq-mean-token-mean": "trajectory", "seq-mean-token-sum": "token"}


def _weights(mode: str | None, method: str, batch: FlatBatch, like: torch.Tensor) -> torch.Tensor:
    mode = _mode(mode, method)
    if mode == "token-mean":
        return objectives.aggregation_weights("token", like)
    if mode == "seq-mean-token-mean":  # the rows with tokens are the trajectories: by their lengths, no id pass
        return objectives.aggregation_weights("trajectory", like, trajectory_segments(batch))
    return torch.full_like(like, 1.0 / batch.shape[0])  # seq-mean-token-sum


def _padded(name: str, value, like: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """A float ``(B, L)`` tensor shaped like ``like`` and on its device.

    With ``mask`` it must also be finite on the response tokens (see
    :func:`_report_non_finite`); without, the caller checks the flat values.
    """
    value = _validate.as_float(name, value)
    if value.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(like.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device}, expected {like.device}")
    if mask is not None:
        _report_non_finite({name: value}, mask)
    return value


def _report_non_finite(padded: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
    """Raise for the first input with a non-finite response token, by row and column.

    Padded slots are ignored for every input (their values never reach the
    loss), as verl and TRL ignore them.  Only called once the flat values
    were found non-finite, so a clean batch never scans the padded tensors.
    """
    for name, value in padded.items():
        bad = ~torch.isfinite(value.detach()) & mask
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise _validate.NonFiniteError(f"{name} has a non-finite value at row {row}, column {col}: "
                                           f"{value[row, col].item()}")


def _flat_inputs(old_log_prob, log_prob, advantages, response_mask):
    """The padded inputs checked (finite response tokens included), the flat batch, x and Â."""
    batch, log_ratio, adv, padded = _flat_parts(old_log_prob, log_prob, advantages, response_mask)
    if not (_validate._all_finite(log_ratio) and _validate._all_finite(adv)):
        _report_non_finite(padded, batch.mask)
    return batch, log_ratio, adv


def _flat_parts(old_log_prob, log_prob, advantages, response_mask):
    log_prob = _validate.as_float("log_prob", log_prob)
    if log_prob.dim() != 2:
        raise ValueError(f"log_prob must be (B, L), got shape {tuple(log_prob.shape)}")
    if not isinstance(response_mask, torch.Tensor) or response_mask.shape != log_prob.shape:
        shape = tuple(response_mask.shape) if isinstance(response_mask, torch.Tensor) else type(response_mask).__name__
        raise ValueError(f"response_mask has shape {shape}, expected {tuple(log_prob.shape)}")
    batch = flatten_mask(response_mask)
    padded = {
        "log_prob": log_prob,
        "old_log_prob": _padded("old_log_prob", old_log_prob, log_prob),
        "advantages": _padded("advantages", advantages, log_prob),
    }
    # the difference on the response tokens only (padding may hold anything)
    log_ratio = to_flat_difference(log_prob, padded["old_log_prob"].detach(), batch, "log_prob - old_log_prob")
    adv = to_flat(padded["advantages"], batch)
    return batch, log_ratio, adv, padded


@contextmanager
def _checked_by_the_objective(old_log_prob, log_prob, advantages, response_mask) -> Iterator[tuple]:
    """:func:`_flat_inputs` without its finiteness passes, for a FiberPO objective: its J is non-finite
    whenever an x_i or Â_i is, and only then does it scan them; the error it raises is named here by row and
    column of the padded input, as :func:`_flat_inputs` names it."""
    batch, log_ratio, adv, padded = _flat_parts(old_log_prob, log_prob, advantages, response_mask)
    try:
        yield batch, log_ratio, adv
    except _validate.NonFiniteError:
        _report_non_finite(padded, batch.mask)
        raise


def _row_ids(name: str, ids, batch: FlatBatch) -> torch.Tensor:
    if ids is None:
        raise ValueError(f"{name} is required for this loss")
    return to_flat(_validate_row_ids(name, ids), batch, name)


def _validate_row_ids(name, ids):
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer torch.Tensor")
    return ids


def _finish(method, gated, log_ratio, adv, batch, mode, metrics):
    """The loss -J (Eq. 2) of a gated ratio with the μ of ``mode``, and the metrics."""
    weights = _weights(mode, method, batch, gated)
    return _loss_and_metrics(objectives.rgf_objective(gated, adv, weights), log_ratio, metrics)


def _loss_and_metrics(objective, log_ratio, metrics):
    """The loss -J and the method's metrics with the mean raw ratio added."""
    return -objective, {**metrics, "ratio/mean": float(torch.exp(log_ratio.detach()).mean())}


def _fiber_finish(method, objective_fn, log_ratio, adv, batch, mode, metrics):
    """:func:`_finish` for the FiberPO family: Eq. 2 in the gate's pass (μ is constant on each row in every mode)."""
    mode = _mode(mode, method)
    objective = objective_fn(adv, _PER_TRAJECTORY[mode])
    if mode == "seq-mean-token-sum":
        objective = objective * (log_ratio.numel() / batch.shape[0])
    return _loss_and_metrics(objective, log_ratio, metrics)


def _clip_loss(method, old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, clip):
    batch, x, adv = _flat_inputs(old_log_prob, log_prob, advantages, response_mask)
    ratio = baselines.bounded_ratio(x)
    gated = baselines.ppo_gated_ratio(ratio, advantages=adv, **clip)
    metrics = {"clipfrac": diagnostics.clip_fraction(ratio.detach(), gated.detach())}
    return _finish(method, gated, x, adv, batch, loss_agg_mode, metrics)


@register_policy_loss("ppo")
def ppo_loss(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=None, *,
    eps=0.2, eps_low=None, eps_high=None, clip_ratio_c=None,
):
    """PPO: min form of clip(r, 1 − ε_low, 1 + ε_high) (App. C.4), token-mean by default.

    ``clip_ratio_c`` adds the dual clip; the log-ratio is bounded by ±20 before exp.
    """
    clip = dict(eps=eps, eps_low=eps_low, eps_high=eps_high, clip_ratio_c=clip_ratio_c)
    return _clip_loss("ppo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, clip)


@register_policy_loss("grpo")
def grpo_loss(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=None, *,
    eps=0.2, eps_low=None, eps_high=None, clip_ratio_c=None,
):
    """GRPO: PPO's gate with trajectory-normalised μ = 1/(|Tj| T_τ) (App. C.4)."""
    clip = dict(eps=eps, eps_low=eps_low, eps_high=eps_high, clip_ratio_c=clip_ratio_c)
    return _clip_loss("grpo", old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, clip)


@register_policy_loss("gspo")
def gspo_loss(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=None, *,
    eps=4e-4, eps_low=None, eps_high=None, token_level=False,
):
    """GSPO: min form of clip(s_τ, 1 ± ε), s_τ the geometric-mean ratio (App. C.4); ``token_level``: GSPO-token."""
    batch, x, adv = _flat_inputs(old_log_prob, log_prob, advantages, response_mask)
    clip = dict(eps=eps, eps_low=eps_low, eps_high=eps_high, token_level=token_level)
    gated = baselines.gspo_gated_ratio(x, batch.traj_id, advantages=adv, **clip)
    # an unbounded ε gives the unclipped aggregate s_τ from the same formula
    unclipped = baselines.gspo_gated_ratio(x.detach(), batch.traj_id, eps=1e30)
    metrics = {"clipfrac": diagnostics.clip_fraction(unclipped, gated.detach())}
    return _finish("gspo", gated, x, adv, batch, loss_agg_mode, metrics)


@register_policy_loss("apc_obj")
def apc_obj_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=None, *, delta=None, state_ids=None):
    """APC-Obj (Eq. 3/59) with a relaxed δ; ``state_ids`` is ``(B, L)`` per token; log-ratio bounded by ±20."""
    if delta is None:
        raise ValueError("delta is required for apc_obj (a positive TV budget)")
    batch, x, adv = _flat_inputs(old_log_prob, log_prob, advantages, response_mask)
    if state_ids is None:
        raise ValueError("state_ids is required for apc_obj")
    states = to_flat(_validate_row_ids("state_ids", state_ids), batch, "state_ids")
    ratio = baselines.bounded_ratio(x)
    gated = objectives.apc_obj_gated_ratio(ratio, states, delta=delta)
    metrics = {"clipfrac": diagnostics.clip_fraction(ratio.detach(), gated.detach())}
    return _finish("apc_obj", gated, x, adv, batch, loss_agg_mode, metrics)


@register_policy_loss("fiberpo")
def fiberpo_loss(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode=None, *, eps=0.04, c_pos=0.12, c_neg=0.05, k=None
):
    """FiberPO (Eq. 6-16); defaults are the illustrative values of the paper's Fig. 4.

    The loss is :func:`~fiberpo_theory.objectives.fiberpo_objective` (Eq. 2 in the fused gate's pass) in
    every mode (each one's μ is constant on a row); the metrics
    from :func:`~fiberpo_theory.core.diagnostics.fiberpo_loss_metrics`, counted in that same pass.
    """
    with _checked_by_the_objective(old_log_prob, log_prob, advantages, response_mask) as (batch, x, adv):
        traj = trajectory_segments(batch)
        hyper = dict(eps=eps, c_pos=c_pos, c_neg=c_neg, k=k)
        with diagnostics.counting_gate() as counted:
            loss, extra = _fiber_finish("fiberpo", lambda a, w: objectives.fiberpo_objective(x, traj, a, weights=w,
                                                                                             **hyper),
                                        x, adv, batch, loss_agg_mode, {})
        return loss, {**diagnostics.fiberpo_loss_metrics(x, traj, counted=counted, **hyper), **extra}


@register_policy_loss("fiberpo_domain")
def fiberpo_domain_loss(
    old_log_prob,
    log_prob,
    advantages,
    response_mask,
    loss_agg_mode=None,
    *,
    eps=0.04,
    c_pos=0.12,
    c_neg=0.05,
    group_ids=None,
    domain_ids=None,
    process_group=None,
):
    """FiberPO-Domain (Eq. 30-33); ``group_ids`` and ``domain_ids`` are ``(B,)`` per row.

    ``process_group`` all-reduces the group and domain aggregates across
    data-parallel ranks (see :mod:`fiberpo_theory.core.distributed`); the μ weights
    of ``loss_agg_mode`` and the metrics stay per rank, as in any DDP loss.
    The loss runs the fused gate (with Eq. 2 in its pass, as for ``fiberpo``), which also counts the
    metrics; with a ``process_group`` the metrics come from the reference without a graph (the same
    collectives on every rank).
    """
    with _checked_by_the_objective(old_log_prob, log_prob, advantages, response_mask) as (batch, x, adv):
        traj = trajectory_segments(batch)
        groups = _row_ids("group_ids", group_ids, batch)
        domains = _row_ids("domain_ids", domain_ids, batch)
        hyper = dict(eps=eps, c_pos=c_pos, c_neg=c_neg, process_group=process_group)
        with diagnostics.counting_gate(enabled=process_group is None) as counted:  # across ranks the parts count
            loss, extra = _fiber_finish(
                "fiberpo_domain", lambda a, w: objectives.fiberpo_domain_objective(x, traj, groups, domains, a,
                                                                                   weights=w, **hyper),
                x, adv, batch, loss_agg_mode, {})
        metrics = diagnostics.fiberpo_domain_loss_metrics(x, traj, groups, domains, counted=counted, **hyper)
        return loss, {**metrics, **extra}
