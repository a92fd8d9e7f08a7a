"""``fiberpo-theory verify``: run every claim check and report the verdicts.

Every audited claim of the paper (``AUDITED_IDS``) gets a row, in that order.  An id without a registered
check (or whose check module failed to import) is reported with verdict
``error``, never skipped: a missing check is a finding.  Exit status: 0 when
every check ran, 2 when any errored, and with ``--fail-on fails`` 1 when a
claim was refuted (errors take precedence).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..theory import claims
from ..theory.claims import Claim, ClaimReport, Profile, run_claim
from .cli_types import nonnegative_int, positive_int

# The audited claims of the paper, in reading order.  Kept here so that an id nobody registered is still reported.
AUDITED_IDS: tuple[str, ...] = (
    "thm-2.1", "lemma-d.2", "eq-70", "thm-d.3", "lemma-d.6", "eq-61-63", "lemma-d.9", "thm-d.10",
    "lemma-d.11", "lemma-d.12", "claim-3.5", "kl-bias", "logclip-asymmetry", "eq-10", "eq-16",
    "ratio-decoupling", "g-regimes", "eq-77-identity", "eq-77-stricter", "eq-79-approx", "eq-e5-fbg",
    "thm-4.5", "prop-5.2", "prop-5.3", "prop-5.4", "prop-5.5", "reflecting", "remark-6.3", "eq-31-fgh",
    "fgh-first-order",
)  # fmt: skip

VERDICT_STYLE = {"holds": "green", "fails": "bold red", "conditional": "yellow", "error": "magenta"}


def load_registry(package=None) -> tuple[dict[str, Claim], dict[str, str]]:
    """The registered claims and, per module of the check package that failed to import, the error.

    ``package`` defaults to the library's own checks (``fiberpo_theory.checks``).
    """
    failures = claims.import_checks(package)  # once: a module that fails is not cached, so it would run again
    return claims.registered(), failures


def missing_report(claim_id: str, import_failures: dict[str, str]) -> ClaimReport:
    """The row for an id with no registered check."""
    details = "no check registered"
    if import_failures:
        details += "; check modules that failed to import: " + "; ".join(
            f"{name}: {error.strip().splitlines()[-1]}" for name, error in import_failures.items()
        )
    return ClaimReport(claim_id, "", "", "", "error", 0, None, details, 0.0)


def collect(
    ids: list[str],
    profile: Profile,
    registry: dict[str, Claim],
    import_failures: dict[str, str],
    on_done: Callable[[ClaimReport], None] = lambda report: None,
    jobs: int = 1,
) -> list[ClaimReport]:
    """Run the checks for ``ids``; ``on_done`` is called after each (progress display).

    With ``jobs > 1`` the checks run in that many worker processes.  Each
    check seeds its own search from ``profile``, so the reports are the same
    as in one process; they are returned in the order of ``ids``.
    """
    if jobs <= 1 or len(ids) <= 1:
        reports = []
        for claim_id in ids:
            entry = registry.get(claim_id)
            report = run_claim(entry, profile) if entry is not None else missing_report(claim_id, import_failures)
            reports.append(report)
            on_done(report)
        return reports
    return _collect_parallel(ids, profile, registry, import_failures, on_done, jobs)


# Below this many claims a worker's start-up (importing torch, SymPy and the checks) outweighs the gain.
SERIAL_UP_TO = 4


def default_jobs(n_claims: int) -> int:
    return 1 if n_claims <= SERIAL_UP_TO else min(2, os.cpu_count() or 1)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # the workers already use every core between them


def _collect_parallel(ids, profile, registry, import_failures, on_done, jobs) -> list[ClaimReport]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    by_id = {i: missing_report(i, import_failures) for i in ids if i not in registry}
    for report in by_id.values():
        on_done(report)
    # spawn, not fork: a forked child inherits the parent's torch/OpenMP thread state and can deadlock.
    # A Claim pickles by reference to its check function, which the worker imports by module name.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init) as pool:
        futures = {pool.submit(run_claim, registry[i], profile): i for i in ids if i in registry}
        for future in as_completed(futures):
            claim_id = futures[future]
            try:
                report = future.result()
            except Exception as err:  # a worker that died: the claim gets an error row, the run goes on
                report = ClaimReport(claim_id, "", "", "", "error", 0, None, f"worker failed: {err!r}", 0.0)
            by_id[claim_id] = report
            on_done(report)
    return [by_id[claim_id] for claim_id in ids]


def exit_status(reports: list[ClaimReport], fail_on: str | None) -> int:
    if any(r.verdict == "error" for r in reports):
        return 2
    if fail_on == "fails" and any(r.verdict == "fails" for r in reports):
        return 1
    return 0


# ---------------------------------------------------------------------------
# Output: JSON, markdown, rich table
# ---------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Counterexamples may hold tensors or numpy scalars; JSON gets plain lists and numbers."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and value != value:
        return "nan"
    return str(value)


def json_report(reports: list[ClaimReport], profile: Profile, seconds: float) -> dict[str, Any]:
    counts = {v: sum(r.verdict == v for r in reports) for v in claims.VERDICTS}
    return {
        "profile": profile.name,
        "seed": profile.seed,
        "max_examples": profile.max_examples,
        "seconds": round(seconds, 3),
        "summary": counts,
        "claims": [r.to_json() for r in reports],
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown_report(reports: list[ClaimReport], profile: Profile, seconds: float) -> str:
    """A verdict table plus, for every claim not plainly holding, its condition and counterexample."""
    lines = [
        "# Claim verdicts",
        "",
        f"Generated by `fiberpo-theory verify --profile {profile.name} --seed {profile.seed}` "
        f"({profile.max_examples} examples per property search, {seconds:.1f} s). Verdicts: "
        + ", ".join(f"{v} {sum(r.verdict == v for r in reports)}" for v in claims.VERDICTS)
        + ".",
        "",
        "| id | paper | verdict | method | examples | seconds | statement |",
        "| --- | --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in reports:
        lines.append(
            f"| `{r.id}` | {_cell(r.paper_ref)} | **{r.verdict}** | {r.method} | {r.examples} | {r.seconds:.2f} | {_cell(r.statement)} |"
        )
    lines += ["", "## Evidence", ""]
    for r in reports:
        lines += [f"### `{r.id}` — {r.verdict}", "", _cell(r.details)]
        if r.condition:
            lines += ["", f"*Condition:* {_cell(r.condition)}"]
        if r.regimes:
            lines += ["", "*Reached:* " + ", ".join(f"{k} ({v})" for k, v in sorted(r.regimes.items()))]
        if r.counterexample is not None:
            text = json.dumps(r.counterexample, ensure_ascii=False, default=_jsonable)
            lines += ["", "*Counterexample:*", "", "```json", text, "```"]
        lines.append("")
    return "\n".join(lines)


def print_table(reports: list[ClaimReport], profile: Profile, seconds: float, console, rerun: str = "") -> None:
    from rich.table import Table

    table = Table(title=f"fiberpo-theory verify — profile {profile.name}, seed {profile.seed}")
    table.add_column("id", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    table.add_column("examples", justify="right", no_wrap=True, min_width=8)
    table.add_column("s", justify="right", no_wrap=True, min_width=5)
    table.add_column("evidence (see --json / --markdown for all of it)", no_wrap=True, overflow="ellipsis", max_width=80)
    for r in reports:
        summary = f"condition: {r.condition}" if r.condition else " ".join(r.details.split())
        table.add_row(r.id, f"[{VERDICT_STYLE[r.verdict]}]{r.verdict}[/]", str(r.examples), f"{r.seconds:.2f}", summary)
    console.print(table)
    counts = ", ".join(f"{v}: {sum(r.verdict == v for r in reports)}" for v in claims.VERDICTS)
    console.print(f"{len(reports)} claims in {seconds:.1f} s — {counts}. Re-run: fiberpo-theory verify --profile {profile.name} --seed {profile.seed}{rerun}")


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=("quick", "thorough"), default="quick", help="search effort (default quick)")
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these claim ids (see --list)")
    parser.add_argument("--list", action="store_true", help="print every claim id with its paper reference and exit")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the JSON report here")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write a markdown verdict table here")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of every property search (default 0)")
    parser.add_argument("--fail-on", choices=("fails",), help="also exit 1 when a claim is refuted (for CI)")
    parser.add_argument("--jobs", type=positive_int, default=None,
                        help="worker processes; 1 runs in this process (default: up to 2 when more than "
                             f"{SERIAL_UP_TO} claims run, else 1)")


def _selected_ids(only: list[str] | None, registry: dict[str, Claim]) -> list[str]:
    """Audited ids first, in their order, then any extra registered ids; ``--only`` filters."""
    known = list(AUDITED_IDS) + sorted(set(registry) - set(AUDITED_IDS))
    if not only:
        return known
    unknown = [i for i in only if i not in known]
    if unknown:
        raise ValueError(f"--only: unknown claim id(s) {unknown}; `fiberpo-theory verify --list` prints the known ids")
    return [i for i in known if i in only]


def _console():
    from rich.console import Console

    console = Console()
    # pipes and CI logs: wide enough that the table stays one line per claim
    return console if console.is_terminal else Console(width=140)


def _run_with_progress(ids, profile, registry, import_failures, console, jobs: int = 1) -> list[ClaimReport]:
    """``collect`` under a progress bar, with one intra-op torch thread (tiny tensors; the pool only adds latency)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task("checking", total=len(ids))

            def advance(report: ClaimReport) -> None:
                progress.update(task, advance=1, description=f"{report.id}: {report.verdict}")

            return collect(ids, profile, registry, import_failures, on_done=advance, jobs=jobs)
    finally:
        torch.set_num_threads(threads)


def print_claim_list(registry: dict[str, Claim]) -> None:
    for claim_id in _selected_ids(None, registry):
        claim = registry.get(claim_id)
        ref, statement = (claim.paper_ref, claim.statement) if claim else ("?", "(no check registered)")
        print(f"{claim_id:<18} {ref:<28} {statement}")


def run(args: argparse.Namespace) -> int:
    console = _console()
    try:
        profile = Profile.named(args.profile, seed=args.seed)
        registry, import_failures = load_registry()
        if args.list:
            print_claim_list(registry)
            return 0
        ids = _selected_ids(args.only, registry)
        jobs = default_jobs(len(ids)) if args.jobs is None else args.jobs  # --jobs is checked by argparse
    except ValueError as err:
        print(f"fiberpo-theory verify: {err}", file=sys.stderr)
        return 2
    console.print(f"profile {profile.name}: {profile.max_examples} examples per search, seed {profile.seed}, {jobs} job(s)")
    for name, error in import_failures.items():
        console.print(f"[magenta]could not import {name}[/]: {error.strip().splitlines()[-1]}")
    start = time.perf_counter()
    reports = _run_with_progress(ids, profile, registry, import_failures, console, jobs=jobs)
    seconds = time.perf_counter() - start
    print_table(reports, profile, seconds, console, rerun=" --only " + " ".join(args.only) if args.only else "")
    if args.json:
        write_json(args.json, json_report(reports, profile, seconds))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_report(reports, profile, seconds) + "\n")
    return exit_status(reports, args.fail_on)
