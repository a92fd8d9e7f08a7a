"""The compiled token loops against the chains of torch ops they stand in for: the same bits, or a clean fallback."""

import pytest
import torch

import fiberpo_theory.core.native as native
import fiberpo_theory.core.fused as fused
from fiberpo_theory.core import gates, objectives as obj
from fiberpo_theory.core.segments import Segments, _native_sorted_runs, _sorted_runs

from _loops import HAS_CC, needs_cc, needs_loops

HYPER = dict(eps=0.1, c_pos=0.12, c_neg=0.2)


@pytest.fixture
def fresh_build(monkeypatch):
    """The library looked up anew with the switch cleared (the suite may run with FIBERPO_THEORY_NATIVE=0), and
    again after the test with the environment restored."""
    monkeypatch.delenv("FIBERPO_THEORY_NATIVE", raising=False)
    native.library.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    native.library.cache_clear()


@pytest.fixture
def torch_only(monkeypatch):
    """Run the torch-op path, as on a machine without a C compiler."""
    monkeypatch.setattr(native, "library", lambda: None)


def _layouts(dtype, seed=0):
    """Sorted, shuffled and length-given trajectories with exact zeros and tokens on the clip's ends."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (30,), generator=gen)
    n = int(lengths.sum())
    x = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    x[torch.rand(n, generator=gen) < 0.1] = 0.0
    x[torch.rand(n, generator=gen) < 0.05] = -0.0
    ids = torch.arange(30).repeat_interleave(lengths) * 7 + 2
    perm = torch.randperm(n, generator=gen)
    return {"sorted": (x, ids), "lengths": (x, Segments.from_lengths(lengths)), "shuffled": (x[perm], ids[perm])}


def _gate_and_grads(x, traj, weight):
    """Gate values, the gradient of Σ w·G (a dense gradient) and of Σ G (a broadcast one)."""
    out = []
    for reduce in (lambda g: (g * weight).sum(), lambda g: g.sum()):
        leaf = x.clone().requires_grad_(True)
        gated = obj.fiberpo_gated_ratio(leaf, traj, **HYPER)
        reduce(gated).backward()
        out += [gated.detach(), leaf.grad]
    domain_leaf = x.clone().requires_grad_(True)
    ids = Segments.from_ids(traj).index if isinstance(traj, torch.Tensor) else traj.index
    gated = obj.fiberpo_domain_gated_ratio(domain_leaf, traj, ids // 4, ids // 8, **HYPER)
    (gated * weight).sum().backward()
    return out + [gated.detach(), domain_leaf.grad]


@needs_cc
def test_the_library_builds_and_loads_where_a_compiler_is(fresh_build):
    assert native.library() is not None, native.status()
    assert native.status().startswith("on:")


def test_the_switch_turns_the_library_off(monkeypatch, tmp_path):
    monkeypatch.setenv("FIBERPO_THEORY_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.library() is None and native.status() == "off: FIBERPO_THEORY_NATIVE=0"
        x, ids = _layouts(torch.float64)["sorted"]
        assert obj.fiberpo_gated_ratio(x, ids, **HYPER).shape == x.shape  # the torch path still runs
    finally:
        monkeypatch.delenv("FIBERPO_THEORY_NATIVE")
        native.library.cache_clear()


def test_a_failing_build_falls_back_with_the_reason(fresh_build, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    fresh_build.setattr(native, "SOURCE", broken)
    fresh_build.setenv("FIBERPO_THEORY_CACHE", str(tmp_path / "cache"))
    if not HAS_CC:
        assert native.library() is None and "no C compiler" in native.status()
    else:
        assert native.library() is None and native.status().startswith("off:") and "failed" in native.status()


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["sorted", "lengths", "shuffled"])
def test_compiled_and_torch_paths_give_the_same_bits(layout, dtype, monkeypatch):
    x, traj = _layouts(dtype)[layout]
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    compiled = _gate_and_grads(x, traj, weight)
    monkeypatch.setattr(native, "library", lambda: None)
    reference = _gate_and_grads(x, traj, weight)
    for got, expected in zip(compiled, reference):
        assert torch.equal(got, expected), (got - expected).abs().max()
        assert torch.equal(got.signbit(), expected.signbit())


RUN_LOOPS = ["_runs_channel_sums", "_compiled_chain", "_runs_gate_tokens", "_runs_reduce_tokens", "_compiled_chain_grad",
             "_runs_add_channel_terms"]
INDEX_LOOPS = ["_native_channel_sums", "_compiled_chain", "_native_gate_tokens", "_native_reduce_tokens",
               "_compiled_chain_grad", "_native_add_channel_terms"]


@needs_loops
@pytest.mark.parametrize("layout, expected", [("sorted", RUN_LOOPS), ("lengths", RUN_LOOPS), ("shuffled", INDEX_LOOPS)])
def test_compiled_path_runs_the_loops(layout, expected, monkeypatch):
    """The fused gate does call the compiled loops (so the bit-equality test above compares two paths)."""
    calls = []
    for name in dict.fromkeys(RUN_LOOPS + INDEX_LOOPS):  # the chain loops are on both lists
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    x, ids = _layouts(torch.float32)[layout]
    leaf = x.clone().requires_grad_(True)
    obj.fiberpo_gated_ratio(leaf, ids, **HYPER).sum().backward()
    assert calls == expected


@needs_loops
def test_run_loops_fall_back_to_the_index_path_under_vmap():
    """A vmap-batched gradient cannot go through C: the key is rebuilt from the flag bytes for the torch path."""
    x, ids = _layouts(torch.float64, seed=3)["sorted"]
    x = x[:40]
    ids = ids[:40]
    f = lambda z: obj.fiberpo_gated_ratio(z, ids, **HYPER)  # noqa: E731
    vectorized = torch.autograd.functional.jacobian(f, x, vectorize=True)
    looped = torch.autograd.functional.jacobian(f, x)
    assert torch.equal(vectorized, looped)


@needs_loops
@pytest.mark.parametrize("layout", ["sorted", "lengths", "shuffled"])
def test_chunks_of_the_compiled_gate_equal_one_chunk(layout, monkeypatch):
    """13-token chunks: run chunks end at the trajectory crossing each multiple (trajectories are up to 39 long)."""
    x, ids = _layouts(torch.float64, seed=4)[layout]
    weight = torch.randn(x.shape, dtype=torch.float64)
    whole = _gate_and_grads(x, ids, weight)
    monkeypatch.setattr(fused, "_CHUNK", 13)
    assert all(torch.equal(a, b) for a, b in zip(whole, _gate_and_grads(x, ids, weight)))


@needs_loops
def test_gradcheck_through_the_compiled_loops():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(24, generator=gen, dtype=torch.float64) * 0.2
    ids = torch.arange(4).repeat_interleave(6)
    assert native.kernels_for(x) is not None
    assert torch.autograd.gradcheck(lambda z: obj.fiberpo_gated_ratio(z, ids, **HYPER), (x.requires_grad_(),))


@needs_loops
def test_infinite_upstream_gradient_stays_in_its_own_sign_entry():
    """An infinite ∂L/∂G reaches the tables it belongs to only, as index_add would put it (no inf·0 = NaN),
    in the index loop and in the run loop alike."""
    gated = torch.ones(4, dtype=torch.float64)
    key = torch.tensor([0, 1, 0, 1], dtype=torch.int32)  # one trajectory, signs alternating
    inside = torch.ones(4, dtype=torch.bool)
    flags = torch.tensor([1, 3, 1, 3], dtype=torch.uint8)  # the same as run-loop flags: inside | negative << 1
    grad = torch.tensor([float("inf"), 1.0, 2.0, 3.0], dtype=torch.float64)
    expected = fused._reduce_tokens(grad, gated, key, inside, 2)
    for got in (fused._native_reduce_tokens(grad, gated, key, inside, 2),
                fused._runs_reduce_tokens(grad, gated, flags, torch.tensor([4]))):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert torch.isinf(got[1][0]) and got[1][1] == 4.0 and got[2][1] == -4.0  # ∂L/∂A, ∂L/∂S of l = -1


def _assert_compiled_gives_the_torch_bits(run, chain_name, monkeypatch):
    """``run()`` with the loops (the compiled chain ``fused.<chain_name>`` asserted called) and without them:
    equal outputs, sign bits included."""
    calls = []
    real = getattr(fused, chain_name)
    with monkeypatch.context() as patch:
        patch.setattr(fused, chain_name, lambda *a: calls.append(1) or real(*a))
        compiled = run()
        patch.setattr(native, "library", lambda: None)
        reference = run()
    assert calls, "the compiled chain did not run"
    for got, expected in zip(compiled, reference):
        assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())


# dyadic budgets and values, so channel means land exactly on C, on (1 + 1/T)C and on ε
EDGES = dict(eps=0.125, c_pos=0.125, c_neg=0.25)
EDGE_VALUES = [0.125, 0.14, 0.15625, 0.3, -0.25, -0.28, -0.3125, -0.5, 0.0, -0.125, 0.05]


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["sorted", "shuffled"])
def test_compiled_trajectory_chain_gives_the_torch_bits_in_every_regime(layout, dtype, monkeypatch):
    """The C chain of Eq. 8-10 (g_agg with k = T) and of its backward against the torch ops, every regime reached."""
    gen = torch.Generator().manual_seed(5)
    # trajectories of 4 tokens: 2 × a and 2 × b, b = a among them (a channel mean exactly a)
    pairs = [(a, b) for a in EDGE_VALUES for b in [a, *EDGE_VALUES[::3]]]
    # and channel means on ε with tokens of the other sign, whose table entry reads that clip's slope
    pairs += [(0.25, -b) for b in (0.25, 0.5, 0.3)] + [(b, -0.25) for b in (0.5, 0.3)]
    x = torch.tensor([v for a, b in pairs for v in (a, a, b, b)], dtype=dtype)
    ids = torch.arange(len(pairs)).repeat_interleave(4)
    if layout == "shuffled":
        perm = torch.randperm(x.numel(), generator=gen)
        x, ids = x[perm], ids[perm]
    weight = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(dtype)

    def run():
        leaf = x.clone().requires_grad_(True)
        gated = obj.fiberpo_gated_ratio(leaf, ids, **EDGES)
        (gated * weight).sum().backward()
        return gated.detach(), leaf.grad

    _assert_compiled_gives_the_torch_bits(run, "_compiled_chain", monkeypatch)
    parts = obj.fiberpo_parts(x, ids, **EDGES)
    for channel, budget in ((parts.log_s_pos, EDGES["c_pos"]), (parts.log_s_neg, EDGES["c_neg"])):
        regimes = set(gates.g_agg_regime(channel, budget, parts.length).tolist())
        assert regimes == {gates.PASS, gates.ROLLBACK, gates.ZEROED}
        assert bool((channel == budget).any()) and bool((channel.abs() == EDGES["eps"]).any())


@needs_loops
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("ids", [[4, 4, 4], [0, 1, 1, 2, 9, 9], [3, 5, 5, 4], [-2, -2, 0], [1, 2, 3, 4]])
@pytest.mark.parametrize("room", [1 << 14, 2], ids=["room", "rerun"])
def test_compiled_sorted_runs_equal_the_torch_passes(ids, dtype, room, monkeypatch):
    import fiberpo_theory.core.segments as segments

    column = torch.tensor(ids, dtype=dtype)
    monkeypatch.setattr(segments, "_RUN_ROOM", room)  # 2: more runs than room, so the loop runs again
    compiled = _native_sorted_runs(column)
    reference = _sorted_runs(column)  # the torch passes
    if reference is None:
        assert compiled is None
        return
    assert torch.equal(compiled.narrow_index, reference.narrow_index)
    assert compiled.narrow_index.dtype == reference.narrow_index.dtype == torch.int32
    assert torch.equal(compiled.count, reference.count) and torch.equal(compiled.ids, reference.ids)


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_loops), False], ids=["compiled", "torch"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_negative_sorted_ids_are_named_with_the_least_id(compiled, dtype, monkeypatch):
    """Sorted ids are checked by their first run (read from the C loop's buffer on the compiled path)."""
    if not compiled:
        monkeypatch.setattr(native, "library", lambda: None)
    with pytest.raises(ValueError, match="traj_id must be non-negative, found -3"):
        Segments.from_ids(torch.tensor([-3, -3, -1, 0, 2], dtype=dtype), name="traj_id")
    segs = Segments.from_ids(torch.tensor([0, 0, 5, 7, 7], dtype=dtype))
    assert segs.ids.tolist() == [0, 5, 7] and segs.count.tolist() == [2, 1, 2]


def test_torch_path_alone_matches_the_autograd_reference(torch_only):
    x, ids = _layouts(torch.float64, seed=7)["shuffled"]
    leaf, ref_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    weight = torch.randn(x.shape, dtype=torch.float64)
    (obj.fiberpo_gated_ratio(leaf, ids, **HYPER) * weight).sum().backward()
    (obj.fiberpo_parts(ref_leaf, ids, **HYPER).gated_ratio * weight).sum().backward()
    assert torch.allclose(leaf.grad, ref_leaf.grad, rtol=0, atol=1e-10)


def test_tensors_the_loops_cannot_take_go_the_torch_way():
    x = torch.randn(10, dtype=torch.float64)
    assert native.kernels_for(x[::2]) is None  # strided
    assert native.kernels_for(x.to(torch.float16)) is None
    assert native.kernels_for(torch.randn(4, device="meta")) is None


@needs_loops
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_compiled_carried_ids_equal_the_torch_passes(dtype, monkeypatch):
    from fiberpo_theory.core.segments import _carried_by_runs

    traj = Segments.from_ids(torch.tensor([0, 0, 1, 1, 1, 2, 3, 3]))
    group = torch.tensor([5, 5, 5, 5, 5, 7, 7, 7], dtype=dtype)
    split = torch.tensor([5, 5, 5, 6, 6, 7, 7, 7], dtype=dtype)  # trajectory 1 spans two groups
    last = torch.tensor([5, 5, 5, 5, 5, 7, 7, 8], dtype=dtype)  # the split is in the last run
    compiled = [_carried_by_runs(traj, [group, group * 3]), _carried_by_runs(traj, [group, split]),
                _carried_by_runs(traj, [last])]
    monkeypatch.setattr(native, "library", lambda: None)
    reference = [_carried_by_runs(traj, [group, group * 3]), _carried_by_runs(traj, [group, split]),
                 _carried_by_runs(traj, [last])]
    assert torch.equal(compiled[0], reference[0]) and compiled[0].dtype == torch.long
    assert compiled[0][:, 0].tolist() == [5, 5, 7, 7]
    assert compiled[1] is None and reference[1] is None and compiled[2] is None and reference[2] is None


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_loops), False], ids=["compiled", "torch"])
@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_negative_coarser_ids_are_named_from_the_carried_ids(compiled, order, monkeypatch):
    """Group and domain signs are read off the ids carried to the trajectories; the message names the argument."""
    from fiberpo_theory.hierarchy import structure as hier

    if not compiled:
        monkeypatch.setattr(native, "library", lambda: None)
    traj = torch.tensor([0, 0, 1, 1, 2, 2])
    group, domain = traj // 2, torch.zeros(6, dtype=torch.int32)  # an int32 column beside int64 ones
    perm = torch.tensor([3, 0, 5, 1, 4, 2]) if order == "shuffled" else torch.arange(6)
    x = torch.linspace(-0.1, 0.1, 6, dtype=torch.float64)[perm]
    traj, group, domain = traj[perm], group[perm], domain[perm]
    assert obj.fiberpo_domain_gated_ratio(x, traj, group, domain, **HYPER).shape == (6,)
    with pytest.raises(ValueError, match="group_id must be non-negative, found -1"):
        obj.fiberpo_domain_gated_ratio(x, traj, group - 1, domain, **HYPER)
    with pytest.raises(ValueError, match="domain_id must be non-negative, found -4"):
        obj.fiberpo_domain_gated_ratio(x, traj, group, domain - 4, **HYPER)
    with pytest.raises(ValueError, match=r"level_ids\[0\] must be non-negative, found -2"):
        hier.from_ids([group - 2, traj])
    split = group.clone()
    split[traj == 1] = torch.tensor([0, 1])  # trajectory 1 in two groups: still a nesting error
    with pytest.raises(ValueError, match="does not nest"):
        obj.fiberpo_domain_gated_ratio(x, traj, split, domain, **HYPER)


@needs_cc
def test_an_unwritable_cache_builds_in_the_temporary_folder(fresh_build, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache folder should be: mkdir fails
    fresh_build.setenv("FIBERPO_THEORY_CACHE", str(blocked / "cache"))
    assert native.library() is not None and native.status().startswith("on:")


@needs_cc
def test_a_compiler_refusing_march_native_gets_the_portable_flags(fresh_build, tmp_path):
    real_run = native.subprocess.run

    def run(args, **kwargs):  # a compiler that does not know -march=native
        if "-march=native" in args:
            return native.subprocess.CompletedProcess(args, 1, "", "error: unknown -march=native")
        return real_run(args, **kwargs)

    fresh_build.setattr(native.subprocess, "run", run)
    fresh_build.setenv("FIBERPO_THEORY_CACHE", str(tmp_path / "cache"))
    assert native.library() is not None and "-march=native" not in native.status()
    x, ids = _layouts(torch.float64)["sorted"]
    assert obj.fiberpo_gated_ratio(x, ids, **HYPER).shape == x.shape


def test_hand_built_contiguous_segments_whose_lengths_do_not_cover_the_elements_are_refused():
    """The run loops trust the lengths: a Segments whose counts do not add up raises instead of running off the end."""
    index = torch.tensor([0, 0, 1, 1, 1])
    x = torch.linspace(-0.1, 0.1, 5, dtype=torch.float64)
    for count in ([2, 9], [2, 2], [5, 0]):
        bad = Segments(index=index, count=torch.tensor(count), ids=torch.tensor([0, 1]), contiguous=True)
        with pytest.raises(ValueError, match="counts sum to"):
            _ = bad.runs
    good = Segments(index=index, count=torch.tensor([2, 3]), ids=torch.tensor([0, 1]), contiguous=True)
    assert good.runs.tolist() == [2, 3] and obj.fiberpo_gated_ratio(x, good, **HYPER).shape == (5,)


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_loops), False], ids=["compiled", "torch"])
@pytest.mark.parametrize("kind", ["narrow_index", "index"])
def test_hand_built_segments_with_an_index_out_of_range_are_refused_on_every_path(kind, compiled, monkeypatch):
    """The loops read without bounds checks, index_add raises an IndexError and CUDA a device-side assert: the
    range of a hand-built index is tested at its first read instead, whichever path reads it."""
    if not compiled:
        monkeypatch.setattr(native, "library", lambda: None)
    x = torch.linspace(-0.1, 0.1, 4, dtype=torch.float64)
    dtype = torch.int32 if kind == "narrow_index" else torch.long
    for index, message in (([0, 2, 1, 0], "from 0 to 2"), ([0, -1, 1, 0], "from -1 to 1")):
        bad = Segments(**{kind: torch.tensor(index, dtype=dtype)}, count=torch.tensor([2, 2]), ids=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=f"index runs {message} but there are 2 segments"):
            obj.fiberpo_gated_ratio(x, bad, **HYPER)
    good = Segments(**{kind: torch.tensor([0, 1, 1, 0], dtype=dtype)}, count=torch.tensor([2, 2]),
                    ids=torch.tensor([0, 1]))
    assert obj.fiberpo_gated_ratio(x, good, **HYPER).shape == (4,) and good._is_trusted(getattr(good, kind))


def test_segments_attributes_are_read_only():
    segs = Segments.from_lengths(torch.tensor([2, 3]))
    for name in ("count", "ids", "contiguous"):
        with pytest.raises(AttributeError):
            setattr(segs, name, getattr(segs, name))


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_loops), False], ids=["compiled", "torch"])
def test_lengths_changed_in_place_after_their_test_are_tested_again(compiled, monkeypatch):
    """The run loops walk the tokens by the lengths, and segment_reduce takes them unchecked: lengths written to
    after they were trusted are tested at their next read instead of walking past the end."""
    if not compiled:
        monkeypatch.setattr(native, "library", lambda: None)
    x = torch.linspace(-0.1, 0.1, 5, dtype=torch.float64)
    lengths = Segments.from_lengths(torch.tensor([2, 3]))
    assert obj.fiberpo_gated_ratio(x, lengths, **HYPER).shape == (5,)
    lengths.count[1] = 1 << 20
    with pytest.raises(ValueError, match="counts sum to 1048578"):
        obj.fiberpo_gated_ratio(x, lengths, **HYPER)


@pytest.mark.parametrize("compiled", [pytest.param(True, marks=needs_loops), False], ids=["compiled", "torch"])
def test_an_index_changed_in_place_after_its_test_is_tested_again(compiled, monkeypatch):
    if not compiled:
        monkeypatch.setattr(native, "library", lambda: None)
    x = torch.linspace(-0.1, 0.1, 5, dtype=torch.float64)
    shuffled = Segments.from_ids(torch.tensor([1, 0, 1, 0, 0]))
    assert obj.fiberpo_gated_ratio(x, shuffled, **HYPER).shape == (5,)
    shuffled.narrow_index[0] = 7
    with pytest.raises(ValueError, match="index runs from 0 to 7 but there are 2 segments"):
        obj.fiberpo_gated_ratio(x, shuffled, **HYPER)


@needs_loops
@pytest.mark.parametrize("shape, density", [((7, 9), 0.6), ((5, 1), 0.5), ((3, 4), 1.0), ((4, 6), 0.0), ((0, 3), 0.5),
                                            ((9, 2), 0.3)])
@pytest.mark.parametrize("padding", ["holes", "right", "left"])
def test_compiled_mask_positions_equal_nonzero_and_sum(shape, density, padding):
    """The one-pass C loop over a (B, L) mask gives torch's nonzero positions (as int32) and row sums, and the
    row starts exactly when every row's tokens are one block."""
    from fiberpo_theory.core.layout import _native_positions

    gen = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=gen) < density
    if padding != "holes":  # each row's tokens moved together to one end
        mask = torch.arange(shape[1]) < mask.sum(1, keepdim=True)
        mask = mask.flip(1) if padding == "left" else mask
    positions, lengths, starts, empty = _native_positions(mask)
    assert positions.dtype == torch.int32 and lengths.dtype == torch.long
    empty_rows = (lengths == 0).nonzero().squeeze(1).tolist()
    assert empty == (empty_rows[0] if empty_rows else -1)  # the first row without a token, read off the same pass
    assert torch.equal(positions.long(), mask.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(lengths, mask.sum(1))
    blocks = all(bool(row[row.nonzero().min():row.nonzero().max() + 1].all()) for row in mask if row.any())
    assert (starts is not None) == blocks
    if starts is not None:
        first = torch.where(lengths > 0, mask.int().argmax(1), 0)
        assert torch.equal(starts, first)


@needs_loops
def test_under_torch_func_transforms_the_loops_step_aside():
    """torch.func lifts even fresh buffers into wrapped tensors without storage: the C paths (sorted runs,
    carried ids) must not run there, so the autograd reference differentiates by jacrev as by jacobian."""
    x = torch.randn(30, dtype=torch.float64) * 0.2
    traj = torch.arange(6).repeat_interleave(5)
    f = lambda z: obj.fiberpo_domain_parts(z, traj, traj // 2, traj // 4, **HYPER).gated_ratio  # noqa: E731
    assert torch.allclose(torch.func.jacrev(f)(x), torch.autograd.functional.jacobian(f, x), rtol=0, atol=1e-14)


def _domain_batch(scale, dtype, seed):
    """Random nested trajectories (groups of 1-3, 3 domains) at ``scale``, plus hand-made domains of 4-token
    trajectories of one value each, whose domain and group means sit inside g_agg's narrow rollback bands
    (C, (1 + 1/T)C) and past its zero on either channel (dyadic values: the means are exact)."""
    gen = torch.Generator().manual_seed(seed)
    values, traj, group, domain = [], [], [], []
    t = g = 0
    while t < 30:
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            length = int(torch.randint(1, 7, (1,), generator=gen))
            values += (torch.randn(length, generator=gen, dtype=torch.float64) * scale).tolist()
            traj += [t] * length
            group += [g] * length
            domain += [g % 3] * length
            t += 1
        g += 1
    # T_D = 8: bands (0.125, 0.140625) and (0.25, 0.28125); the last domain's two groups (T_g = 8) deviate from
    # its mean by ±0.1328125, inside the group level's band
    for d, group_values in enumerate(((0.1328125,), (-0.265625,), (0.5,), (-1.0,), (0.328125, 0.0625))):
        for v in group_values:
            for _ in range(2):
                values += [v] * 4
                traj += [t] * 4
                group += [g] * 4
                domain += [3 + d] * 4
                t += 1
            g += 1
    as_ids = lambda column: torch.tensor(column)  # noqa: E731
    return torch.tensor(values, dtype=dtype), as_ids(traj), as_ids(group), as_ids(domain)


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", ["sorted", "shuffled"])
def test_compiled_domain_chain_gives_the_torch_bits_in_every_regime_of_every_level(layout, dtype, monkeypatch):
    """The C chain of Eq. 30-33 (group and domain means, g_agg at three levels) and its backward against the torch
    ops: the gated ratio and its gradient bit for bit, sign bits included."""
    reached = set()
    for seed, scale in enumerate((0.02, 0.1, 0.3, 1.0)):
        x, traj, group, domain = _domain_batch(scale, dtype, seed)
        if layout == "shuffled":
            perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed))
            x, traj, group, domain = x[perm], traj[perm], group[perm], domain[perm]
        weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)

        def run():
            leaf = x.clone().requires_grad_(True)
            gated = obj.fiberpo_domain_gated_ratio(leaf, traj, group, domain, **EDGES)
            (gated * weight).sum().backward()
            return gated.detach(), leaf.grad

        _assert_compiled_gives_the_torch_bits(run, "_compiled_domain_chain", monkeypatch)
        parts = obj.fiberpo_domain_parts(x.double(), traj, group, domain, **EDGES)
        lv = obj._domain_levels(x.double(), traj, group, domain)
        channels = torch.stack([parts.log_s_pos, parts.log_s_neg], dim=1)
        args, budget, ks, _ = obj._domain_terms(channels, lv, EDGES["c_pos"], EDGES["c_neg"], None)
        for level, (arg, k) in enumerate(zip(args, ks)):
            reached |= {(level, int(r)) for r in gates.g_agg_regime(arg, budget, k).unique()}
    assert reached == {(level, r) for level in range(3) for r in (gates.PASS, gates.ROLLBACK, gates.ZEROED)}, reached
