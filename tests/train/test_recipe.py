"""The SigLIP 2 recipe in `siglip train` (siglip.train.recipe): a whole run with every loss on; micro-batches give the
whole batch's gradient with every loss on; a resumed run ends bitwise where an uninterrupted one does, before and
after the teacher exists; final/ loads with AutoModel and the decoder beside it reads back bitwise; `siglip eval
--task dense --json` on the run; bad input refused in one line; two ranks match one process."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from siglip.errors import UserError
from siglip.train import TrainConfig, train
from train.runs import QUICK, QUICK_FLAGS, child_environment, final_weights, read_metrics, siglip_command, torchrun

RECIPE = dict(decoder_weight=1.0, siglip2_from=0.5, ema_decay=0.9)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """Six steps of batch 8 in micro-batches of 4, the teacher on from step 3 (0-based), checkpoints after steps 2, 4
    and 6."""
    out = tmp_path_factory.mktemp("recipe_run")
    config = TrainConfig(**QUICK, **RECIPE, data="shapes", batch_size=8, steps=6, lr=2e-3, micro_batch=4,
                         evaluation=False, checkpoint_every=2, keep_checkpoints=3, seed=random.randrange(1000),
                         out=str(out))
    train(config)
    return out, config


def checkpoint_state(out, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def test_the_whole_recipe_runs_and_each_loss_starts_when_it_should(recipe_run):
    out, config = recipe_run
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        assert row["loss/decoder"] > 0 and row["loss/contrastive"] > 0
        parts = row["loss/contrastive"] + sum(row.get(f"loss/{name}", 0.0) for name in ("decoder", "consistency",
                                                                                        "masked"))
        assert row["loss"] == pytest.approx(parts, rel=1e-5)
        # switch-on step 3 (0-based) is the update logged as step 4
        assert ("loss/consistency" in row) == ("loss/masked" in row) == (row["step"] >= 4)
    before, after = checkpoint_state(out, 2), checkpoint_state(out, 4)
    assert not any(name.startswith("siglip2.teacher.") for name in before)
    assert any(name.startswith("siglip2.teacher.") for name in after) and "siglip2.center.global" in after
    # The heads and the mask token got no gradient before the switch-on: they are still as initialised (the parts
    # are built from the run's seed alone, so a Recipe built again holds the same initial values).
    from transformers import AutoProcessor

    from siglip.model import build_model
    from siglip.train.recipe import Recipe

    processor = AutoProcessor.from_pretrained(str(out / "processor"))
    model = build_model("tiny", vocab_size=len(processor.tokenizer), max_text_length=config.max_text_length)
    initial = Recipe(config, model, processor, torch.device("cpu")).parts.heads.state_dict()
    assert all(torch.equal(before[f"siglip2.parts.heads.{name}"], value) for name, value in initial.items())
    assert any(not torch.equal(after[f"siglip2.parts.heads.{name}"], value) for name, value in initial.items())


def test_final_loads_with_automodel_and_the_decoder_reads_back_bitwise(recipe_run):
    from transformers import AutoModel, SiglipModel

    from siglip.siglip2.decoder_files import load_decoder

    out, _ = recipe_run
    model = AutoModel.from_pretrained(str(out / "final"))
    assert type(model) is SiglipModel
    assert not any("siglip2" in name for name in final_weights(out))
    saved = load_decoder(out / "decoder")
    last = checkpoint_state(out, 6)
    decoder = {name[len("siglip2.parts.decoder."):]: value for name, value in last.items()
               if name.startswith("siglip2.parts.decoder.")}
    got = saved.decoder.state_dict()
    assert decoder.keys() == got.keys()
    assert all(torch.equal(decoder[name], got[name]) for name in decoder)
    assert saved.text_length == QUICK["max_text_length"]


@pytest.mark.parametrize("from_step", [2, 4])          # before the teacher exists, and after
def test_a_resumed_run_ends_bitwise_where_the_uninterrupted_one_does(tmp_path, recipe_run, from_step):
    whole, config = recipe_run
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    for step in range(from_step + config.checkpoint_every, config.steps + 1, config.checkpoint_every):
        shutil.rmtree(resumed / "checkpoints" / f"step_{step:08d}")
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "decoder")
    train(replace(config, out=str(resumed), resume=True))
    want, got = checkpoint_state(whole, config.steps), checkpoint_state(resumed, config.steps)
    assert want.keys() == got.keys()
    for name in want:                     # the towers, the decoder, the heads, the teacher and the centres
        assert torch.equal(want[name], got[name]), name
    want_decoder = load_file(str(whole / "decoder" / "model.safetensors"))
    got_decoder = load_file(str(resumed / "decoder" / "model.safetensors"))
    assert all(torch.equal(want_decoder[name], got_decoder[name]) for name in want_decoder)
    assert [(r["step"], r["loss"]) for r in read_metrics(resumed)] == [(r["step"], r["loss"]) for r in
                                                                       read_metrics(whole)]


def test_micro_batches_give_the_whole_batchs_gradient_with_every_loss_on():
    """float64 towers and parts (the contrastive loss itself runs in float32 on both paths): measured worst relative
    error 4e-15 of each parameter's largest gradient entry over 20 draws; 1e-11 leaves a wide margin and still
    catches a term divided by the micro-batch instead of the batch (an error of order 1)."""
    from siglip.model import build_model
    from siglip.siglip2.boxes import DecoderVocabulary
    from siglip.siglip2.decoder import DecoderConfig, LocCaDecoder
    from siglip.siglip2.distill import DistillationHeads, EmaTeacher
    from siglip.siglip2.recipe import RecipeWeights, Siglip2Parts, crops_of, draw_views, teacher_targets
    from siglip.train.recipe import Siglip2Towers
    from siglip.train.step import forward_backward

    model = build_model("tiny", vocab_size=64, max_text_length=8, init_logit_bias=-5.0).double()
    vocab = DecoderVocabulary(text_size=64, bins=16)
    decoder = LocCaDecoder(DecoderConfig(vocab.size, 128, width=32, layers=1, heads=2, mlp=64, max_length=14))
    heads = DistillationHeads(128, hidden=32, bottleneck=8, prototypes=16, patch_prototypes=8)
    parts = Siglip2Parts(decoder, heads).double()
    towers = Siglip2Towers(model, parts, RecipeWeights(1.0, 0.25))
    n = 11
    pixels = torch.randn(n, 3, 32, 32, dtype=torch.float64)
    input_ids, positive_ids = torch.randint(2, 64, (n, 8)), torch.randint(0, 4, (n,))
    teacher = EmaTeacher(torch.nn.ModuleDict({"vision": model.vision_model, "heads": heads}))
    centers = {"global": torch.zeros(16, dtype=torch.float64), "patch": torch.zeros(8, dtype=torch.float64)}
    global_targets, patch_targets, _ = teacher_targets(teacher, pixels, centers, chunk=4)
    boxes, masks = draw_views(random.randrange(1000), 3, n, 32, 8, slice(0, n))
    inputs = dict(decoder_tokens=torch.randint(2, vocab.size, (n, 3, 14)), decoder_scored=torch.rand(n, 3, 14) < 0.6,
                  crops=crops_of(pixels, boxes, 16), global_targets=global_targets, patch_mask=masks,
                  patch_targets=patch_targets)
    parameters = [*model.named_parameters(), *(("parts." + name, value) for name, value in parts.named_parameters())]

    def gradients(micro_batch):
        for _, parameter in parameters:
            parameter.grad = None
        terms = {}
        value = forward_backward(towers, pixels, input_ids, positive_ids, micro_batch=micro_batch,
                                 recipe_inputs=inputs, terms=terms)
        return value, terms, {name: p.grad.clone() for name, p in parameters if p.grad is not None}

    want_loss, want_terms, want = gradients(None)
    got_loss, got_terms, got = gradients(4)
    assert set(want_terms) == {"contrastive", "decoder", "consistency", "masked"} == set(got_terms)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert want.keys() == got.keys() and any(name.startswith("parts.heads") for name in want)
    for name in want:
        if not name.endswith("k_proj.bias"):            # zero up to rounding: softmax attention ignores them
            error = (got[name] - want[name]).abs().max() / want[name].abs().max()
            assert error < 1e-11, (name, float(error))


def test_siglip_eval_dense_json_on_the_run(recipe_run, capsys):
    from siglip.cli import main

    out, _ = recipe_run
    assert main(["eval", str(out), "--data", "shapes", "--task", "dense", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "dense" and result["n"] == 600 and result["grid"] == [4, 4]
    assert set(result["probe"]) == {"color", "shape"} and 0 <= result["balanced_accuracy"] <= 1
    referring = result["referring"]
    assert referring["n"] >= 600 and 0 <= referring["accuracy"] <= 1 and referring["iou_threshold"] == 0.5
    assert result["decoder"] == str(out / "decoder")
    assert main(["eval", str(out / "final"), "--data", "digits", "--task", "dense", "--json", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "--task dense needs a source that knows where its objects are" in error and error.count("\n") == 1


def test_bad_recipe_settings_are_refused_in_one_line(tmp_path):
    from siglip.train.config import validate_config

    for changes, message in ((dict(lock_image=True), "which --lock-image freezes"),
                             (dict(siglip2_from=1.5), "--siglip2-from must be a fraction"),
                             (dict(ema_decay=1.2), "--ema-decay must lie in"),
                             (dict(decoder_weight=-1.0), "--decoder-weight must be")):
        with pytest.raises(UserError, match=message) as error:
            validate_config(TrainConfig(**{**RECIPE, **changes}))
        assert "\n" not in str(error.value)
    config = TrainConfig(**{**QUICK, "model": "naflex-tiny"}, **RECIPE, batch_size=4, steps=3,
                         out=str(tmp_path / "naflex"))
    with pytest.raises(UserError, match="a NaFlex model is not supported"):
        train(config)


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_in_micro_batches_match_one_process_with_every_loss_on(tmp_path):
    seed = str(random.randrange(1000))
    flags = [*QUICK_FLAGS, "--data", "shapes", "--batch-size", "8", "--steps", "4", "--lr", "2e-3", "--no-evaluation",
             "--checkpoint-every", "0", "--num-workers", "0", "--decoder-weight", "1", "--siglip2-from", "0.5",
             "--seed", seed]
    two, one = tmp_path / "two", tmp_path / "one"
    result = subprocess.run(torchrun("train", *flags, "--micro-batch", "3", "--out", str(two)),
                            env=child_environment(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    subprocess.run(siglip_command("train", *flags, "--out", str(one)), env=child_environment(), check=True,
                   capture_output=True, timeout=300)
    for got, want in zip(read_metrics(two), read_metrics(one), strict=True):
        for key in ("loss", "loss/contrastive", "loss/decoder", "loss/consistency", "loss/masked"):
            assert (key in got) == (key in want)
            if key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-5), key
    for folder in ("final", "decoder"):
        want = load_file(str(one / folder / "model.safetensors"))
        got = load_file(str(two / folder / "model.safetensors"))
        for name in want:
            # As in test_loop_torchrun: sums over ranks run in another order; a twentieth of a step after 4 steps.
            if not name.endswith("k_proj.bias"):
                assert (got[name] - want[name]).abs().max().item() <= 0.05 * 2e-3, (folder, name)
