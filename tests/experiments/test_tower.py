"""siglip.experiments.tower: the pretrained image tower's cache, a miss then a hit, keyed by the spec."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from siglip.experiments import tower as tower_module
from siglip.experiments.design import TowerSpec
from siglip.experiments.tower import cache_key, pretrained_image_tower, tower_path

TINY = TowerSpec(steps=1, batch_size=4, pool_size=8)


def test_cache_key_follows_every_field():
    assert cache_key(TINY) == cache_key(TowerSpec(steps=1, batch_size=4, pool_size=8))
    for field in dataclasses.fields(TowerSpec):
        value = getattr(TINY, field.name)
        changed = value + 1 if isinstance(value, int | float) else value + "x"
        assert cache_key(dataclasses.replace(TINY, **{field.name: changed})) != cache_key(TINY), field.name


def test_miss_pretrains_and_writes_then_hit_loads_without_training(tmp_path, monkeypatch):
    calls = []
    real_pretrain = tower_module.pretrain

    def counting_pretrain(spec):
        calls.append(spec)
        return real_pretrain(spec)

    monkeypatch.setattr(tower_module, "pretrain", counting_pretrain)
    seed = int(torch.randint(0, 10_000, ()))
    spec = dataclasses.replace(TINY, seed=seed)
    first = pretrained_image_tower(spec, tmp_path)
    assert not first.cache_hit and calls == [spec]
    assert first.path == tower_path(spec, tmp_path) and first.path.is_file()
    assert not list(tmp_path.glob("*.partial-*")), "no partial file is left behind"
    second = pretrained_image_tower(spec, tmp_path)
    assert second.cache_hit and calls == [spec], "a hit must not pretrain again"
    assert second.state.keys() == first.state.keys()
    for name, value in first.state.items():
        assert torch.equal(second.state[name], value), name
    assert second.train_accuracy == pytest.approx(first.train_accuracy, abs=1e-6)
    other = pretrained_image_tower(dataclasses.replace(spec, steps=2), tmp_path)
    assert not other.cache_hit and len(calls) == 2 and other.path != first.path


def test_pretraining_moves_the_tower_and_fits_a_vision_model():
    from siglip.experiments.design import Arm, Scale
    from siglip.experiments.prepared import prepare_data
    from siglip.experiments.trial import build_arm_model

    spec = dataclasses.replace(TINY, seed=int(torch.randint(0, 10_000, ())))
    state, accuracy = tower_module.pretrain(spec)
    data = prepare_data(Scale(pool_size=8, corpus_size=64), spec.seed, with_test=False)
    fresh = build_arm_model(Arm("fresh", 4, 1), spec.seed, data, "tiny").vision_model.state_dict()
    assert fresh.keys() == state.keys()
    assert any(not torch.equal(fresh[name], state[name]) for name in state), "a step must change the weights"
    assert 0.0 <= accuracy <= 1.0
