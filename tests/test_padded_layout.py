"""The padded (B, L) ⇄ flat layout selects by token positions: the same tokens, order and gradients as boolean
indexing, on masks with holes and (where allowed) empty rows."""

import pytest
import torch

from fiberpo_theory.core.layout import flatten_mask, to_flat, to_flat_difference, to_padded, trajectory_segments
from fiberpo_theory.core import native
from fiberpo_theory.core.segments import Segments

HAS_LOOPS = native.library() is not None


def _mask(seed, rows=7, length=9, empty=()):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, length, generator=gen) < 0.6  # holes anywhere, as multi-turn masks have
    mask[:, 0] = True
    for row in empty:
        mask[row] = False
    return mask


@pytest.mark.parametrize("seed", range(5))
def test_positions_select_what_boolean_indexing_selects_with_its_gradient(seed):
    mask = _mask(seed)
    batch = flatten_mask(mask.double())  # a 0/1 float mask, as verl passes it
    rows = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)
    assert torch.equal(batch.traj_id, rows[mask]) and batch.traj_id.dtype == torch.long
    assert torch.equal(batch.lengths, mask.sum(1))
    values = torch.randn(mask.shape, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(int(mask.sum()), dtype=torch.float64)
    ours, = torch.autograd.grad((to_flat(values, batch) * weights).sum(), values)
    reference, = torch.autograd.grad((values[mask] * weights).sum(), values)
    assert torch.equal(to_flat(values, batch), values[mask])
    assert torch.equal(ours, reference)
    per_row = torch.arange(mask.shape[0]) * 10
    assert torch.equal(to_flat(per_row, batch), per_row.unsqueeze(1).expand_as(mask)[mask])


def test_to_padded_inverts_to_flat_and_passes_the_gradient():
    mask = _mask(11)
    batch = flatten_mask(mask)
    flat = torch.randn(int(mask.sum()), dtype=torch.float64, requires_grad=True)
    padded = to_padded(flat, batch, fill=-3.0)
    assert torch.equal(padded[mask], flat.detach()) and bool((padded[~mask] == -3.0).all())
    assert torch.equal(to_flat(padded, batch), flat.detach())
    grad, = torch.autograd.grad((padded * 2.0).sum(), flat)
    assert torch.equal(grad, torch.full_like(flat, 2.0))
    with pytest.raises(ValueError, match="flat has shape"):
        to_padded(flat[:-1], batch)


def test_empty_rows_are_refused_by_name_unless_allowed_and_then_carry_no_trajectory():
    mask = _mask(3, empty=(2, 5))
    with pytest.raises(ValueError, match="row 2 is an empty trajectory"):
        flatten_mask(mask)
    batch = flatten_mask(mask, allow_empty_rows=True)
    segs = trajectory_segments(batch)
    reference = Segments.from_ids(batch.traj_id)
    assert segs.ids.tolist() == [0, 1, 3, 4, 6] and torch.equal(segs.ids, reference.ids)
    assert torch.equal(segs.index, reference.index) and torch.equal(segs.count, reference.count)
    assert segs.contiguous
    full = trajectory_segments(flatten_mask(_mask(3)))
    assert full.ids.tolist() == list(range(7)) and torch.equal(full.count, _mask(3).sum(1))


def test_bad_masks_name_the_argument():
    with pytest.raises(ValueError, match="only 0 and 1"):
        flatten_mask(torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match="2-D"):
        flatten_mask(torch.ones(4, dtype=torch.bool))


def _padded_mask(seed, side, rows=6, length=11, empty=()):
    """Each row's tokens as one block at one end, as right-padded (verl) and left-padded batches hold them."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    lengths[list(empty)] = 0
    mask = torch.arange(length) < lengths.unsqueeze(1)
    return mask.flip(1) if side == "left" else mask


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_blocks_select_and_scatter_what_boolean_indexing_does(side, dtype):
    mask = _padded_mask(1, side, empty=(2,))
    batch = flatten_mask(mask, allow_empty_rows=True)
    assert batch.row_starts is not None or not HAS_LOOPS  # the block path is the one under test
    values = torch.randn(mask.shape, dtype=dtype)
    values[0, 0] = -0.0
    leaf = values.clone().requires_grad_(True)
    flat = to_flat(leaf, batch)
    assert torch.equal(flat, values[mask]) and torch.equal(flat.signbit(), values[mask].signbit())
    weights = torch.randn(flat.shape, dtype=dtype)
    weights[0] = -0.0  # the gradient of index_add into zeros: +0 + (-0) = +0, as the reference
    ours, = torch.autograd.grad((flat * weights).sum(), leaf)
    reference, = torch.autograd.grad((leaf.reshape(-1).index_select(0, batch.positions) * weights).sum(), leaf)
    assert torch.equal(ours, reference) and torch.equal(ours.signbit(), reference.signbit())
    assert torch.equal(to_flat(mask.to(torch.int16), batch), torch.ones(flat.shape, dtype=torch.int16))


def test_row_blocks_are_twice_differentiable_and_vectorise():
    mask = _padded_mask(2, "right")
    batch = flatten_mask(mask)
    values = torch.randn(mask.shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: to_flat(v, batch) ** 2, (values,))
    assert torch.autograd.gradgradcheck(lambda v: to_flat(v, batch) ** 2, (values,))
    f = lambda v: to_flat(v, batch) * 3.0  # noqa: E731
    vectorized = torch.autograd.functional.jacobian(f, values.detach(), vectorize=True)
    looped = torch.autograd.functional.jacobian(f, values.detach())
    assert torch.equal(vectorized, looped)
    assert torch.equal(torch.func.vmap(f)(values.detach().unsqueeze(0).expand(3, *mask.shape)),
                       f(values.detach()).expand(3, -1))


def test_masks_with_holes_keep_the_position_path():
    batch = flatten_mask(_mask(0))
    assert batch.row_starts is None


@pytest.mark.parametrize("layout", ["right", "left", "holes"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_flat_difference_is_the_difference_selected_without_reading_the_padding(layout, dtype):
    """to_flat_difference(a, b) against to_flat(a - b): values (signed zeros too) and both gradients, on block
    masks (one C pass) and masks with holes (the fallback); padding full of NaN never reaches the result."""
    mask = _mask(4) if layout == "holes" else _padded_mask(3, layout, empty=(1,))
    batch = flatten_mask(mask, allow_empty_rows=True)
    gen = torch.Generator().manual_seed(5)
    a, b = (torch.randn(mask.shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    first = mask.nonzero()[0].tolist()
    a[first[0], first[1]], b[first[0], first[1]] = 0.0, 0.0  # +0 - +0 = +0, as torch's sub gives it
    a[~mask], b[~mask] = float("nan"), float("inf")
    leaf_a, leaf_b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    got = to_flat_difference(leaf_a, leaf_b, batch)
    want = to_flat(leaf_a - leaf_b, batch)
    assert torch.equal(got, want) and torch.equal(got.signbit(), want.signbit()) and bool(got.isfinite().all())
    if layout != "holes" and HAS_LOOPS:
        assert type(got.grad_fn).__name__ == "_RowBlocksDifferenceBackward"  # the C pass is the one under test
    weights = torch.randn(got.shape, generator=gen, dtype=torch.float64).to(dtype)
    ours = torch.autograd.grad((got * weights).sum(), (leaf_a, leaf_b))
    reference = torch.autograd.grad((want * weights).sum(), (leaf_a, leaf_b))
    assert all(torch.equal(o, r) for o, r in zip(ours, reference))
    detached = to_flat_difference(leaf_a, b, batch)  # one operand without a gradient
    reference_a = to_flat(leaf_a - b, batch)
    assert torch.equal(torch.autograd.grad(detached.sum(), leaf_a)[0],
                       torch.autograd.grad(reference_a.sum(), leaf_a)[0])
    mixed = to_flat_difference(a.double(), b.float(), batch)  # dtypes differ: promoted as torch's a - b
    assert mixed.dtype == torch.float64 and torch.equal(mixed, to_flat(a.double() - b.float(), batch))
    with pytest.raises(ValueError, match=r"x \(second operand\) has shape \(2, 3\)"):
        to_flat_difference(a, torch.zeros(2, 3), batch, "x")


def test_the_flat_difference_is_twice_differentiable():
    mask = _padded_mask(6, "right")
    batch = flatten_mask(mask)
    a, b = (torch.randn(mask.shape, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda u, v: to_flat_difference(u, v, batch) ** 2, (a, b))
    assert torch.autograd.gradgradcheck(lambda u, v: to_flat_difference(u, v, batch) ** 2, (a, b))
