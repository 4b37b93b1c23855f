"""siglip.experiments.runner: comparisons on made-up trials (differences, preconditions, verdicts)."""

from __future__ import annotations

import math

import pytest
import torch

from siglip.experiments.design import Comparison, TrialResult
from siglip.experiments.runner import compare, values
from siglip.experiments.stats import NOT_REPRODUCED, NOT_TESTED, REPRODUCED, t_interval

CHANCE = {"zeroshot": 0.25, "i2t_r1": 0.01}


def trials(arm: str, headline: list[float], **other: list[float]) -> list[TrialResult]:
    """Made-up trials of one arm, one per seed."""
    out = []
    for seed, value in enumerate(headline):
        metrics = {"zeroshot": value, **{key: numbers[seed] for key, numbers in other.items()}}
        out.append(TrialResult(arm, seed, metrics, dict(CHANCE), {"loss": [1.0]}, 0.0, False, f"order-{seed}"))
    return out


def drawn(n: int, low: float, high: float) -> list[float]:
    return (torch.rand(n, dtype=torch.float64) * (high - low) + low).tolist()


def test_a_difference_of_differences_is_summed_seed_by_seed():
    n = 5
    a, b, c, d = (drawn(n, 0.4, 0.9) for _ in range(4))
    results = {"a": trials("a", a), "b": trials("b", b), "c": trials("c", c), "d": trials("d", d)}
    outcome = compare(Comparison("x", plus=("a", "d"), minus=("b", "c")), results)
    want = [a[s] + d[s] - b[s] - c[s] for s in range(n)]
    assert outcome.differences == pytest.approx(want, abs=1e-15)
    assert outcome.interval == t_interval(outcome.differences)


def test_verdicts_follow_the_interval():
    results = {"good": trials("good", [0.60, 0.62, 0.61, 0.63]), "bad": trials("bad", [0.50, 0.51, 0.49, 0.52])}
    assert compare(Comparison("good beats bad", plus=("good",), minus=("bad",)), results).verdict == REPRODUCED
    outcome = compare(Comparison("bad beats good", plus=("bad",), minus=("good",)), results)
    assert outcome.verdict == NOT_REPRODUCED and "opposite" in outcome.reason
    unpredicted = compare(Comparison("shown", plus=("good",), minus=("bad",), predicted=False), results)
    assert unpredicted.verdict == "-" and unpredicted.interval.low > 0


def test_an_arm_at_chance_makes_the_claim_not_tested():
    results = {"learns": trials("learns", [0.60, 0.62, 0.61, 0.63]),
               "stuck": trials("stuck", [0.25, 0.26, 0.25, 0.24])}
    outcome = compare(Comparison("learns beats stuck", plus=("learns",), minus=("stuck",)), results)
    assert outcome.verdict == NOT_TESTED and "'stuck' did not learn" in outcome.reason
    assert outcome.interval.low > 0, "the interval is still reported"
    # When the claim is about the stuck arm failing, only the other arm must learn.
    allowed = compare(Comparison("x", plus=("learns",), minus=("stuck",), must_learn=("learns",)), results)
    assert allowed.verdict == REPRODUCED


def test_a_condition_that_never_occurred_makes_the_claim_not_tested():
    results = {"a": trials("a", [0.6] * 4, spikes=[0, 0, 0, 0]), "b": trials("b", [0.6] * 4, spikes=[0, 0, 0, 0])}

    def spiked(found):
        return None if any(v > 0 for v in values(found, "a", "spikes")) else "no run spiked"

    outcome = compare(Comparison("a spikes more", plus=("a",), minus=("b",), metric="spikes", percent=False,
                                 condition=spiked), results)
    assert outcome.verdict == NOT_TESTED and outcome.reason == "no run spiked"


def test_a_margin_turns_greater_into_not_worse():
    results = {"a": trials("a", [0.600, 0.605, 0.598, 0.602]), "b": trials("b", [0.605, 0.610, 0.606, 0.607])}
    strict = compare(Comparison("a beats b", plus=("a",), minus=("b",)), results)
    loose = compare(Comparison("a within 2 points of b", plus=("a",), minus=("b",), margin=0.02), results)
    assert strict.verdict == NOT_REPRODUCED and loose.verdict == REPRODUCED and "-2 points" in loose.reason
    assert math.isclose(loose.interval.mean, strict.interval.mean)
