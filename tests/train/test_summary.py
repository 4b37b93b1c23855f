"""siglip.train.summary: the end-of-run table says what was evaluated, on how many processes, and what was skipped."""

from __future__ import annotations

import math
import random
from collections import Counter

import torch

from siglip.train import TrainConfig
from siglip.train.summary import summary_table, train_row
from train.runs import tiny_towers


def _result(**extra) -> dict:
    zeroshot = {"task": "zeroshot", "accuracy": 0.5, "chance": 0.25, "n": 40,
                "per_task": {"label": {"accuracy": 0.5, "chance": 0.25, "classes": 4}}}
    return {"step": 30, "loss": 1.0, "logit_scale": 10.0, "logit_bias": -5.0, "zeroshot": zeroshot,
            "retrieval": {"image_to_text_r1": 0.4, "text_to_image_r1": 0.3, "n": 40}, "bad_samples": {},
            "trained_seconds": 1.0, "wall_time_s": 2.0, **extra}


def test_the_summary_names_the_processes_and_the_global_batch():
    config = TrainConfig(data="shapes", batch_size=256)
    one = summary_table(config, _result()).splitlines()[1]
    assert "30 steps of batch 256," in one and "processes" not in one
    world = random.choice([2, 4, 8])
    many = summary_table(config, _result(world_size=world)).splitlines()[1]
    assert f"30 steps of global batch 256 ({world} processes x {256 // world})," in many


def test_the_summary_says_what_the_evaluation_ran_on():
    held_out = summary_table(TrainConfig(data="shapes"), _result())
    assert "(held-out split, 40 images)" in held_out
    table = summary_table(TrainConfig(data="mydata/train.csv"), _result())
    assert "(held-out split" not in table
    assert "(every sample of mydata/train.csv, the training data itself, 40 images" in table
    without_labels = _result()
    del without_labels["zeroshot"]
    assert "the training data itself" in summary_table(TrainConfig(data="shards/{000..009}.tar"), without_labels)


def test_the_summary_counts_captions_cut_short_and_skipped_updates():
    config = TrainConfig(data="shapes", batch_size=64, max_text_length=16)
    table = summary_table(config, _result(truncated_captions=192, skipped_updates=0))
    assert "captions cut short at 16 tokens: 192 of 1920 (10.0%)" in table and "updates skipped" not in table
    table = summary_table(config, _result(truncated_captions=0, skipped_updates=3))
    assert "captions cut short at 16 tokens: none" in table
    assert "updates skipped (non-finite loss or gradient norm): 3" in table


def test_a_skipped_update_is_logged_as_strict_json():
    import json

    model, _ = tiny_towers()
    good = train_row(model, 3, torch.tensor(2.5), 1e-3, torch.tensor(0.7), 100.0, 96, Counter(), 4, 0)
    assert good["loss"] == 2.5 and good["grad_norm"] == torch.tensor(0.7).item() and "update_skipped" not in good
    assert (good["truncated_captions"], good["skipped_updates"]) == (4, 0)
    bad = train_row(model, 4, torch.tensor(math.nan), 1e-3, torch.tensor(math.inf), 100.0, 128, Counter(), 4, 1)
    assert bad["loss"] is None and bad["grad_norm"] is None and bad["update_skipped"] is True
    json.loads(json.dumps(bad, allow_nan=False))                         # no NaN or Infinity in the file
