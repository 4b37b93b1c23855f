"""siglip.experiments.stats: the paired t-interval against a hand computation and scipy, and the verdict rule."""

from __future__ import annotations

import math

import pytest
import torch

from siglip.experiments.stats import (
    NOT_REPRODUCED,
    NOT_TESTED,
    REPRODUCED,
    Interval,
    learned,
    paired_differences,
    t_interval,
    verdict,
)


def test_t_interval_by_hand():
    # Differences 1, 2, 4, 5: mean 3; squared deviations 4 + 1 + 1 + 4 = 10, variance 10 / 3, standard error
    # sqrt(10 / 3 / 4) = 0.912870929; t(0.975, 3) = 3.182446305 (a t-table), half-width 2.905163.
    interval = t_interval(paired_differences([11.0, 12.0, 14.0, 15.0], [10.0, 10.0, 10.0, 10.0]))
    assert interval.n == 4 and interval.mean == 3.0
    assert math.isclose(interval.half_width, 3.182446305 * math.sqrt(10 / 3 / 4), rel_tol=1e-8)
    assert math.isclose(interval.low, 3.0 - 2.905163, abs_tol=1e-5)
    assert math.isclose(interval.high, 3.0 + 2.905163, abs_tol=1e-5)


@pytest.mark.parametrize("n", [2, 4, 7])
def test_t_interval_matches_scipy_on_fresh_draws(n):
    from scipy import stats

    first = (torch.rand(n, dtype=torch.float64) * 0.6 + 0.2).tolist()
    second = (torch.rand(n, dtype=torch.float64) * 0.6 + 0.2).tolist()
    differences = paired_differences(first, second)
    interval = t_interval(differences)
    want = stats.ttest_rel(first, second).confidence_interval(0.95)          # the paired t-test's own interval
    assert math.isclose(interval.low, want.low, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(interval.high, want.high, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(interval.mean, sum(differences) / n, rel_tol=1e-12)


def test_one_value_has_no_interval_and_nan_propagates():
    assert t_interval([0.3]) == Interval(0.3, 0.3, 0.3, 1)
    assert math.isnan(t_interval([0.3, math.nan]).mean)
    with pytest.raises(ValueError, match="one per seed"):
        paired_differences([1.0, 2.0], [1.0])


def test_verdict_reads_the_interval_against_the_claim():
    assert verdict(Interval(0.05, 0.01, 0.09, 4))[0] == REPRODUCED
    word, reason = verdict(Interval(0.02, -0.01, 0.05, 4))
    assert word == NOT_REPRODUCED and "includes zero" in reason
    word, reason = verdict(Interval(-0.05, -0.09, -0.01, 4))
    assert word == NOT_REPRODUCED and "opposite" in reason
    # "Not worse by more than 2 points": an interval wholly above -0.02 reproduces it, even below zero.
    assert verdict(Interval(-0.005, -0.015, 0.005, 4), margin=0.02)[0] == REPRODUCED
    assert verdict(Interval(-0.01, -0.03, 0.01, 4), margin=0.02)[0] == NOT_REPRODUCED
    assert verdict(Interval(0.05, 0.05, 0.05, 1))[0] == NOT_TESTED
    assert verdict(Interval(math.nan, math.nan, math.nan, 4))[0] == NOT_TESTED


def test_learned_needs_the_whole_interval_above_chance_plus_margin():
    chance = 0.25
    assert learned([0.60, 0.62, 0.58, 0.61], chance)
    assert not learned([0.27, 0.26, 0.28, 0.25], chance), "2 points above chance is not learning"
    assert not learned([0.60, 0.20, 0.55, 0.25], chance), "two seeds at chance: the interval reaches it"
    assert learned([0.5], chance) and not learned([0.28], chance)
