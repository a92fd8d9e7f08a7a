"""Bad command-line arguments of verify, derive and bench: one line on stderr, exit 2, no traceback."""

import pytest

from fiberpo_theory.cli import main

BAD_ARGUMENTS = [
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
]


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse errors exit from inside parse_args
        code = exit_.code
    return code, capsys.readouterr()


@pytest.mark.parametrize("argv, named", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_argument_exits_2_with_one_line(argv, named, capsys):
    code, out = _run(argv, capsys)
    assert code == 2
    lines = [line for line in out.err.splitlines() if not line.startswith(("usage:", " "))]
    assert len(lines) == 1, out.err
    assert named in lines[0]
    assert "Traceback" not in out.err + out.out


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
    from fiberpo_theory import verify

    code, out = _run(["verify", "--list"], capsys)
    assert code == 0
    printed = [line.split()[0] for line in out.out.splitlines() if line.strip()]
    assert printed[: len(verify.AUDITED_IDS)] == list(verify.AUDITED_IDS)


@pytest.mark.parametrize("command", ["verify", "bench", "derive"])
def test_help_texts_do_not_refer_to_a_spec_file(command, capsys):
    code, out = _run([command, "--help"], capsys)
    assert code == 0
    assert "SPEC" not in out.out
    if command == "bench":  # every option explains itself
        for option in ("--trajectories", "--repeats", "--device"):
            assert option in out.out
        options = out.out.split("options:", 1)[1]
        assert "default" in options.split("--repeats", 1)[1].split("--device", 1)[0]
