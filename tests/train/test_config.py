"""siglip.train.config: a YAML file then flags, bad values refused by name, older keys upgraded."""

from __future__ import annotations

import random
import subprocess
from dataclasses import replace

import pytest
import torch

from siglip.errors import UserError
from siglip.train import TrainConfig, load_config, validate_config
from train.runs import (
    ROOT,
    child_environment,
    siglip_command,
    tiny_towers,
)


def test_config_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch-size: 32\nlr: 1e-3\nmicro_batch: 8\ninit: null\nloss: softmax\n")
    config = load_config(str(path), {"lr": 5e-4, "steps": None, "lock_image": True})
    assert (config.batch_size, config.lr, config.micro_batch, config.loss, config.lock_image) == (32, 5e-4, 8,
                                                                                                  "softmax", True)
    assert config.steps == TrainConfig().steps

    path.write_text("batch_sise: 32\n")
    with pytest.raises(UserError, match="unknown field 'batch_sise'.*batch_size"):
        load_config(str(path), {})
    path.write_text("steps: many\n")
    with pytest.raises(UserError, match="steps must be int, got 'many'"):
        load_config(str(path), {})
    with pytest.raises(UserError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"), {})


def test_bad_values_are_refused_by_name():
    with pytest.raises(UserError, match="--batch-size 10 is the global batch and must be divisible by the number "
                                        "of processes \\(4\\)"):
        validate_config(TrainConfig(batch_size=10), world_size=4)
    with pytest.raises(UserError, match="--loss must be one of sigmoid, softmax, got 'hinge'"):
        validate_config(TrainConfig(loss="hinge"))
    with pytest.raises(UserError, match="--micro-batch must be a positive number"):
        validate_config(TrainConfig(micro_batch=0))
    with pytest.raises(UserError, match="--resume and --overwrite"):
        validate_config(replace(TrainConfig(), resume=True, overwrite=True))


def test_positives_flag_and_the_older_positive_ids_key(tmp_path):
    from siglip.train.config import upgrade_config_dict

    assert TrainConfig().positives == "ids"
    path = tmp_path / "run.yaml"
    path.write_text("positives: diagonal\n")
    assert load_config(str(path), {}).positives == "diagonal"
    assert load_config(str(path), {"positives": "ids"}).positives == "ids"        # the flag wins over the file
    # Config files and checkpoints written before --positives hold positive_ids: true/false.
    for old, new in (("true", "ids"), ("false", "diagonal"), ("no", "diagonal")):
        path.write_text(f"positive_ids: {old}\n")
        config = load_config(str(path), {})
        assert config.positives == new
    path.write_text("positive_ids: false\n")
    assert load_config(str(path), {"positives": "ids"}).positives == "ids"
    assert upgrade_config_dict({"positive_ids": False, "lr": 0.1}) == {"positives": "diagonal", "lr": 0.1}
    assert upgrade_config_dict({"positives": "ids"}) == {"positives": "ids"}
    for name in ("demo", "tiny"):
        assert load_config(str(ROOT / "configs" / f"{name}.yaml"), {}).positives == "ids"

    path.write_text("positive_ids: true\npositives: diagonal\n")
    with pytest.raises(UserError, match="positive_ids True contradicts positives 'diagonal'"):
        load_config(str(path), {})
    path.write_text("positive_ids: maybe\n")
    with pytest.raises(UserError, match="positive_ids must be bool, got 'maybe'"):
        load_config(str(path), {})
    path.write_text("positives: all\n")
    with pytest.raises(UserError, match="--positives must be one of ids, diagonal, got 'all'"):
        validate_config(load_config(str(path), {}))


def test_cli_refuses_an_unknown_positives_choice(tmp_path):
    result = subprocess.run(siglip_command("train", "--positives", "all", "--out", str(tmp_path)),
                            env=child_environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--positives: invalid choice: 'all'" in result.stderr and "'ids', 'diagonal'" in result.stderr


def test_cache_image_features_needs_a_locked_image_tower():
    with pytest.raises(UserError, match="--cache-image-features needs --lock-image"):
        validate_config(TrainConfig(cache_image_features=True))
    validate_config(TrainConfig(cache_image_features=True, lock_image=True))
    model, towers = tiny_towers(lock_image=False)
    with pytest.raises(ValueError, match="need a locked image tower"):
        towers(None, torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, model.config.vision_config.hidden_size))


def test_a_warmup_as_long_as_the_run_is_refused():
    steps = random.randint(2, 60)
    validate_config(TrainConfig(steps=steps, warmup_steps=steps - 1))
    validate_config(TrainConfig(steps=steps, warmup_steps=0))
    for warmup in (steps, steps + random.randint(1, 50)):
        with pytest.raises(UserError, match=f"--warmup-steps {warmup} must be fewer than --steps {steps}: the "
                                            f"warm-up would take the whole run.*--warmup-steps {steps // 10}"):
            validate_config(TrainConfig(steps=steps, warmup_steps=warmup))
    with pytest.raises(UserError, match="--weight-decay-mode must be one of torch, paper, got 'l2'"):
        validate_config(TrainConfig(weight_decay_mode="l2"))
    with pytest.raises(UserError, match="--max-consecutive-skips must be at least 1"):
        validate_config(TrainConfig(max_consecutive_skips=0))


def test_help_starts_with_examples_and_keeps_each_flag_to_one_sentence(capsys):
    from siglip.cli import main
    from siglip.train.config import config_fields, first_sentence

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    head = text.splitlines()[:12]
    assert head[0].startswith("usage: siglip train [--config FILE.yaml]")
    examples = [line for line in head if line.lstrip().startswith(("siglip train", "torchrun"))]
    assert len(examples) == 3 and any("--init" in line for line in examples)
    assert "NOTES.md" not in text and "CONTRACT.md" not in text
    for name, (_, doc) in config_fields().items():
        sentence = first_sentence(doc)
        assert sentence and ". " not in sentence.rstrip("."), name
        # Measurements stay in the docstrings and the docs, out of --help.
        assert "%" not in sentence and "measured" not in sentence.lower(), name
