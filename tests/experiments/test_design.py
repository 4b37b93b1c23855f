"""siglip.experiments.design and every study's description: the shared pieces, and each study as it is declared."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from siglip.experiments import STUDIES, load_study
from siglip.experiments.design import LOCKED, Arm, Study, prior_logit_bias
from siglip.experiments.stats import LEARNED_MARGIN


def test_prior_bias_is_the_log_odds_of_a_positive():
    batch = int(torch.randint(2, 70_000, ()))
    bias = prior_logit_bias(batch)
    # sigmoid(b) must equal the share of positives among a row's pairs: 1 of B with diagonal labels.
    assert math.isclose(1 / (1 + math.exp(-bias)), 1 / batch, rel_tol=1e-9)
    assert math.isclose(prior_logit_bias(32768), -10.397, abs_tol=1e-3), "the paper's -10 is the prior at 32k"
    assert Arm("x", batch, 3, init_logit_bias=-1.5).logit_bias_at_start() == -1.5


def test_arm_examples_and_lookup():
    arm = Arm("a", 16, 300)
    assert arm.examples == 4800
    study = Study(name="s", title="t", claim="c", paper=[], arms=[arm], comparisons=[], scope="")
    assert study.arm("a") is arm
    with pytest.raises(KeyError, match="no arm 'b'"):
        study.arm("b")


@pytest.mark.parametrize("smoke", [False, True])
@pytest.mark.parametrize("name", list(STUDIES))
def test_every_study_is_a_well_formed_fair_test(name, smoke):
    study: Study = load_study(name).study(smoke)
    names = [arm.name for arm in study.arms]
    assert study.name == name and len(set(names)) == len(names), "arm names must be unique"
    assert len(study.seeds) >= (2 if smoke else 4), "at least four paired seeds (two for a smoke run's interval)"
    assert study.smoke is smoke and study.scope and study.paper and study.claim
    pickle.loads(pickle.dumps(study.arms))                       # arms travel to worker processes
    for comparison in study.comparisons:
        assert set(comparison.arms) <= set(names), f"{comparison.claim!r} names an arm the study lacks"
        assert comparison.plus and comparison.minus
        assert len(comparison.plus) == len(comparison.minus), "a difference (of differences) is balanced"
    if any(arm.image_tower == LOCKED for arm in study.arms):
        assert study.tower is not None, "locked arms need the study's pretrained tower"
    for arm in study.arms:
        assert arm.init_logit_scale > 0 and arm.steps >= 1
    by_loss = {arm.loss for arm in study.arms if arm.objective is None}
    if by_loss == {"sigmoid", "softmax"}:
        # A sigmoid-softmax comparison must not also compare temperatures.
        assert len({arm.init_logit_scale for arm in study.arms}) == 1


@pytest.mark.parametrize("name", ["batch-size", "siglit"])
def test_batch_studies_see_equal_examples_and_enough_steps(name):
    study = load_study(name).study(False)
    assert len({arm.examples for arm in study.arms}) == 1, "equal examples seen for every batch size"
    assert min(arm.steps for arm in study.arms) >= 300, "the largest batch must take enough steps to learn"
    assert len({arm.batch_size for arm in study.arms}) == 2 and max(arm.batch_size for arm in study.arms) == 256


def test_beta2_runs_where_the_default_can_spike():
    study = load_study("beta2").study(False)
    assert {arm.beta2 for arm in study.arms} == {0.999, 0.95}
    assert all(arm.lr > 1e-3 and arm.grad_clip is None for arm in study.arms), "1e-3 never spiked; clipping hides it"


def test_learned_margin_is_stated_in_points():
    assert 0 < LEARNED_MARGIN < 0.2
