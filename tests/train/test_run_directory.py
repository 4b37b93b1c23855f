"""siglip.train.run_directory: a resumed run must have the configuration its checkpoint was written with."""

from __future__ import annotations

import random
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from siglip.errors import UserError
from siglip.train import TrainConfig
from siglip.train.config import RESUMABLE_CHANGES
from siglip.train.run_directory import check_resumable

# Fields that change what a run computes, each with another valid value.
COMPUTING_CHANGES = {"lr": 2e-3, "batch_size": 128, "steps": 999, "seed": 7, "loss": "softmax", "beta2": 0.999,
                     "weight_decay": 0.1, "weight_decay_mode": "paper", "warmup_steps": 10, "logit_lr_multiplier": 3.0,
                     "init_logit_bias": -5.0, "positives": "diagonal", "max_text_length": 32, "data": "digits",
                     "model": "small", "lock_image": True, "grad_clip": 0.0, "min_lr_ratio": 0.1}


def _checkpoint(config: TrainConfig) -> SimpleNamespace:
    return SimpleNamespace(state={"config": asdict(config)}, path=Path("runs/x/checkpoints/step_00000100"))


def test_resume_refuses_a_changed_configuration_by_name():
    saved = TrainConfig()
    for name, value in random.sample(sorted(COMPUTING_CHANGES.items()), 5):
        assert name not in RESUMABLE_CHANGES
        with pytest.raises(UserError, match=f"cannot resume runs/x/checkpoints/step_00000100 with a different "
                                            f"configuration \\({name}: {getattr(saved, name)!r} in the checkpoint, "
                                            f"{value!r} now\\)"):
            check_resumable(replace(saved, **{name: value}), _checkpoint(saved))


def test_resume_accepts_changes_of_where_and_how_a_run_runs():
    saved = TrainConfig()
    check_resumable(replace(saved, resume=True, device="cpu", num_workers=3, micro_batch=16, checkpoint_every=7,
                            keep_checkpoints=5, cache_image_features=True, max_consecutive_skips=9, eval_every=3,
                            log_every=2, progress=False, plots=False, out="elsewhere"), _checkpoint(saved))
    # A checkpoint written before a field existed resumes under that field's default; older names are read as new.
    older = asdict(saved)
    del older["weight_decay_mode"]
    older["positive_ids"] = older.pop("positives") == "ids"
    check_resumable(saved, SimpleNamespace(state={"config": older}, path=Path("old")))
    with pytest.raises(UserError, match="positives: 'ids' in the checkpoint, 'diagonal' now"):
        check_resumable(replace(saved, positives="diagonal"), SimpleNamespace(state={"config": older}, path="old"))
