"""The claim registry: every audited claim of the paper (Fibration Policy Optimization, arXiv:2603.08239) with its check.

A check is a plain function ``check(profile) -> Outcome``.  It searches for
evidence and reports what it found; it never decides the verdict in advance.
Checks live in the ``fiberpo_theory.checks`` package (the repository's ``checks/`` folder) and register themselves with
the :func:`claim` decorator; :func:`registry` imports them all.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

VERDICTS = ("holds", "fails", "conditional", "error")
METHODS = ("symbolic", "property", "lp", "exact-expectation", "numeric")


@dataclass(frozen=True)
class Profile:
    """How hard checks search.  ``quick`` fits CI; ``thorough`` is for long runs."""

    name: str
    max_examples: int
    seed: int

    @classmethod
    def named(cls, name: str, seed: int = 0) -> "Profile":
        sizes = {"quick": 200, "thorough": 10_000}
        if name not in sizes:
            raise ValueError(f"profile must be one of {sorted(sizes)}, got {name!r}")
        return cls(name=name, max_examples=sizes[name], seed=seed)


@dataclass
class Outcome:
    """What a check found.

    ``examples`` counts the instances examined; ``regimes`` names the regimes
    the search reached (so "found nothing" can be read as "searched here");
    ``counterexample`` holds exact, re-checkable numbers when the verdict is
    ``fails`` or ``conditional``; ``condition`` states the extra hypothesis
    under which a ``conditional`` claim holds.
    """

    verdict: str
    examples: int
    details: str
    counterexample: dict[str, Any] | None = None
    condition: str | None = None
    regimes: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass(frozen=True)
class Claim:
    id: str
    paper_ref: str
    statement: str
    method: str
    check: Callable[[Profile], Outcome]


@dataclass
class ClaimReport:
    id: str
    paper_ref: str
    statement: str
    method: str
    verdict: str
    examples: int
    counterexample: dict[str, Any] | None
    details: str
    seconds: float
    condition: str | None = None
    regimes: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_REGISTRY: dict[str, Claim] = {}


def claim(id: str, paper_ref: str, method: str, statement: str):
    """Decorator registering ``check(profile) -> Outcome`` under a claim id (`fiberpo-theory verify --list` prints them).

    ``paper_ref`` cites the paper; ``method`` is one of :data:`METHODS`;
    ``statement`` is the claim in our own words.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def register(check: Callable[[Profile], Outcome]):
        if id in _REGISTRY and _REGISTRY[id].check is not check:
            raise ValueError(f"claim {id!r} registered twice")
        _REGISTRY[id] = Claim(id, paper_ref, statement, method, check)
        return check

    return register


def import_checks(package=None) -> dict[str, str]:
    """Import every module of a check package, each on its own.

    ``package`` defaults to the checks shipped with this library,
    ``fiberpo_theory.checks`` (the repository's ``checks/`` folder).

    One broken module must not hide the claims of the others, so failures are
    returned (module name -> traceback) instead of raised.
    """
    if package is None:
        from fiberpo_theory import checks as package

    failures: dict[str, str] = {}
    for info in pkgutil.iter_modules(package.__path__):
        name = f"{package.__name__}.{info.name}"
        try:
            importlib.import_module(name)
        except Exception:  # reported by the caller; verify must always produce a table
            failures[name] = traceback.format_exc(limit=3)
    return failures


def registered() -> dict[str, Claim]:
    """The claims registered so far, without importing anything."""
    return dict(_REGISTRY)


def registry(strict: bool = True, package=None) -> dict[str, Claim]:
    """All registered claims; with ``strict`` a check module that fails to import raises."""
    failures = import_checks(package)
    if strict and failures:
        raise ImportError("claim check modules failed to import:\n" + "\n".join(failures.values()))
    return registered()


def run_claim(entry: Claim, profile: Profile) -> ClaimReport:
    """Run one check; an exception becomes verdict ``error`` with its traceback."""
    start = time.perf_counter()
    try:
        outcome = entry.check(profile)
    except Exception:  # a check that cannot run is reported, not hidden
        outcome = Outcome("error", 0, traceback.format_exc(limit=8))
    return ClaimReport(
        id=entry.id,
        paper_ref=entry.paper_ref,
        statement=entry.statement,
        method=entry.method,
        verdict=outcome.verdict,
        examples=outcome.examples,
        counterexample=outcome.counterexample,
        details=outcome.details,
        seconds=time.perf_counter() - start,
        condition=outcome.condition,
        regimes=outcome.regimes,
    )
