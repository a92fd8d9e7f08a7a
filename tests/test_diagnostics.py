"""The training metrics: the compiled counting pass against the tally read off the gate's parts."""

import pytest
import torch

import fiberpo_theory.core.native as native
from fiberpo_theory.core import diagnostics, gates, objectives as obj
from fiberpo_theory.core.segments import Segments

from _loops import LOOPS_ON, needs_loops

EDGES = dict(eps=0.125, c_pos=0.125, c_neg=0.25)
EDGE_VALUES = [0.125, 0.14, 0.15625, 0.3, -0.25, -0.28, -0.3125, -0.5, 0.0, -0.125, 0.05]


def _edge_batch(dtype):
    """Trajectories of 4 tokens on the kinks (channel means on ε and on the budgets, |u| = ε), plus ragged random
    trajectories at scales from well inside the budgets to far past them: every regime of every label."""
    gen = torch.Generator().manual_seed(11)
    pairs = [(a, b) for a in EDGE_VALUES for b in [a, *EDGE_VALUES[::3]]]
    pairs += [(0.25, 0.0), (-0.25, 0.0)]  # u = ±ε exactly: log s = ±a/2 with a zero in the same channel
    x = [v for a, b in pairs for v in (a, a, b, b)]
    lengths = [4] * len(pairs)
    for scale in (0.01, 0.05, 0.12, 0.4):
        for length in torch.randint(1, 30, (12,), generator=gen).tolist():
            x += (torch.randn(length, generator=gen, dtype=torch.float64) * scale).tolist()
            lengths.append(length)
    ids = torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths)) * 3 + 1
    return torch.tensor(x, dtype=dtype), ids


def _assert_tallies_equal(got, want, dtype):
    close = dict(rel=1e-12 if dtype == torch.float64 else 1e-5, abs=1e-12)
    for field in ("log_s_pos", "log_s_neg", "length", "reaching"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    for field in ("numerator_clipped", "denominator_clipped", "tokens"):
        assert getattr(got, field) == getattr(want, field), field
    for field in ("abs_log_base_sum", "gated_sum"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), **close), field


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method", ["fiberpo", "fiberpo_domain"])
def test_the_counting_pass_gives_the_parts_tally_in_every_regime(method, dtype):
    x, ids = _edge_batch(dtype)
    traj = Segments.from_ids(ids)
    if method == "fiberpo":
        parts = obj.fiberpo_parts(x, traj, **EDGES)
        _, _, eps, log_base_fn = obj._fiberpo_inputs(x, traj, EDGES["eps"], EDGES["c_pos"], EDGES["c_neg"], None)
    else:
        group, domain = traj.index // 4, traj.index // 16
        parts = obj.fiberpo_domain_parts(x, traj, group, domain, **EDGES)
        _, levels, eps, log_base_fn = obj._domain_inputs(x, traj, group, domain, EDGES["eps"], EDGES["c_pos"],
                                                         EDGES["c_neg"], None)
    got = diagnostics.runs_tally(x, traj, log_base_fn, eps)
    assert got is not None, "the compiled pass did not run"
    want = diagnostics.tally_of_parts(parts, eps=EDGES["eps"])
    _assert_tallies_equal(got, want, dtype)
    # what the data reaches, so that equal tallies mean something
    size_u = parts.signed_u.abs()
    assert bool((size_u == EDGES["eps"]).any()) and bool((size_u > EDGES["eps"]).any())
    assert 0 < want.denominator_clipped < want.tokens
    pos, neg = diagnostics.channel_regimes(parts, c_pos=EDGES["c_pos"], c_neg=EDGES["c_neg"])
    assert set(pos.tolist()) == set(neg.tolist()) == {gates.PASS, gates.ROLLBACK, gates.ZEROED}
    assert set(diagnostics.local_regime(parts, eps=EDGES["eps"]).tolist()) == {0, 1, 2}


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method", ["fiberpo", "fiberpo_domain"])
@pytest.mark.parametrize("pass_", ["gate", "objective"])
def test_the_counts_a_fused_pass_leaves_give_the_parts_tally_in_every_regime(pass_, method, dtype, monkeypatch):
    """counting_gate around the fused gate or objective: its counts, read off the gate's flags and G, are the
    parts' tally, and the metrics made from them count nothing again."""
    x, ids = _edge_batch(dtype)
    traj = Segments.from_ids(ids)
    adv = torch.linspace(-1, 1, x.numel(), dtype=dtype)
    if method == "fiberpo":
        parts = obj.fiberpo_parts(x, traj, **EDGES)
        run = {"gate": lambda: obj.fiberpo_gated_ratio(x, traj, **EDGES),
               "objective": lambda: obj.fiberpo_objective(x, traj, adv, **EDGES)}[pass_]
    else:
        group, domain = traj.index // 4, traj.index // 16
        parts = obj.fiberpo_domain_parts(x, traj, group, domain, **EDGES)
        run = {"gate": lambda: obj.fiberpo_domain_gated_ratio(x, traj, group, domain, **EDGES),
               "objective": lambda: obj.fiberpo_domain_objective(x, traj, group, domain, adv, **EDGES)}[pass_]
    with diagnostics.counting_gate() as counted:
        run()
    assert counted.filled, "the fused pass left no counts"
    tally = diagnostics.tally_of_parts(parts, eps=EDGES["eps"])
    _assert_tallies_equal(diagnostics._counted_tally(counted, traj, x), tally, dtype)
    monkeypatch.setattr(diagnostics, "_runs_counts", lambda *a: pytest.fail("counted again"))
    if method == "fiberpo":
        got = diagnostics.fiberpo_loss_metrics(x, traj, counted=counted, **EDGES)
    else:
        got = diagnostics.fiberpo_domain_loss_metrics(x, traj, group, domain, counted=counted, **EDGES)
    want = diagnostics.metrics_of_tally(tally, c_pos=EDGES["c_pos"], c_neg=EDGES["c_neg"])
    assert got.keys() == want.keys() and got == pytest.approx(want, rel=1e-12 if dtype == torch.float64 else 1e-5)


@needs_loops
def test_counting_gate_is_filled_by_one_pass_and_left_empty_off_the_run_loops(monkeypatch):
    calls, real_counts = [], diagnostics._runs_counts
    x = torch.linspace(-0.3, 0.3, 12, dtype=torch.float64)
    traj = Segments.from_lengths(torch.tensor([5, 7]))
    with diagnostics.counting_gate() as counted:
        obj.fiberpo_gated_ratio(x, torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 1, 2]), **EDGES)  # shuffled: no runs
        obj.fiberpo_gated_ratio(x, traj, **EDGES)  # the first pass took the counts: they stay empty
    assert not counted.filled
    with diagnostics.counting_gate() as first:
        obj.fiberpo_gated_ratio(x, traj, **EDGES)
        obj.fiberpo_gated_ratio(x.flip(0), traj, **EDGES)  # a second pass leaves the first one's counts
    assert first.filled and torch.equal(first.tallies, _reference_counts(x, traj))
    with diagnostics.counting_gate() as outer, diagnostics.counting_gate(enabled=False) as off:
        obj.fiberpo_gated_ratio(x, traj, **EDGES)  # a disabled gate installs nothing: the outer one counts
    assert off is None and outer.filled and torch.equal(outer.tallies, first.tallies)
    assert first.counts_for(x) and not first.counts_for(x.clone())  # counts of x only, not of equal values elsewhere
    changed = x.clone()
    with diagnostics.counting_gate() as written:
        obj.fiberpo_gated_ratio(changed, traj, **EDGES)
    changed.mul_(2)  # written to after the pass: its counts no longer describe it
    monkeypatch.setattr(diagnostics, "_runs_counts", lambda *a: calls.append(1) or real_counts(*a))
    got = diagnostics.fiberpo_loss_metrics(changed, traj, counted=written, **EDGES)
    assert calls and got == diagnostics.fiberpo_loss_metrics(changed, traj, **EDGES)
    with diagnostics.counting_gate() as float_k:  # a given k: the chain still writes log w
        obj.fiberpo_gated_ratio(x, traj, k=3.0, **EDGES)
    parts = obj.fiberpo_parts(x, traj, k=3.0, **EDGES)
    _assert_tallies_equal(diagnostics._counted_tally(float_k, traj, x), diagnostics.tally_of_parts(parts, eps=0.125),
                          torch.float64)
    assert not torch.equal(_reference_counts(x.flip(0), traj), _reference_counts(x, traj))  # so the test tells


def _reference_counts(x, traj):
    parts = obj.fiberpo_parts(x, traj, **EDGES)
    size_u = parts.signed_u.abs()
    rows = [traj.sum(v.to(x.dtype)).long() for v in ((x < 0), size_u >= EDGES["eps"], size_u > EDGES["eps"],
                                                    parts.v.abs() > EDGES["eps"])]
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("path", ["compiled", "torch", "shuffled"])
@pytest.mark.parametrize("method", ["fiberpo", "fiberpo_domain"])
def test_loss_metrics_equal_the_metrics_of_the_parts(method, path, monkeypatch):
    """Whichever tally runs (the C pass; no library; ids out of order, so no runs), the metrics are the parts'."""
    if path == "compiled" and not LOOPS_ON:
        pytest.skip("the compiled loops are off")
    if path == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    x, ids = _edge_batch(torch.float64)
    if path == "shuffled":
        perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(2))
        x, ids = x[perm], ids[perm]
    leaf = x.clone().requires_grad_(True)  # the metrics take no graph whatever they are given
    if method == "fiberpo":
        got = diagnostics.fiberpo_loss_metrics(leaf, ids, **EDGES)
        want = diagnostics.fiberpo_metrics(obj.fiberpo_parts(x, ids, **EDGES), **EDGES)
    else:
        group, domain = ids // 12, ids // 48
        got = diagnostics.fiberpo_domain_loss_metrics(leaf, ids, group, domain, **EDGES)
        want = diagnostics.fiberpo_metrics(obj.fiberpo_domain_parts(x, ids, group, domain, **EDGES), **EDGES)
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(v, rel=1e-12, abs=1e-15) for k, v in want.items())
    assert leaf.grad is None and 0 < got["local/L-II"] < 1


def test_the_counting_pass_stays_out_of_the_way_where_it_cannot_run(monkeypatch):
    x, ids = _edge_batch(torch.float64)
    _, traj, eps, log_base_fn = obj._fiberpo_inputs(x, ids, EDGES["eps"], EDGES["c_pos"], EDGES["c_neg"], None)
    monkeypatch.setattr(native, "library", lambda: None)
    assert diagnostics.runs_tally(x, traj, log_base_fn, eps) is None


def test_every_metric_fraction_is_its_labels_share_of_the_trajectories():
    # counted here label by label with Python's Counter, against the one offset bincount of metrics_of_tally
    from collections import Counter

    x, ids = _edge_batch(torch.float64)
    parts = obj.fiberpo_parts(x, ids, **EDGES)
    got = diagnostics.fiberpo_metrics(parts, **EDGES)
    pos, neg = diagnostics.channel_regimes(parts, c_pos=EDGES["c_pos"], c_neg=EDGES["c_neg"])
    labels = {
        "channel_pos": (pos, gates.REGIME_NAMES), "channel_neg": (neg, gates.REGIME_NAMES),
        "global": (diagnostics.global_regime(pos, neg), diagnostics.GLOBAL_REGIMES),
        "local": (diagnostics.local_regime(parts, eps=EDGES["eps"]), diagnostics.LOCAL_REGIMES),
    }
    seen = set()
    for prefix, (label, names) in labels.items():
        counts = Counter(label.tolist())
        seen |= {(prefix, v) for v in counts}
        for index, name in enumerate(names):
            assert got[f"{prefix}/{name}"] == counts[index] / label.numel(), (prefix, name)
    assert len({prefix for prefix, _ in seen}) == 4 and len(seen) >= 10  # most labels present, so shares differ
    assert got["log_s_pos/mean"] == pytest.approx(float(parts.log_s_pos.mean()), rel=1e-15)
    assert got["log_s_neg/mean"] == pytest.approx(float(parts.log_s_neg.mean()), rel=1e-15)


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k", [None, 3.0, 0.7])
@pytest.mark.parametrize("budgets", [(0.125, 0.25), (0.12, 0.05)], ids=["dyadic", "decimal"])
def test_the_compiled_label_count_equals_the_labels_counted_by_torch(dtype, k, budgets):
    # channel means on C and on (1 + 1/k)C as the tensor's dtype rounds them, on both sides, and at random;
    # reaching counts of 0, all and some of each trajectory's tokens; strided channels as runs_tally hands them
    c_pos, c_neg = budgets
    gen = torch.Generator().manual_seed(3)
    m = 400
    length = torch.randint(1, 9, (m,), generator=gen).to(dtype)
    k_traj = length if k is None else torch.full_like(length, k)
    edges = []
    for c in budgets:
        zero_at = ((1 + 1 / k_traj) * c) if k is None else torch.full_like(length, (1 + 1 / k) * c)
        edges += [torch.full_like(length, c), zero_at, torch.nextafter(zero_at, torch.zeros_like(zero_at))]
    pick = torch.randint(0, len(edges) + 1, (m, 2), generator=gen)
    channels = torch.rand(m, 2, generator=gen, dtype=torch.float64).to(dtype) * 0.6
    for j in range(len(edges)):
        channels = torch.where(pick == j, edges[j].unsqueeze(1), channels)
    reaching = torch.minimum((torch.rand(m, generator=gen) * 1.5 * length.double()).floor().to(dtype), length)
    tally = diagnostics.GateTally(channels[:, 0], channels[:, 1], length, reaching, 0, 0, 0.0, 0.0, int(length.sum()))
    got = diagnostics._native_label_counts(tally, c_pos, c_neg, k)
    assert got is not None, "the compiled count did not run"
    want = diagnostics.label_counts(tally, c_pos=c_pos, c_neg=c_neg, k=k)
    assert torch.equal(got, want), (got, want)
    assert bool((want > 0).all()), want  # every label of every set present, so a swapped bin would show


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("k", [None, 3.0])
def test_the_one_call_summary_of_a_pass_counts_equals_the_metrics_of_its_tally(dtype, k, monkeypatch):
    """summarize_counts (labels, sums and clip counts of a pass's counts in one C call) against metrics_of_tally
    of the same counts made into a GateTally by torch ops: channels strided as the chain hands them."""
    x, ids = _edge_batch(dtype)
    traj = Segments.from_ids(ids)
    _, _, eps, log_base_fn = obj._fiberpo_inputs(x, traj, EDGES["eps"], EDGES["c_pos"], EDGES["c_neg"], k)
    counts = diagnostics._runs_counts(x, traj, log_base_fn, eps)
    assert counts is not None and counts.channels.stride() != (1, traj.size)
    want = diagnostics.metrics_of_tally(diagnostics._tally(*counts, traj, x), c_pos=EDGES["c_pos"],
                                        c_neg=EDGES["c_neg"], k=k)
    monkeypatch.setattr(diagnostics, "metrics_of_tally", lambda *a, **kw: pytest.fail("the summary did not run"))
    got = diagnostics._metrics_of_counts(counts, traj, x, c_pos=EDGES["c_pos"], c_neg=EDGES["c_neg"], k=k)
    assert got.keys() == want.keys()
    shares = [name for name in want if name.split("/")[0] in ("channel_pos", "channel_neg", "global", "local")]
    assert {name: got[name] for name in shares} == {name: want[name] for name in shares}  # counts: exact
    assert got == pytest.approx(want, rel=1e-13)
    assert len({want[name] for name in shares}) > 5 and 0 < want["clipfrac/denominator"] < want["clipfrac/numerator"]
