"""Dense evaluation: the probe reads patch labels that the features hold, referring accuracy counts boxes with IoU above
0.5 (over all objects and over crowded images), a source without regions is refused in one line, the JSON holds no
NaN."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import siglip.siglip2.dense_eval as dense_eval
from siglip.data import open_source
from siglip.errors import UserError
from siglip.siglip2.boxes import DecoderVocabulary, normalise_box
from siglip.siglip2.dense import patch_labels


def held_out(count: int) -> tuple[list, dict]:
    source = open_source("shapes", split="test", image_size=32, with_regions=True)
    samples = dense_eval.dense_samples(source)
    return random.sample(samples, count), source.tasks


def test_the_probe_reads_labels_the_patch_features_hold_and_not_those_they_lack():
    samples, tasks = held_out(80)
    grid = (4, 4)
    color = np.stack([patch_labels(s.regions, grid, "color", 8).reshape(-1) for s in samples])
    shape = np.stack([patch_labels(s.regions, grid, "shape", 6).reshape(-1) for s in samples])
    # Features that spell out the colour and the shape of every patch (one-hot, plus a little noise) ...
    knowing = torch.cat([torch.nn.functional.one_hot(torch.from_numpy(color), 9),
                         torch.nn.functional.one_hot(torch.from_numpy(shape), 7)], dim=-1).double()
    knowing = knowing + 0.05 * torch.randn_like(knowing)
    seed = random.randrange(100)
    result = dense_eval.probe_patches(knowing, samples, grid, tasks, seed=seed)
    assert set(result["probe"]) == {"color", "shape"}
    assert result["probe"]["color"]["classes"] == 9 and result["probe"]["shape"]["classes"] == 7
    # Every patch is read right, except those of a class the fitting half of the images never shows (in 80 draws,
    # 2 of them missed a colour that way): the probe cannot name a class it was not fitted on. The halves are
    # linear_probe's documented seeded permutation.
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).numpy()
    fit, scored = order[:len(samples) // 2], order[len(samples) // 2:]
    for task, labels, background in (("color", color, 8), ("shape", shape, 6)):
        seen = set(labels[fit].reshape(-1).tolist())
        present = sorted(set(labels[scored].reshape(-1).tolist()))
        balanced = sum(label in seen for label in present) / len(present)
        objects = labels[scored][labels[scored] != background]
        readable = float(np.mean([label in seen for label in objects.tolist()]))
        assert result["probe"][task]["balanced_accuracy"] == pytest.approx(balanced, abs=1e-12), task
        assert result["probe"][task]["object_accuracy"] == pytest.approx(readable, abs=1e-12), task
    # ... and features that know nothing: the balanced accuracy stays near chance.
    blind = dense_eval.probe_patches(torch.randn(80, 16, 8, dtype=torch.float64), samples, grid, tasks)
    assert blind["balanced_accuracy"] < blind["chance_balanced"] + 0.15


def test_referring_accuracy_counts_boxes_above_half_iou_over_all_and_crowded_images(monkeypatch):
    samples, _ = held_out(30)
    vocab = DecoderVocabulary(text_size=50, bins=16)
    truth = torch.tensor([normalise_box(region.box, *sample.image.size) for sample in samples
                          for region in sample.regions], dtype=torch.float64)
    crowded = torch.tensor([len(sample.regions) > 1 for sample in samples for _ in sample.regions])
    wrong = torch.rand(len(truth)) < 0.4
    width = truth[:, 2] - truth[:, 0]
    answer = truth.clone()
    answer[wrong, 0] += 2 * width[wrong]                           # moved off the object: IoU 0
    answer[wrong, 2] += 2 * width[wrong]
    calls = []

    def predict(decoder, vocab, features, prompts):
        start = sum(len(call) for call in calls)
        calls.append(prompts)
        return answer[start:start + len(prompts)]

    monkeypatch.setattr(dense_eval, "predict_boxes", predict)
    features = torch.randn(len(samples), 16, 8)
    result = dense_eval.referring_accuracy(torch.nn.Linear(1, 1), vocab, features, samples,
                                           lambda text: [2, 3, vocab.eos_id], batch_size=7)
    assert result["n"] == len(truth) and result["multi_object_n"] == int(crowded.sum())
    assert result["accuracy"] == pytest.approx(1 - wrong.double().mean().item())
    assert result["multi_object_accuracy"] == pytest.approx(1 - wrong[crowded].double().mean().item())
    assert all(prompt[0] == vocab.task_id("refer") for call in calls for prompt in call)


def test_a_source_without_regions_is_refused_in_one_line_and_json_holds_no_nan():
    with pytest.raises(UserError, match="--task dense needs a source that knows where its objects are") as error:
        dense_eval.check_dense_source(open_source("shapes", split="test"))       # opened without regions
    assert "\n" not in str(error.value)
    assert dense_eval.without_nan({"a": float("nan"), "b": [1.0, float("nan")], "c": {"d": 2}}) == \
        {"a": None, "b": [1.0, None], "c": {"d": 2}}
