"""Bad arguments of ``figures`` and ``audit`` (and the command itself): one line on stderr, exit 2, no traceback.

Every case is refused by argparse before any work starts, so none of these renders a figure or runs an audit.
"""

import subprocess
import sys
import textwrap

import pytest

from fiberpo_theory.cli import build_parser, main

GOOD_TARGET = "fiberpo_theory.examples.verl_style:fiberpo_gating"

BAD_ARGUMENTS = [
    (["figures", "--resolution", "0"], "--resolution"),
    (["figures", "--resolution", "-5"], "--resolution"),
    (["figures", "--resolution", "2"], "--resolution"),
    (["figures", "--resolution", "many"], "--resolution"),
    (["figures", "--dpi", "0"], "--dpi"),
    (["figures", "--dpi", "-1"], "--dpi"),
    (["figures", "--dpi", "1.5"], "--dpi"),
    (["audit", GOOD_TARGET, "--seed", "-1"], "--seed"),
    (["audit", GOOD_TARGET, "--max-examples", "0"], "--max-examples"),
    (["audit", GOOD_TARGET, "--eps", "0"], "--eps"),
    (["audit", GOOD_TARGET, "--eps", "nan"], "--eps"),
    (["audit", GOOD_TARGET, "--c-pos", "-0.1"], "--c-pos"),
    (["audit", GOOD_TARGET, "--c-neg", "inf"], "--c-neg"),
    (["audit", "no_colon_here"], "MODULE:FUNCTION"),
    (["audit", "fiberpo_theory.examples.verl_style:missing"], "missing"),
    (["audit", "no_such_module_xyz:fn"], "no_such_module_xyz"),
    (["no-such-command"], "no-such-command"),
    ([], "command"),
]


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse errors exit from inside parse_args
        code = exit_.code
    return code, capsys.readouterr()


@pytest.mark.parametrize("argv, named", BAD_ARGUMENTS, ids=[" ".join(a) or "(none)" for a, _ in BAD_ARGUMENTS])
def test_bad_argument_exits_2_with_one_line(argv, named, capsys):
    code, out = _run(argv, capsys)
    assert code == 2
    lines = [line for line in out.err.splitlines() if line.strip() and not line.startswith(("usage:", " "))]
    assert len(lines) == 1, out.err
    assert named in lines[0]
    assert "Traceback" not in out.err + out.out
    assert out.out == ""  # nothing ran


def test_output_paths_that_cannot_be_written_are_refused(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    code, out = _run(["figures", "--out", str(a_file)], capsys)
    assert code == 2 and "not a directory" in out.err
    code, out = _run(["audit", GOOD_TARGET, "--json", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in out.err
    code, out = _run(["audit", GOOD_TARGET, "--json", str(a_file / "report.json")], capsys)
    assert code == 2 and "not a directory" in out.err


def test_a_real_process_prints_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fiberpo_theory.cli", "figures", "--resolution", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("must be an integer >= 3, got 0")


def _subcommand_help(name: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name].format_help()


def _option_help(name: str, option: str) -> str:
    """The help text of one option, from the options section (the usage line names it too)."""
    text = " ".join(_subcommand_help(name).split())
    options = text[text.index("options:"):]
    after = options[options.index(option + " "):]
    return after[: after.index(")") + 1]


@pytest.mark.parametrize("option, default", [("--out", "figures"), ("--dpi", "150"), ("--resolution", "401")])
def test_figures_help_shows_every_default(option, default):
    assert f"(default: {default})" in _option_help("figures", option)


@pytest.mark.parametrize("option", ["--eps", "--c-pos", "--c-neg", "--seed", "--max-examples"])
def test_audit_options_have_help_with_defaults(option):
    assert "(default: " in _option_help("audit", option)


@pytest.mark.parametrize("name", ["audit", "figures"])
def test_help_texts_do_not_refer_to_an_internal_spec(name):
    assert "SPEC" not in _subcommand_help(name)


def test_audit_doc_stands_on_its_own():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "audit.md").read_text()
    assert "SPEC" not in text


def test_a_target_that_fails_to_import_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_target.py").write_text("raise RuntimeError('import-time failure')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out = _run(["audit", "broken_target:fn"], capsys)
    assert code == 2 and "import-time failure" in out.err and "Traceback" not in out.err
    assert len(out.err.strip().splitlines()) == 1


def test_only_the_chosen_subcommand_is_imported():
    code = textwrap.dedent("""
        import contextlib, io, sys
        from fiberpo_theory.cli import main
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                main(["figures", "--dpi", "0"])
            except SystemExit:
                pass
        print(sorted(m for m in ("fiberpo_theory.bench", "fiberpo_theory.verify", "fiberpo_theory.audit_loss") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
