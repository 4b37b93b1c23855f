"""Paired comparisons over seeds: the 95% t-interval of a per-seed difference, and the verdict it supports.

Every arm of a study runs the same seeds, and a seed fixes the model's initial weights, the data drawn and the order
of the batches. Arm A and arm B of seed s therefore differ only in what the study varies, and the per-seed differences
d_s = A_s - B_s are paired observations. With n seeds their mean has the Student t-interval

    mean(d) ± t(0.975, n - 1) · sd(d) / sqrt(n),      sd with n - 1 in the denominator,

which covers the true mean difference 95% of the time if the d_s are independent draws from a normal distribution
(the seeds are the replicates; normality is an assumption, weakest with few seeds).

A verdict reads the interval against the claim: the claim "A beats B" predicts d > 0; "A is not worse than B by more
than m" predicts d > -m. Reproduced when the whole interval lies on the predicted side; not reproduced otherwise.
"Not tested" is decided before any interval: when an arm the claim needs did not learn, or the condition the claim
is about (a loss spike, say) never occurred, the interval says nothing about the claim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
"""Two-sided coverage of every interval in the reports."""

LEARNED_MARGIN = 0.05
"""An arm has learned when its metric is above chance by more than this (5 points of accuracy), over the seeds'
95% interval: an arm at chance cannot show whether one loss beats another, only that neither has started."""

REPRODUCED, NOT_REPRODUCED, NOT_TESTED = "reproduced", "not reproduced", "not tested"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, NOT_TESTED)


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and its two-sided t-interval; low = high = mean for a single value (no spread known)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def t_quantile(probability: float, degrees_of_freedom: int) -> float:
    """The `probability` quantile of Student's t with `degrees_of_freedom` (scipy's, as scikit-learn brings it)."""
    from scipy.stats import t

    return float(t.ppf(probability, degrees_of_freedom))


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The t-interval of the mean of `values` (see the module docstring); NaN everywhere if any value is NaN.

    Args:
        values: one number per seed.
        confidence: two-sided coverage, e.g. 0.95.

    Returns:
        `Interval`; with one value, low = high = the value and n = 1 (no interval exists).
    """
    n = len(values)
    if n == 0 or any(math.isnan(value) for value in values):
        return Interval(math.nan, math.nan, math.nan, n)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, mean, mean, 1)
    variance = sum((value - mean) ** 2 for value in values) / (n - 1)
    half = t_quantile(0.5 + confidence / 2, n - 1) * math.sqrt(variance / n)
    return Interval(mean, mean - half, mean + half, n)


def paired_differences(first: Sequence[float], second: Sequence[float]) -> list[float]:
    """first[s] - second[s] for each seed s; the two lists must hold the same seeds in the same order."""
    if len(first) != len(second):
        raise ValueError(f"paired values need one per seed on both sides, got {len(first)} and {len(second)}")
    return [a - b for a, b in zip(first, second, strict=True)]


def verdict(interval: Interval, *, margin: float = 0.0, line_name: str = "") -> tuple[str, str]:
    """(verdict, reason) for the claim "difference > -margin" (margin 0: the first arm is better).

    Reproduced when the whole interval lies above -margin; not reproduced otherwise, with the reason saying whether
    the interval straddles the line or lies wholly below it (the opposite of the claim holds). `line_name` words
    the line in the reason ("zero", "-3 points"); by default "zero" or the margin's value.
    """
    line = -margin
    line_name = line_name or ("zero" if margin == 0 else f"{line:g}")
    if math.isnan(interval.mean):
        return NOT_TESTED, "a run diverged, so its metric is undefined"
    if interval.n < 2:
        return NOT_TESTED, "one seed gives no interval"
    if interval.low > line:
        return REPRODUCED, f"the whole interval lies above {line_name}"
    if interval.high < line:
        return NOT_REPRODUCED, f"the whole interval lies below {line_name}: the opposite holds"
    return NOT_REPRODUCED, f"the interval includes {line_name}"


def learned(values: Sequence[float], chance: float, *, margin: float = LEARNED_MARGIN) -> bool:
    """Whether an arm's metric is above chance + margin over its seeds' interval (its single value for one seed)."""
    interval = t_interval([value - chance for value in values])
    return not math.isnan(interval.low) and interval.low > margin
