import pytest
import torch

from fiberpo_theory.theory.strategies import use_profile

# HYPOTHESIS_PROFILE=thorough selects the long property runs; the default is the quick "ci" profile.
use_profile()

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ),
]
DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float64, id="f64")]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture(params=DTYPES)
def dtype(request):
    return request.param


def _padded_batch(rows, length, *, lengths, seed=0, junk_padding=False, dtype=torch.float64, device="cpu"):
    """``(old, new, adv, mask)`` of a verl-style padded batch, drawn in float64 from ``seed``.

    ``lengths`` maps a row to its response length (the other rows are full).  With ``junk_padding`` the padded
    slots of ``new`` and ``adv`` hold large random values, which a loss must ignore.
    """
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(rows, length, generator=gen, dtype=torch.float64)
    new = old + 0.3 * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    adv = torch.randn(rows, length, generator=gen, dtype=torch.float64)
    mask = torch.ones(rows, length)
    for row, kept in lengths.items():
        mask[row, kept:] = 0
    if junk_padding:
        pad = mask == 0
        new = torch.where(pad, 40 * torch.randn(rows, length, generator=gen, dtype=torch.float64), new)
        adv = torch.where(pad, 40 * torch.randn(rows, length, generator=gen, dtype=torch.float64), adv)
    to = dict(dtype=dtype, device=device)
    return old.to(**to), new.to(**to), adv.to(**to), mask.to(device)


@pytest.fixture
def padded_batch_of():
    """The padded-batch builder the loss tests share; each module fixes its own shape and lengths."""
    return _padded_batch
