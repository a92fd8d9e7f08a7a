"""Audit a third-party FiberPO-style gating map, like ``torch.autograd.gradcheck`` for the paper's properties.

The map under audit has the verl/TRL signature ``fn(log_ratio[B, L], mask[B, L]) -> gated_ratio[B, L]``:
rows are trajectories, ``mask`` is 0/1 in the dtype of ``log_ratio`` (1 = response token), padded
positions of the output are ignored.  Seven properties, each ``holds`` or ``fails`` with a
concrete witness:

``on-policy-identity``  G(1) = 1 on every response token.
``first-order-exact``   the Jacobian at exactly r = 1 is the identity (where every PPO-style epoch takes
                        its first step; ``torch.sign`` implementations break it).
``first-order-near``    near r = 1 (no log-ratio exactly 0) the Jacobian stays within 10·h of the identity
                        for 0 < |log r| <= h.
``block-diagonal``      no output of one row depends on another row (Property 5.3).
``finite-extremes``     ±50 log-ratios and 4096-token rows give finite outputs and gradients.
``matches-reference``   agreement with :func:`fiberpo_theory.core.objectives.fiberpo_gated_ratio` at the given
                        ε, C⁺, C⁻ (largest deviation and where).
``restorative-gradient`` some uniform drift beyond the budget C⁺ (resp. C⁻) where d G/d(drift) opposes
                        the drift, in both directions (the rollback regime of Eq. 10).

Use in a test suite::

    report = audit(my_gating_fn, eps=0.04, c_pos=0.12, c_neg=0.05)
    assert report.passed, report
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..core import _validate
from ..core._threads import single_thread
from ..core.layout import flatten_mask, to_padded
from ..core.objectives import fiberpo_gated_ratio

PROPERTY_IDS = (
    "on-policy-identity",
    "first-order-exact",
    "first-order-near",
    "block-diagonal",
    "finite-extremes",
    "matches-reference",
    "restorative-gradient",
)
NEAR_CONSTANT = 10.0  # first-order-near: ‖J − I‖_max <= NEAR_CONSTANT · h for |log r| <= h


@dataclass
class PropertyResult:
    id: str
    verdict: str  # "holds", "fails", or "error" (the property could not be checked; the witness says why)
    witness: dict[str, Any] | None
    details: str

    @property
    def passed(self) -> bool:
        return self.verdict == "holds"


@dataclass
class AuditReport:
    """Verdicts of the audited properties; ``passed`` is True only when all hold.

    ``reference`` holds the settings the properties were checked against (for a gating map: the reference
    FiberPO's ``eps``, ``c_pos``, ``c_neg``); ``kind`` names the audit in the printed report.
    """

    function: str
    reference: dict[str, Any]
    seed: int
    properties: list[PropertyResult] = field(default_factory=list)
    kind: str = "FiberPO audit"

    @property
    def eps(self) -> float:
        return self.reference["eps"]

    @property
    def c_pos(self) -> float:
        return self.reference["c_pos"]

    @property
    def c_neg(self) -> float:
        return self.reference["c_neg"]

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.properties)

    @property
    def failures(self) -> list[PropertyResult]:
        return [p for p in self.properties if not p.passed]

    def __bool__(self) -> bool:
        return self.passed

    def __getitem__(self, property_id: str) -> PropertyResult:
        for result in self.properties:
            if result.id == property_id:
                return result
        raise KeyError(property_id)

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise AssertionError(str(self))

    def to_json(self) -> dict[str, Any]:
        return {
            "function": self.function,
            "reference": _strict_json(self.reference),
            "seed": self.seed,
            "passed": self.passed,
            "properties": [_strict_json(asdict(p)) for p in self.properties],
        }

    def __str__(self) -> str:
        against = ", ".join(f"{key}={value}" for key, value in self.reference.items())
        head = (
            f"{self.kind} of {self.function} against {against} "
            f"(seed {self.seed}): {'PASSED' if self.passed else 'FAILED'} "
            f"({sum(p.passed for p in self.properties)}/{len(self.properties)} properties hold)"
        )
        lines = [head]
        for p in self.properties:
            lines.append(f"  [{'holds' if p.passed else p.verdict.upper()}] {p.id}: {p.details}")
            if not p.passed and p.witness is not None:
                lines.append(f"      witness: {json.dumps(p.witness, default=str)[:600]}")
        return "\n".join(lines)


def _strict_json(value):
    """NaN/inf witnesses as the strings "nan"/"inf" so the JSON file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    return value


class _BadOutput(Exception):
    """The audited function returned something that is not a (B, L) float tensor."""


# ---------------------------------------------------------------------------
# Inputs and calls
# ---------------------------------------------------------------------------


def _random_mask(gen: torch.Generator, rows: int, length: int, dtype) -> torch.Tensor:
    """A verl-style response mask: each row a non-empty prefix of 1s."""
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    return (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).to(dtype)


def _random_batch(gen, dtype, scale: float, *, rows=(1, 4), length=(1, 12), zeros=True):
    """Random log-ratios at ``scale`` with repeated values and (unless ``zeros=False``) exact zeros mixed in."""
    b = int(torch.randint(rows[0], rows[1] + 1, (1,), generator=gen))
    n = int(torch.randint(length[0], length[1] + 1, (1,), generator=gen))
    x = (2 * torch.rand(b, n, generator=gen, dtype=dtype) - 1) * scale
    if zeros:
        x[torch.rand(b, n, generator=gen) < 0.15] = 0.0  # exactly on-policy tokens
    repeat = torch.rand(b, n, generator=gen) < 0.15
    x[repeat] = x[0, 0]  # repeated values
    return x, _random_mask(gen, b, n, dtype)


def _call(fn, x, mask) -> torch.Tensor:
    out = fn(x, mask)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape or not out.is_floating_point():
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _BadOutput(f"expected a float tensor of shape {tuple(x.shape)}, got {shape}")
    return out


def _jacobian(fn, x, mask) -> torch.Tensor:
    """∂ out[b, t] / ∂ x[b', t'] as a (B, L, B, L) tensor (vmap first, a plain loop if vmap cannot run)."""
    func = lambda t: _call(fn, t, mask)  # noqa: E731
    try:
        return torch.autograd.functional.jacobian(func, x, vectorize=True)
    except _BadOutput:
        raise
    except Exception:
        return torch.autograd.functional.jacobian(func, x)


def _deviation(t: torch.Tensor) -> torch.Tensor:
    """|t| with NaN and ±inf turned into +inf, so a non-finite output is the worst deviation, never a match."""
    return torch.where(torch.isfinite(t), t.abs(), torch.full_like(t, math.inf))


def _size(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "inf (a NaN or infinite value)"


def _tolerance(out: torch.Tensor) -> float:
    return 1e-10 if out.dtype == torch.float64 else 1e-5


def _position(index: int, shape) -> list[int]:
    return list(torch.unravel_index(torch.tensor(index), shape))


def _masked_identity_gap(jac: torch.Tensor, mask: torch.Tensor):
    """(J − I) restricted to response tokens, flattened to (N, N), with the (b, t) of each index."""
    keep = mask.bool().reshape(-1)
    n = keep.numel()
    flat = jac.reshape(n, n)[keep][:, keep]
    where = keep.nonzero().squeeze(1)
    return flat - torch.eye(flat.shape[0], dtype=flat.dtype), where


def _describe_entry(where, mask_shape, i, j, value, expected) -> dict[str, Any]:
    out_pos, in_pos = _position(int(where[i]), mask_shape), _position(int(where[j]), mask_shape)
    return {"output": [int(v) for v in out_pos], "input": [int(v) for v in in_pos],
            "dG/dlog_r": value, "expected": expected}


# ---------------------------------------------------------------------------
# The seven properties
# ---------------------------------------------------------------------------


def _on_policy_identity(fn, gen, dtype, n, hyper):
    worst = (0.0, None)
    for _ in range(n):
        x, mask = _random_batch(gen, dtype, 0.0)
        out = _call(fn, x, mask).detach()
        gap = torch.where(mask.bool(), _deviation(out - 1), torch.zeros_like(out))
        if worst[1] is None or float(gap.max()) > worst[0]:
            b, t = _position(int(gap.argmax()), gap.shape)
            worst = (float(gap.max()), {"shape": list(x.shape), "row_lengths": mask.sum(1).int().tolist(), "position": [int(b), int(t)], "gated_ratio": float(out[b, t])})
    if worst[0] > _tolerance(out):
        return PropertyResult("on-policy-identity", "fails", worst[1], f"G(1) deviates from 1 by {_size(worst[0])}")
    return PropertyResult("on-policy-identity", "holds", None, f"G(1) = 1 on {n} padded batches (max |G - 1| = {worst[0]:.1e})")


def _first_order_exact(fn, gen, dtype, n, hyper):
    worst = (0.0, None)
    for _ in range(n):
        x, mask = _random_batch(gen, dtype, 0.0)
        gap, where = _masked_identity_gap(_jacobian(fn, x, mask), mask)
        value = float(_deviation(gap).max())
        if worst[1] is None or value > worst[0]:
            i, j = divmod(int(_deviation(gap).argmax()), gap.shape[1])
            worst = (value, {"shape": list(x.shape), "row_lengths": mask.sum(1).int().tolist(), **_describe_entry(where, mask.shape, i, j, float(gap[i, j]) + float(i == j), float(i == j))})
    if worst[0] > _tolerance(x):
        return PropertyResult("first-order-exact", "fails", worst[1], f"Jacobian at r = 1 is not the identity: max |J - I| = {_size(worst[0])}")
    return PropertyResult("first-order-exact", "holds", None, f"Jacobian at exactly r = 1 is the identity on {n} batches (max |J - I| = {worst[0]:.1e})")


def _first_order_near(fn, gen, dtype, n, hyper):
    budget = min(hyper.values())
    steps = [budget / 20 * 10.0**-k for k in range(3)]
    worst = (0.0, None)
    for _ in range(n):
        # no exact zeros here: r = 1 exactly is first-order-exact's job; this one asks about the neighbourhood
        x, mask = _random_batch(gen, dtype, 1.0, zeros=False)
        x = torch.where(x == 0, torch.full_like(x, 0.5), x)
        for h in steps:
            gap, where = _masked_identity_gap(_jacobian(fn, x * h, mask), mask)
            ratio = float(_deviation(gap).max()) / h
            if worst[1] is None or ratio > worst[0]:
                i, j = divmod(int(_deviation(gap).argmax()), gap.shape[1])
                worst = (ratio, {"h": h, "log_ratio": (x * h)[mask.bool()].tolist()[:16], "row_lengths": mask.sum(1).int().tolist(), **_describe_entry(where, mask.shape, i, j, float(gap[i, j]) + float(i == j), float(i == j))})
    text = f"max ‖J - I‖/h = {_size(worst[0])} over |log r| <= h, h in {[f'{h:.1e}' for h in steps]}"
    if worst[0] > NEAR_CONSTANT:
        return PropertyResult("first-order-near", "fails", worst[1], f"Jacobian strays from I near r = 1: {text} (> {NEAR_CONSTANT:g})")
    return PropertyResult("first-order-near", "holds", None, f"{text} on {n} batches")


def _block_diagonal(fn, gen, dtype, n, hyper):
    budget = max(hyper.values())
    worst = (0.0, None)
    for k in range(n):
        x, mask = _random_batch(gen, dtype, budget * (0.5, 1.5, 4.0)[k % 3], rows=(2, 4))
        jac = _jacobian(fn, x, mask)
        rows = x.shape[0]
        other_row = torch.arange(rows).view(rows, 1, 1, 1) != torch.arange(rows).view(1, 1, rows, 1)
        both = mask.bool().view(*mask.shape, 1, 1) & mask.bool().view(1, 1, *mask.shape)
        cross = torch.where(other_row & both, _deviation(jac), torch.zeros_like(jac))
        # value level too: moving row 0 must leave every other row bit-identical
        moved = x.clone()
        moved[0] += 0.37 * budget
        change = _deviation((_call(fn, moved, mask) - _call(fn, x, mask)).detach())
        change = torch.where(mask.bool(), change, torch.zeros_like(change))
        change[0] = 0
        for kind, tensor in (("jacobian", cross), ("value", change)):
            if float(tensor.max()) > worst[0]:
                pos = [int(v) for v in _position(int(tensor.argmax()), tensor.shape)]
                worst = (float(tensor.max()), {"kind": kind, "position": pos, "magnitude": float(tensor.max()), "log_ratio": x.tolist(), "mask": mask.tolist()})
    if worst[0] > _tolerance(x):
        w = worst[1]
        where = f"dG{w['position'][:2]}/dlog_r{w['position'][2:]}" if w["kind"] == "jacobian" else f"G{w['position']} moved when row 0 moved"
        return PropertyResult("block-diagonal", "fails", w, f"{'rows are coupled' if math.isfinite(worst[0]) else 'non-finite output or Jacobian'}: {where}, magnitude {_size(worst[0])}")
    return PropertyResult("block-diagonal", "holds", None, f"no cross-row Jacobian entry or value change on {n} batches of 2-4 rows")


def _extreme_cases(dtype):
    gen = torch.Generator().manual_seed(50)
    long = (torch.randint(0, 2, (2, 4096), generator=gen).to(dtype) * 2 - 1) * 50
    long[1, ::3] = 1e-3
    single = torch.zeros(3, 5, dtype=dtype)
    single[:, 0] = torch.tensor([50.0, -50.0, 0.0], dtype=dtype)
    single_mask = torch.zeros(3, 5, dtype=dtype)
    single_mask[:, 0] = 1
    return {
        "all +50": (torch.full((2, 8), 50.0, dtype=dtype), torch.ones(2, 8, dtype=dtype)),
        "all -50": (torch.full((2, 8), -50.0, dtype=dtype), torch.ones(2, 8, dtype=dtype)),
        "alternating ±50": ((torch.arange(16).view(2, 8) % 2 * 2 - 1).to(dtype) * 50, torch.ones(2, 8, dtype=dtype)),
        "4096-token rows of ±50 and 1e-3": (long, torch.ones(2, 4096, dtype=dtype)),
        "single-token rows of ±50, 0": (single, single_mask),
    }


def _finite_extremes(fn, gen, dtype, n, hyper):
    for name, (x, mask) in _extreme_cases(dtype).items():
        leaf = x.clone().requires_grad_(True)
        out = _call(fn, leaf, mask)
        bad = ~torch.isfinite(out) & mask.bool()
        if bool(bad.any()):
            b, t = [int(v) for v in bad.nonzero()[0]]
            return PropertyResult("finite-extremes", "fails", {"case": name, "output": [b, t], "value": str(float(out[b, t].detach()))}, f"non-finite output on '{name}'")
        if out.requires_grad:
            (grad,) = torch.autograd.grad((out * mask).sum(), leaf, allow_unused=True)
            if grad is not None and not bool(torch.isfinite(grad).all()):
                b, t = [int(v) for v in (~torch.isfinite(grad)).nonzero()[0]]
                return PropertyResult("finite-extremes", "fails", {"case": name, "input": [b, t], "gradient": str(float(grad[b, t]))}, f"non-finite gradient on '{name}'")
    return PropertyResult("finite-extremes", "holds", None, f"finite outputs and gradients on {len(_extreme_cases(dtype))} extreme cases (±50, 4096-token rows, single tokens)")


def _reference(x, mask, hyper):
    batch = flatten_mask(mask)
    flat = fiberpo_gated_ratio(x[batch.mask], batch.traj_id, **hyper)
    return to_padded(flat, batch, fill=1.0)


def _matches_reference(fn, gen, dtype, n, hyper):
    budget = max(hyper.values())
    scales = {"near r = 1": min(hyper.values()) / 4, "around the budgets": 2 * budget, "far off-policy": 10 * budget}
    worst = (0.0, None)
    for k in range(n):
        scale_name = list(scales)[k % 3]
        x, mask = _random_batch(gen, dtype, scales[scale_name])
        out = _call(fn, x, mask).detach()
        ref = _reference(x, mask, hyper)
        gap = torch.where(mask.bool(), _deviation(out - ref) / ref.abs().clamp(min=1.0), torch.zeros_like(out))
        if worst[1] is None or float(gap.max()) > worst[0]:
            b, t = [int(v) for v in _position(int(gap.argmax()), gap.shape)]
            worst = (float(gap.max()), {"inputs": scale_name, "position": [b, t], "value": float(out[b, t]), "reference": float(ref[b, t]),
                                        "row_log_ratio": x[b][mask[b].bool()].tolist()[:32], "row_length": int(mask[b].sum())})
    if worst[0] > _tolerance(out) * 10:
        w = worst[1]
        return PropertyResult("matches-reference", "fails", w, f"max relative deviation {_size(worst[0])} at row {w['position'][0]}, token {w['position'][1]} ({w['inputs']}): {w['value']:.6g} vs reference {w['reference']:.6g}")
    return PropertyResult("matches-reference", "holds", None, f"max relative deviation from fiberpo_gated_ratio {worst[0]:.1e} on {n} batches (near r = 1, around and far beyond the budgets)")


def _drift_derivative(fn, length, direction, t, dtype) -> tuple[float, float]:
    """d/dt Σ_row G(t · direction · 1) for one row of ``length`` tokens (plus two padded slots)."""
    mask = torch.zeros(1, length + 2, dtype=dtype)
    mask[0, :length] = 1
    scale = torch.tensor(t, dtype=dtype, requires_grad=True)
    x = scale * direction * mask
    out = _call(fn, x, mask)
    total = (out * mask).sum()
    if not total.requires_grad:
        return float(total) / length, 0.0
    (grad,) = torch.autograd.grad(total, scale)
    return float(total.detach()) / length, float(grad)


def _restorative_gradient(fn, gen, dtype, n, hyper):
    found, tried = {}, {}
    for direction, budget, name in ((1.0, hyper["c_pos"], "positive"), (-1.0, hyper["c_neg"], "negative")):
        tried[name] = []
        for length in (1, 2, 5, 16, 64):
            # inside g_agg's rollback window (width C/T) first, then well beyond it
            for t in [budget * (1 + j / (4 * length)) for j in (1, 2, 3)] + [budget * f for f in (1.5, 2.0, 4.0)]:
                mean_g, slope = _drift_derivative(fn, length, direction, t, dtype)
                if not (math.isfinite(mean_g) and math.isfinite(slope)):
                    witness = {"drift": f"{'+' if direction > 0 else '-'}{t:.6g} on every token", "row_length": length, "mean_gated_ratio": mean_g, "dG/dt": slope}
                    return PropertyResult("restorative-gradient", "fails", witness, f"non-finite gated ratio or gradient under a {name} drift of {t:.3g}")
                tried[name].append(slope)
                if slope * direction < -1e-12:  # G moves against the drift: restoring
                    found[name] = {"drift": f"{'+' if direction > 0 else '-'}{t:.6g} on every token", "row_length": length, "mean_gated_ratio": mean_g, "dG/dt": slope}
                    break
            if name in found:
                break
    if len(found) == 2:
        return PropertyResult("restorative-gradient", "holds", found, "a drift beyond C⁺ and one beyond C⁻ each get a gradient that pushes the ratio back")
    missing = [name for name in ("positive", "negative") if name not in found]
    witness = {name: {"largest_dG/dt_along_drift": max(s * d for s in tried[name]) if tried[name] else None} for name, d in (("positive", 1.0), ("negative", -1.0)) if name in missing}
    return PropertyResult("restorative-gradient", "fails", {**witness, "found": found}, f"no restoring derivative for {' or '.join(missing)} drift beyond the budget (gradient is zero or pushes further)")


_PROPERTIES: dict[str, Callable] = {
    "on-policy-identity": _on_policy_identity,
    "first-order-exact": _first_order_exact,
    "first-order-near": _first_order_near,
    "block-diagonal": _block_diagonal,
    "finite-extremes": _finite_extremes,
    "matches-reference": _matches_reference,
    "restorative-gradient": _restorative_gradient,
}


def audit(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    eps: float,
    c_pos: float,
    c_neg: float,
    seed: int = 0,
    max_examples: int = 30,
    dtype: torch.dtype = torch.float64,
) -> AuditReport:
    """Check ``fn(log_ratio[B, L], mask[B, L]) -> gated_ratio[B, L]`` for the seven properties.

    ``eps``, ``c_pos``, ``c_neg`` define the reference FiberPO it is compared with and the budgets
    beyond which a restoring gradient is looked for.  ``max_examples`` random batches per property,
    drawn from ``seed``.  An exception raised by ``fn`` fails the property it occurred in.
    """
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    hyper = {"eps": _validate.positive("eps", eps), "c_pos": _validate.positive("c_pos", c_pos), "c_neg": _validate.positive("c_neg", c_neg)}
    max_examples = _validate.positive_int("max_examples", max_examples)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    report = AuditReport(getattr(fn, "__qualname__", repr(fn)), dict(hyper), seed)
    with single_thread():
        _run_properties(fn, hyper, seed, max_examples, dtype, report)
    return report


def _run_properties(fn, hyper, seed, max_examples, dtype, report) -> None:
    for offset, (property_id, check) in enumerate(_PROPERTIES.items()):
        gen = torch.Generator().manual_seed(seed * 1000 + offset)
        count = max_examples if property_id not in ("first-order-exact", "first-order-near", "block-diagonal") else max(3, max_examples // 3)
        try:
            result = check(fn, gen, dtype, count, hyper)
        except Exception as err:  # the audited code failed on a valid input: that is a finding
            result = PropertyResult(property_id, "fails", {"error": f"{type(err).__name__}: {err}"}, f"fn raised {type(err).__name__}: {err}")
        report.properties.append(result)


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def load_target(target: str) -> Callable:
    """Import ``MODULE:FUNCTION`` (the current directory is importable)."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"target must look like MODULE:FUNCTION, got {target!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # a syntax error or a failing import inside the target is the user's input, not ours
        raise ValueError(f"cannot import {module_name!r}: {type(err).__name__}: {err}") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"{target!r}: {getattr(fn, '__name__', module_name)!r} has no attribute {part!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"target {target!r} is not callable")
    return fn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli_types import nonnegative_int, output_file, positive_float, positive_int

    parser.add_argument("target", metavar="MODULE:FUNCTION", help="fn(log_ratio[B, L], mask[B, L]) -> gated_ratio[B, L]")
    parser.add_argument("--json", type=output_file, metavar="PATH", help="also write the report as JSON to PATH")
    parser.add_argument("--eps", type=positive_float, default=0.04, help="reference fiber clip ε (default: %(default)s)")
    parser.add_argument("--c-pos", type=positive_float, default=0.12, help="reference budget C⁺ (default: %(default)s)")
    parser.add_argument("--c-neg", type=positive_float, default=0.05, help="reference budget C⁻ (default: %(default)s)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random batches, >= 0 (default: %(default)s)")
    parser.add_argument("--max-examples", type=positive_int, default=30, help="random batches per property (default: %(default)s)")


def check_args(args: argparse.Namespace) -> None:
    """The target must import and be callable; a ValueError here is a bad argument (exit 2, see :mod:`.cli`)."""
    args.fn = load_target(args.target)


def run(args: argparse.Namespace) -> int:
    fn = args.fn if getattr(args, "fn", None) is not None else load_target(args.target)
    report = audit(fn, eps=args.eps, c_pos=args.c_pos, c_neg=args.c_neg, seed=args.seed, max_examples=args.max_examples)
    report.function = args.target
    print(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False, default=str) + "\n")
    return 0 if report.passed else 1
