"""FiberPO, FiberPO-Domain and APC-Obj as verl policy losses.

Every loss here has verl's policy-loss signature::

    pg_loss, metrics = fn(old_log_prob, log_prob, advantages, response_mask,
                          loss_agg_mode="token-mean", config=None, rollout_is_weights=None)

and returns verl's metric keys (``actor/pg_clipfrac``, ``actor/ppo_kl``,
``actor/pg_clipfrac_lower``) plus this package's diagnostics under ``actor/``.
The gate computes the per-token loss ``-Â_t·G(r)_t`` (paper Eq. 2); verl's own
``agg_loss`` then aggregates it, so every ``loss_agg_mode`` and verl's global
normalisation (``config.global_batch_info``) behave exactly as for verl's losses,
and rows without response tokens are left to verl's rules.

Registering: importing this module (or calling :func:`register`) adds
``fiberpo``, ``fiberpo_domain``, ``apc_obj``, ``rgf_vanilla`` and ``rgf_gspo``
to verl's ``POLICY_LOSS_REGISTRY``.  verl imports user modules named in the
environment variable ``VERL_USE_EXTERNAL_MODULES`` when ``verl`` is imported, so
``VERL_USE_EXTERNAL_MODULES=fiberpo_theory.integrations.verl`` together with
``actor.policy_loss.loss_mode=fiberpo`` selects FiberPO in a verl run.

Hyper-parameters come from ``config``:

* ``rgf_vanilla`` / ``rgf_gspo`` read ``clip_ratio``, ``clip_ratio_low``,
  ``clip_ratio_high`` and (vanilla) ``clip_ratio_c``, with verl's meaning;
* FiberPO's ε, C⁺, C⁻, k (Eq. 6-16) and APC-Obj's δ mean something else, so they
  are read from ``config.policy_loss`` as ``fiberpo_eps``, ``fiberpo_c_pos``,
  ``fiberpo_c_neg``, optional ``fiberpo_k``, and ``apc_delta``.  verl's structured
  ``PolicyLossConfig`` refuses unknown YAML keys, so set them as attributes in
  Python or pass them once to :func:`register` (``register(fiberpo_c_pos=0.12,
  ...)``); a config attribute wins over a registered value, and a missing key
  raises ``ValueError`` naming it.  verl's workers are separate processes, so in
  a real run put that ``register(...)`` call in a small module of your own and
  name it in ``VERL_USE_EXTERNAL_MODULES`` (a comma-separated list): every
  worker then runs it when it imports verl.

Ids: verl 0.9.1's worker calls ``verl.workers.utils.losses.ppo_loss`` on each
micro-batch ``TensorDict``; that micro-batch still holds every row's ``uid`` and
``data_source`` (``non_tensor_batch`` columns), but ``ppo_loss`` hands the policy
loss only tensors.  :func:`ppo_loss` here is verl's ``ppo_loss`` run inside
:func:`batch_ids` with those two columns; give it to the worker in place of
verl's (``actor_rollout_wg.set_loss_fn(partial(ppo_loss, config=actor_config))``,
or the same ``partial`` in your own worker).  When calling a loss directly, use
:func:`batch_ids` or the keyword arguments.  APC-Obj's per-token state ids are
not something verl has; pass them the same way.

Whole prompt groups: FiberPO-Domain's group aggregate is a mean over all
responses of a prompt, so a micro-batch holding part of a group is refused
(``ValueError`` naming the ``uid``) rather than silently changing the loss.
verl's rollout repeats each prompt ``rollout.n`` times in consecutive rows, and
splits rows over ranks and cuts mini- and micro-batches in order, so groups stay
whole when ``data.train_batch_size`` and ``ppo_mini_batch_size`` (both counted in
prompts) are divisible by the number of data-parallel ranks,
``ppo_micro_batch_size_per_gpu`` is a multiple of ``rollout.n``, and
nothing reorders rows: ``trainer.balance_batch=False`` (it sorts rows by length
across ranks), ``actor.use_dynamic_bsz=False`` (it packs micro-batches by token
count) and ``actor.shuffle=False`` (the default).
The domain aggregates (Eq. 33), by contrast, are taken over the domain's
responses in the micro-batch on this rank: verl hands the loss one micro-batch
at a time, so a domain spread over several micro-batches or ranks is aggregated
per micro-batch (no collective is made here).
"""

from __future__ import annotations

import contextlib

import torch
from verl.trainer.ppo import core_algos

from ..core import baselines, diagnostics, objectives
from ..core.losses import _padded
from ..core.layout import flatten_mask, to_flat, to_flat_difference, to_padded, trajectory_segments
from ._common import require_whole_groups, string_ids

__all__ = [
    "LOSSES", "register", "batch_ids", "ppo_loss", "fiberpo", "fiberpo_domain", "apc_obj", "rgf_vanilla", "rgf_gspo",
]

HYPER_KEYS = ("fiberpo_eps", "fiberpo_c_pos", "fiberpo_c_neg", "fiberpo_k", "apc_delta")
_registered_hyper: dict = {}
_ids: dict = {}


# --- inputs --------------------------------------------------------------------------------------


def _hyper(config, key: str, *, optional: bool = False):
    policy_loss = config.get("policy_loss") if config is not None else None
    value = policy_loss.get(key) if policy_loss is not None else None
    value = _registered_hyper.get(key) if value is None else value
    if value is None and not optional:
        raise ValueError(
            f"config.policy_loss.{key} is missing: set it on the actor's policy_loss config or pass it to register()"
        )
    return value


def _clip(config) -> dict:
    if config is None:
        raise ValueError("config is required (verl's actor config with clip_ratio, clip_ratio_low/high)")
    low, high = config.get("clip_ratio_low"), config.get("clip_ratio_high")
    eps = config.get("clip_ratio")
    return dict(eps=eps, eps_low=eps if low is None else low, eps_high=eps if high is None else high)


class _Batch:
    """The response tokens of a padded verl micro-batch in the flat layout (rows may be empty)."""

    def __init__(self, old_log_prob, log_prob, advantages, response_mask):
        if not isinstance(response_mask, torch.Tensor) or response_mask.dim() != 2:
            raise ValueError("response_mask must be a (B, L) torch.Tensor")
        self.mask = response_mask.bool()
        log_prob = _padded("log_prob", log_prob, response_mask, self.mask)
        old = _padded("old_log_prob", old_log_prob, log_prob, self.mask)
        adv = _padded("advantages", advantages, log_prob, self.mask)
        self.flat = flatten_mask(self.mask, allow_empty_rows=True)  # token positions: no boolean indexing
        self.log_ratio = to_flat_difference(log_prob, old.detach(), self.flat, "log_prob - old_log_prob")
        self.adv = to_flat(adv, self.flat)

    @property
    def traj_id(self) -> torch.Tensor:
        """``(N,)`` row of each token, built on first use (FiberPO walks the rows by their lengths instead)."""
        return self.flat.traj_id

    def row_ids(self, name: str, values) -> torch.Tensor:
        """Per-row ids (strings or integers, length B) spread onto the response tokens."""
        if values is None:
            raise ValueError(f"{name} is required: pass it with batch_ids(...) around the loss call")
        ids = values if isinstance(values, torch.Tensor) else string_ids(values)
        if ids.dim() != 1 or ids.numel() != self.mask.shape[0] or ids.is_floating_point():
            raise ValueError(f"{name} must hold one integer id or label per row ({self.mask.shape[0]}), got {tuple(ids.shape)}")
        return ids.to(self.mask.device).long()

    def token_ids(self, name: str, values) -> torch.Tensor:
        if values is None:
            raise ValueError(f"{name} is required: pass it with batch_ids(...) around the loss call")
        if not isinstance(values, torch.Tensor) or values.shape != self.mask.shape or values.is_floating_point():
            raise ValueError(f"{name} must be an integer (B, L) tensor like response_mask")
        return to_flat(values, self.flat).long()


@contextlib.contextmanager
def batch_ids(*, uid=None, data_source=None, state_ids=None):
    """Make the micro-batch's ``uid`` (prompt group), ``data_source`` (domain) and per-token state ids visible to the losses.

    ``uid`` and ``data_source`` are length-B sequences of labels (verl's
    ``non_tensor_batch`` arrays) or integer tensors; ``state_ids`` is ``(B, L)``.
    """
    previous = dict(_ids)
    _ids.update(uid=uid, data_source=data_source, state_ids=state_ids)
    try:
        yield
    finally:
        _ids.clear()
        _ids.update(previous)


def _column(data, key: str):
    """One ``non_tensor_batch`` column of a verl micro-batch ``TensorDict`` as a list, or None if absent."""
    return list(data[key]) if key in data.keys() else None


def ppo_loss(config, model_output, data, dp_group=None):
    """verl's worker loss ``verl.workers.utils.losses.ppo_loss``, with the micro-batch's ``uid`` and ``data_source``
    made visible to the losses of this module (see :func:`batch_ids`)."""
    from verl.workers.utils import losses  # verl's worker code, imported only when this path is used

    with batch_ids(uid=_column(data, "uid"), data_source=_column(data, "data_source")):
        return losses.ppo_loss(config, model_output, data, dp_group)


# --- the shared tail: verl's aggregation and metrics ----------------------------------------------


def _finish(batch: _Batch, gated, response_mask, loss_agg_mode, config, rollout_is_weights, extra_metrics,
            unclipped=None):
    """``unclipped``: what the gate compares against for the clip fraction (default: the token ratio)."""
    ratio = torch.exp(batch.log_ratio.detach()) if unclipped is None else unclipped
    loss_mat = to_padded(-batch.adv * gated, batch.flat)
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights
    info = dict(config.get("global_batch_info") or {}) if config is not None else {}
    pg_loss = core_algos.agg_loss(loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **info)
    metrics = {
        "actor/pg_clipfrac": diagnostics.clip_fraction(ratio, gated.detach()),
        "actor/ppo_kl": float(-batch.log_ratio.detach().mean()),
        "actor/pg_clipfrac_lower": 0.0,
    }
    metrics.update({f"actor/{key}": value for key, value in extra_metrics.items()})
    return pg_loss, metrics


# --- the losses ---------------------------------------------------------------------------------


def rgf_vanilla(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                rollout_is_weights=None):
    """verl's default PPO loss through this package's gate: asymmetric and dual clip, log-ratio bound ±20 (App. C.4)."""
    batch = _Batch(old_log_prob, log_prob, advantages, response_mask)
    clip_ratio_c = config.get("clip_ratio_c", 3.0) if config is not None else None
    ratio = baselines.bounded_ratio(batch.log_ratio)
    single = baselines.ppo_gated_ratio(ratio, advantages=batch.adv, **_clip(config))
    gated = baselines.ppo_gated_ratio(ratio, advantages=batch.adv, clip_ratio_c=clip_ratio_c, **_clip(config))
    pg_loss, metrics = _finish(batch, gated, response_mask, loss_agg_mode, config, rollout_is_weights, {})
    metrics["actor/pg_clipfrac"] = diagnostics.clip_fraction(ratio.detach(), single.detach())
    metrics["actor/pg_clipfrac_lower"] = diagnostics.clip_fraction(single.detach(), gated.detach())  # the dual clip's share
    return pg_loss, metrics


def rgf_gspo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-mean", config=None,
             rollout_is_weights=None):
    """GSPO-token (App. C.4) with verl's clip_ratio_low/high."""
    batch = _Batch(old_log_prob, log_prob, advantages, response_mask)
    gated = baselines.gspo_gated_ratio(
        batch.log_ratio, batch.traj_id, advantages=batch.adv, token_level=True,
        eps_low=_clip(config)["eps_low"], eps_high=_clip(config)["eps_high"],
    )
    # an unbounded clip gives the unclipped sequence ratio s_τ from the same formula
    s_tau = baselines.gspo_gated_ratio(batch.log_ratio.detach(), batch.traj_id, eps=1e30, token_level=True)
    return _finish(batch, gated, response_mask, loss_agg_mode, config, rollout_is_weights, {}, unclipped=s_tau)


def _fiberpo_hyper(config) -> dict:
    return dict(eps=_hyper(config, "fiberpo_eps"), c_pos=_hyper(config, "fiberpo_c_pos"),
                c_neg=_hyper(config, "fiberpo_c_neg"))


def fiberpo(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
            rollout_is_weights=None):
    """FiberPO (Eq. 6-16), one trajectory per row: the loss by the fused gate, which also counts the metrics."""
    batch = _Batch(old_log_prob, log_prob, advantages, response_mask)
    hyper = dict(_fiberpo_hyper(config), k=_hyper(config, "fiberpo_k", optional=True))
    traj = trajectory_segments(batch.flat)  # the non-empty rows, by their lengths: indexed once for loss and metrics
    with diagnostics.counting_gate() as counted:
        gated = objectives.fiberpo_gated_ratio(batch.log_ratio, traj, **hyper)
    metrics = diagnostics.fiberpo_loss_metrics(batch.log_ratio, traj, counted=counted, **hyper)
    return _finish(batch, gated, response_mask, loss_agg_mode, config, rollout_is_weights, metrics)


def fiberpo_domain(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                   rollout_is_weights=None, *, group_ids=None, domain_ids=None):
    """FiberPO-Domain (Eq. 30-33): groups from ``uid``, domains from ``data_source`` (see :func:`batch_ids`)."""
    batch = _Batch(old_log_prob, log_prob, advantages, response_mask)
    uid = _ids.get("uid") if group_ids is None else group_ids
    groups = batch.row_ids("uid", uid)
    domains = batch.row_ids("data_source", _ids.get("data_source") if domain_ids is None else domain_ids)
    rollout_n = config.get("rollout_n") if config is not None else None
    if rollout_n is not None:
        labels = None if isinstance(uid, torch.Tensor) else list(dict.fromkeys(uid))  # string_ids' order
        require_whole_groups(groups, int(rollout_n), name="prompt group uid", labels=labels)
    hyper = _fiberpo_hyper(config)
    traj = trajectory_segments(batch.flat)
    levels = (traj, groups[batch.traj_id], domains[batch.traj_id])
    with diagnostics.counting_gate() as counted:
        gated = objectives.fiberpo_domain_gated_ratio(batch.log_ratio, *levels, **hyper)  # the fused gate
    metrics = diagnostics.fiberpo_domain_loss_metrics(batch.log_ratio, *levels, counted=counted, **hyper)
    return _finish(batch, gated, response_mask, loss_agg_mode, config, rollout_is_weights, metrics)


def apc_obj(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
            rollout_is_weights=None, *, state_ids=None):
    """APC-Obj (Eq. 3/59) with δ from ``config.policy_loss.apc_delta`` and per-token state ids."""
    batch = _Batch(old_log_prob, log_prob, advantages, response_mask)
    states = batch.token_ids("state_ids", _ids.get("state_ids") if state_ids is None else state_ids)
    gated = objectives.apc_obj_gated_ratio(baselines.bounded_ratio(batch.log_ratio), states,
                                           delta=_hyper(config, "apc_delta"))
    return _finish(batch, gated, response_mask, loss_agg_mode, config, rollout_is_weights, {})


LOSSES = {"fiberpo": fiberpo, "fiberpo_domain": fiberpo_domain, "apc_obj": apc_obj,
          "rgf_vanilla": rgf_vanilla, "rgf_gspo": rgf_gspo}


def register(**hyper) -> None:
    """Put :data:`LOSSES` into verl's ``POLICY_LOSS_REGISTRY``; ``hyper`` sets defaults for :data:`HYPER_KEYS`."""
    unknown = set(hyper) - set(HYPER_KEYS)
    if unknown:
        raise ValueError(f"unknown hyper-parameter(s) {sorted(unknown)}; known: {list(HYPER_KEYS)}")
    _registered_hyper.update(hyper)
    for name, fn in LOSSES.items():
        core_algos.register_policy_loss(name)(fn)


register()  # importing the module is what VERL_USE_EXTERNAL_MODULES does
