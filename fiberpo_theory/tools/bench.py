"""``fiberpo-theory bench``: forward+backward time and memory of every objective against the losses users run.

Every case is one step from a fresh leaf to gradients: the scalar loss
``-Σ μ_i G(r)_i Â_i`` (Eq. 2) of the method, including whatever id
indexing, flattening and validation that method's path does.  The same
tokens are laid out three ways:

* ``padded``: ``(B, L)`` log-probs with a response mask, rows are
  trajectories (what verl and TRL hand to a loss);
* ``sorted``: flat tokens with sorted trajectory ids (packed batches);
* ``shuffled``: the same flat tokens in a random order (arbitrary ids).

Baselines: the bare elementwise clip ``clamp(exp(x), 1±ε)·Â`` summed (no
ids, no weights); the package's GRPO objective on flat ids; the package's
GRPO registry loss on the padded batch; and, when verl is installed, verl's
own ``compute_policy_loss_vanilla`` with ``agg_loss`` in
``seq-mean-token-mean`` mode (dual-clip PPO plus its clip-fraction and KL
metrics) on the padded batch.  Ratios are measured in one run with the
repeats of all cases interleaved, so load bursts hit every case alike.
Memory is the bytes autograd saves for backward (any device) and, on CUDA,
the peak allocated during the step.  Throughput is tokens/s and a floor on
the fraction of the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..core import native as _native
from ..core import objectives as obj
from .cli_types import positive_int, torch_device
from ..hierarchy.fgh import fiberpo_hierarchy_gated_ratio
from ..core.losses import POLICY_LOSSES
from ..core.layout import flatten_mask, to_flat, to_flat_difference, trajectory_segments
from ..core.segments import Segments, segments_for

EPS, C_POS, C_NEG, DELTA = 0.2, 0.12, 0.05, 0.1
FIBER = dict(eps=EPS, c_pos=C_POS, c_neg=C_NEG)

# The speed goals: (case, baseline case, largest ratio).  Padded FiberPO is held to verl's own loss both
# as the bare fused path and as the registry loss users plug in (which also computes metrics).
GOALS = (
    ("fiberpo/padded", "verl/padded", 2.0),
    ("fiberpo_loss/padded", "verl/padded", 2.0),
    ("fiberpo_domain/padded", "verl/padded", 2.5),
    ("fiberpo/sorted", "clip/sorted", 3.0),
    ("fiberpo/shuffled", "clip/sorted", 5.0),
    ("apc_obj/shuffled", "clip/sorted", 3.0),
    ("fgh_4level/sorted", "fiberpo_domain/sorted", 1.5),
)
STRETCH = ("fiberpo_objective/sorted", "clip/sorted", 1.5)  # FiberPO's objective as the package computes it fastest
COMPOSED_STRETCH = ("fiberpo/sorted", "clip/sorted", 1.5)  # the gate, μ and Eq. 2 as three calls: printed beside it
# the sorted goal again with the ids indexed once per batch: printed beside the goal, not counted as meeting it
INDEXED = ("fiberpo/indexed", "clip/sorted", 3.0)
MEMORY_GOAL = ("fiberpo/padded", "verl/padded", 2.0)
SCALING_CASES = ("clip/sorted", "verl/padded", "fiberpo_loss/padded", "fiberpo/padded", "fiberpo/sorted",
                 "fiberpo_objective/sorted", "fiberpo_domain/sorted")
SCALING_TOLERANCE = 0.2  # cost per token within ±20% of its value at the main table's size
FLATNESS_CASES = ("fiberpo/sorted", "fiberpo_objective/sorted", "fiberpo/padded", "fiberpo_loss/padded")


def verl_loss():
    """verl's ``compute_policy_loss_vanilla`` (with ``agg_loss``) and an actor config, or ``None`` without verl."""
    try:
        from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla
        from verl.workers.config.actor import ActorConfig
    except Exception:  # verl is optional; any import failure means "not available"
        return None
    config = ActorConfig(strategy="fsdp", clip_ratio=EPS, ppo_micro_batch_size_per_gpu=1, use_dynamic_bsz=False,
                         rollout_n=1)
    return compute_policy_loss_vanilla, config


@dataclass
class Batch:
    """The same tokens in the flat sorted, flat shuffled and padded layouts (ids per token or per row)."""

    log_ratio: torch.Tensor  # (N,) sorted layout
    advantages: torch.Tensor
    traj_id: torch.Tensor  # sorted trajectory ids
    group_id: torch.Tensor
    domain_id: torch.Tensor
    state_id: torch.Tensor
    lengths: torch.Tensor  # (B,)
    perm: torch.Tensor  # (N,) the shuffled layout is log_ratio[perm]
    names: torch.Tensor  # (B,) arbitrary trajectory names used by the shuffled layout
    padded_log_prob: torch.Tensor  # (B, L); old log-probs are zero, so log_prob - old = log_ratio
    padded_old: torch.Tensor
    padded_advantages: torch.Tensor
    mask: torch.Tensor  # (B, L) bool


def make_batch(n_tokens: int, n_traj: int, *, seed: int = 0, device="cpu", dtype=torch.float32) -> Batch:
    """Ragged trajectories (lengths vary ×4), 8 per prompt group, 4 domains, random state ids."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(n_traj, generator=gen) * 3 + 1
    lengths = torch.clamp((weights / weights.sum() * n_tokens).round().long(), min=1)
    lengths[-1] += n_tokens - int(lengths.sum())
    traj = torch.repeat_interleave(torch.arange(n_traj), lengths)
    rows = torch.arange(n_traj)
    group = torch.repeat_interleave(rows // 8 * 3 + 5, lengths)
    domain = torch.repeat_interleave(rows // 8 % 4 + 100, lengths)
    log_ratio = torch.randn(n_tokens, generator=gen) * 0.05
    advantages = torch.repeat_interleave(torch.randn(n_traj, generator=gen), lengths)
    state = torch.randint(0, max(n_tokens // 4, 1), (n_tokens,), generator=gen)
    perm = torch.randperm(n_tokens, generator=gen)
    names = torch.randperm(n_traj * 10, generator=gen)[:n_traj]
    mask = torch.arange(int(lengths.max())).unsqueeze(0) < lengths.unsqueeze(1)
    padded = torch.zeros(mask.shape).masked_scatter(mask, log_ratio)
    padded_adv = torch.zeros(mask.shape).masked_scatter(mask, advantages)
    to = dict(device=device)
    fl = dict(device=device, dtype=dtype)
    return Batch(
        log_ratio.to(**fl), advantages.to(**fl), traj.to(**to), group.to(**to), domain.to(**to), state.to(**to),
        lengths.to(**to), perm.to(**to), names.to(**to), padded.to(**fl), torch.zeros(mask.shape, **fl),
        padded_adv.to(**fl), mask.to(**to),
    )


@dataclass
class Case:
    """One timed step: ``loss(leaf)`` from a fresh leaf copied from ``start``."""

    name: str  # "method/layout"
    includes: str
    start: torch.Tensor
    loss: Callable[[torch.Tensor], torch.Tensor]

    @property
    def method(self) -> str:
        return self.name.split("/")[0]


def _objective(method, gated, advantages, traj):
    return -obj.rgf_objective(gated, advantages, obj.aggregation_weights(method, gated, traj))


def _padded_cases(b: Batch) -> list[Case]:
    mask, old, adv = b.mask, b.padded_old, b.padded_advantages
    row_group, row_domain = b.group_id[b.lengths.cumsum(0) - 1], b.domain_id[b.lengths.cumsum(0) - 1]

    def flat(lp):  # what the registry losses do: token positions, no boolean indexing; rows are trajectories
        batch = flatten_mask(mask)
        return to_flat_difference(lp, old, batch), to_flat(adv, batch), trajectory_segments(batch)

    def fiberpo(lp):
        x, a, traj = flat(lp)
        return _objective("fiberpo", obj.fiberpo_gated_ratio(x, traj, **FIBER), a, traj)

    def fiberpo_domain(lp):
        x, a, traj = flat(lp)
        group, domain = row_group.index_select(0, traj.index), row_domain.index_select(0, traj.index)
        return _objective("fiberpo_domain", obj.fiberpo_domain_gated_ratio(x, traj, group, domain, **FIBER), a, traj)

    def registry(name, **extra):
        return lambda lp: POLICY_LOSSES[name](old, lp, adv, mask, "seq-mean-token-mean", **extra)[0]

    cases = [
        Case("grpo_loss/padded", "package registry GRPO: validation, flattening, metrics", b.padded_log_prob,
             registry("grpo", eps=EPS)),
        Case("fiberpo/padded", "flatten_mask, to_flat_difference(lp, old), row Segments by length, fused gate, μ, Eq. 2", b.padded_log_prob,
             fiberpo),
        Case("fiberpo_domain/padded", "as fiberpo/padded plus row group/domain ids per token", b.padded_log_prob,
             fiberpo_domain),
        Case("fiberpo_loss/padded", "package registry FiberPO: Eq. 2 and the metrics' counts in the fused gate's pass",
             b.padded_log_prob, registry("fiberpo", **FIBER)),
    ]
    verl = verl_loss()
    if verl is not None:
        vanilla, config = verl
        mask_float = mask.to(old.dtype)
        cases.insert(0, Case("verl/padded", "verl compute_policy_loss_vanilla + agg_loss seq-mean-token-mean",
                             b.padded_log_prob,
                             lambda lp: vanilla(old, lp, adv, mask_float, "seq-mean-token-mean", config)[0]))
    return cases


def _flat_cases(b: Batch) -> list[Case]:
    x, adv = b.log_ratio, b.advantages
    sx, sadv, straj = x[b.perm], adv[b.perm], b.names[b.traj_id][b.perm]
    sgroup, sdomain = b.group_id[b.perm], b.domain_id[b.perm]
    traj_once = Segments.from_ids(b.traj_id)  # what a PPO epoch loop reuses across its steps over one batch
    levels_once = obj.domain_levels(b.traj_id, b.group_id, b.domain_id, like=x)

    def clip(z):
        return -(torch.clamp(torch.exp(z), 1 - EPS, 1 + EPS) * adv).sum()

    return [
        Case("clip/sorted", "clamp(exp(x), 1±ε)·Â summed: no ids, no weights", x, clip),
        Case("grpo/sorted", "package GRPO objective: trajectory ids indexed for μ", x,
             lambda z: _objective("grpo", obj.grpo_gated_ratio(torch.exp(z), eps=EPS), adv, b.traj_id)),
        Case("ppo/sorted", "package PPO objective, token-mean", x,
             lambda z: _objective("ppo", obj.ppo_gated_ratio(torch.exp(z), eps=EPS), adv, None)),
        Case("gspo/sorted", "package GSPO objective", x,
             lambda z: _objective("gspo", obj.gspo_gated_ratio(z, b.traj_id, eps=0.04), adv, b.traj_id)),
        Case("fiberpo/sorted", "ids checked, sorted detected, fused gate, μ", x,
             lambda z: _fiber_objective(z, b.traj_id, adv)),
        Case("fiberpo_objective/sorted", "ids checked, sorted detected, Eq. 2 in the gate's pass (fiberpo_objective)",
             x, lambda z: -obj.fiberpo_objective(z, b.traj_id, adv, **FIBER)),
        Case("fiberpo/shuffled", "arbitrary ids ranked, fused gate, μ", sx, lambda z: _fiber_objective(z, straj, sadv)),
        Case("fiberpo/indexed", "sorted ids indexed once per batch (not timed), fused gate, μ", x,
             lambda z: _fiber_objective(z, traj_once, adv)),
        Case("fiberpo_domain/sorted", "fused gate, group/domain carried per trajectory", x,
             lambda z: _domain_objective(z, b.traj_id, b.group_id, b.domain_id, adv)),
        Case("fiberpo_domain/indexed", "trajectory, group and domain levels indexed once per batch (not timed), "
             "fused gate, μ", x,
             lambda z: _objective("fiberpo_domain", obj.fiberpo_domain_gated_ratio(z, levels_once, None, None, **FIBER),
                                  adv, levels_once.traj)),
        Case("fiberpo_domain/shuffled", "as fiberpo_domain/sorted on shuffled tokens", sx,
             lambda z: _domain_objective(z, straj, sgroup, sdomain, sadv)),
        Case("apc_obj/shuffled", "random state ids (T/4 states), token-mean", x,
             lambda z: _objective("apc_obj", obj.apc_obj_gated_ratio(torch.exp(z), b.state_id, delta=DELTA), adv, None)),
        Case("fgh_4level/sorted", "FiberPO on a domain→group→trajectory→token hierarchy: fused token gate around the FGH operator", x,
             lambda z: _hierarchy_objective(z, b.traj_id, b.group_id, b.domain_id, adv)),
    ]


def _fiber_objective(x, traj_id, adv):
    traj = segments_for("traj_id", traj_id, x)  # indexed once, reused for μ
    return _objective("fiberpo", obj.fiberpo_gated_ratio(x, traj, **FIBER), adv, traj)


def _domain_objective(x, traj_id, group_id, domain_id, adv):
    traj = segments_for("traj_id", traj_id, x)
    return _objective("fiberpo_domain", obj.fiberpo_domain_gated_ratio(x, traj, group_id, domain_id, **FIBER),
                      adv, traj)


def _hierarchy_objective(x, traj_id, group_id, domain_id, adv):
    traj = segments_for("traj_id", traj_id, x)  # indexed once, for the hierarchy and μ, as in the closed form
    gated = fiberpo_hierarchy_gated_ratio(x, [domain_id, group_id, traj], **FIBER)
    return _objective("fiberpo_domain", gated, adv, traj)


def all_cases(b: Batch) -> list[Case]:
    return _flat_cases(b) + _padded_cases(b)


def method_names() -> list[str]:
    """Every method a case can be selected by (``--methods``)."""
    return ["clip", "grpo", "ppo", "gspo", "apc_obj", "fiberpo", "fiberpo_objective", "fiberpo_domain", "fgh_4level",
            "grpo_loss", "fiberpo_loss", "verl"]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


try:
    import resource
except ImportError:  # not on POSIX: no fault counts
    resource = None


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where the OS does not say): the pages the kernel had to
    map, and zero, for memory the allocator took from it (again)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory instead of handing it back to the OS; ``False`` elsewhere.

    By default glibc serves large blocks by fresh mappings and trims the
    top of its heap on free, so the next step's buffers fault their pages
    in anew: a cost per token that depends on the sizes the process freed
    before (its thresholds adapt), not on the code being timed.  With no
    mappings and no trimming every step reuses the heap's pages, as a
    caching allocator (CUDA's) reuses its blocks.  For the rest of the
    process: there is no way back to glibc's adaptive thresholds.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def _step(case: Case, saved: list[int], faults: list[int] | None = None) -> float:
    """One forward+backward from a fresh leaf; adds the bytes autograd saves to ``saved`` and the minor page
    faults of the step to ``faults``; returns seconds."""
    device = case.start.device

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    leaf = case.start.detach().clone().requires_grad_(True)
    _sync(device)
    before = _minor_faults()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = case.loss(leaf)
    loss.backward()
    _sync(device)
    seconds = time.perf_counter() - start
    if faults is not None:
        faults.append(_minor_faults() - before)
    return seconds


def measure_all(cases: list[Case], repeats: int, *,
                own_predecessor: bool = False) -> dict[str, tuple[float, int, int, float]]:
    """Per case: median seconds of forward+backward, bytes saved for backward, peak CUDA bytes (0 on CPU) and
    the median minor page faults of a timed step.

    Repeats are interleaved (every case once, then again), so a burst of
    load on a shared machine lands on all cases alike and the ratios stay
    comparable.  A first untimed step per case warms allocators and kernels.
    ``own_predecessor``: each timed step follows an untimed step of the same
    case, so what the step before it left in the caches and the allocator is
    the same for every case (at small sizes a step after verl's loss, which
    touches far more memory, costs up to twice as much as after its own).
    """
    measured = _measure(cases, repeats, [1] * len(cases), own_predecessor)
    return {case.name: result for case, result in zip(cases, measured)}


def _measure(cases: list[Case], rounds: int, per_round: list[int], own_predecessor: bool) -> list[tuple]:
    """:func:`measure_all` for a list of cases that may share names: ``per_round[i]`` timed steps of case ``i``
    in each of ``rounds`` rounds, every round visiting every case in turn."""
    saved, peak = [], []
    times, faults = [[] for _ in cases], [[] for _ in cases]
    for case in cases:
        device = case.start.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        counter = [0]
        _step(case, counter)
        saved.append(counter[0])
        peak.append(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0)
    for _ in range(rounds):
        for i, case in enumerate(cases):
            for _ in range(per_round[i]):
                if own_predecessor:
                    _step(case, [0])
                times[i].append(_step(case, [0], faults[i]))
    return [(statistics.median(times[i]), saved[i], peak[i], statistics.median(faults[i])) for i in range(len(cases))]


def copy_bandwidth(device, n_bytes: int = 1 << 28, repeats: int = 5) -> float:
    """Measured device copy bandwidth in bytes/s: (read + write) of an ``n_bytes`` buffer per ``copy_``."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = []
    for attempt in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if attempt:
            times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


@dataclass
class Row:
    method: str  # the case name, "method/layout"
    tokens: int
    seconds: float
    saved_bytes: int
    peak_bytes: int
    faults: float = 0.0  # median minor page faults of a timed step
    includes: str = ""
    time_ratio: float = 0.0  # to grpo/sorted, the package's GRPO objective
    memory_ratio: float = 0.0
    value_bytes: int = 4

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def bytes_moved(self) -> int:
        """A floor on the traffic of one step: saved tensors written and read back, the leaf's value and gradient."""
        return 2 * self.saved_bytes + 2 * self.tokens * self.value_bytes


def _selected(cases: list[Case], methods) -> list[Case]:
    """The chosen methods plus every baseline a goal compares with."""
    if not methods:
        return cases
    keep = set(methods) | {"clip", "grpo", "verl"}
    keep |= {"fiberpo_domain"} if "fgh_4level" in keep else set()
    return [case for case in cases if case.method in keep]


def run_table(batch: Batch, repeats: int, methods=None, progress=None) -> list[Row]:
    cases = _selected(all_cases(batch), methods)
    task = progress.add_task("objectives", total=1) if progress else None
    measured = measure_all(cases, repeats)
    if progress:
        progress.advance(task)
    size = batch.log_ratio.element_size()
    rows = [Row(c.name, batch.log_ratio.numel(), *measured[c.name], includes=c.includes, value_bytes=size)
            for c in cases]
    base = next(row for row in rows if row.method == "grpo/sorted")
    for row in rows:
        row.time_ratio = row.seconds / base.seconds
        row.memory_ratio = row.saved_bytes / max(base.saved_bytes, 1)
    return rows


def scaling_repeats(sizes: list[int], repeats: int) -> dict[int, int]:
    """Repeats per size: ``repeats`` at the largest, more at smaller sizes, so that each size times about as many tokens.

    A step of 64k tokens lasts about a millisecond, so a handful of them is at the mercy of one
    scheduler hiccup; the medians of the small sizes, which set the per-token spread, need more.
    """
    largest = max(sizes)
    return {n: min(max(repeats, -(-repeats * largest // n)), 1000) for n in sizes}


def run_scaling(sizes: list[int], repeats: int, device, dtype, progress=None) -> list[Row]:
    """The scaling rows: every size's cases measured in the same rounds, so a burst of load on a shared
    machine lands on all sizes alike (each round runs ``repeats`` steps' share of every size and case)."""
    task = progress.add_task("scaling", total=1) if progress else None
    per_size = scaling_repeats(sizes, repeats)
    rounds = min(per_size.values())
    cases, sized = [], []
    for n in sizes:
        batch = make_batch(n, max(n // 1024, 1), device=device, dtype=dtype)
        for case in all_cases(batch):
            if case.name in SCALING_CASES:
                cases.append(case)
                sized.append((n, -(-per_size[n] // rounds), batch.log_ratio.element_size()))
    measured = _measure(cases, rounds, [steps for _, steps, _ in sized], own_predecessor=True)
    if progress:
        progress.advance(task)
    return [Row(case.name, n, *result, value_bytes=size) for case, (n, _, size), result in zip(cases, sized, measured)]


CACHE_CASES = ("clip/sorted", "fiberpo/sorted")
CACHE_FLUSH_BYTES = 256 << 20  # well past the caches of the machines this runs on


def cache_state(n_tokens: int, repeats: int, *, flush_bytes: int = CACHE_FLUSH_BYTES, dtype=torch.float32):
    """Median seconds per case at ``n_tokens``: ``{case: (warm, after a flush_bytes write)}`` (CPU only).

    What the small sizes of the scaling table are sensitive to: the same
    step, once with its inputs left in the caches by the step before, once
    after a large write has pushed everything out (as another case's
    step, or a model's backward, does).
    """
    batch = make_batch(n_tokens, max(n_tokens // 1024, 1), dtype=dtype)
    cases = [case for case in all_cases(batch) if case.name in CACHE_CASES]
    flush = torch.empty(flush_bytes // 4, dtype=torch.float32)
    out = {}
    for case in cases:
        _step(case, [0])
        warm = statistics.median(_step(case, [0]) for _ in range(repeats))
        cold = []
        for _ in range(repeats):
            flush.fill_(1.0)
            cold.append(_step(case, [0]))
        out[case.name] = (warm, statistics.median(cold))
    return out


def cache_state_line(n_tokens: int, measured: dict[str, tuple[float, float]], flush_bytes: int = CACHE_FLUSH_BYTES) -> str:
    parts = [f"{name} {warm * 1e3:.2f} ms warm, {cold * 1e3:.2f} ms after a {flush_bytes >> 20} MB write"
             for name, (warm, cold) in measured.items()]
    return (f"cache state at {n_tokens:,} tokens: " + "; ".join(parts)
            + " (the scaling table is the warm state: each of its steps follows a step of the same case)")


def goal_lines(rows: list[Row], scaling: list[Row], main_tokens: int, kept: list[Row] | None = None) -> list[str]:
    """Each speed goal as one line: the ratio measured in this run and whether it is met.

    ``kept``: the scaling rows measured again with freed memory kept by malloc (:func:`keep_freed_memory`);
    the flatness goal is printed for both, the fits for the kept rows when there are any.
    """
    by = {row.method: row for row in rows}
    lines = []

    def ratio_line(case, base, limit, what="time", label=""):
        if case not in by or base not in by:
            return f"{label}{case} vs {base}: not measured (baseline unavailable)"
        pick = (lambda r: r.seconds) if what == "time" else (lambda r: r.saved_bytes)
        ratio = pick(by[case]) / max(pick(by[base]), 1e-12)
        return f"{label}{case} {what} = {ratio:.2f}× {base} (goal ≤ {limit}×: {'met' if ratio <= limit else 'MISSED'})"

    lines += [ratio_line(*goal) for goal in GOALS]
    lines.append(ratio_line(*STRETCH, label="stretch: "))
    lines.append(ratio_line(*COMPOSED_STRETCH, label="stretch, gate and Eq. 2 composed: "))
    lines.append(ratio_line(*INDEXED, label="ids indexed once per batch: "))
    lines.append(ratio_line(*MEMORY_GOAL, what="saved bytes"))
    lines.append(ratio_line("fiberpo/padded", "grpo_loss/padded", 2.0, what="saved bytes"))
    states = [("malloc's defaults", scaling)] + ([("freed memory kept", kept)] if kept else [])
    for state, measured in states:
        lines += _flatness_lines(measured, main_tokens, state if kept else "")
    fitted, state = (kept, " (freed memory kept)") if kept else (scaling, "")
    for case in ("fiberpo/sorted", "fiberpo_objective/sorted", "fiberpo_loss/padded", "clip/sorted"):
        fit = _fixed_plus_linear(fitted, case)
        if fit is not None:  # what the per-token spread is made of; no goal
            fixed, per_million, worst = fit
            lines.append(f"{case} time ≈ {fixed * 1e3:.2f} ms per call + {per_million * 1e3:.2f} ms per million "
                         f"tokens{state} (relative least squares over the scaling sizes; largest deviation "
                         f"{100 * worst:.0f}%)")
    return lines


def _flatness_lines(scaling: list[Row], main_tokens: int, state: str) -> list[str]:
    sizes = sorted({row.tokens for row in scaling})
    lines = []
    for case in (*FLATNESS_CASES, "clip/sorted"):
        spread = _cost_spread(scaling, case, main_tokens)
        if spread is None:
            continue
        verdict = "for reference: no goal" if case == "clip/sorted" else (
            f"goal ±{100 * SCALING_TOLERANCE:.0f}%: {'met' if spread <= SCALING_TOLERANCE else 'MISSED'}")
        where = f", {state}" if state else ""
        lines.append(f"{case} cost per token from {sizes[0]:,} to {sizes[-1]:,} tokens{where}: within "
                     f"±{100 * spread:.0f}% ({verdict})")
    return lines


def _fixed_plus_linear(scaling: list[Row], case: str) -> tuple[float, float, float] | None:
    """``(a, b, worst)`` of the fit time ≈ a + b·tokens/10⁶ over the scaling rows, worst = largest relative residual.

    Least squares on relative residuals (each row divided by its time), so the small sizes count as much as
    the large ones.
    """
    points = sorted((row.tokens / 1e6, row.seconds) for row in scaling if row.method == case)
    if len(points) < 3:
        return None
    sizes = torch.tensor([p[0] for p in points], dtype=torch.float64)
    times = torch.tensor([p[1] for p in points], dtype=torch.float64)
    design = torch.stack([torch.ones_like(sizes), sizes], dim=1) / times.unsqueeze(1)
    fixed, slope = torch.linalg.lstsq(design, torch.ones_like(times).unsqueeze(1)).solution.squeeze(1).tolist()
    worst = float(((fixed + slope * sizes - times).abs() / times).max())
    return fixed, slope, worst


def _cost_spread(scaling: list[Row], case: str, main_tokens: int) -> float | None:
    """Largest relative deviation of the cost per token from its value at the main size (None: < 2 sizes)."""
    per_token = {row.tokens: row.seconds / row.tokens for row in scaling if row.method == case}
    if len(per_token) < 2:
        return None
    ref = per_token.get(main_tokens, statistics.median(per_token.values()))
    return max(abs(v / ref - 1) for v in per_token.values())


def _ratio_table(rows: list[Row], device: str, bandwidth: float) -> Table:
    table = Table(title=f"forward+backward at {rows[0].tokens:,} tokens on {device} (same run)")
    columns = ("case", "ms", "× clip", "× verl", "× GRPO time", "saved MB", "× GRPO saved", "Mtok/s", "% copy BW",
               "includes")
    for col in columns:
        table.add_column(col, justify="left" if col in ("case", "includes") else "right")
    by = {row.method: row for row in rows}
    for row in rows:
        ratio = {base: f"{row.seconds / by[base].seconds:.2f}" if base in by else "-"
                 for base in ("clip/sorted", "verl/padded")}
        table.add_row(
            row.method, f"{row.seconds * 1e3:.1f}", ratio["clip/sorted"], ratio["verl/padded"],
            f"{row.time_ratio:.2f}", f"{row.saved_bytes / 2**20:.1f}", f"{row.memory_ratio:.2f}",
            f"{row.tokens_per_second / 1e6:.2f}", f"{100 * row.bytes_moved / row.seconds / bandwidth:.1f}",
            row.includes,
        )
    return table


def _faults_table(rows: list[Row], title: str) -> Table:
    cases = [c for c in SCALING_CASES if any(row.method == c for row in rows)]
    table = Table(title=title)
    for col in ("tokens", *cases):
        table.add_column(col, justify="right")
    for n in sorted({row.tokens for row in rows}):
        at = {row.method: row for row in rows if row.tokens == n}
        table.add_row(f"{n:,}", *(f"{at[c].faults:.0f}" for c in cases))
    return table


def _scaling_table(rows: list[Row], bandwidth: float,
                   title: str = "scaling: ms per million tokens (constant ⇔ linear cost)") -> Table:
    cases = [c for c in SCALING_CASES if any(row.method == c for row in rows)]
    table = Table(title=title)
    versus_verl = "verl/padded" in cases and "fiberpo_loss/padded" in cases
    extra = ("fiberpo/sorted × clip", *(["fiberpo_loss × verl"] if versus_verl else []), "fiberpo/sorted % copy BW")
    for col in ("tokens", *cases, *extra):
        table.add_column(col, justify="right")
    for n in sorted({row.tokens for row in rows}):
        at = {row.method: row for row in rows if row.tokens == n}
        fiberpo, clip = at["fiberpo/sorted"], at["clip/sorted"]
        loss_ratio = [f"{at['fiberpo_loss/padded'].seconds / at['verl/padded'].seconds:.2f}"] if versus_verl else []
        table.add_row(
            f"{n:,}", *(f"{at[c].seconds * 1e3 / (n / 1e6):.1f}" for c in cases),
            f"{fiberpo.seconds / clip.seconds:.2f}", *loss_ratio,
            f"{100 * fiberpo.bytes_moved / fiberpo.seconds / bandwidth:.1f}",
        )
    return table


def _json_row(row: Row, bandwidth: float) -> dict:
    return {**asdict(row), "tokens_per_second": row.tokens_per_second, "bytes_moved": row.bytes_moved,
            "copy_bandwidth_fraction": row.bytes_moved / row.seconds / bandwidth}


MARKDOWN_HEAD = """# Benchmarks

Generated by `{command}`; the text block at the end is that run's printed output, unedited.

Every case is one forward+backward step of a loss from a fresh leaf to its gradient, including all id
indexing, flattening and validation its path does.  The same tokens come in three layouts: `padded`
(`(B, L)` log-probs and a response mask, rows are trajectories, as verl and TRL pass them), `sorted` (flat
tokens, sorted trajectory ids, as in packed batches) and `shuffled` (the flat tokens in random order).
What each baseline includes:

* `clip/sorted`: the bare elementwise clip `clamp(exp(x), 1±ε)·Â` summed; no ids, no weights.
* `grpo/sorted`: the package's GRPO objective on flat tokens; its μ indexes the trajectory ids.
* `grpo_loss/padded`: the package's registry GRPO loss on the padded batch (validation, flattening,
  metrics).
* `verl/padded`: the installed verl's own `compute_policy_loss_vanilla` (dual-clip PPO with its KL and
  clip-fraction metrics) and `agg_loss` in `seq-mean-token-mean` mode on the padded batch.
* `fiberpo/padded` and `fiberpo_domain/padded`: flatten with the mask as the registry losses do (the token
  positions and row lengths found in one pass; the bench's rows are right-padded blocks, so values are
  selected and gradients written back by block copies: no boolean indexing; the log-ratios
  `log_prob - old_log_prob` are taken on the response tokens only, `to_flat_difference`), the rows as trajectories by
  their lengths (no sort), the fused gate, μ and Eq. 2.  `fiberpo_loss/padded` is the registry loss: `fiberpo_objective` for the loss, its
  metrics (regime shares, clip fractions, means) counted in that same pass (`diagnostics.counting_gate`,
  then `diagnostics.fiberpo_loss_metrics`), and the mean raw ratio.
* `fiberpo_objective/sorted`: `fiberpo_objective`, the same J (Eq. 2 with FiberPO's gate and μ) taken in
  the gate's own pass: per trajectory and sign the forward sums Â·G and Â·G on the open clip, so G, μ and
  their product are never written and the backward is the per-trajectory chain plus one token pass.
  `fiberpo/sorted` composes the same three steps as separate calls (`fiberpo_gated_ratio`,
  `aggregation_weights`, `rgf_objective`); the stretch goal is read on the fused row, the composed one is
  printed beside it.
* `fiberpo/indexed`: as `fiberpo/sorted`, with the trajectory `Segments` built once per batch outside the
  timed step (what several optimizer steps over one batch reuse); reported next to the goal, not in its place.
  `fiberpo_domain/indexed` does the same for FiberPO-Domain with `domain_levels` (the trajectory, group and
  domain ids indexed once).
* `apc_obj/shuffled`: APC-Obj's fused gate on random state ids (a quarter as many states as tokens),
  token-mean weights.
* `fgh_4level/sorted`: FiberPO on a four-level hierarchy (domain → group → trajectory → token) through
  `fiberpo_hierarchy_gated_ratio`: the fused token gate around the FGH operator on the strata above the
  tokens, with the trajectory `Segments` built once in the step for the hierarchy and μ (as
  `fiberpo_domain/sorted` does); compared with `fiberpo_domain/sorted`, the closed form of the same objective.

On CPU the FiberPO rows run the package's compiled token loops when a C compiler is present (the header
line says whether they did): the fused gate's channel sums, token gate and two backward passes (walking
contiguous trajectories by their lengths, so the sorted and padded layouts read no per-token index), the run
lengths of sorted ids, the group/domain ids carried by contiguous trajectories and the padded layout's
positions and block copies, one C loop each, and FiberPO's per-trajectory chain (Eq. 8-10 with k = T and
its backward) and FiberPO-Domain's on one process (Eq. 30-33 and its backward) as one loop over the
trajectories each way; the objective's pass and the metrics' counts (read off the gate's flags) are C loops too, and torch keeps
the `exp`.  `FIBERPO_THEORY_NATIVE=0 fiberpo-theory bench` times the torch-op path instead; both give the
same bits, except that the fused objective's per-trajectory sums are taken in 16 partial sums (a fixed
order, so the result is deterministic), where torch's dot product takes its own.

The scaling table also prints `fiberpo_loss × verl`, the registry FiberPO loss over verl's own loss at each
size: the main table's goal is read at one size, and at small micro-batches the fixed cost per call weighs
more.  The last goal lines fit each scaling column to a fixed cost per call plus a cost per token (least squares
on relative residuals): the fixed part is what a call costs whatever its size (validation, the remaining
small torch ops, ctypes calls and autograd), the rest is what each token costs.  At the small sizes a
step's time also depends on what the step before it left in the caches and the allocator: a step that
follows verl's loss (which touches far more memory) costs up to twice what it costs after its own.  So in
the scaling table every timed step follows an untimed step of the same case, and the steps are taken in
rounds that each visit every size and every column, so that a burst of load on a shared machine lands on
all of them rather than on one size; the flatness goal is read in that warm state.  The `cache state` line
times the clip and FiberPO at the smallest size warm and after a large write, the cold state a step meets
after, say, a model's backward: read the flatness lines against it, since cold small steps cost more per
token for every case, the bare clip included.

The page-fault table counts the minor page faults of each timed step.  With glibc's default settings,
malloc hands large blocks out as fresh mappings and gives the top of its heap back to the OS on free, with
thresholds that adapt to the sizes freed before; a step whose buffers come back as new pages pays for
mapping and zeroing them, a cost per token that depends on the process's history, not on the code timed
(the bare clip pays it too).  So on CPU the scaling is measured a second time, last, with freed memory kept
(`keep_freed_memory`: no mappings, no trimming, as a caching allocator such as CUDA's keeps its blocks), and
the flatness goal is printed for both states.  `--no-kept-memory-pass` skips that pass.

`saved MB` is what autograd keeps for backward; `% copy BW` divides a floor on the bytes a step moves
(saved tensors written and read back, plus the leaf's value and gradient) by the step time and by the copy
bandwidth measured in the same run.  Ratios are from one run with all cases' repeats interleaved; on a shared
machine the absolute times are noisy and so, less, are the ratios: rerun to see their spread before reading a
goal's met/MISSED as settled.

GPU: the same command takes `--device cuda`; the throughput goal (≥ 30% of copy bandwidth) is read
from `% copy BW` at ≥ 16M tokens: `fiberpo-theory bench --device cuda --tokens 16777216 --scaling 1048576 4194304 16777216
67108864`.  Until a GPU machine has run it, the numbers below are CPU-only.

"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=positive_int, default=1 << 20,
                        help="tokens in the main table (default %(default)s)")
    parser.add_argument("--trajectories", type=positive_int, default=1024,
                        help="ragged trajectories the tokens are split into (default %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed forward+backward passes per case; the median is reported (default %(default)s)")
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device: cpu or cuda[:N] (default %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of the log-ratios (default %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument(
        "--scaling", type=positive_int, nargs="*", default=[1 << 16, 1 << 18, 1 << 20, 1 << 22],
        help="token counts of the scaling table; give none to skip it (default %(default)s)",
    )
    parser.add_argument("--methods", nargs="*", default=None, choices=method_names(), metavar="METHOD",
                        help="subset of methods, from: " + ", ".join(method_names())
                        + " (the clip, GRPO and verl baselines always run)")
    parser.add_argument("--no-kept-memory-pass", dest="kept_memory_pass", action="store_false",
                        help="skip the second scaling pass with freed memory kept by glibc's malloc (CPU only; "
                             "it runs last, since it changes malloc's settings for the rest of the process)")
    parser.add_argument("--json", type=str, default=None, metavar="PATH", help="write all rows as JSON")
    parser.add_argument("--markdown", type=str, default=None, metavar="PATH",
                        help="write the printed report as a markdown page (docs/benchmarks.md is made this way)")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(record=True)
    console = console if console.is_terminal else Console(width=190, record=True)  # logs and pipes: one line per row
    dtype = getattr(torch, args.dtype)
    device = str(args.device)
    if args.trajectories > args.tokens:
        print(f"fiberpo-theory bench: --trajectories ({args.trajectories}) must not exceed --tokens ({args.tokens})",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    batch = make_batch(args.tokens, args.trajectories, device=device, dtype=dtype)
    bandwidth = copy_bandwidth(device)
    verl = "verl not installed" if verl_loss() is None else f"verl {_verl_version()}"
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {args.dtype}, "
                  f"{verl}; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    console.print(f"compiled token loops (CPU): {_native.status()}")
    on_cpu = torch.device(device).type == "cpu"
    scaling_base = max(args.repeats // 2, 1)
    per_size = scaling_repeats(args.scaling, scaling_base) if args.scaling else {}
    kept, cache = [], None
    with Progress(console=console, transient=True) as progress:
        rows = run_table(batch, args.repeats, args.methods, progress)
        scaling = run_scaling(args.scaling, scaling_base, device, dtype, progress) if args.scaling else []
        if scaling and on_cpu:
            smallest = min(args.scaling)
            cache = cache_state(smallest, min(per_size[smallest], 100), dtype=dtype)
            # last: glibc's adaptive thresholds cannot be restored once set
            if args.kept_memory_pass and keep_freed_memory():
                kept = run_scaling(args.scaling, scaling_base, device, dtype, progress)
    console.print(_ratio_table(rows, device, bandwidth))
    if scaling:
        console.print(_scaling_table(scaling, bandwidth))
        rounds = min(per_size.values())
        steps = {n: rounds * -(-per_size[n] // rounds) for n in args.scaling}
        console.print("scaling medians over " + ", ".join(f"{steps[n]} steps at {n:,}" for n in args.scaling)
                      + f" tokens, taken in {rounds} rounds that each visit every size and column (so a burst of "
                      "load lands on all of them), each timed step after an untimed one of its own")
        if on_cpu:
            console.print(_faults_table(scaling, "minor page faults per timed step (median), malloc's defaults"))
        if cache is not None:
            console.print(cache_state_line(min(args.scaling), cache))
    if kept:
        console.print(_scaling_table(kept, bandwidth, "scaling again, freed memory kept by malloc (no mappings, no "
                                                      "trimming): ms per million tokens"))
        worst = max(kept, key=lambda row: row.faults)
        console.print("the same steps measured last, after keep_freed_memory(); minor page faults per timed step "
                      f"(median), largest over cases and sizes: {worst.faults:.0f} ({worst.method} at "
                      f"{worst.tokens:,} tokens: a heap growing past its peak still faults its new pages in)")
    console.print("% copy BW: (2 × bytes saved for backward + value and gradient of the leaf) / time, "
                  "over the measured copy bandwidth; a floor on the traffic, so a floor on the fraction.")
    console.print("goals, ratios from this run:")
    for line in goal_lines(rows, scaling, args.tokens, kept):
        console.print(f"  {line}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "copy_bandwidth": bandwidth, "native": _native.status(),
                       "main": [_json_row(r, bandwidth) for r in rows],
                       "scaling": [_json_row(r, bandwidth) for r in scaling],
                       "scaling_freed_memory_kept": [_json_row(r, bandwidth) for r in kept]}, handle, indent=1)
    if args.markdown:
        command = "fiberpo-theory bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "fiberpo-theory bench"
        with open(args.markdown, "w") as handle:
            handle.write(MARKDOWN_HEAD.format(command=command))
            handle.write("```text\n" + console.export_text() + "```\n")
    return 0


def _verl_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("verl")
    except PackageNotFoundError:
        return "(version unknown)"
