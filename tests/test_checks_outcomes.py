"""checks/_outcomes: the one meaning of each verdict, for every check."""

from fiberpo_theory.checks._outcomes import decide, derivation, from_search, merged_regimes, proof_note
from fiberpo_theory.checks._search_tools import SearchResult

WITNESS = {"x": [0.0, 1.5]}


def test_nothing_found_holds_unless_the_derivation_did_not_verify():
    assert decide(3, "searched").verdict == "holds"
    assert decide(3, "searched", proved=True).verdict == "holds"
    out = decide(3, "searched", proved=False)
    assert out.verdict == "error" and "did not establish" in out.details


def test_a_reproduced_counterexample_fails_and_keeps_its_numbers():
    out = decide(3, "found", counterexample=WITNESS, regimes={"P": 2})
    assert (out.verdict, out.counterexample, out.regimes) == ("fails", WITNESS, {"P": 2})
    # a refutation does not rest on the derivation
    assert decide(3, "found", counterexample=WITNESS, proved=False).verdict == "fails"


def test_a_counterexample_that_does_not_reproduce_is_an_error():
    out = decide(3, "found", counterexample=WITNESS, reproduced=False, condition="c")
    assert out.verdict == "error" and out.counterexample == WITNESS and "did not reproduce" in out.details


def test_a_counterexample_with_a_condition_is_conditional_if_the_proof_stands():
    out = decide(3, "found", counterexample=WITNESS, condition="T = 1")
    assert (out.verdict, out.condition) == ("conditional", "T = 1")
    assert decide(3, "found", counterexample=WITNESS, condition="T = 1", proved=False).verdict == "error"


def test_from_search_rechecks_the_witness():
    found = SearchResult(examples=5, regimes={"R": 1}, witness=dict(WITNESS), message="gap 1e-3")
    out = from_search(found, "5 batches", recheck=lambda w: {"reproduced": False, "gap": 0.0})
    assert out.verdict == "error" and out.counterexample["recheck"] == {"reproduced": False, "gap": 0.0}
    out = from_search(found, "5 batches", recheck=lambda w: {"reproduced": True})
    assert out.verdict == "fails" and out.details.startswith("gap 1e-3; 5 batches") and out.examples == 5
    assert from_search(SearchResult(examples=5), "5 batches", proved=False).verdict == "error"


def test_merged_regimes_adds_counts():
    a, b = SearchResult(1, {"P": 1, "R": 2}), SearchResult(1, {"R": 3, "Z": 1})
    assert merged_regimes(a, b) == {"P": 1, "R": 5, "Z": 1}


def test_derivations_load_once_by_module_name():
    assert derivation("eq16") is derivation("eq16")
    assert proof_note("eq16") == "symbolic derivation proofs/eq16.py verified"
