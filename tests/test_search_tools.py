"""The shared search strategies (fiberpo_theory.theory.strategies): aimed batches stay finite at the extremes they aim for."""

import math

import pytest
from fiberpo_theory.theory import strategies as tools


def _scripted_draw(pattern, regime, theta):
    """A stand-in for Hypothesis' draw that returns fixed choices, so one exact case can be pinned."""

    def draw(strategy):
        if strategy is tools._REGIMES:
            return regime
        if strategy is tools._THETA:
            return theta
        return pattern

    return draw


@pytest.mark.parametrize("regime", ["P", "R", "Z-edge", "Z"])
def test_regime_targeting_is_finite_when_the_channel_mean_is_subnormal(regime):
    # one smallest-normal token in a 1024-token trajectory: its channel mean is subnormal, and
    # rescaling by target / mean overflowed to inf (found by the thorough verify profile)
    pattern = [2.3e-308] + [0.0] * 1023
    values, targets = tools.draw_regime_targeted(_scripted_draw(pattern, regime, 0.5), 2.0, 2.0)
    assert all(math.isfinite(v) for v in values)
    assert targets["pos"] == regime and targets["neg"] == "empty"
    # the positive channel's mean lands on the target it aimed for
    target = {"P": 1.0, "R": 2.0 * (1 + 0.5 / 1024), "Z-edge": 2.0 * (1 + 1 / 1024), "Z": 2.0 * (1 + 1 / 1024) * 3}[regime]
    assert sum(max(v, 0.0) for v in values) / len(values) == pytest.approx(target, rel=1e-9)

