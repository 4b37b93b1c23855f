"""siglip.experiments.trial: what a run promises (shared order, locked tower, fixed bias, counts, divergence)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from siglip.experiments.design import LOCKED, Arm, Objective, Scale
from siglip.experiments.prepared import batch_indices, prepare_data
from siglip.experiments.trial import build_arm_model, embed, evaluate, run_trial

SCALE = Scale(pool_size=32, test_size=32, corpus_size=64)


@pytest.fixture(scope="module")
def data():
    return prepare_data(SCALE, 5)


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def test_arms_with_equal_examples_share_the_order_and_seeds_do_not(data):
    seed = fresh_seed()
    small = run_trial(Arm("small", 8, 4, loss="sigmoid"), seed, data)
    large = run_trial(Arm("large", 16, 2, loss="softmax"), seed, data)
    other = run_trial(Arm("small", 8, 4), seed + 1, data)
    assert small.order_digest == large.order_digest != other.order_digest
    assert small.chance == data.chance()
    assert set(small.metrics) >= {"zeroshot", "zeroshot/shape", "i2t_r1", "t2i_r1", "initial_loss", "final_loss"}


def test_same_seed_same_arm_is_bitwise_repeatable(data):
    seed = fresh_seed()
    first, second = (run_trial(Arm("a", 8, 3), seed, data) for _ in range(2))
    assert first.curves == second.curves and first.metrics == second.metrics


def test_a_locked_tower_stays_put_and_its_features_are_the_cached_ones(data):
    from siglip.model import encode_images

    seed = fresh_seed()
    arm = Arm("locked", 8, 3, image_tower=LOCKED)
    state = build_arm_model(Arm("tower", 8, 1), seed + 7, data, "tiny").vision_model.state_dict()
    model = build_arm_model(arm, seed, data, "tiny", state).eval()
    features = (embed(encode_images, model, data.pixel_values), embed(encode_images, model, data.test_pixel_values))
    result = run_trial(arm, seed, data, tower_state=state, locked_features=features)
    assert not result.diverged
    # The held-out metrics used the cached test features: recomputing them from the tower gives the same numbers.
    assert evaluate(model, data, test_image_features=features[1])["zeroshot/shape"] == pytest.approx(
        evaluate(model, data)["zeroshot/shape"], abs=0)
    with pytest.raises(ValueError, match="cached features"):
        run_trial(arm, seed, data, tower_state=state)


def test_a_fixed_bias_does_not_move_and_a_learned_one_does(data):
    seed = fresh_seed()
    fixed = run_trial(Arm("fixed", 8, 4, init_logit_bias=0.0, learn_logit_bias=False), seed, data)
    free = run_trial(Arm("free", 8, 4, init_logit_bias=0.0), seed, data)
    assert set(fixed.curves["logit_bias"]) == {0.0}
    assert free.curves["logit_bias"][-1] != 0.0


def test_duplicates_per_batch_is_the_literal_count(data):
    seed, batch, steps = fresh_seed(), 8, 5
    result = run_trial(Arm("d", batch, steps), seed, data)
    literal = 0
    for step in range(steps):
        ids = data.positive_ids[batch_indices(step, batch, data.pool, seed)].tolist()
        literal += sum(1 for i in range(batch) for j in range(batch) if i != j and ids[i] == ids[j])
    assert result.metrics["duplicates_per_batch"] == literal / steps


@dataclass(frozen=True)
class BreaksAtSecondStep(Objective):
    """The plain sigmoid loss, then NaN: a run that diverges."""

    def __call__(self, inputs) -> torch.Tensor:
        from siglip.loss import sigmoid_loss

        loss = sigmoid_loss(inputs.image_features, inputs.text_features, inputs.logit_scale, inputs.logit_bias)
        return loss if inputs.step == 0 else loss * math.nan


def test_a_diverged_run_stops_and_scores_chance(data):
    result = run_trial(Arm("breaks", 8, 6, objective=BreaksAtSecondStep()), fresh_seed(), data)
    assert result.diverged and len(result.curves["loss"]) == 2 and math.isnan(result.curves["loss"][-1])
    assert result.metrics["zeroshot"] == data.chance()["zeroshot"]


@dataclass(frozen=True)
class WithHead(Objective):
    """The sigmoid loss on text features passed through an extra linear layer the objective owns."""

    def modules(self, model):
        width = model.config.vision_config.hidden_size
        return torch.nn.Linear(width, width)

    def __call__(self, inputs) -> torch.Tensor:
        from siglip.loss import sigmoid_loss

        texts = torch.nn.functional.normalize(inputs.extra(inputs.text_features), dim=-1)
        return sigmoid_loss(inputs.image_features, texts, inputs.logit_scale, inputs.logit_bias)


def test_an_objectives_own_modules_are_trained(data, monkeypatch):
    seen = {}
    original = WithHead.modules

    def recording(self, model):
        seen["module"] = original(self, model)
        seen["start"] = seen["module"].weight.detach().clone()
        return seen["module"]

    monkeypatch.setattr(WithHead, "modules", recording)
    run_trial(Arm("head", 8, 3, objective=WithHead()), fresh_seed(), data)
    assert not torch.equal(seen["module"].weight, seen["start"]), "the optimiser must update the objective's layer"
