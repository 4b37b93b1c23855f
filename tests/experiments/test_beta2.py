"""siglip.experiments.beta2: the spike count on made-up curves."""

from __future__ import annotations

import math

import torch

from siglip.experiments.beta2 import count_spikes, largest_rise


def test_count_spikes_on_a_made_up_curve():
    steps = 400
    decay = float(torch.empty(()).uniform_(50, 120))
    base = (3.0 * torch.exp(-torch.arange(steps) / decay) + 0.5).tolist()
    noisy = [value * (1 + 0.02 * math.sin(step)) for step, value in enumerate(base)]
    assert count_spikes(noisy) == []
    spiked = list(noisy)
    starts = [60, 150, 151, 152, 300]               # a one-step spike, a three-step spike, another one-step spike
    for step in starts:
        spiked[step] *= 2.0
    assert count_spikes(spiked) == [60, 150, 300]
    assert largest_rise(spiked) > 0.8
    spiked[350] = math.inf                          # a non-finite loss is a spike too
    assert count_spikes(spiked) == [60, 150, 300, 350]
    assert largest_rise(spiked) == math.inf


def test_a_rise_below_the_threshold_is_no_spike():
    curve = [1.0] * 50
    curve[30] = 1.19                                # 19% above the median of the 20 before it
    assert count_spikes(curve) == [] and math.isclose(largest_rise(curve), 0.19, rel_tol=1e-9)
    curve[30] = 1.21
    assert count_spikes(curve) == [30]
