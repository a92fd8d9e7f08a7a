"""The bench command: cases, baselines, goal lines, JSON and markdown output, argument errors."""

import json
import subprocess
import sys

import pytest
import torch

from fiberpo_theory.tools import bench
from fiberpo_theory.core import objectives as obj
from fiberpo_theory.tools.cli import main


def test_layouts_hold_the_same_tokens():
    b = bench.make_batch(2000, 13)
    assert torch.equal(b.padded_log_prob[b.mask], b.log_ratio)
    assert torch.equal(b.padded_advantages[b.mask], b.advantages)
    assert torch.equal(b.mask.sum(1), b.lengths)
    assert bool((b.traj_id[1:] >= b.traj_id[:-1]).all())


def test_every_case_computes_the_same_fiberpo_loss_in_every_layout():
    b = bench.make_batch(3000, 20, dtype=torch.float64)
    cases = {c.name: c for c in bench.all_cases(b)}
    losses = {name: float(cases[name].loss(cases[name].start.clone())) for name in
              ("fiberpo/sorted", "fiberpo_objective/sorted", "fiberpo/shuffled", "fiberpo/padded",
                           "fiberpo_loss/padded")}
    assert max(losses.values()) - min(losses.values()) < 1e-10, losses
    domain = [float(cases[n].loss(cases[n].start.clone())) for n in
              ("fiberpo_domain/sorted", "fiberpo_domain/shuffled", "fiberpo_domain/padded", "fiberpo_domain/indexed")]
    assert max(domain) - min(domain) < 1e-10


def test_verl_baseline_is_verls_own_loss():
    pytest.importorskip("verl")
    from verl.trainer.ppo.core_algos import agg_loss

    b = bench.make_batch(2000, 10, dtype=torch.float64)
    case = next(c for c in bench.all_cases(b) if c.name == "verl/padded")
    # log_prob - old = log_ratio, advantages per row: verl's dual clip equals the plain min-form clip here
    ratio = torch.exp(b.padded_log_prob)
    adv = b.padded_advantages
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - bench.EPS, 1 + bench.EPS))
    dual = torch.where(adv < 0, torch.minimum(clipped, -adv * 3.0), clipped)
    want = agg_loss(dual, b.mask.double(), "seq-mean-token-mean")
    assert torch.allclose(case.loss(b.padded_log_prob.clone()), want, atol=1e-12)


def test_bench_command_prints_goals_and_writes_json_and_markdown(tmp_path, capsys):
    out, page = tmp_path / "bench.json", tmp_path / "bench.md"
    # without the kept-memory pass: it would change malloc's settings for the rest of the test process
    code = main(["bench", "--tokens", "4096", "--trajectories", "16", "--repeats", "1", "--threads", "1",
                 "--scaling", "2048", "4096", "--json", str(out), "--markdown", str(page), "--no-kept-memory-pass"])
    assert code == 0
    text = capsys.readouterr().out
    assert "× clip" in text and "× verl" in text and "scaling" in text
    assert "fiberpo/padded time =" in text and "(goal ≤ 2.0×:" in text
    report = json.loads(out.read_text())
    by_name = {row["method"]: row for row in report["main"]}
    assert by_name["grpo/sorted"]["time_ratio"] == 1.0
    assert {"clip/sorted", "fiberpo/padded", "fiberpo/shuffled", "apc_obj/shuffled"} <= set(by_name)
    assert {row["tokens"] for row in report["scaling"]} == {2048, 4096}
    fib = by_name["fiberpo/sorted"]
    assert fib["tokens_per_second"] == pytest.approx(4096 / fib["seconds"])
    assert fib["bytes_moved"] == 2 * fib["saved_bytes"] + 2 * 4096 * 4  # float32 leaf: value and gradient
    markdown = page.read_text()
    assert markdown.startswith("# Benchmarks") and "fiberpo/padded time =" in markdown
    assert "verl/padded" in markdown and "```text" in markdown


def test_goal_lines_say_met_or_missed_from_the_measured_ratio():
    rows = [bench.Row("fiberpo/padded", 10, 3.0, 10, 0), bench.Row("verl/padded", 10, 1.0, 10, 0)]
    lines = bench.goal_lines(rows, [], 10)
    assert "fiberpo/padded time = 3.00× verl/padded (goal ≤ 2.0×: MISSED)" in lines
    rows[0].seconds = 1.5
    assert "fiberpo/padded time = 1.50× verl/padded (goal ≤ 2.0×: met)" in bench.goal_lines(rows, [], 10)


def test_fixed_plus_linear_fit_recovers_a_known_cost():
    # 0.5 ms per call + 10 ms per million tokens, with the 4M point 10% slow
    sizes = [1 << 16, 1 << 18, 1 << 20, 1 << 22]
    seconds = [5e-4 + 1e-2 * n / 1e6 for n in sizes]
    scaling = [bench.Row("fiberpo/sorted", n, t, 0, 0) for n, t in zip(sizes, seconds)]
    fixed, slope, worst = bench._fixed_plus_linear(scaling, "fiberpo/sorted")
    assert fixed == pytest.approx(5e-4) and slope == pytest.approx(1e-2) and worst < 1e-9
    scaling[-1].seconds *= 1.1
    assert bench._fixed_plus_linear(scaling, "fiberpo/sorted")[2] > 0.02
    assert bench._fixed_plus_linear(scaling[:2], "fiberpo/sorted") is None  # two points fit any line
    line = [x for x in bench.goal_lines([], scaling, 1 << 20) if x.startswith("fiberpo/sorted time ≈")]
    assert len(line) == 1 and "ms per call" in line[0]


def test_fused_fiberpo_saves_less_than_the_package_grpo_objective():
    b = bench.make_batch(1 << 14, 16)
    cases = {c.name: c for c in bench.all_cases(b)}
    measured = bench.measure_all([cases["grpo/sorted"], cases["fiberpo/sorted"]], repeats=1)
    assert measured["fiberpo/sorted"][1] <= 2 * measured["grpo/sorted"][1]


@pytest.mark.parametrize("argv, option", [
    (["bench", "--repeats", "0"], "--repeats"),
    (["bench", "--threads", "0"], "--threads"),
    (["bench", "--methods", "nope"], "--methods"),
])
def test_bad_arguments_are_one_line_errors_with_exit_2(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and option in err and "Traceback" not in err


def test_cuda_on_a_cpu_only_torch_is_refused(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cuda"])
    assert exit_info.value.code == 2 and "CUDA" in capsys.readouterr().err


def test_segments_objective_paths_agree_with_aggregation_weights():
    b = bench.make_batch(1000, 7, dtype=torch.float64)
    seg = obj.segments_for("traj_id", b.traj_id, b.log_ratio)
    assert torch.equal(obj.aggregation_weights("fiberpo", b.log_ratio, seg),
                       obj.aggregation_weights("fiberpo", b.log_ratio, b.names[b.traj_id]))


def test_scaling_repeats_give_small_sizes_more_steps_and_the_largest_the_base():
    per_size = bench.scaling_repeats([65536, 262144, 1 << 20, 1 << 22], 4)
    assert per_size == {65536: 256, 262144: 64, 1 << 20: 16, 1 << 22: 4}
    assert bench.scaling_repeats([1, 1 << 30], 2)[1] == 1000  # capped
    assert bench.scaling_repeats([3000, 7000], 5) == {3000: 12, 7000: 5}  # rounded up


def test_cache_state_times_each_case_warm_and_after_a_flush():
    measured = bench.cache_state(4096, 3, flush_bytes=1 << 20)
    assert set(measured) == set(bench.CACHE_CASES)
    assert all(warm > 0 and cold > 0 for warm, cold in measured.values())
    line = bench.cache_state_line(4096, measured, flush_bytes=1 << 20)
    assert line.startswith("cache state at 4,096 tokens: clip/sorted") and "after a 1 MB write" in line


def test_the_kept_memory_pass_runs_last_in_its_own_process_and_is_reported(tmp_path):
    """In a process of its own (keep_freed_memory changes malloc for good): on glibc the scaling is measured
    a second time, the JSON holds both passes, and the flatness goal is printed for each state."""
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "fiberpo_theory.cli", "bench", "--tokens", "4096", "--trajectories",
                          "16", "--repeats", "1", "--threads", "1", "--scaling", "2048", "4096", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    report = json.loads(out.read_text())
    if not report["scaling_freed_memory_kept"]:
        pytest.skip("malloc here takes no mallopt settings (not glibc)")
    assert {(r["method"], r["tokens"]) for r in report["scaling_freed_memory_kept"]} == \
        {(r["method"], r["tokens"]) for r in report["scaling"]}
    assert all(isinstance(r["faults"], (int, float)) and r["faults"] >= 0 for r in report["scaling"])
    text = " ".join(run.stdout.split())
    assert "freed memory kept by malloc" in text and "minor page faults per timed step" in text
    assert "tokens, malloc's defaults: within" in text and "tokens, freed memory kept: within" in text


def test_flatness_is_read_for_each_allocator_state_from_its_own_rows():
    sizes = [1 << 16, 1 << 20, 1 << 22]
    flat = [bench.Row(case, n, 3e-3 * n / 1e6, 0, 0) for case in bench.FLATNESS_CASES for n in sizes]
    faulting = [bench.Row(r.method, r.tokens, r.seconds * (1.5 if r.tokens == 1 << 22 else 1.0), 0, 0, 900.0)
                for r in flat]
    lines = bench.goal_lines([], faulting, 1 << 20, kept=flat)
    for case in bench.FLATNESS_CASES:
        default = next(x for x in lines if x.startswith(f"{case} cost per token") and "malloc's defaults" in x)
        kept = next(x for x in lines if x.startswith(f"{case} cost per token") and "freed memory kept" in x)
        assert "within ±50% (goal ±20%: MISSED)" in default and "within ±0% (goal ±20%: met)" in kept
    alone = bench.goal_lines([], flat, 1 << 20)  # one pass: one line per case, no state named
    assert sum("cost per token" in x for x in alone) == len(bench.FLATNESS_CASES)  # no clip rows here
    assert not any("malloc" in x for x in alone)
    table = bench._faults_table(faulting, "faults")
    assert table.row_count == len(sizes)


def test_scaling_rounds_visit_every_size_and_time_each_its_share(monkeypatch):
    """Each round times every case its share of steps, after an untimed step of its own; medians per case."""
    calls = []
    monkeypatch.setattr(bench, "_step", lambda case, saved, faults=None: calls.append((case.name, faults is not None))
                        or (faults.append(7) if faults is not None else None) or float(len(calls)))
    cases = [bench.Case(name, "", torch.zeros(1), lambda z: z.sum()) for name in ("a", "b")]
    measured = bench._measure(cases, 3, [2, 1], own_predecessor=True)
    timed = [name for name, is_timed in calls if is_timed]
    assert timed == (["a", "a", "b"] * 3)
    assert len(calls) == 2 + 2 * len(timed)  # one warm-up per case, then an untimed step before each timed one
    assert [m[3] for m in measured] == [7, 7]
