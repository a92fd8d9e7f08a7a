"""``fiberpo-theory verify``: report format, exit codes, --only, and missing or broken checks."""

import json
import sys
import textwrap

import pytest

from fiberpo_theory import checks
from fiberpo_theory.theory import claims
from fiberpo_theory.tools import verify
from fiberpo_theory.theory.claims import Claim, Outcome, Profile
from fiberpo_theory.tools.cli import main

FAST_IDS = ["kl-bias", "prop-5.4"]  # in the order of verify.AUDITED_IDS
KEYS = {"id", "paper_ref", "statement", "method", "verdict", "examples", "counterexample", "details", "seconds"}


def fake(claim_id, outcome=None, error=None):
    def check(profile):
        if error:
            raise error
        return outcome

    return Claim(claim_id, "Eq. 0", "a planted claim", "numeric", check)


@pytest.fixture
def registry_of(monkeypatch):
    """Replace the loaded registry with the given claims (and no import failures)."""

    # planted checks are closures, which worker processes cannot receive: these tests run with --jobs 1
    def install(*entries, failures=None):
        monkeypatch.setattr(verify, "load_registry", lambda: ({e.id: e for e in entries}, failures or {}))

    return install


def test_spec_ids_are_unique_and_include_every_registered_check_of_mine():
    assert len(set(verify.AUDITED_IDS)) == len(verify.AUDITED_IDS) == 30
    registered, _ = verify.load_registry()
    for claim_id in ("thm-4.5", "prop-5.3", "prop-5.4", "prop-5.5", "kl-bias", "claim-3.5"):
        assert claim_id in registered and claim_id in verify.AUDITED_IDS


def test_cli_runs_real_checks_and_writes_json_and_markdown(tmp_path, capsys):
    out, md = tmp_path / "v.json", tmp_path / "v.md"
    code = main(["verify", "--only", *reversed(FAST_IDS), "--seed", "3", "--json", str(out), "--markdown", str(md)])
    report = json.loads(out.read_text())
    assert [c["id"] for c in report["claims"]] == FAST_IDS  # the order of verify.AUDITED_IDS, only the selected ids
    for entry in report["claims"]:
        assert KEYS <= set(entry)
        assert entry["verdict"] in claims.VERDICTS
        assert entry["examples"] > 0
    assert report["seed"] == 3 and report["profile"] == "quick"
    assert code == (2 if any(c["verdict"] == "error" for c in report["claims"]) else 0)
    text = md.read_text()
    assert all(f"`{i}`" in text for i in FAST_IDS)
    printed = capsys.readouterr().out
    assert "seed 3" in printed and "kl-bias" in printed


def test_same_seed_reproduces_the_report(tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    main(["verify", "--only", "prop-5.4", "--seed", "5", "--json", str(first)])
    main(["verify", "--only", "prop-5.4", "--seed", "5", "--json", str(second)])
    strip = lambda path: [{k: v for k, v in c.items() if k != "seconds"} for c in json.loads(path.read_text())["claims"]]  # noqa: E731
    assert strip(first) == strip(second)


def test_missing_id_is_an_error_row_not_a_crash(registry_of, tmp_path):
    registry_of(fake("kl-bias", Outcome("holds", 3, "fine")))
    out = tmp_path / "v.json"
    assert main(["verify", "--jobs", "1", "--json", str(out)]) == 2
    rows = {c["id"]: c for c in json.loads(out.read_text())["claims"]}
    assert list(rows) == list(verify.AUDITED_IDS)
    assert rows["kl-bias"]["verdict"] == "holds"
    assert rows["thm-4.5"]["verdict"] == "error"
    assert rows["thm-4.5"]["details"].startswith("no check registered")


def test_exit_codes_for_fails_and_errors(registry_of):
    registry_of(fake("kl-bias", Outcome("fails", 1, "refuted", counterexample={"x": 1.0})), fake("prop-5.4", Outcome("holds", 1, "ok")))
    assert main(["verify", "--jobs", "1", "--only", "kl-bias", "prop-5.4"]) == 0
    assert main(["verify", "--jobs", "1", "--only", "kl-bias", "prop-5.4", "--fail-on", "fails"]) == 1
    registry_of(fake("kl-bias", error=RuntimeError("check blew up")))
    assert main(["verify", "--jobs", "1", "--only", "kl-bias", "--fail-on", "fails"]) == 2


def test_a_raising_check_is_reported_with_its_traceback(registry_of, tmp_path):
    registry_of(fake("kl-bias", error=ZeroDivisionError("planted")))
    out = tmp_path / "v.json"
    main(["verify", "--jobs", "1", "--only", "kl-bias", "--json", str(out)])
    (row,) = json.loads(out.read_text())["claims"]
    assert row["verdict"] == "error" and "ZeroDivisionError: planted" in row["details"]


def test_unknown_only_id_exits_2(capsys):
    assert main(["verify", "--only", "no-such-claim"]) == 2
    assert "no-such-claim" in capsys.readouterr().err


def test_a_broken_check_module_is_reported_not_raised(tmp_path, monkeypatch):
    (tmp_path / "zz_broken_for_test.py").write_text(textwrap.dedent("raise ImportError('planted import failure')\n"))
    monkeypatch.setattr(checks, "__path__", [*checks.__path__, str(tmp_path)])
    try:
        registered, failures = verify.load_registry()
    finally:
        sys.modules.pop("fiberpo_theory.checks.zz_broken_for_test", None)
    assert "fiberpo_theory.checks.zz_broken_for_test" in failures
    assert "thm-4.5" in registered  # the other modules still load
    row = verify.missing_report("eq-10", failures)
    assert row.verdict == "error" and "planted import failure" in row.details


def test_counterexamples_with_tensors_serialise(tmp_path):
    import torch

    report = verify.collect(["kl-bias"], Profile.named("quick"), {"kl-bias": fake("kl-bias", Outcome("fails", 1, "x", counterexample={"t": torch.tensor([1.5])}))}, {})
    path = tmp_path / "r.json"
    verify.write_json(path, verify.json_report(report, Profile.named("quick"), 0.1))
    assert json.loads(path.read_text())["claims"][0]["counterexample"] == {"t": [1.5]}


def test_parallel_jobs_give_the_same_reports_as_one_process(tmp_path):
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main(["verify", "--only", *FAST_IDS, "--jobs", "1", "--json", str(one)]) == 0
    assert main(["verify", "--only", *FAST_IDS, "--jobs", "2", "--json", str(two)]) == 0
    strip = lambda path: [{k: v for k, v in c.items() if k != "seconds"} for c in json.loads(path.read_text())["claims"]]  # noqa: E731
    assert [c["id"] for c in strip(two)] == FAST_IDS
    assert strip(one) == strip(two)


def test_jobs_below_one_is_rejected(capsys):
    try:
        code = main(["verify", "--only", "prop-5.4", "--jobs", "0"])
    except SystemExit as exit_:  # rejected by argparse before any check runs
        code = exit_.code
    assert code == 2
    assert "--jobs" in capsys.readouterr().err


def test_verify_loads_the_check_package_it_is_given(tmp_path, monkeypatch):
    import importlib
    import types

    pkg = tmp_path / "other_checks_for_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text(textwrap.dedent("""
        from fiberpo_theory.theory.claims import Outcome, claim

        @claim(id="zz-given-package", paper_ref="test", statement="s", method="property")
        def check(profile):
            return Outcome("holds", 1, "ok")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(claims, "_REGISTRY", dict(claims._REGISTRY))
    package = importlib.import_module("other_checks_for_test")
    try:
        registered, failures = verify.load_registry(package)
    finally:
        for name in ("other_checks_for_test", "other_checks_for_test.one"):
            sys.modules.pop(name, None)
    assert failures == {} and "zz-given-package" in registered
    assert isinstance(package, types.ModuleType)
