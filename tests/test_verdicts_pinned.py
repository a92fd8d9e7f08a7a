"""The published verdicts (docs/verdicts.json) are what a fresh verify run gives.

One run of ``fiberpo-theory verify --json`` (quick profile, seed 0: the command
that wrote the file) in a subprocess, as a user would run it.  Any change of a
claim's verdict, counterexample, condition or example count fails here, and
docs/verdicts.* must then be regenerated with

    fiberpo-theory verify --profile quick --seed 0 --json docs/verdicts.json --markdown docs/verdicts.md
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "docs" / "verdicts.json"
PINNED_FIELDS = ("verdict", "counterexample", "condition", "examples")
REL = 1e-9  # floats in counterexamples: the same search on another machine may differ in the last bits


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=REL, abs_tol=1e-300) or a == b
    return a == b


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("verify") / "verdicts.json"
    run = subprocess.run(
        [sys.executable, "-m", "fiberpo_theory.tools.cli", "verify", "--profile", "quick", "--seed", "0", "--json", str(out)],
        cwd=tmp_path_factory.getbasetemp(), capture_output=True, text=True, timeout=600,
    )
    assert out.exists(), run.stderr[-2000:]
    return json.loads(out.read_text())


def test_the_run_covers_the_published_claims(fresh):
    published = json.loads(PUBLISHED.read_text())
    assert [c["id"] for c in fresh["claims"]] == [c["id"] for c in published["claims"]]
    assert (fresh["profile"], fresh["seed"], fresh["max_examples"]) == (published["profile"], published["seed"], published["max_examples"])


def test_every_verdict_and_counterexample_matches_the_published_one(fresh):
    published = {c["id"]: c for c in json.loads(PUBLISHED.read_text())["claims"]}
    changed = []
    for claim in fresh["claims"]:
        old = published.get(claim["id"], {})
        for field in PINNED_FIELDS:
            if not _same(claim.get(field), old.get(field)):
                changed.append(f"{claim['id']}.{field}: published {str(old.get(field))[:200]!r}, now {str(claim.get(field))[:200]!r}")
    assert not changed, "verify no longer reproduces docs/verdicts.json (regenerate it if the change is intended):\n" + "\n".join(changed)
    assert fresh["summary"] == json.loads(PUBLISHED.read_text())["summary"]


def test_the_markdown_table_matches_the_json():
    data = json.loads(PUBLISHED.read_text())
    text = (ROOT / "docs" / "verdicts.md").read_text()
    for claim in data["claims"]:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{claim['id']}` |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2] == f"**{claim['verdict']}**" and cells[4] == str(claim["examples"]), row


def test_same_compares_what_it_should():
    assert _same({"x": [1.0, 2.0]}, {"x": [1.0, 2.0 * (1 + 1e-12)]})
    assert not _same({"x": [1.0, 2.0]}, {"x": [1.0, 2.001]})
    assert not _same({"x": 1.0}, {"x": 1.0, "y": 0})
    assert not _same("holds", "fails")
