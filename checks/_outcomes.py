"""From evidence to a verdict: the one place that says what each verdict means.

Every check gathers evidence (a Hypothesis search, a SymPy derivation, a
scan) and hands it to :func:`decide` or :func:`from_search`:

* ``holds``: nothing contradicted the claim and, where the check relies on a
  derivation, the derivation verified.
* ``fails``: a counterexample that an independent re-check reproduced.
* ``conditional``: a reproduced counterexample to the claim as printed, plus
  the condition under which the claim does hold.
* ``error``: the check could not reach a verdict: its derivation did not
  verify (the proof half of the check is missing), or its counterexample did
  not reproduce on re-check (the search and the re-check disagree).

Derivations are loaded through :func:`derivation` (once per process).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Any, Callable

from fiberpo_theory.theory.claims import Outcome
from fiberpo_theory.symbolic import Derivation

PROOFS = "fiberpo_theory.proofs"  # the repository's proofs/ folder, installed inside the package


def proof_module(module: str):
    """The module ``proofs/<module>.py`` itself, for checks that reuse its SymPy helpers."""
    return importlib.import_module(f"{PROOFS}.{module}")


@lru_cache(maxsize=None)
def derivation(module: str) -> Derivation:
    """The derivation ``derive()`` of ``proofs/<module>.py``, computed once per process."""
    return proof_module(module).derive()


def proof_note(module: str) -> str:
    """``symbolic derivation proofs/<module>.py verified`` (or ``NOT verified``), for a check's evidence."""
    status = "verified" if derivation(module).verified else "NOT verified"
    return f"symbolic derivation proofs/{module}.py {status}"


def decide(
    examples: int,
    details: str,
    *,
    regimes: dict[str, int] | None = None,
    counterexample: dict[str, Any] | None = None,
    reproduced: bool = True,
    condition: str | None = None,
    proved: bool | None = None,
) -> Outcome:
    """The verdict for a check's evidence (see the module docstring for the rules).

    ``counterexample``: what contradicts the claim as printed, already re-checked
    (``reproduced`` says whether the re-check agreed).  ``condition``: with a
    counterexample, the hypothesis under which the claim holds.  ``proved``: for a
    check whose symbolic half establishes the claim, whether it did (a derivation's
    ``verified``); ``False`` means the check could not establish the claim: ``error``.
    """
    regimes = regimes or {}
    if counterexample is not None and not reproduced:
        return Outcome("error", examples, f"counterexample did not reproduce on re-check: {details}",
                       counterexample=counterexample, regimes=regimes)
    if counterexample is not None and not condition:
        return Outcome("fails", examples, details, counterexample=counterexample, regimes=regimes)
    if proved is False:  # what holds (outright or under the condition) rests on the derivation
        return Outcome("error", examples, f"the symbolic half did not establish the claim; {details}",
                       counterexample=counterexample, regimes=regimes)
    if counterexample is not None:
        return Outcome("conditional", examples, details, counterexample=counterexample, condition=condition, regimes=regimes)
    return Outcome("holds", examples, details, regimes=regimes)


def from_search(
    result,
    details: str,
    *,
    recheck: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    condition: str | None = None,
    proved: bool | None = None,
    examples: int | None = None,
    regimes: dict[str, int] | None = None,
) -> Outcome:
    """:func:`decide` for one search result (``_search_tools.SearchResult``).

    A witness is re-checked by ``recheck(witness) -> dict`` (stored under
    ``"recheck"``; its ``"reproduced"`` entry decides between ``fails`` and
    ``error``).  ``examples`` / ``regimes`` override the search's own counts
    when a check combined several searches.
    """
    examples = result.examples if examples is None else examples
    regimes = result.regimes if regimes is None else regimes
    if not result.falsified:
        return decide(examples, details, regimes=regimes, proved=proved)
    witness, reproduced = dict(result.witness), True
    if recheck is not None:
        witness["recheck"] = recheck(result.witness)
        reproduced = bool(witness["recheck"].get("reproduced", True))
    return decide(examples, f"{result.message}; {details}", regimes=regimes, counterexample=witness,
                  reproduced=reproduced, condition=condition, proved=proved)


def merged_regimes(*results) -> dict[str, int]:
    """The regime counts of several searches added up."""
    total: dict[str, int] = {}
    for result in results:
        for key, count in result.regimes.items():
            total[key] = total.get(key, 0) + count
    return total
