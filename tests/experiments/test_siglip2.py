"""The siglip2 study: its arms are `siglip train` runs with the recipe's flags and nothing else changed, its claims
name its metrics, chance is what a blind model scores, and the held-out subset keeps every task."""

from __future__ import annotations

import math
import random
from dataclasses import fields

import pytest

from siglip.experiments import STUDIES, load_study
from siglip.experiments.siglip2 import DECODER, FULL, SIGLIP, HeldOut, Recipe, chance_metrics, train_config


@pytest.mark.parametrize("smoke", [False, True])
def test_the_arms_differ_only_in_the_recipes_flags(smoke):
    study = load_study("siglip2").study(smoke)
    assert "siglip2" in STUDIES and [arm.name for arm in study.arms] == [SIGLIP, DECODER, FULL]
    configs = {arm.name: train_config(arm, 3, study.scale, "/tmp/unused") for arm in study.arms}
    recipe_fields = {field.name for field in fields(Recipe)}
    differing = {name for name in recipe_fields | set(vars(configs[SIGLIP]))
                 if len({str(getattr(config, name)) for config in configs.values()}) > 1}
    assert differing == {"decoder_weight", "siglip2_from"}
    assert (configs[SIGLIP].decoder_weight, configs[SIGLIP].siglip2_from) == (0.0, None)
    assert (configs[DECODER].decoder_weight, configs[DECODER].siglip2_from) == (1.0, None)
    assert (configs[FULL].decoder_weight, configs[FULL].siglip2_from) == (1.0, 0.8)
    full = configs[FULL]
    assert full.distillation_weight == 0.25 and full.seed == 3 and full.grad_clip == 0.0 and full.evaluation is False
    assert full.warmup_steps == max(1, round(0.1 * full.steps))
    assert full.init_logit_bias == pytest.approx(-math.log(full.batch_size - 1))
    metrics = {comparison.metric for comparison in study.comparisons}
    assert metrics == {"zeroshot", "i2t_r1", "t2i_r1", "dense", "referring/probe", "referring/decoder"}


def test_chance_is_what_a_blind_model_scores_on_a_subset_that_keeps_every_task():
    from siglip.data import open_source

    test = HeldOut(open_source("shapes", split="test", image_size=32, with_regions=True), 60)
    assert len(test.samples) == 60
    assert {task for sample in test.samples for task in sample.labels} == {"color", "shape", "count"}
    assert [item.captions[0] for item in test.iter_retrieval_images()] == [s.caption for s in test.samples]
    stream = open_source("shapes", split="train", seed=random.randrange(10**6), image_size=32, with_regions=True)
    chance = chance_metrics(test, [stream.train_sample(index) for index in range(40)], 4)
    assert chance["zeroshot/color"] == 1 / 8 and chance["zeroshot/shape"] == 1 / 6 and chance["zeroshot/count"] == 1 / 3
    assert chance["zeroshot"] == pytest.approx((1 / 6 + 1 / 3) / 2)            # colour stays out of the headline
    captions = [" ".join(sample.caption.lower().split()) for sample in test.samples]
    assert chance["i2t_r1"] == pytest.approx(sum(captions.count(c) / len(captions) for c in captions) / len(captions))
    assert 0 < chance["dense/color"] <= 1 / 2 and chance["dense"] == pytest.approx(
        (chance["dense/color"] + chance["dense/shape"]) / 2)
    assert 0 <= chance["referring/probe"] < 0.2 and chance["referring/probe"] == chance["referring/decoder"]
