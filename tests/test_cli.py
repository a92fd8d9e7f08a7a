"""Bad arguments of every subcommand (and of the command itself): one line on stderr, exit 2, no traceback.

Every case is refused by argparse before any work starts, so none of these renders a figure or runs an audit.
"""

import subprocess
import sys
import textwrap

import pytest

from fiberpo_theory.tools.cli import build_parser, main

GOOD_TARGET = "fiberpo_theory.examples.verl_style:fiberpo_gating"

BAD_ARGUMENTS = [
    (["figures", "--resolution", "0"], "--resolution"),
    (["figures", "--resolution", "-5"], "--resolution"),
    (["figures", "--resolution", "2"], "--resolution"),
    (["figures", "--resolution", "many"], "--resolution"),
    (["figures", "--dpi", "0"], "--dpi"),
    (["figures", "--dpi", "-1"], "--dpi"),
    (["figures", "--dpi", "1.5"], "--dpi"),
    (["figures", "--dpi", "100000"], "--dpi"),  # matplotlib would refuse the image after all the computing
    (["figures", "--resolution", "100000"], "--resolution"),  # 10^10 grid points: out of memory
    (["audit", GOOD_TARGET, "--seed", "-1"], "--seed"),
    (["audit", GOOD_TARGET, "--max-examples", "0"], "--max-examples"),
    (["audit", GOOD_TARGET, "--eps", "0"], "--eps"),
    (["audit", GOOD_TARGET, "--eps", "nan"], "--eps"),
    (["audit", GOOD_TARGET, "--c-pos", "-0.1"], "--c-pos"),
    (["audit", GOOD_TARGET, "--c-neg", "inf"], "--c-neg"),
    (["audit", "no_colon_here"], "MODULE:FUNCTION"),
    (["audit", "fiberpo_theory.examples.verl_style:missing"], "missing"),
    (["audit", "no_such_module_xyz:fn"], "no_such_module_xyz"),
    (["verify", "--seed", "-1"], "--seed"),
    (["verify", "--jobs", "0"], "--jobs"),
    (["verify", "--only", "no-such-claim"], "no-such-claim"),
    (["derive", "--only", "no-such-proof"], "no-such-proof"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--tokens", "-3"], "--tokens"),
    (["bench", "--trajectories", "0"], "--trajectories"),
    (["bench", "--methods", "nope"], "--methods"),
    (["bench", "--tokens", "10", "--trajectories", "20"], "--trajectories"),
    (["bench", "--scaling", "0"], "--scaling"),
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


def test_derive_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("")
    code, out = _run(["derive", "--out", str(target)], capsys)
    assert code == 2 and "not a directory" in out.err


def test_bench_cuda_without_a_gpu_is_refused(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the refusal is for CPU-only torch builds")
    code, out = _run(["bench", "--device", "cuda"], capsys)
    assert code == 2 and "CUDA" in out.err


def test_verify_list_prints_every_audited_id(capsys):
    from fiberpo_theory.tools import verify

    code, out = _run(["verify", "--list"], capsys)
    assert code == 0
    printed = [line.split()[0] for line in out.out.splitlines() if line.strip()]
    assert printed[: len(verify.AUDITED_IDS)] == list(verify.AUDITED_IDS)


def test_bench_options_explain_themselves(capsys):
    code, out = _run(["bench", "--help"], capsys)
    assert code == 0
    options = out.out.split("options:", 1)[1]
    for option in ("--trajectories", "--repeats", "--device"):
        assert option in options
    assert "default" in options.split("--repeats", 1)[1].split("--device", 1)[0]


def test_output_paths_that_cannot_be_written_are_refused(tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    code, out = _run(["figures", "--out", str(a_file)], capsys)
    assert code == 2 and "not a directory" in out.err
    code, out = _run(["figures", "--out", str(a_file / "sub")], capsys)  # was a NotADirectoryError traceback
    assert code == 2 and "not a directory" in out.err and "Traceback" not in out.err
    code, out = _run(["audit", GOOD_TARGET, "--json", str(tmp_path)], capsys)
    assert code == 2 and "is a directory" in out.err
    code, out = _run(["audit", GOOD_TARGET, "--json", str(a_file / "report.json")], capsys)
    assert code == 2 and "not a directory" in out.err


def test_a_real_process_prints_one_line_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "fiberpo_theory.tools.cli", "figures", "--resolution", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("must be an integer from 3 to 2001, got 0")


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


@pytest.mark.parametrize("option", ["--seed", "--max-examples"])
def test_audit_loss_options_have_help_with_defaults(option):
    assert "(default: " in _option_help("audit-loss", option)


@pytest.mark.parametrize("name", ["audit", "audit-loss", "figures", "verify", "derive", "bench"])
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
        from fiberpo_theory.tools.cli import main
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                main(["figures", "--dpi", "0"])
            except SystemExit:
                pass
        print(sorted(m for m in ("fiberpo_theory.tools.bench", "fiberpo_theory.tools.verify", "fiberpo_theory.tools.audit_loss") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def _fake_subcommand(monkeypatch, check_error=None, run_error=None):
    """A subcommand module 'fake' whose check_args and run raise the given errors (None: succeed)."""
    import types

    from fiberpo_theory.tools import cli

    module = types.ModuleType("fiberpo_theory_fake_subcommand")
    module.add_arguments = lambda parser: parser.add_argument("--x", default="1")
    calls = []

    def check_args(args):
        calls.append("check")
        if check_error is not None:
            raise check_error

    def run(args):
        calls.append("run")
        if run_error is not None:
            raise run_error
        return 0

    module.check_args, module.run = check_args, run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", (module.__name__, "a test subcommand"))
    return calls


def test_a_value_error_from_check_args_is_one_line_and_exit_2(monkeypatch, capsys):
    calls = _fake_subcommand(monkeypatch, check_error=ValueError("--x clashes with --y\nsecond line of detail"))
    code, out = _run(["fake"], capsys)
    assert code == 2 and calls == ["check"]  # the work never started
    assert out.err.strip() == "fiberpo-theory fake: error: --x clashes with --y"


def test_a_value_error_raised_by_the_work_itself_is_not_turned_into_exit_2(monkeypatch):
    calls = _fake_subcommand(monkeypatch, run_error=ValueError("a bug in the work"))
    with pytest.raises(ValueError, match="a bug in the work"):
        main(["fake"])
    assert calls == ["check", "run"]


def test_other_exceptions_from_check_args_are_not_swallowed(monkeypatch):
    _fake_subcommand(monkeypatch, check_error=RuntimeError("not an argument problem"))
    with pytest.raises(RuntimeError):
        main(["fake"])


AUDIT_LOSS_BAD_ARGUMENTS = [
    (["audit-loss"], "MODULE:FUNCTION"),
    (["audit-loss", GOOD_TARGET, "--verl-registry"], "--verl-registry"),
    (["audit-loss", GOOD_TARGET, "--markdown", "x.md"], "--markdown"),
    (["audit-loss", "no_colon_here"], "MODULE:FUNCTION"),
    (["audit-loss", "--verl-registry", "--seed", "-1"], "--seed"),
    (["audit-loss", "--verl-registry", "--max-examples", "0"], "--max-examples"),
    (["audit-loss", "--verl-registry", "--mode", "token-average"], "--mode"),
    (["audit-loss", "--verl-registry", "--set", "clip_ratio=abc"], "clip_ratio"),
    (["audit-loss", "--verl-registry", "--set", "use_kl_loss=1"], "use_kl_loss"),
    (["audit-loss", "--verl-registry", "--set", "policy_loss=3"], "policy_loss"),
    (["audit-loss", "--verl-registry", "--set", "policy_loss.no_such_key=1"], "no_such_key"),
    (["audit-loss", "--verl-registry", "--set", "loss_agg_mode=nope"], "loss_agg_mode"),
]


@pytest.mark.parametrize("argv, named", AUDIT_LOSS_BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in AUDIT_LOSS_BAD_ARGUMENTS])
def test_audit_loss_bad_argument_exits_2_with_one_line(argv, named, capsys):
    pytest.importorskip("verl.workers.config.actor")
    test_bad_argument_exits_2_with_one_line(argv, named, capsys)
