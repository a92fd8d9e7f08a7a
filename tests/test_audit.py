"""The audit catches what it claims to catch, and passes the package's own FiberPO."""

import json

import pytest
import torch

from fiberpo_theory.tools.audit import PROPERTY_IDS, AuditReport, audit
from fiberpo_theory.tools.cli import main
from fiberpo_theory.examples.verl_style import fiberpo_gating, fiberpo_gating_torch_sign
from fiberpo_theory.core.objectives import fiberpo_gated_ratio

HYPER = dict(eps=0.04, c_pos=0.12, c_neg=0.05)
FAST = dict(HYPER, max_examples=9)


def plain_clip(log_ratio, mask):
    """PPO's token clip: right at r = 1, but no restoring gradient and not FiberPO."""
    return torch.clamp(torch.exp(log_ratio), 1 - HYPER["eps"], 1 + HYPER["eps"])


def whole_batch_as_one_trajectory(log_ratio, mask):
    """FiberPO whose aggregates run over the whole batch: couples rows."""
    keep = mask.bool()
    flat = fiberpo_gated_ratio(log_ratio[keep], torch.zeros(int(keep.sum()), dtype=torch.long), **HYPER)
    return torch.ones_like(log_ratio).masked_scatter(keep, flat)


def test_package_fiberpo_passes_all_seven():
    report = audit(fiberpo_gating, seed=0, **FAST)
    assert [p.id for p in report.properties] == list(PROPERTY_IDS)
    assert report.passed, report
    assert "PASSED (7/7" in str(report)


def test_torch_sign_port_fails_first_order_exact_only_at_r_equal_one():
    report = audit(fiberpo_gating_torch_sign, seed=0, **FAST)
    assert not report.passed
    exact = report["first-order-exact"]
    assert exact.verdict == "fails"
    # the witness is a diagonal entry the bug zeroes: dG_i/dlog r_i = 0 instead of 1
    assert exact.witness["dG/dlog_r"] == 0.0 and exact.witness["expected"] == 1.0
    assert report["on-policy-identity"].passed  # the values at r = 1 are right; only the derivative is wrong
    assert report["first-order-near"].passed  # and only at exactly r = 1: nearby the Jacobian is fine
    assert report["block-diagonal"].passed
    with pytest.raises(AssertionError, match="first-order-exact"):
        report.raise_if_failed()


def test_plain_clip_has_no_restorative_gradient_and_is_not_fiberpo():
    report = audit(plain_clip, seed=0, **FAST)
    assert report["restorative-gradient"].verdict == "fails"
    assert report["matches-reference"].verdict == "fails"
    witness = report["matches-reference"].witness
    assert abs(witness["value"] - witness["reference"]) > 1e-6
    assert report["first-order-exact"].passed  # clip(r) is the identity around r = 1


def test_cross_row_coupling_fails_block_diagonal():
    report = audit(whole_batch_as_one_trajectory, seed=0, **FAST)
    result = report["block-diagonal"]
    assert result.verdict == "fails"
    assert result.witness["magnitude"] > 0


def test_a_crashing_function_is_a_failed_property_not_a_crash():
    def broken(log_ratio, mask):
        raise RuntimeError("boom")

    report = audit(broken, seed=0, **FAST)
    assert all(p.verdict == "fails" for p in report.properties)
    assert "boom" in report["on-policy-identity"].witness["error"]


def test_wrong_output_shape_fails():
    report = audit(lambda x, m: x.sum(dim=1), seed=0, **FAST)
    assert "shape" in report["on-policy-identity"].details


@pytest.mark.parametrize("name, value", [("eps", -1.0), ("c_pos", 0.0), ("c_neg", float("nan")), ("max_examples", 0), ("seed", -1), ("seed", 1.5)])
def test_bad_arguments_name_themselves(name, value):
    kwargs = dict(HYPER, max_examples=3)
    kwargs[name] = value
    with pytest.raises(ValueError, match=name):
        audit(fiberpo_gating, **kwargs)


def test_fn_must_be_callable():
    with pytest.raises(ValueError, match="fn"):
        audit("not a function", **HYPER)


def test_report_is_usable_in_pytest_and_serialisable():
    report = audit(fiberpo_gating, seed=1, **FAST)
    assert isinstance(report, AuditReport) and bool(report)
    data = json.loads(json.dumps(report.to_json(), default=str))
    assert {"id", "verdict", "witness", "details"} <= set(data["properties"][0])


def test_cli_json_and_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.json"
    assert main(["audit", "fiberpo_theory.examples.verl_style:fiberpo_gating", "--json", str(good), "--max-examples", "6"]) == 0
    data = json.loads(good.read_text())
    assert [p["id"] for p in data["properties"]] == list(PROPERTY_IDS)
    assert all(p["verdict"] == "holds" for p in data["properties"])
    assert main(["audit", "fiberpo_theory.examples.verl_style:fiberpo_gating_torch_sign", "--max-examples", "6"]) == 1
    assert "FAILS] first-order-exact" in capsys.readouterr().out
    assert main(["audit", "no_colon_here"]) == 2
    assert main(["audit", "fiberpo_theory.examples.verl_style:missing"]) == 2


def test_torch_sign_port_values_differ_where_one_token_is_exactly_on_policy():
    """Why matches-reference can fail too: torch.sign(0) = 0 drops the token from the fiber clip."""
    x = torch.tensor([[0.125, 0.0]], dtype=torch.float64)
    mask = torch.ones_like(x)
    buggy, right = fiberpo_gating_torch_sign(x, mask), fiberpo_gating(x, mask)
    assert torch.equal(buggy[0, 0], right[0, 0])
    assert abs(float(buggy[0, 1] - right[0, 1])) > 1e-2


VALUE_PROPERTIES = list(PROPERTY_IDS)  # every property compares values or gradients


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_output_fails_every_property_with_a_witness(bad):
    def non_finite(log_ratio, mask):
        return log_ratio * 0 + bad  # depends on the input, so its Jacobian is non-finite too (nan)

    report = audit(non_finite, seed=0, **FAST)
    for pid in VALUE_PROPERTIES:
        result = report[pid]
        assert result.verdict == "fails", result
        assert result.witness, result
    assert "non-finite" in report["on-policy-identity"].details or "inf" in report["on-policy-identity"].details
    assert report["on-policy-identity"].witness["gated_ratio"] != 1.0
    data = json.loads(json.dumps(report.to_json()), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["passed"] is False


def test_nan_only_in_the_jacobian_at_r_equal_one_fails_first_order_exact():
    """Values exactly FiberPO's, but d sqrt(|x|) at x = 0 puts 0 · inf = NaN into the Jacobian at r = 1."""
    def nan_gradient(log_ratio, mask):
        return fiberpo_gating(log_ratio, mask) + 0 * log_ratio.abs().sqrt()

    report = audit(nan_gradient, seed=0, **FAST)
    assert report["on-policy-identity"].passed and report["matches-reference"].passed
    exact = report["first-order-exact"]
    assert exact.verdict == "fails"
    assert exact.witness["dG/dlog_r"] != exact.witness["dG/dlog_r"]  # the witness entry is the NaN itself


def _console_transcripts(text):
    """(argv, printed lines, exit status) of each ``$ fiberpo-theory audit ...`` session in a markdown page."""
    import re
    import shlex

    for block in re.findall(r"```console\n(.*?)```", text, re.S):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if not line.startswith("$ fiberpo-theory audit "):
                continue
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("$ ")), len(lines))
            status = int(lines[end + 1]) if end + 1 < len(lines) and lines[end] == "$ echo $?" else None
            yield shlex.split(line[2:])[1:], lines[i + 1:end], status


def test_the_audit_transcripts_in_the_docs_are_what_the_command_prints(tmp_path, monkeypatch, capsys):
    """docs/audit.md shows real runs: each one, rerun now, prints exactly those lines and exit status."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "audit.md").read_text()
    transcripts = list(_console_transcripts(text))
    assert len(transcripts) >= 2
    monkeypatch.chdir(tmp_path)  # the --json files the transcripts name land here
    for argv, printed, status in transcripts:
        code = main(argv)
        assert capsys.readouterr().out.splitlines() == printed, argv
        assert status is None or code == status, argv
