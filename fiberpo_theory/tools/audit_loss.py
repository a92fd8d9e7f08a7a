"""Audit a verl-signature policy loss from its gradients, the loss-level sibling of :mod:`fiberpo_theory.tools.audit`.

The loss under audit is called exactly as verl's actor calls a registered policy loss::

    pg_loss, metrics = fn(old_log_prob=..., log_prob=..., advantages=..., response_mask=...,
                          loss_agg_mode=mode, config=config, rollout_is_weights=None)

(``rollout_is_weights`` is given only by ``importance-weights``) with padded ``(B, L)`` float64 tensors, a 0/1 ``response_mask`` (each row a non-empty prefix of 1s) and, unless
one is given, a default ``verl.workers.config.ActorConfig``.  Every claim is read off autograd, so the loss is
treated as a black box.  Write ``agg`` for verl's ``agg_loss`` in the chosen ``loss_agg_mode`` (linear in the
loss matrix: ``agg(M) = Σ w ⊙ M`` with weights ``w`` that autograd reads off it) and ``r = exp(log_prob -
old_log_prob)``.  The policy-gradient surrogate of that mode is ``-agg(A ⊙ r)`` (the paper's Eq. 2 with the
plain ratio), and eight properties are checked, each ``holds``, ``fails`` (with a witness) or ``error``:

``on-policy-value``     at ``log_prob == old_log_prob`` the loss equals ``-agg(A)``, in every mode, for per-token
                        advantages and for row-constant ones (outcome rewards, as in GRPO) alike.
``on-policy-gradient``  there, ``∂loss/∂log_prob == -w ⊙ A`` (the surrogate's gradient) on every token, padding
                        included (where it is 0): the first-order agreement every trust-region method needs.
``row-block``           moving row 0's ``log_prob``, ``old_log_prob`` or ``advantages`` leaves every other row's
                        ∂loss/∂log_prob and ∂loss/∂A (its implied gated ratio) unchanged: the gating map's
                        Jacobian is block-diagonal over rows.
``finite-extremes``     log-ratios of ±20 and ±50, and a 2048-token row, give a finite loss and gradient.
``padding-ignored``     finite garbage in the padded slots of all three inputs (log-probs in (-40, 0), advantages
                        ~1000) leaves the loss and ∂loss/∂log_prob unchanged, with ∂loss/∂log_prob = 0 on padding.
``nan-padding-ignored`` the same with NaN in every padded slot (a NaN gradient on a padded slot would reach the
                        model's parameters through the padded logits).
``implied-gating``      ``G = -(∂loss/∂A) / w`` recovers the gated ratio the loss applies to each token; it is
                        finite and the loss equals ``-agg(A ⊙ G)`` off-policy, i.e. the loss *is* a gated-ratio
                        surrogate.  The report tabulates G along a uniform drift of the log-ratio, for A > 0
                        and A < 0.
``importance-weights``  with ``rollout_is_weights = ρ`` (positive, per token, as verl's rollout correction
                        passes them) ``∂loss/∂A`` (each token's term ``-w ⊙ G``) is ρ times what it is without
                        them, at r = 1 and off-policy: each token's term is scaled by its own weight, whatever
                        the gate.  Checked with weights that vary within a row and with row-constant ones (a loss
                        that weights whole sequences by a mean of ρ over the row holds only for the latter); a
                        loss that drops the argument fails.

A loss that raises on the first, ordinary batch (for instance because the default config lacks a key it needs)
gets ``error`` on every property with the exception as the reason: nothing is skipped silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from .audit import AuditReport, PropertyResult, _BadOutput, _deviation, _random_mask, _size, load_target, single_thread

LOSS_PROPERTY_IDS = ("on-policy-value", "on-policy-gradient", "row-block", "finite-extremes", "padding-ignored", "nan-padding-ignored",
                     "implied-gating", "importance-weights")
AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
GATING_LOG_RATIOS = (-1.0, -0.3, -0.1, 0.0, 0.1, 0.3, 1.0)
TOLERANCE = 1e-6  # relative to max(1, |expected|); float64, but verl adds 1e-8 to denominators (a 1e-9 relative effect)


class LossSetupError(Exception):
    """The loss cannot be run on an ordinary batch with the config given (reported as ``error``)."""


# ---------------------------------------------------------------------------
# verl pieces: its aggregation and a default actor config (imported only when used)
# ---------------------------------------------------------------------------


def default_verl_config():
    """verl's own ``ActorConfig`` with its defaults; only the two fields verl insists on are filled in."""
    from verl.workers.config.actor import ActorConfig

    # rollout_n and a micro-batch size are required by ActorConfig's checks but play no part in a loss
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)


def verl_config(overrides: list[str] | tuple[str, ...] = ()):
    """:func:`default_verl_config` with ``KEY=VALUE`` overrides, dotted for nested keys (``policy_loss.dro_beta=0.1``).

    Values are typed the way omegaconf types a command-line override; a key the config does not have is a ValueError
    naming it (never a silent extra attribute).
    """
    from omegaconf import OmegaConf

    for item in overrides:
        if "=" not in item or not item.partition("=")[0].strip():
            raise ValueError(f"config override must look like KEY=VALUE, got {item!r}")
    tree = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides))) if overrides else {}
    return _replace(default_verl_config(), tree, "")


def _replace(obj, changes: dict, prefix: str):
    names = {f.name for f in dataclasses.fields(obj)}
    kwargs = {}
    for key, value in changes.items():
        if key not in names:
            raise ValueError(f"config override {prefix}{key}: {type(obj).__name__} has no key {key!r}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config override {prefix}{key}: a section of keys, set its keys ({prefix}{key}.NAME=VALUE), not {value!r}")
            kwargs[key] = _replace(current, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _typed(f"{prefix}{key}", current, value)
    return dataclasses.replace(obj, **kwargs)


def _typed(key: str, current, value):
    """``value`` if it has the kind of the default it replaces (numbers stand for numbers), else a ValueError."""
    def kind(v):
        return "bool" if isinstance(v, bool) else "number" if isinstance(v, (int, float)) else type(v).__name__

    if current is None or kind(value) == kind(current):
        return float(value) if isinstance(current, float) and kind(value) == "number" else value
    raise ValueError(f"config override {key}={value!r}: expected a {kind(current)} like the default {current!r}")


def verl_registry() -> dict[str, Callable]:
    """The losses the installed verl ships in its ``POLICY_LOSS_REGISTRY`` (name -> loss, registry order).

    Entries other packages registered (``fiberpo_theory.integrations.verl`` adds its own on import) are left out:
    the registry document describes verl itself, whatever else the process has imported.
    """
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    return {name: fn for name, fn in POLICY_LOSS_REGISTRY.items() if _shipped_by_verl(fn)}


def _shipped_by_verl(fn) -> bool:
    module = getattr(fn, "__module__", "") or ""
    return module == "verl" or module.startswith("verl.")


def aggregation_weights(mask: torch.Tensor, mode: str, config) -> torch.Tensor:
    """``w`` with ``agg_loss(M) = Σ w ⊙ M`` for verl's ``agg_loss`` in ``mode`` (read off by autograd)."""
    from verl.trainer.ppo.core_algos import agg_loss

    matrix = torch.zeros_like(mask, requires_grad=True)
    batch_info = dict(getattr(config, "global_batch_info", None) or {})
    (weights,) = torch.autograd.grad(agg_loss(loss_mat=matrix, loss_mask=mask, loss_agg_mode=mode, **batch_info), matrix)
    return weights


# ---------------------------------------------------------------------------
# Calling the loss
# ---------------------------------------------------------------------------


class _Loss:
    """The audited loss with its config; every call reseeds torch so random losses are repeatable."""

    def __init__(self, fn, config, seed):
        self.fn, self.config, self.seed = fn, config, seed

    def __call__(self, old, log_prob, adv, mask, mode, weights=None) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            out = self.fn(old_log_prob=old, log_prob=log_prob, advantages=adv, response_mask=mask,
                          loss_agg_mode=mode, config=self.config, rollout_is_weights=weights)
        loss = out[0] if isinstance(out, tuple) else out
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise _BadOutput(f"expected (pg_loss, metrics) with a scalar pg_loss, got {type(out).__name__}")
        return loss.reshape(())

    def grads(self, old, log_prob, adv, mask, mode, wrt=("log_prob",), weights=None):
        """The loss and its gradients with respect to the inputs named in ``wrt`` (None where it does not depend)."""
        inputs = {"old": old.clone(), "log_prob": log_prob.clone(), "adv": adv.clone()}
        leaves = [inputs[name].requires_grad_(True) for name in wrt]
        loss = self(inputs["old"], inputs["log_prob"], inputs["adv"], mask, mode, weights)
        if not loss.requires_grad:
            return loss.detach(), [None] * len(leaves)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return loss.detach(), list(grads)


def _random_inputs(gen, dtype, scale: float, *, rows=(1, 4), length=(2, 10), advantages="per-token"):
    """(old_log_prob, log_prob, advantages, mask): log-probs in (-3, -0.05), log-ratios within ±scale, A ~ N(0, 1).

    ``advantages="row-constant"`` gives every token of a row the same A (outcome rewards, as in GRPO).
    """
    b = int(torch.randint(rows[0], rows[1] + 1, (1,), generator=gen))
    n = int(torch.randint(length[0], length[1] + 1, (1,), generator=gen))
    old = -(0.05 + 2.95 * torch.rand(b, n, generator=gen, dtype=dtype))
    log_ratio = (2 * torch.rand(b, n, generator=gen, dtype=dtype) - 1) * scale
    adv = torch.randn(b, n, generator=gen, dtype=dtype)
    if advantages == "row-constant":
        adv = adv[:, :1].expand(b, n).clone()
    return old, old + log_ratio, adv, _random_mask(gen, b, n, dtype)


def _describe(mask) -> dict[str, Any]:
    return {"shape": list(mask.shape), "row_lengths": mask.sum(1).int().tolist()}


def _relative(value: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|value - expected| / max(1, |expected|), elementwise; NaN or inf in either counts as an infinite gap."""
    scale = torch.where(torch.isfinite(expected), expected.abs().clamp(min=1.0), torch.ones_like(expected))
    return _deviation(value - expected) / scale


# ---------------------------------------------------------------------------
# The eight properties
# ---------------------------------------------------------------------------


ADVANTAGE_KINDS = ("per-token", "row-constant")


def _by_kind(property_id, worst, bad, modes, failure_text, holds_text, noun="advantages") -> PropertyResult:
    """One verdict from the worst case per input kind (``noun``: advantages or weights); the details say which kinds
    and modes fail.

    ``worst`` and ``bad`` are keyed by kind; ``bad`` maps each kind to the modes in which some batch exceeded the
    tolerance.
    """
    kinds = list(worst)
    failing = [kind for kind in kinds if worst[kind][0] > TOLERANCE]
    if not failing:
        gap = max(worst[kind][0] for kind in kinds)
        return PropertyResult(property_id, "holds", None, f"{holds_text} (max relative gap {gap:.1e})")
    kind = max(failing, key=lambda k: worst[k][0])
    w = {noun: kind, **worst[kind][1]}

    def where(kind):
        return "every mode" if bad[kind] == set(modes) else ", ".join(m for m in modes if m in bad[kind])

    which = "; ".join(f"{k} {noun} fail in {where(k)}" for k in failing)
    return PropertyResult(property_id, "fails", {**w, "failing_modes": {k: [m for m in modes if m in bad[k]] for k in failing}},
                          f"{failure_text(w, _size(worst[kind][0]))}; {which}")


def _on_policy_sweep(gen, dtype, n, modes, measure):
    """At r = 1, per advantage kind: the worst gap over batches x modes with its witness, and the modes that fail.

    ``measure(old, adv, mask, mode)`` returns the gap and a function building the
    witness (only called when the gap is the worst so far).
    """
    worst = {kind: (-1.0, None) for kind in ADVANTAGE_KINDS}
    bad = {kind: set() for kind in ADVANTAGE_KINDS}
    for k in range(n):
        kind = ADVANTAGE_KINDS[k % 2]
        old, _, adv, mask = _random_inputs(gen, dtype, 0.0, advantages=kind)
        for mode in modes:
            gap, witness = measure(old, adv, mask, mode)
            if gap > TOLERANCE:
                bad[kind].add(mode)
            if gap > worst[kind][0]:
                worst[kind] = (gap, {"loss_agg_mode": mode, **_describe(mask), **witness()})
    return worst, bad


def _on_policy_value(loss, gen, dtype, n, modes):
    def measure(old, adv, mask, mode):
        value = loss(old, old.clone(), adv, mask, mode).detach()
        expected = -(aggregation_weights(mask, mode, loss.config) * adv).sum()
        return float(_relative(value, expected)), lambda: {"loss": float(value), "expected": float(expected)}

    worst, bad = _on_policy_sweep(gen, dtype, n, modes, measure)
    return _by_kind("on-policy-value", worst, bad, modes,
                    lambda w, gap: f"at r = 1 the loss is {w['loss']:.6g}, not -agg(A) = {w['expected']:.6g} ({w['loss_agg_mode']}; relative gap {gap})",
                    f"loss = -agg(A) at r = 1 on {n} batches x {len(modes)} modes, per-token and row-constant advantages")


def _on_policy_gradient(loss, gen, dtype, n, modes):
    def measure(old, adv, mask, mode):
        _, (grad,) = loss.grads(old, old, adv, mask, mode)
        expected = -aggregation_weights(mask, mode, loss.config) * adv
        grad = torch.zeros_like(expected) if grad is None else grad
        gap = _relative(grad, expected)

        def witness():
            b, t = [int(v) for v in torch.unravel_index(gap.argmax(), gap.shape)]
            return {"position": [b, t], "padded": not bool(mask[b, t]), "dloss/dlog_prob": float(grad[b, t]),
                    "expected": float(expected[b, t]), "advantage": float(adv[b, t])}

        return float(gap.max()), witness

    worst, bad = _on_policy_sweep(gen, dtype, n, modes, measure)
    return _by_kind("on-policy-gradient", worst, bad, modes,
                    lambda w, gap: f"at r = 1, dloss/dlog_prob{w['position']} = {w['dloss/dlog_prob']:.6g} but the policy gradient gives {w['expected']:.6g} ({w['loss_agg_mode']})",
                    f"dloss/dlog_prob = -w * A at r = 1 on {n} batches x {len(modes)} modes, per-token and row-constant advantages")


ROW_BLOCK_GRADIENTS = {"log_prob": "dloss/dlog_prob", "adv": "dloss/dadvantages"}


def _row_block(loss, gen, dtype, n, modes):
    """Move row 0's inputs; every other row's gradients (w.r.t. log_prob and A, i.e. its gated ratio) must not move."""
    worst = (-1.0, None)
    for k in range(n):
        scale = (0.0, 0.3, 1.0)[k % 3]
        old, log_prob, adv, mask = _random_inputs(gen, dtype, scale, rows=(2, 4))
        shift = (2 * torch.rand(log_prob.shape[1], generator=gen, dtype=dtype) - 1) * 0.5
        for mode in modes:
            base = _gradients(loss, old, log_prob, adv, mask, mode)
            for name in ("log_prob", "old_log_prob", "advantages"):
                moved = {"old_log_prob": old.clone(), "log_prob": log_prob.clone(), "advantages": adv.clone()}
                moved[name][0] += shift
                after = _gradients(loss, moved["old_log_prob"], moved["log_prob"], moved["advantages"], mask, mode)
                for label, before, grad in zip(ROW_BLOCK_GRADIENTS.values(), base, after):
                    change = torch.where(mask.bool(), _deviation(grad - before), torch.zeros_like(grad))[1:]
                    if float(change.max()) > worst[0]:
                        b, t = [int(v) for v in torch.unravel_index(change.argmax(), change.shape)]
                        worst = (float(change.max()), {"loss_agg_mode": mode, "moved": f"{name}[0]", "gradient": label, "log_ratio_scale": scale,
                                                       **_describe(mask), "position": [b + 1, t], "before": float(before[b + 1, t]), "after": float(grad[b + 1, t])})
    if worst[0] > TOLERANCE:
        w = worst[1]
        what = "rows are coupled" if math.isfinite(worst[0]) else "the gradient is not finite"
        return PropertyResult("row-block", "fails", w, f"moving {w['moved']} changed {w['gradient']}{w['position']} by {_size(worst[0])} ({w['loss_agg_mode']}): {what}")
    return PropertyResult("row-block", "holds", None, f"moving one row's log_prob, old_log_prob or advantages never changed another row's dloss/dlog_prob or dloss/dA ({n} batches x {len(modes)} modes, |log r| up to 1)")


def _gradients(loss, old, log_prob, adv, mask, mode) -> list[torch.Tensor]:
    """dloss/dlog_prob and dloss/dA, zeros where the loss does not depend on them through autograd."""
    _, grads = loss.grads(old, log_prob, adv, mask, mode, wrt=tuple(ROW_BLOCK_GRADIENTS))
    return [torch.zeros_like(mask) if g is None else g for g in grads]


PADDING_INPUTS = {"log_prob": "log_prob"}  # old_log_prob and advantages are data: no gradient of theirs reaches the model


def _padding_garbage(kind, gen, like):
    """Values for the padded slots of (old_log_prob, log_prob, advantages)."""
    if kind == "nan":
        return [torch.full_like(like, math.nan)] * 3
    logp = [-40 * torch.rand(like.shape, generator=gen, dtype=like.dtype) for _ in range(2)]
    return logp + [1e3 * torch.randn(like.shape, generator=gen, dtype=like.dtype)]


def _padding_check(kind: str):
    """The property that ``kind`` garbage in padded slots changes neither the loss nor ∂loss/∂log_prob.

    ``finite``: padded log-probs drawn in (-40, 0) and advantages of size ~1000; ``nan``: NaN in every padded
    slot.  ∂loss/∂log_prob is the gradient training uses: it must be unchanged on response tokens and 0 on padded
    slots (a NaN there would reach the model's parameters through the padded logits).
    """
    property_id = "padding-ignored" if kind == "finite" else "nan-padding-ignored"

    def check(loss, gen, dtype, n, modes):
        worst = (-1.0, None)
        bad = set()
        for k in range(n):
            old, log_prob, adv, mask = _random_inputs(gen, dtype, (0.0, 0.3, 1.0)[k % 3], rows=(2, 4))
            mask[-1, -1] = 0  # at least one padded slot (rows keep >= 1 token: every row has >= 2 slots)
            pad = ~mask.bool()
            dirty = [torch.where(pad, g, clean) for g, clean in zip(_padding_garbage(kind, gen, old), (old, log_prob, adv))]
            for mode in modes:
                clean_value, (clean_grad,) = loss.grads(old, log_prob, adv, mask, mode)
                value, (grad,) = loss.grads(*dirty, mask, mode)
                clean_grad = torch.zeros_like(mask) if clean_grad is None else clean_grad
                grad = torch.zeros_like(mask) if grad is None else grad
                grad_gap = torch.where(pad, _deviation(grad), _relative(grad, clean_grad))
                gaps = {"loss": (float(_relative(value, clean_value)), {}),
                        "dloss/dlog_prob": (float(grad_gap.max()), _where(grad_gap, pad, grad, clean_grad))}
                changed, (gap, where) = max(gaps.items(), key=lambda item: item[1][0])
                if gap > TOLERANCE:
                    bad.add(mode)
                if gap > worst[0]:
                    worst = (gap, {"loss_agg_mode": mode, **_describe(mask), "changed": changed, "loss_clean": float(clean_value), "loss": float(value), **where})
        garbage = "finite garbage (log-probs in (-40, 0), advantages ~1000)" if kind == "finite" else "NaN"
        if worst[0] > TOLERANCE:
            w = worst[1]
            at = f"{w['position']}" if "position" in w else ""
            modes_text = "every mode" if bad == set(modes) else ", ".join(m for m in modes if m in bad)
            return PropertyResult(property_id, "fails", {**w, "failing_modes": [m for m in modes if m in bad]},
                                  f"{garbage} in padded slots changed {w['changed']}{at} by {_size(worst[0])} ({w['loss_agg_mode']}); fails in {modes_text}")
        return PropertyResult(property_id, "holds", None, f"{garbage} in the padded slots of old_log_prob, log_prob and advantages left the loss "
                                                          f"and dloss/dlog_prob unchanged, 0 on padding ({n} batches x {len(modes)} modes; max relative gap {worst[0]:.1e})")

    return check


def _where(gap, pad, grad, clean_grad) -> dict[str, Any]:
    b, t = [int(v) for v in torch.unravel_index(gap.argmax(), gap.shape)]
    return {"position": [b, t], "padded": bool(pad[b, t]), "gradient": float(grad[b, t]), "gradient_clean": float(clean_grad[b, t])}


def _extreme_cases(dtype):
    gen = torch.Generator().manual_seed(50)
    signs = torch.randint(0, 2, (2, 2048), generator=gen).to(dtype) * 2 - 1
    mixed_adv = torch.tensor([[1.0, -1.0] * 4, [-1.0, 1.0] * 4], dtype=dtype)
    cases = {}
    for x in (20.0, 50.0):
        for sign_name, sign in (("+", 1.0), ("-", -1.0)):
            cases[f"all {sign_name}{x:g}, mixed-sign A"] = (torch.full((2, 8), sign * x, dtype=dtype), mixed_adv)
        cases[f"alternating ±{x:g}, mixed-sign A"] = ((torch.arange(16).view(2, 8) % 2 * 2 - 1).to(dtype) * x, mixed_adv)
    cases["2048-token rows of ±50"] = (signs * 50, signs.flip(1))
    return cases


def _finite_extremes(loss, gen, dtype, n, modes):
    cases = _extreme_cases(dtype)
    for name, (log_ratio, adv) in cases.items():
        old = torch.full_like(log_ratio, -60.0)
        mask = torch.ones_like(log_ratio)
        for mode in modes:
            value, (grad,) = loss.grads(old, old + log_ratio, adv, mask, mode)
            if not bool(torch.isfinite(value)):
                return PropertyResult("finite-extremes", "fails", {"case": name, "loss_agg_mode": mode, "loss": str(float(value))}, f"non-finite loss on '{name}' ({mode})")
            if grad is not None and not bool(torch.isfinite(grad).all()):
                b, t = [int(v) for v in (~torch.isfinite(grad)).nonzero()[0]]
                return PropertyResult("finite-extremes", "fails", {"case": name, "loss_agg_mode": mode, "position": [b, t], "gradient": str(float(grad[b, t]))}, f"non-finite gradient on '{name}' ({mode})")
    return PropertyResult("finite-extremes", "holds", None, f"finite loss and gradient on {len(cases)} extreme cases (log r = ±20, ±50, 2048-token rows) x {len(modes)} modes")


def implied_gated_ratio(loss, old, log_prob, adv, mask, mode) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G, pg_loss)`` with ``G = -(∂ pg_loss / ∂ A) / w`` on response tokens (NaN on padding)."""
    value, (d_adv,) = loss.grads(old, log_prob, adv, mask, mode, wrt=("adv",))
    if d_adv is None:
        raise LossSetupError("the loss does not depend on advantages through autograd, so G cannot be read off")
    weights = aggregation_weights(mask, mode, loss.config)
    gated = torch.where(mask.bool(), -d_adv / torch.where(mask.bool(), weights, torch.ones_like(weights)), torch.full_like(d_adv, math.nan))
    return gated, value


def _gating_table(loss, dtype) -> dict[str, list[float]]:
    """Mean G over a 4-token row whose log-ratios all equal x, for A = +1 and A = -1."""
    table = {"log_ratio": list(GATING_LOG_RATIOS)}
    mask = torch.ones(1, 4, dtype=dtype)
    old = torch.full((1, 4), -1.0, dtype=dtype)
    for name, sign in (("A>0", 1.0), ("A<0", -1.0)):
        table[name] = [float(implied_gated_ratio(loss, old, old + x, torch.full_like(old, sign), mask, "token-mean")[0].mean())
                       for x in GATING_LOG_RATIOS]
    return table


def _implied_gating(loss, gen, dtype, n, modes):
    worst = (-1.0, None)
    for k in range(n):
        old, log_prob, adv, mask = _random_inputs(gen, dtype, (0.1, 0.3, 1.0)[k % 3])
        for mode in modes:
            gated, value = implied_gated_ratio(loss, old, log_prob, adv, mask, mode)
            keep = mask.bool()
            rebuilt = -(aggregation_weights(mask, mode, loss.config) * adv * torch.where(keep, gated, torch.zeros_like(gated))).sum()
            gap = float(_relative(value, rebuilt)) if bool(torch.isfinite(gated[keep]).all()) else math.inf
            if gap > worst[0]:
                worst = (gap, {"loss_agg_mode": mode, **_describe(mask), "loss": float(value), "-agg(A*G)": float(rebuilt),
                               "log_ratio": (log_prob - old)[keep].tolist()[:16], "G": gated[keep].tolist()[:16]})
    table = _gating_table(loss, dtype)
    text = f"G at log r = {list(GATING_LOG_RATIOS)}: A>0 {_short(table['A>0'])}, A<0 {_short(table['A<0'])}"
    if worst[0] > TOLERANCE:
        w = worst[1]
        return PropertyResult("implied-gating", "fails", {**w, "gating": table}, f"the loss is not -agg(A * G): {w['loss']:.6g} vs {w['-agg(A*G)']:.6g} ({w['loss_agg_mode']}); {text}")
    return PropertyResult("implied-gating", "holds", {"gating": table}, f"loss = -agg(A * G) with G = -(dloss/dA)/w on {n} batches x {len(modes)} modes; {text}")


WEIGHT_KINDS = ("per-token", "row-constant")


def _importance_weights(loss, gen, dtype, n, modes):
    """With rollout IS weights ρ in (0.2, 2): dloss/dA equals ρ ⊙ (dloss/dA without them), at r = 1 and off-policy.

    dloss/dA is -w ⊙ G, each token's term of the surrogate, so the property says that ρ multiplies each term
    (as ``loss_mat * rollout_is_weights`` does) whatever the gate, coupled ones included.
    """
    worst = {kind: (-1.0, None) for kind in WEIGHT_KINDS}
    bad = {kind: set() for kind in WEIGHT_KINDS}
    for k in range(n):
        kind, scale = WEIGHT_KINDS[k % 2], (0.0, 0.3, 1.0)[(k // 2) % 3]
        old, log_prob, adv, mask = _random_inputs(gen, dtype, scale)
        rho = 0.2 + 1.8 * torch.rand(old.shape, generator=gen, dtype=dtype)
        if kind == "row-constant":
            rho = rho[:, :1].expand_as(rho).clone()
        for mode in modes:
            (_, (plain,)), (_, (weighted,)) = (loss.grads(old, log_prob, adv, mask, mode, wrt=("adv",), weights=w)
                                               for w in (None, rho))
            if plain is None:
                raise LossSetupError("the loss does not depend on advantages through autograd, so its terms cannot be read off")
            weighted = torch.zeros_like(plain) if weighted is None else weighted
            gap = _relative(weighted, rho * plain)
            if float(gap.max()) > TOLERANCE:
                bad[kind].add(mode)
            if float(gap.max()) > worst[kind][0]:
                b, t = [int(v) for v in torch.unravel_index(gap.argmax(), gap.shape)]
                worst[kind] = (float(gap.max()), {"loss_agg_mode": mode, **_describe(mask), "log_ratio_scale": scale,
                                                  "position": [b, t], "rho": float(rho[b, t]), "dloss/dA": float(weighted[b, t]),
                                                  "rho*dloss/dA_unweighted": float(rho[b, t] * plain[b, t])})
    return _by_kind("importance-weights", worst, bad, modes,
                    lambda w, gap: (f"with rollout_is_weights, dloss/dA{w['position']} = {w['dloss/dA']:.6g} but rho times the "
                                    f"unweighted one is {w['rho*dloss/dA_unweighted']:.6g} ({w['loss_agg_mode']}; relative gap {gap})"),
                    f"dloss/dA = rho * (dloss/dA unweighted) on {n} batches x {len(modes)} modes, |log r| up to 1, "
                    "weights per token and per row", noun="weights")


def _short(values) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


_PROPERTIES: dict[str, Callable] = {
    "on-policy-value": _on_policy_value,
    "on-policy-gradient": _on_policy_gradient,
    "row-block": _row_block,
    "finite-extremes": _finite_extremes,
    "padding-ignored": _padding_check("finite"),
    "nan-padding-ignored": _padding_check("nan"),
    "implied-gating": _implied_gating,
    "importance-weights": _importance_weights,
}


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------


def audit_loss(
    fn: Callable,
    *,
    config=None,
    loss_agg_modes: tuple[str, ...] = AGG_MODES,
    seed: int = 0,
    max_examples: int = 12,
    name: str | None = None,
) -> AuditReport:
    """Check a verl-signature policy loss for the eight properties; ``config`` defaults to verl's ActorConfig.

    ``max_examples`` random batches per property (a third of them for ``row-block``), drawn from ``seed``;
    each batch is tried in every mode of ``loss_agg_modes``.
    """
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be a positive integer, got {max_examples!r}")
    modes = tuple(loss_agg_modes)
    if not modes or any(mode not in AGG_MODES for mode in modes):
        raise ValueError(f"loss_agg_modes must be a non-empty selection of {AGG_MODES}, got {loss_agg_modes!r}")
    config = verl_config() if config is None else config
    loss = _Loss(fn, config, seed)
    report = AuditReport(name or getattr(fn, "__qualname__", repr(fn)), {"config": type(config).__name__, "loss_agg_modes": list(modes)}, seed, kind="policy-loss audit")
    with single_thread():
        setup_error = _setup_error(loss, modes)
        for offset, (property_id, check) in enumerate(_PROPERTIES.items()):
            if setup_error is not None:
                report.properties.append(PropertyResult(property_id, "error", {"error": setup_error}, f"not checked: {setup_error}"))
                continue
            gen = torch.Generator().manual_seed(seed * 1000 + offset)
            count = max(3, max_examples // 3) if property_id == "row-block" else max_examples
            report.properties.append(_run_one(property_id, check, loss, gen, count, modes))
    return report


def _setup_error(loss, modes) -> str | None:
    """Why the loss cannot run on an ordinary off-policy batch (2 rows of 3 tokens), or None."""
    old = torch.tensor([[-1.0, -0.5, -2.0], [-0.7, -1.2, -0.3]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    errors = {}
    for mode in modes:
        try:
            loss(old, old + 0.05, adv, mask, mode)
        except Exception as err:  # e.g. a config key the default verl config leaves unset
            errors[mode] = f"{type(err).__name__}: {err}"
    if not errors:
        return None
    mode, first = next(iter(errors.items()))
    if len(errors) == len(modes):
        return f"the loss raises on an ordinary batch in every mode; {mode}: {first}"
    # some modes run: the others are unsupported, and the audit can be rerun on the ones that work
    return (f"the loss raises on an ordinary batch in {', '.join(errors)}; {mode}: {first}; "
            "select the modes it runs in with --mode (loss_agg_modes)")


def _run_one(property_id, check, loss, gen, count, modes) -> PropertyResult:
    try:
        return check(loss, gen, torch.float64, count, modes)
    except LossSetupError as err:
        return PropertyResult(property_id, "error", {"error": str(err)}, f"not checked: {err}")
    except Exception as err:  # the loss failed on a valid input after running on an ordinary one: a finding
        return PropertyResult(property_id, "fails", {"error": f"{type(err).__name__}: {err}"}, f"the loss raised {type(err).__name__}: {err}")


def audit_verl_registry(**kwargs) -> dict[str, AuditReport]:
    """:func:`audit_loss` on every loss verl ships in its ``POLICY_LOSS_REGISTRY`` (:func:`verl_registry`), in order."""
    return {name: audit_loss(fn, name=f"verl:{name}", **kwargs) for name, fn in verl_registry().items()}


# ---------------------------------------------------------------------------
# Markdown (docs/verl-losses.md is this function's output)
# ---------------------------------------------------------------------------


def registry_markdown(reports: dict[str, AuditReport], *, command: str) -> str:
    import verl

    lines = [
        "# verl's shipped policy losses under `audit-loss`",
        "",
        f"Generated by `{command}` against the installed verl {verl.__version__} "
        "with its default `ActorConfig`; do not edit by hand (a test regenerates the verdicts and compares).",
        "",
        "Each loss is called as verl's actor calls it, in float64, in all five `loss_agg_mode`s. With `agg` verl's",
        "aggregation (`agg(M) = Σ w ⊙ M`), r = exp(log_prob − old_log_prob) and A the advantages, the policy-gradient",
        "surrogate is −agg(A ⊙ r) (Eq. 2 of the paper with the plain ratio). The properties:",
        "",
        "* `on-policy-value`: at r = 1 the loss equals −agg(A). This and the next property are checked with per-token",
        "  advantages and with row-constant ones (outcome rewards, as in GRPO); the details say which kind fails.",
        "* `on-policy-gradient`: at r = 1, ∂loss/∂log_prob = −w ⊙ A on every token (first-order agreement with the",
        "  policy gradient, where every epoch takes its first step).",
        "* `row-block`: moving one row's inputs never changes another row's ∂loss/∂log_prob or ∂loss/∂A (its gated",
        "  ratio): no coupling across responses.",
        "* `finite-extremes`: finite loss and gradient at log r = ±20, ±50 and on 2048-token rows.",
        "* `padding-ignored`: finite garbage in the padded slots of old_log_prob, log_prob and advantages (log-probs in",
        "  (−40, 0), advantages ~1000) changes neither the loss nor ∂loss/∂log_prob, which stays 0 on padding.",
        "* `nan-padding-ignored`: the same with NaN in every padded slot. A NaN gradient on a padded slot reaches the",
        "  model's parameters through the padded logits; a NaN loss poisons the step outright.",
        "* `implied-gating`: G = −(∂loss/∂A)/w is the gated ratio the loss applies per token; the property holds",
        "  when the loss is exactly −agg(A ⊙ G) (a gated-ratio surrogate, nothing added). G is tabulated in the",
        "  details: the mean over a 4-token row with old_log_prob = −1 and every log-ratio equal to x. A loss that",
        "  multiplies A by log_prob instead of by a ratio has that log-prob as its G (hence G = −1 at r = 1 there).",
        "* `importance-weights`: with positive `rollout_is_weights` ρ (verl's rollout correction), ∂loss/∂A (each",
        "  token's term −w ⊙ G) is ρ times what it is without them, at r = 1 and off-policy: each token's term carries",
        "  its own weight. Checked with weights that vary within a row and with row-constant ones; the details say",
        "  which kind fails.",
        "",
        "A verdict of `fails` is a property the loss does not have, not necessarily a bug: several losses are",
        "designed to differ from the plain surrogate. `error` means the loss could not run with the default config;",
        "give it the keys it needs with `--set KEY=VALUE` (e.g. `--set policy_loss.dro_beta=0.1`) to audit it.",
        "",
        "| loss | " + " | ".join(LOSS_PROPERTY_IDS) + " |",
        "| --- | " + " | ".join("---" for _ in LOSS_PROPERTY_IDS) + " |",
    ]
    for name, report in reports.items():
        lines.append(f"| `{name}` | " + " | ".join(report[pid].verdict for pid in LOSS_PROPERTY_IDS) + " |")
    lines += ["", "## Details", ""]
    for name, report in reports.items():
        lines.append(f"### `{name}`")
        lines.append("")
        for p in report.properties:
            lines.append(f"* **{p.id}** ({p.verdict}): {p.details}")
            if p.verdict != "holds" and p.witness is not None:
                lines.append(f"  Witness: `{json.dumps(_round(p.witness), ensure_ascii=False, default=str)[:400]}`")
        lines.append("")
    return "\n".join(lines)


def _round(value):
    """Witness numbers to 6 significant digits so the document reads well."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def parse_markdown_verdicts(text: str) -> dict[str, dict[str, str]]:
    """The verdict table of a document written by :func:`registry_markdown`: loss -> property -> verdict."""
    verdicts = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == len(LOSS_PROPERTY_IDS) + 1 and cells[0].startswith("`"):
            verdicts[cells[0].strip("`")] = dict(zip(LOSS_PROPERTY_IDS, cells[1:]))
    return verdicts


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli_types import nonnegative_int, output_file, positive_int

    parser.add_argument("target", nargs="?", metavar="MODULE:FUNCTION",
                        help="a policy loss fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights)")
    parser.add_argument("--verl-registry", action="store_true", help="audit every loss the installed verl ships in its POLICY_LOSS_REGISTRY instead")
    parser.add_argument("--mode", dest="modes", action="append", choices=AGG_MODES, metavar="MODE",
                        help=f"loss_agg_mode to check, repeatable (default: all of {', '.join(AGG_MODES)})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of verl's default ActorConfig, repeatable (e.g. policy_loss.dro_beta=0.1)")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="also write the report(s) as JSON to PATH")
    parser.add_argument("--markdown", type=output_file, metavar="PATH", help="with --verl-registry: also write the verdict document to PATH")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random batches, >= 0 (default: %(default)s)")
    parser.add_argument("--max-examples", type=positive_int, default=12, help="random batches per property (default: %(default)s)")


def check_args(args: argparse.Namespace) -> None:
    """Everything about the arguments argparse cannot see, before any loss runs (a ValueError is exit 2)."""
    if bool(args.target) == bool(args.verl_registry):
        raise ValueError("give exactly one of MODULE:FUNCTION or --verl-registry")
    if args.markdown and not args.verl_registry:
        raise ValueError("--markdown needs --verl-registry")
    try:
        args.config = verl_config(args.overrides)
    except ImportError as err:
        raise ValueError(f"audit-loss needs verl installed ({err})") from None
    except TypeError as err:  # verl's config classes refusing a value
        raise ValueError(f"config override refused by verl: {err}") from None
    args.fn = None if args.verl_registry else load_target(args.target)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "config", None) is None:  # called without cli.main, which runs check_args first
        check_args(args)
    kwargs = dict(seed=args.seed, max_examples=args.max_examples, loss_agg_modes=tuple(args.modes or AGG_MODES), config=args.config)
    if args.verl_registry:
        reports = audit_verl_registry(**kwargs)
    else:
        reports = {args.target: audit_loss(args.fn, name=args.target, **kwargs)}
    print("\n\n".join(str(report) for report in reports.values()))
    if args.json:
        data = {name: report.to_json() for name, report in reports.items()}
        _write(args.json, json.dumps(data if args.verl_registry else data[args.target], indent=2, ensure_ascii=False, default=str) + "\n")
    if args.markdown:
        flags = "" if (args.seed, args.max_examples, args.modes, args.overrides) == (0, 12, None, []) else " (non-default options)"
        _write(args.markdown, registry_markdown(reports, command=f"fiberpo-theory audit-loss --verl-registry --markdown {args.markdown}{flags}"))
    return 0 if all(report.passed for report in reports.values()) else 1


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
