"""``fiberpo-theory bench``: forward+backward time and memory of every objective.

Each method is timed on the same ragged batch as the full RGF loss
``-Σ μ_i G(r)_i Â_i`` (Eq. 2) from raw log-ratios and ids to gradients, so
segment indexing (``torch.unique``) is inside every timing, GRPO's included;
FiberPO and FiberPO-Domain reuse their trajectory indexing for μ, as the
loss registry does.
Results are ratios to GRPO measured in the same run, with the repeats of all
methods interleaved; absolute numbers depend on the machine.  Memory is the
bytes autograd saves for backward (any device) and, on CUDA, the peak
allocated during the step.  Throughput is also given as tokens/s and as a
fraction of the device's measured copy bandwidth (issue 6's GPU goal).
"""

from __future__ import annotations

import argparse
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

from . import objectives as obj
from .cli_types import positive_int, torch_device
from .fgh import fiberpo_hierarchy_gated_ratio

# Goals of issue 2 (ratio to GRPO, forward+backward) and issue 3 (operator vs closed form).
GOALS = {"fiberpo": 3.0, "fiberpo_domain": 4.0, "apc_obj": 4.0}
HIERARCHY_GOAL = 2.0


@dataclass
class Batch:
    log_ratio: torch.Tensor
    advantages: torch.Tensor
    traj_id: torch.Tensor
    group_id: torch.Tensor
    domain_id: torch.Tensor
    state_id: torch.Tensor


def make_batch(n_tokens: int, n_traj: int, *, seed: int = 0, device="cpu", dtype=torch.float32) -> Batch:
    """A ragged batch: lengths vary ×4, 8 trajectories per prompt group, 4 domains, ids shuffled."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(n_traj, generator=gen) * 3 + 1
    lengths = torch.clamp((weights / weights.sum() * n_tokens).round().long(), min=1)
    lengths[-1] += n_tokens - int(lengths.sum())
    traj_names = torch.randperm(n_traj * 10, generator=gen)[:n_traj]
    traj = torch.repeat_interleave(traj_names, lengths)
    group = torch.repeat_interleave(torch.arange(n_traj) // 8 * 3 + 5, lengths)
    domain = torch.repeat_interleave(torch.arange(n_traj) // 8 % 4 + 100, lengths)
    log_ratio = torch.randn(n_tokens, generator=gen) * 0.05
    advantages = torch.repeat_interleave(torch.randn(n_traj, generator=gen), lengths)
    state = torch.randint(0, max(n_tokens // 4, 1), (n_tokens,), generator=gen)
    to = dict(device=device)
    return Batch(
        log_ratio.to(device=device, dtype=dtype),
        advantages.to(device=device, dtype=dtype),
        traj.to(**to),
        group.to(**to),
        domain.to(**to),
        state.to(**to),
    )


def method_losses(eps=0.2, c_pos=0.12, c_neg=0.05, delta=0.1) -> dict[str, Callable[[Batch, torch.Tensor], torch.Tensor]]:
    """Loss builders: each maps (batch, log_ratio leaf) to the scalar RGF loss."""

    def loss(method, gated, b, traj=None):
        weights = obj.aggregation_weights(method, gated, b.traj_id if traj is None else traj)
        return -obj.rgf_objective(gated, b.advantages, weights)

    def parts_loss(method, parts, b):
        # μ reuses the trajectory indexing the objective built, as the loss registry does
        return loss(method, parts.gated_ratio, b, parts.traj)

    losses = {
        "grpo": lambda b, x: loss("grpo", obj.grpo_gated_ratio(torch.exp(x), eps=eps), b),
        "ppo": lambda b, x: loss("ppo", obj.ppo_gated_ratio(torch.exp(x), eps=eps), b),
        "gspo": lambda b, x: loss("gspo", obj.gspo_gated_ratio(x, b.traj_id, eps=eps), b),
        "apc_obj": lambda b, x: loss("apc_obj", obj.apc_obj_gated_ratio(torch.exp(x), b.state_id, delta=delta), b),
        "fiberpo": lambda b, x: parts_loss(
            "fiberpo", obj.fiberpo_parts(x, b.traj_id, eps=eps, c_pos=c_pos, c_neg=c_neg), b
        ),
        "fiberpo_domain": lambda b, x: parts_loss(
            "fiberpo_domain",
            obj.fiberpo_domain_parts(x, b.traj_id, b.group_id, b.domain_id, eps=eps, c_pos=c_pos, c_neg=c_neg),
            b,
        ),
        # the general FGH operator on domain -> group -> trajectory -> token (issue 3's 4-level goal)
        "fgh_4level": lambda b, x: loss(
            "fiberpo_domain",
            fiberpo_hierarchy_gated_ratio(x, [b.domain_id, b.group_id, b.traj_id], eps=eps, c_pos=c_pos, c_neg=c_neg),
            b,
        ),
    }
    return losses


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _step(fn, batch: Batch, saved: list[int]) -> float:
    """One forward+backward from a fresh leaf; adds the bytes autograd saves to ``saved``; returns seconds."""
    device = batch.log_ratio.device

    def pack(tensor):
        saved[0] += tensor.numel() * tensor.element_size()
        return tensor

    x = batch.log_ratio.detach().requires_grad_(True)
    _sync(device)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn(batch, x)
    loss.backward()
    _sync(device)
    return time.perf_counter() - start


def measure_all(fns: dict[str, Callable], batch: Batch, repeats: int) -> dict[str, tuple[float, int, int]]:
    """Per method: median seconds of forward+backward, bytes saved for backward, peak CUDA bytes (0 on CPU).

    Repeats are interleaved (every method once, then again), so a burst of
    load on a shared machine lands on all methods alike and the ratios stay
    comparable.  A first untimed step per method warms allocators and kernels.
    """
    device = batch.log_ratio.device
    saved, peak, times = {}, {}, {name: [] for name in fns}
    for name, fn in fns.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        counter = [0]
        _step(fn, batch, counter)
        saved[name] = counter[0]
        peak[name] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_step(fn, batch, [0]))
    return {name: (statistics.median(times[name]), saved[name], peak[name]) for name in fns}


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
    method: str
    tokens: int
    seconds: float
    saved_bytes: int
    peak_bytes: int
    time_ratio: float = 0.0
    memory_ratio: float = 0.0
    value_bytes: int = 4

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def bytes_moved(self) -> int:
        """A floor on the traffic of one step: saved tensors written and read back, the leaf's value and gradient."""
        return 2 * self.saved_bytes + 2 * self.tokens * self.value_bytes


def run_table(batch: Batch, repeats: int, methods: list[str], progress=None) -> list[Row]:
    losses = method_losses()
    names = ["grpo"] + [m for m in methods if m in losses and m != "grpo"]
    task = progress.add_task("objectives", total=1) if progress else None
    measured = measure_all({name: losses[name] for name in names}, batch, repeats)
    if progress:
        progress.advance(task)
    size = batch.log_ratio.element_size()
    rows = [Row(name, batch.log_ratio.numel(), *measured[name], value_bytes=size) for name in names]
    base = rows[0]
    for row in rows:
        row.time_ratio = row.seconds / base.seconds
        row.memory_ratio = row.saved_bytes / max(base.saved_bytes, 1)
    return rows


def run_scaling(sizes: list[int], repeats: int, device, dtype, progress=None) -> list[Row]:
    losses = method_losses()
    names = ("grpo", "fiberpo", "fiberpo_domain")
    rows = []
    task = progress.add_task("scaling", total=len(sizes)) if progress else None
    for n in sizes:
        batch = make_batch(n, max(n // 1024, 1), device=device, dtype=dtype)
        measured = measure_all({name: losses[name] for name in names}, batch, repeats)
        rows += [Row(name, n, *measured[name], value_bytes=batch.log_ratio.element_size()) for name in names]
        if progress:
            progress.advance(task)
    return rows


def _ratio_table(rows: list[Row], device: str, bandwidth: float) -> Table:
    table = Table(title=f"forward+backward at {rows[0].tokens:,} tokens on {device} (ratios to GRPO, same run)")
    columns = ("method", "ms", "× GRPO time", "saved MB", "× GRPO saved", "Mtok/s", "% copy BW", "goal")
    for col in columns:
        table.add_column(col, justify="right" if col != "method" else "left")
    by_name = {row.method: row for row in rows}
    for row in rows:
        goal = ""
        if row.method in GOALS:
            ok = row.time_ratio <= GOALS[row.method]
            goal = f"≤ {GOALS[row.method]:.0f}× {'met' if ok else 'MISSED'}"
        if row.method == "fgh_4level" and "fiberpo_domain" in by_name:
            ratio = row.seconds / by_name["fiberpo_domain"].seconds
            goal = f"{ratio:.2f}× closed form (≤ {HIERARCHY_GOAL:.0f}× {'met' if ratio <= HIERARCHY_GOAL else 'MISSED'})"
        table.add_row(
            row.method,
            f"{row.seconds * 1e3:.1f}",
            f"{row.time_ratio:.2f}",
            f"{row.saved_bytes / 2**20:.1f}",
            f"{row.memory_ratio:.2f}",
            f"{row.tokens_per_second / 1e6:.2f}",
            f"{100 * row.bytes_moved / row.seconds / bandwidth:.1f}",
            goal,
        )
    return table


def _scaling_table(rows: list[Row], bandwidth: float) -> Table:
    table = Table(title="scaling: ms per million tokens (constant ⇔ linear cost)")
    for col in ("tokens", "grpo", "fiberpo", "fiberpo_domain", "fiberpo × grpo", "fiberpo Mtok/s", "fiberpo % copy BW"):
        table.add_column(col, justify="right")
    sizes = sorted({row.tokens for row in rows})
    for n in sizes:
        at = {row.method: row for row in rows if row.tokens == n}
        per_m = {m: at[m].seconds * 1e3 / (n / 1e6) for m in at}
        fiberpo = at["fiberpo"]
        table.add_row(
            f"{n:,}", *(f"{per_m[m]:.1f}" for m in ("grpo", "fiberpo", "fiberpo_domain")),
            f"{fiberpo.seconds / at['grpo'].seconds:.2f}",
            f"{fiberpo.tokens_per_second / 1e6:.2f}",
            f"{100 * fiberpo.bytes_moved / fiberpo.seconds / bandwidth:.1f}",
        )
    return table


def _json_row(row: Row, bandwidth: float) -> dict:
    return {**asdict(row), "tokens_per_second": row.tokens_per_second, "bytes_moved": row.bytes_moved,
            "copy_bandwidth_fraction": row.bytes_moved / row.seconds / bandwidth}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=positive_int, default=1 << 20,
                        help="tokens in the main table (default %(default)s)")
    parser.add_argument("--trajectories", type=positive_int, default=1024,
                        help="ragged trajectories the tokens are split into (default %(default)s)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed forward+backward passes per method; the median is reported (default %(default)s)")
    parser.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device: cpu or cuda[:N] (default %(default)s)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="dtype of the log-ratios (default %(default)s)")
    parser.add_argument(
        "--scaling", type=positive_int, nargs="*", default=[1 << 16, 1 << 18, 1 << 20, 1 << 22],
        help="token counts of the scaling table; give none to skip it (default %(default)s)",
    )
    parser.add_argument("--methods", nargs="*", default=None, choices=list(method_losses()), metavar="METHOD",
                        help="subset of methods, from: " + ", ".join(method_losses()) + " (GRPO is always run)")
    parser.add_argument("--json", type=str, default=None, metavar="PATH", help="write all rows as JSON")


def run(args) -> int:
    console = Console()
    console = console if console.is_terminal else Console(width=150)  # logs and pipes: one line per row
    dtype = getattr(torch, args.dtype)
    device = str(args.device)
    if args.trajectories > args.tokens:
        print(f"fiberpo-theory bench: --trajectories ({args.trajectories}) must not exceed --tokens ({args.tokens})",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    batch = make_batch(args.tokens, args.trajectories, device=device, dtype=dtype)
    methods = args.methods or list(method_losses())
    bandwidth = copy_bandwidth(device)
    console.print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {args.dtype}; "
                  f"measured copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    with Progress(console=console, transient=True) as progress:
        rows = run_table(batch, args.repeats, methods, progress)
        scaling = run_scaling(args.scaling, max(args.repeats // 2, 1), device, dtype, progress) if args.scaling else []
    console.print(_ratio_table(rows, device, bandwidth))
    if scaling:
        console.print(_scaling_table(scaling, bandwidth))
    console.print("% copy BW: (2 × bytes saved for backward + value and gradient of the log-ratios) / time, "
                  "over the measured copy bandwidth; a floor on the traffic, so a floor on the fraction.")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device, "copy_bandwidth": bandwidth,
                       "main": [_json_row(r, bandwidth) for r in rows],
                       "scaling": [_json_row(r, bandwidth) for r in scaling]}, handle, indent=1)
    return 0
