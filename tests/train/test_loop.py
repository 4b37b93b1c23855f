"""Training end to end (siglip.train.loop): the loss falls, the export loads, a killed run resumes bitwise (with
dropout too), bad samples and captions cut short are counted, SigLiT's cache embeds each image once and resumes
bitwise, a non-finite update is skipped and a diverged run stops with exit status 3."""

from __future__ import annotations

import math
import random
import signal
import subprocess
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from siglip.train import TrainConfig, train
from siglip.train.summary import summary_table
from train.runs import (
    QUICK,
    QUICK_FLAGS,
    child_environment,
    final_weights,
    read_metrics,
    siglip_command,
    with_attention_dropout,
    write_table,
)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_run")
    config = TrainConfig(**{**QUICK, "plots": True}, data="shapes", batch_size=64, steps=40, lr=2e-3,
                         init_logit_bias=-4.0, checkpoint_every=20, out=str(out), seed=random.randrange(1000))
    started = time.perf_counter()
    result = train(config)
    return out, config, result, time.perf_counter() - started


@pytest.mark.slow
def test_short_run_on_shapes_lowers_the_loss(shapes_run):
    out, config, result, _ = shapes_run
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == list(range(1, config.steps + 1))
    for key in ("loss", "logit_scale", "logit_bias", "lr", "samples_per_s", "bad_samples"):
        assert all(key in row for row in rows), key
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert "zeroshot/color/accuracy" in rows[-1] and "retrieval/image_to_text_r1" in rows[-1]
    assert set(result["zeroshot"]["per_task"]) >= {"color", "shape"}
    assert result["bad_samples"] == {}
    for name in ("loss.png", "scale_bias.png", "pairs.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "tensorboard").is_dir() and any((out / "tensorboard").iterdir())
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["step_00000020", "step_00000040"]


@pytest.mark.slow
def test_short_run_on_digits_lowers_the_loss(tmp_path):
    config = TrainConfig(**QUICK, data="digits", batch_size=64, steps=30, lr=2e-3, init_logit_bias=-4.0,
                         checkpoint_every=0, out=str(tmp_path), seed=random.randrange(1000))
    result = train(config)
    rows = read_metrics(tmp_path)
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert set(result["zeroshot"]["per_task"]) == {"digit"}


@pytest.mark.slow
def test_final_loads_with_automodel_and_pipeline(shapes_run):
    from transformers import AutoModel, pipeline

    from siglip.data import open_source
    from siglip.model import encode_images, encode_texts, scale_and_bias
    from siglip.tokenizer import load_processor
    from siglip.train.step import PairTransform

    out, config, _, _ = shapes_run
    final = out / "final"
    model = AutoModel.from_pretrained(str(final)).eval()
    assert type(model).__name__ == "SiglipModel"
    checkpoint = load_file(str(out / "checkpoints" / "step_00000040" / "model.safetensors"))
    for name, value in model.state_dict().items():
        if name in checkpoint:
            assert torch.equal(value, checkpoint[name]), name

    # The pipeline, tokenising as the processor saved in final/ says, scores as our own encoders do.
    sample = open_source("shapes", seed=config.seed).test_samples()[0]
    labels = ["a red circle", "a blue square", "a green star"]
    classifier = pipeline("zero-shot-image-classification", model=str(final), device="cpu")
    scores = {item["label"]: item["score"] for item in classifier(sample.image, candidate_labels=labels,
                                                                     hypothesis_template="{}")}
    processor = load_processor(str(final))
    transform = PairTransform(processor)
    with torch.no_grad():
        image = encode_images(model, transform(sample)["pixel_values"][None])
        texts = encode_texts(model, torch.stack([transform.text(label) for label in labels]))
        t, b = scale_and_bias(model)
        want = torch.sigmoid(t * image @ texts.T + b)[0]
    got = torch.tensor([scores[label] for label in labels])
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_equal(tmp_path):
    # Killed after step 5 at the earliest, so the checkpoint of step 3 is complete and the resume must use it.
    steps, kill_after = 12, random.randint(5, 9)
    flags = [*QUICK_FLAGS, "--no-evaluation", "--data", "shapes", "--batch-size", "16", "--steps", str(steps),
             "--lr", "2e-3", "--checkpoint-every", "3", "--num-workers", "1", "--seed", str(random.randrange(1000))]
    environment = child_environment()
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    subprocess.run(siglip_command("train", *flags, "--out", str(whole)), env=environment, check=True,
                   capture_output=True, timeout=300)

    process = subprocess.Popen(siglip_command("train", *flags, "--out", str(broken)), env=environment,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        metrics = broken / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (broken / "final").exists()

    resumed = subprocess.run(siglip_command("train", *flags, "--out", str(broken), "--resume"), env=environment,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    want, got = final_weights(whole), final_weights(broken)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    # The log holds each step once, with the losses of the uninterrupted run.
    assert [(r["step"], r["loss"]) for r in read_metrics(broken)] == [(r["step"], r["loss"]) for r in
                                                                      read_metrics(whole)]


@pytest.mark.slow
def test_init_with_a_locked_image_tower(tmp_path, shapes_run):
    from siglip.checkpoint import latest_checkpoint, load_checkpoint

    start = shapes_run[0] / "final"
    config = TrainConfig(**QUICK, data="shapes", batch_size=16, steps=3, lr=1e-3, init=str(start), lock_image=True,
                         evaluation=False, out=str(tmp_path))
    train(config)
    before, after = final_weights(start.parent), final_weights(tmp_path)
    vision = [name for name in before if name.startswith("vision_model.")]
    assert vision and all(torch.equal(before[name], after[name]) for name in vision)
    assert not torch.equal(before["text_model.final_layer_norm.weight"], after["text_model.final_layer_norm.weight"])
    # The optimiser holds state for the text tower, t' and b only.
    state = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints")).optimizer_state
    assert len(state["state"]) == len(before) - len(vision)


@pytest.mark.slow
def test_bad_samples_are_counted_or_stop_a_strict_run(tmp_path):
    from siglip.data import BadSample

    table = write_table(tmp_path, rows=14, missing={3, 9})
    config = TrainConfig(**QUICK, data=str(table), batch_size=4, steps=4, out=str(tmp_path / "run"))
    result = train(config)                                    # 16 samples: every row of the table at least once
    assert result["bad_samples"].get("missing_file", 0) >= 2
    last = read_metrics(tmp_path / "run")[-1]
    assert last["bad/missing_file"] == last["bad_samples"] == sum(result["bad_samples"].values())
    assert result["retrieval"]["n"] == 12                     # evaluation skips the two bad rows
    # A table has no held-out split: the summary says the evaluation ran on the training rows themselves.
    table = summary_table(config, result)
    assert "the training data itself" in table and "(held-out split" not in table

    with pytest.raises(BadSample, match=r"pairs\.csv:\d+ \(missing_file\)"):
        train(replace(config, strict=True, out=str(tmp_path / "strict")))


def test_cli_trains_on_a_table_of_other_column_names_with_the_column_flags(tmp_path, capsys):
    from siglip.cli import main

    table = write_table(tmp_path, rows=8, missing=set())
    table.write_text(table.read_text().replace("image,caption", "picture,words", 1))
    flags = [*QUICK_FLAGS, "--data", str(table), "--batch-size", "4", "--steps", "3", "--no-evaluation"]
    assert main(["train", *flags, "--out", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert "no image column" in error and "--image-column" in error and "picture" in error
    columns = ["--image-column", "picture", "--caption-column", "words"]
    assert main(["train", *flags, *columns, "--out", str(tmp_path / "run")]) == 0
    assert [row["step"] for row in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_cli_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    result = subprocess.run(siglip_command("train", *QUICK_FLAGS, "--steps", "1", "--warmup-steps", "0", "--out",
                                           str(tmp_path)),
                            env=child_environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("siglip train: error: --out")
    assert "--resume" in result.stderr and "--overwrite" in result.stderr


def _count_image_tower_rows(monkeypatch) -> list[torch.Tensor]:
    """Patch training so that every call of the image tower is recorded; returns the list of their (m, 3, S, S)
    pixel inputs."""
    import siglip.train.loop as train_module

    calls: list[torch.Tensor] = []
    original = train_module._model_processor_source

    def counting(config, run):
        model, processor, source = original(config, run)
        model.vision_model.register_forward_hook(
            lambda module, args, kwargs, output: calls.append(kwargs.get("pixel_values", args[0] if args else None)),
            with_kwargs=True)
        return model, processor, source

    monkeypatch.setattr(train_module, "_model_processor_source", counting)
    return calls


def _record_cached_keys(monkeypatch) -> list[str]:
    """Patch the image-feature cache so that the key of every image it embeds is recorded."""
    from siglip.train.feature_cache import ImageFeatureCache

    keys: list[str] = []
    original = ImageFeatureCache._insert

    def recording(self, new_keys, features):
        keys.extend(new_keys)
        return original(self, new_keys, features)

    monkeypatch.setattr(ImageFeatureCache, "_insert", recording)
    return keys


@pytest.mark.slow
def test_siglit_cache_embeds_each_image_once_and_survives_resume(tmp_path, monkeypatch):
    table = write_table(tmp_path, rows=6, missing=set())
    # 6 steps of 4 over a table of 6 rows: every image comes back three to four times.
    base = TrainConfig(**QUICK, data=str(table), batch_size=4, steps=6, lr=2e-3, lock_image=True, evaluation=False,
                       checkpoint_every=3, micro_batch=3, seed=random.randrange(1000), out=str(tmp_path / "plain"))
    calls, embedded = _count_image_tower_rows(monkeypatch), _record_cached_keys(monkeypatch)
    train(base)
    assert sum(len(pixels) for pixels in calls) == 6 * 4     # without the cache: every sample of every step
    calls.clear()
    cached = replace(base, cache_image_features=True, out=str(tmp_path / "cached"))
    train(cached)
    # With it: each of the 6 images once, in tower calls of exactly the micro-batch (the last one padded).
    assert len(embedded) == len(set(embedded)) == 6 and {len(pixels) for pixels in calls} == {3}
    assert sum(len(pixels) for pixels in calls) == 3 * -(-4 // 3) + 3      # steps 1 and 2 (4 and 2 new images)
    want, got = final_weights(tmp_path / "plain"), final_weights(tmp_path / "cached")
    for name in want:
        # Rounding only (images embedded in other groupings); Adam may lift it for tiny gradients: allow a
        # twentieth of one step, and leave out the key biases, whose gradient is rounding noise (as for the
        # two-process test).
        if not name.endswith("k_proj.bias"):
            assert (got[name] - want[name]).abs().max().item() <= 0.05 * 2e-3, name

    # Resume from step 3: the cache is not in the checkpoint and is rebuilt, each image embedded once more. It embeds
    # them at other steps, among other new images, than the uninterrupted run did; the encoder's fixed-size groups
    # make each embedding the image's own, so the run ends bitwise where the uninterrupted one did.
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "cached", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    shutil.rmtree(resumed / "final")
    calls.clear()
    embedded.clear()
    train(replace(cached, out=str(resumed), resume=True))
    assert len(embedded) == len(set(embedded)) == 6        # steps 4 to 6 visit all 6 rows again
    again = final_weights(resumed)
    assert again.keys() == got.keys()
    for name in got:
        assert torch.equal(again[name], got[name]), name


@pytest.mark.slow
def test_the_run_uses_the_papers_optimiser_and_counts_captions_cut_short(shapes_run):
    from siglip.checkpoint import latest_checkpoint, load_checkpoint
    from siglip.data import open_source
    from siglip.tokenizer import load_processor
    from siglip.train.step import PairTransform

    out, config, result, _ = shapes_run
    groups = {group["name"]: group for group in
              load_checkpoint(latest_checkpoint(out / "checkpoints")).optimizer_state["param_groups"]}
    assert set(groups) == {"decay", "no_decay", "logit"}
    assert all(tuple(group["betas"]) == (config.beta1, config.beta2) == (0.9, 0.95) for group in groups.values())
    assert (groups["decay"]["weight_decay"], groups["no_decay"]["weight_decay"], groups["logit"]["weight_decay"]) \
        == (config.weight_decay, 0.0, 0.0)

    # Captions longer than the text length, counted as the samples pass: the first step's count is that of its
    # samples, recounted here from the source and the run's own processor.
    rows = read_metrics(out)
    transform = PairTransform(load_processor(str(out / "processor")))          # the processor training used
    source = open_source("shapes", seed=config.seed, image_size=32)
    first = sum(bool(transform(source.train_sample(index))["caption_truncated"]) for index in range(config.batch_size))
    assert rows[0]["truncated_captions"] == first
    assert rows[-1]["truncated_captions"] == result["truncated_captions"] > 0
    counts = [row["truncated_captions"] for row in rows]
    assert counts == sorted(counts)
    assert f"captions cut short at {config.max_text_length} tokens: {result['truncated_captions']} of " \
           f"{config.steps * config.batch_size}" in summary_table(config, result)


def test_a_run_that_diverges_skips_counts_and_stops_with_status_3(tmp_path):
    out = tmp_path / "diverged"
    # The command used lr 50, which did not diverge from every seed (a torchrun draw ran its 40 steps).
    # At lr 1e30 the first update puts weights near 1e30, and the next forward's layer norm squares them past
    # float32's range: every update after the first is non-finite, whatever the seed.
    flags = [*QUICK_FLAGS, "--data", "shapes", "--batch-size", "32", "--steps", "40", "--lr", "1e30",
             "--grad-clip", "0", "--warmup-steps", "1", "--checkpoint-every", "1", "--num-workers", "0",
             "--no-evaluation", "--seed", str(random.randrange(1000))]
    result = subprocess.run(siglip_command("train", *flags, "--out", str(out)), env=child_environment(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and not (out / "final").exists()
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("siglip train: stopped at step "), message
    rows = read_metrics(out)
    stopped_at = rows[-1]["step"]
    assert f"stopped at step {stopped_at}: the last 5 updates had a non-finite" in message
    assert all(row["update_skipped"] and row["grad_norm"] is None for row in rows[-5:])
    assert [row["skipped_updates"] for row in rows] == [sum(r.get("update_skipped", False) for r in rows[:k + 1])
                                                        for k in range(len(rows))]
    # Every checkpoint holds finite values only, and the message names the newest one.
    from siglip.checkpoint import list_checkpoints, load_checkpoint

    checkpoints = list_checkpoints(out / "checkpoints")
    assert checkpoints and f"newest good checkpoint: {checkpoints[-1]};" in message
    for path in checkpoints:
        saved = load_checkpoint(path)
        tensors = [*saved.model_state.values()] + [value for state in saved.optimizer_state["state"].values()
                                                    for value in state.values() if isinstance(value, torch.Tensor)]
        assert all(torch.isfinite(tensor).all() for tensor in tensors if tensor.is_floating_point()), path
        assert saved.step < stopped_at - 4                    # none written while updates were being skipped


def test_a_skipped_update_leaves_weights_and_optimiser_alone(tmp_path, monkeypatch, capsys):
    import siglip.optim
    import siglip.train.loop as loop

    skip_call, snapshots, optimizers = random.randint(1, 3), [], []
    real_step, real_build = loop.forward_backward, siglip.optim.build_optimizer

    def build(*args, **kwargs):
        optimizers.append(real_build(*args, **kwargs))
        return optimizers[-1]

    def step_with_one_nan(towers, *args, **kwargs):
        # The state the update starts from, then the step itself, its loss made NaN once (an overflow in one batch).
        state = {f"optimizer/{index}/{name}": value.clone() for index, values in optimizers[0][0].state.items()
                 for name, value in values.items()}
        state.update({name: p.detach().clone() for name, p in towers.model.named_parameters()})
        snapshots.append(state)
        loss = real_step(towers, *args, **kwargs)
        return loss * math.nan if len(snapshots) - 1 == skip_call else loss

    monkeypatch.setattr(siglip.optim, "build_optimizer", build)
    monkeypatch.setattr(loop, "forward_backward", step_with_one_nan)
    config = TrainConfig(**QUICK, data="shapes", batch_size=8, steps=5, lr=2e-3, micro_batch=4, evaluation=False,
                         checkpoint_every=1, keep_checkpoints=5, out=str(tmp_path), seed=random.randrange(1000))
    result = train(config)
    before, after = snapshots[skip_call], snapshots[skip_call + 1]
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)           # untouched, Adam's step too
    assert not torch.equal(snapshots[skip_call - 1]["logit_bias"], before["logit_bias"])      # a good update moves
    rows = read_metrics(tmp_path)
    assert rows[skip_call]["update_skipped"] and rows[skip_call]["loss"] is None
    assert [row["skipped_updates"] for row in rows] == [0] * skip_call + [1] * (5 - skip_call)
    assert result["skipped_updates"] == 1 and result["step"] == 5
    # The schedule moves on over a skipped update, as for any other.
    warmup = config.warmup_steps
    assert [row["lr"] for row in rows] == pytest.approx(
        [2e-3 * (k + 1) / warmup if k < warmup else 2e-3 * 0.5 * (1 + math.cos(math.pi * (k - warmup) / (5 - warmup)))
         for k in range(5)])
    assert "updates skipped (non-finite loss or gradient norm): 1" in capsys.readouterr().out
    checkpoints = sorted(path.name for path in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == [f"step_{step:08d}" for step in range(1, 6) if step != skip_call + 1]   # none while skipping


@pytest.mark.slow
def test_with_dropout_a_resumed_run_ends_bitwise_where_an_uninterrupted_one_does(tmp_path, monkeypatch):
    import shutil

    import siglip.train.loop as loop

    real = loop._model_processor_source

    def with_dropout(config, run):
        model, processor, source = real(config, run)
        with_attention_dropout(model, 0.1)
        return model, processor, source

    monkeypatch.setattr(loop, "_model_processor_source", with_dropout)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    config = TrainConfig(**QUICK, data="shapes", batch_size=8, steps=6, lr=2e-3, micro_batch=4, evaluation=False,
                         checkpoint_every=3, seed=random.randrange(1000), out=str(whole))
    train(config)
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    shutil.rmtree(resumed / "final")
    train(replace(config, out=str(resumed), resume=True))
    want, got = final_weights(whole), final_weights(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert [(r["step"], r["loss"]) for r in read_metrics(resumed)] == [(r["step"], r["loss"]) for r in
                                                                       read_metrics(whole)]
