"""``fiberpo-theory derive``: run every SymPy derivation in ``proofs/`` and write LaTeX.

Every module of the ``proofs`` package that exposes ``derive()`` (returning a
:class:`~fiberpo_theory.symbolic.Derivation`) or ``DERIVATIONS`` (a list of
such callables) is run; modules whose name starts with ``_`` are helpers and
are skipped.  One ``<slug>.tex`` per derivation and a ``main.tex`` that
inputs them all are written to ``--out`` (default ``docs/derivations``);
``--pdf`` also compiles ``main.tex`` with pdflatex.  A derivation that raises
is reported and makes the command exit 1; the others are still written.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator

from .cli_types import output_dir
from ..symbolic.latex import master_document, slug, to_latex
from ..symbolic import Derivation

DEFAULT_OUT = "docs/derivations"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=output_dir, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--pdf", action="store_true", help="also compile main.tex with pdflatex")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="run only the proof modules whose name contains one of these strings")
    parser.add_argument("--quiet", action="store_true", help="no progress display")


def discover(only: list[str] | None = None, package=None) -> Iterator[tuple[str, Callable[[], Derivation]]]:
    """(label, callable) for every derivation ``package`` exposes, in module order.

    ``package`` defaults to the derivations shipped with this library,
    ``fiberpo_theory.proofs`` (the repository's ``proofs/`` folder); labels are
    ``proofs.<module>`` whatever the package is called.
    """
    if package is None:
        from fiberpo_theory import proofs as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        if only and not any(s in info.name for s in only):
            continue
        name = f"proofs.{info.name}"
        try:
            module = importlib.import_module(f"{package.__name__}.{info.name}")
        except Exception:  # a broken module is reported as a failed derivation
            tb = traceback.format_exc(limit=6)

            def broken(tb=tb):
                raise ImportError(tb)

            yield name, broken
            continue
        if hasattr(module, "DERIVATIONS"):
            for i, fn in enumerate(module.DERIVATIONS):
                yield f"{name}[{getattr(fn, '__name__', i)}]", fn
        elif callable(getattr(module, "derive", None)):
            yield name, module.derive


def run_all(only=None, progress=None) -> tuple[list[Derivation], list[tuple[str, str]], dict[str, float]]:
    """Run the derivations; returns (derivations, failures as (label, traceback), seconds per id or label)."""
    jobs = list(discover(only))
    done, failures, seconds = [], [], {}
    task = progress.add_task("deriving", total=len(jobs)) if progress is not None else None
    for label, fn in jobs:
        if progress is not None:
            progress.update(task, description=label)
        start = time.perf_counter()
        try:
            result = fn()
            if not isinstance(result, Derivation):
                raise TypeError(f"{label} returned {type(result).__name__}, not a Derivation")
            done.append(result)
            seconds[result.id] = time.perf_counter() - start
        except Exception:
            failures.append((label, traceback.format_exc(limit=8)))
            seconds[label] = time.perf_counter() - start
        if progress is not None:
            progress.advance(task)
    return done, failures, seconds


def write(derivations: list[Derivation], out: Path) -> list[Path]:
    """Write one .tex per derivation and main.tex; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths, seen = [], set()
    for d in derivations:
        name = slug(d.id)
        if name in seen:
            raise ValueError(f"two derivations share the id {d.id!r}")
        seen.add(name)
        path = out / f"{name}.tex"
        path.write_text(to_latex(d), encoding="ascii")
        paths.append(path)
    main = out / "main.tex"
    main.write_text(master_document(derivations), encoding="ascii")
    paths.append(main)
    return paths


def compile_pdf(out: Path, *, runs: int = 2, timeout: float = 120) -> tuple[bool, str]:
    """Run pdflatex on ``out/main.tex`` (twice, for the table of contents); (ok, log tail)."""
    exe = shutil.which("pdflatex")
    if exe is None:
        return False, "pdflatex not found"
    proc = None
    for _ in range(runs):
        proc = subprocess.run(
            [exe, "-interaction=nonstopmode", "-halt-on-error", "main.tex"],
            cwd=out, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            break
    ok = proc is not None and proc.returncode == 0 and (out / "main.pdf").exists()
    return ok, (proc.stdout[-3000:] if proc is not None else "")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    if args.only and not any(True for _ in discover(args.only)):
        print(f"fiberpo-theory derive: --only {' '.join(args.only)} matches no proof module", file=sys.stderr)
        return 2
    console = Console(stderr=True, quiet=getattr(args, "quiet", False))
    start = time.perf_counter()
    if getattr(args, "quiet", False):
        derivations, failures, seconds = run_all(args.only)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True) as progress:
            derivations, failures, seconds = run_all(args.only, progress)
    out = Path(args.out)
    paths = write(derivations, out)
    table = Table(title=f"derivations written to {out}")
    table.add_column("id")
    table.add_column("verified")
    table.add_column("seconds", justify="right")
    for d in derivations:
        table.add_row(d.id, "yes" if d.verified else "[red]no[/red]", f"{seconds.get(d.id, 0.0):.1f}")
    console.print(table)
    for label, tb in failures:
        console.print(f"[red]derivation {label} failed[/red]\n{tb}")
    console.print(f"{len(derivations)} derivations, {sum(d.verified for d in derivations)} verified, "
                  f"{len(failures)} failed, {len(paths)} files, {time.perf_counter() - start:.1f} s")
    status = 1 if failures else 0
    if args.pdf:
        ok, log = compile_pdf(out)
        if ok:
            console.print(f"compiled {out / 'main.pdf'}")
        else:
            console.print(f"[red]pdflatex failed[/red]\n{log}")
            status = 1
    return status


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="fiberpo-theory derive")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
