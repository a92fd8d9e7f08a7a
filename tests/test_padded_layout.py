"""The padded (B, L) ⇄ flat layout selects by token positions: the same tokens, order and gradients as boolean
indexing, on masks with holes and (where allowed) empty rows."""

import pytest
import torch

from fiberpo_theory.core.layout import flatten_mask, to_flat, to_padded, trajectory_segments
from fiberpo_theory.core.segments import Segments


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
