"""Every code block of the user guide runs (python blocks in one namespace per page)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if "```python" in p.read_text() or "fiberpo-theory" in p.read_text())
BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.S)


def blocks(page: Path):
    return [(lang, code) for lang, code in BLOCK.findall(page.read_text())]


@pytest.mark.parametrize("page", [p for p in PAGES if "```python" in p.read_text()], ids=lambda p: p.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for index, (lang, code) in enumerate(blocks(page)):
        if lang == "python":
            exec(compile(code, f"{page.name}[block {index}]", "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_cli_blocks_run(page, tmp_path):
    for lang, code in blocks(page):
        if lang != "bash":
            continue
        for line in code.strip().splitlines():
            if not line.startswith("fiberpo-theory"):
                continue  # install lines are exercised by .ci/run itself
            args = shlex.split(line)[1:]
            done = subprocess.run([sys.executable, "-m", "fiberpo_theory.tools.cli", *args], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=300)
            assert done.returncode in (0,), f"{line!r} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
