"""Training end to end: the loss falls, the export loads, a killed run resumes bitwise, ranks agree, micro-batches
give the full batch's gradient, and bad configurations are refused with a clear message."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from siglip.errors import UserError
from siglip.train import ContrastiveTowers, TrainConfig, forward_backward, load_config, train, validate_config

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for a test: the tiny preset, a small tokenizer, a few steps.
QUICK = dict(model="tiny", device="cpu", vocab_size=128, max_text_length=16, tokenizer_captions=400,
             warmup_steps=2, log_every=1, eval_every=0, num_workers=0, progress=False, plots=False)
QUICK_FLAGS = ["--model", "tiny", "--device", "cpu", "--vocab-size", "128", "--max-text-length", "16",
               "--tokenizer-captions", "400", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "0",
               "--no-progress", "--no-plots"]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def siglip_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "siglip", *args]


def child_environment() -> dict[str, str]:
    # Every process pinned to the same thread count, so float reductions run in the same order in each.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


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
    from siglip.train import PairTransform

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


def _write_table(folder: Path, rows: int, missing: set[int]) -> Path:
    from PIL import Image

    lines = ["image,caption"]
    for row in range(rows):
        color = ["red", "green", "blue"][row % 3]
        if row not in missing:
            Image.new("RGB", (20, 20), color).save(folder / f"{row}.png")
        lines.append(f"{row}.png,a {color} square number {row}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


@pytest.mark.slow
def test_bad_samples_are_counted_or_stop_a_strict_run(tmp_path):
    from siglip.data import BadSample

    table = _write_table(tmp_path, rows=14, missing={3, 9})
    config = TrainConfig(**QUICK, data=str(table), batch_size=4, steps=4, out=str(tmp_path / "run"))
    result = train(config)                                    # 16 samples: every row of the table at least once
    assert result["bad_samples"].get("missing_file", 0) >= 2
    last = read_metrics(tmp_path / "run")[-1]
    assert last["bad/missing_file"] == last["bad_samples"] == sum(result["bad_samples"].values())
    assert result["retrieval"]["n"] == 12                     # evaluation skips the two bad rows

    with pytest.raises(BadSample, match=r"pairs\.csv:\d+ \(missing_file\)"):
        train(replace(config, strict=True, out=str(tmp_path / "strict")))


def _tiny_towers(lock_image: bool = False):
    from siglip.model import build_model

    model = build_model("tiny", vocab_size=64, max_text_length=8, init_logit_scale=10.0, init_logit_bias=-5.0)
    if lock_image:
        model.vision_model.requires_grad_(False)
    return model, ContrastiveTowers(model, lock_image=lock_image)


@pytest.mark.parametrize("loss,lock_image", [("sigmoid", False), ("softmax", False), ("sigmoid", True)])
def test_micro_batch_gradient_equals_full_batch(loss, lock_image):
    model, towers = _tiny_towers(lock_image)
    if loss == "softmax":
        model.logit_bias.requires_grad_(False)
    size = model.config.vision_config.image_size
    n = 11
    pixel_values = torch.randn(n, 3, size, size)
    input_ids = torch.randint(0, 64, (n, 8))
    positive_ids = torch.randint(0, 4, (n,))              # repeated ids: several positives per row

    def gradients(micro_batch):
        model.zero_grad(set_to_none=True)
        value = forward_backward(towers, pixel_values, input_ids, positive_ids, loss=loss, micro_batch=micro_batch)
        return value, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    want_loss, want = gradients(None)
    got_loss, got = gradients(4)                          # micro-batches of 4, 4, 3
    # The two paths embed in batches of 11 and of 4, so the matrix products round differently: over 360 draws the
    # losses differed by at most 1.0 float32 ulp (1.2e-7 relative, locked image tower; 0 otherwise). 16 ulps is the
    # bound, a 16x margin; a wrong gradient path moves the loss by far more.
    assert torch.allclose(got_loss, want_loss, rtol=16 * torch.finfo(torch.float32).eps, atol=0), (
        f"loss {got_loss.item()!r} in micro-batches against {want_loss.item()!r}")
    assert want.keys() == got.keys() and len(want) > 0
    assert ("logit_bias" in want) == (loss == "sigmoid")
    assert not any(name.startswith("vision_model") for name in want) if lock_image else True
    overall = max(grad.abs().max().item() for grad in want.values())
    for name in want:
        scale = want[name].abs().max().item()
        error = (got[name] - want[name]).abs().max().item()
        if name.endswith("k_proj.bias"):
            # Softmax attention is invariant to a bias added to every key: this gradient is zero up to rounding,
            # so only its size against the other gradients means anything.
            assert scale <= 1e-5 * overall and error <= 1e-5 * overall, name
            continue
        assert error <= 1e-5 * scale, f"{name}: error {error:.2e} against {scale:.2e}"


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


def test_cli_refuses_to_overwrite_a_run(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    result = subprocess.run(siglip_command("train", *QUICK_FLAGS, "--steps", "1", "--out", str(tmp_path)),
                            env=child_environment(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("siglip train: error: --out")
    assert "--resume" in result.stderr and "--overwrite" in result.stderr


# ------------------------------------------------------------------------------------------------ several processes

DIST_FLAGS = [*QUICK_FLAGS, "--data", "shapes", "--batch-size", "16", "--steps", "8", "--lr", "2e-3",
              "--checkpoint-every", "2", "--num-workers", "0"]


# The 2-process runs also encode in micro-batches (8 per rank: 3 + 3 + 2), which must not change the gradient.
MICRO = ["--micro-batch", "3"]


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", str(restarts), "-m", "siglip", *args]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """An uninterrupted 2-process gloo run in micro-batches, and the seed it used."""
    out, seed = tmp_path_factory.mktemp("two_process"), str(random.randrange(1000))
    result = subprocess.run(torchrun("train", *DIST_FLAGS, *MICRO, "--seed", seed, "--out", str(out)),
                            env=child_environment(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, seed


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_in_micro_batches_match_one_process_on_the_global_batch(tmp_path, two_process_run):
    two, seed = two_process_run
    one = tmp_path / "one"
    subprocess.run(siglip_command("train", *DIST_FLAGS, "--seed", seed, "--out", str(one)), env=child_environment(),
                   check=True, capture_output=True, timeout=300)
    for got, want in zip(read_metrics(two), read_metrics(one), strict=True):
        assert got["step"] == want["step"] and got["samples_seen"] == want["samples_seen"] == 16 * got["step"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    want, got = final_weights(one), final_weights(two)
    for name in want:
        error = (got[name] - want[name]).abs().max().item()
        # Sums over the batch run in another order on two ranks, so gradients differ by rounding; Adam divides
        # each gradient by its own running size, which can lift a rounding difference to a sizeable fraction of
        # a step for an entry whose gradient is tiny. Allow a twentieth of one step (lr = 2e-3) after 8 steps.
        # Key biases get a zero gradient up to rounding (softmax attention ignores them), which Adam scales up to
        # whole steps of noise: they are left out.
        if not name.endswith("k_proj.bias"):
            assert error <= 0.05 * 2e-3, f"{name}: {error:.2e}"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank, found through /proc (Linux)."""
    for pid in _children(launcher):
        try:
            environment = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environment:
            return pid
    return None


def test_each_torchrun_restart_reads_and_writes_its_own_keys_of_the_agent_store(monkeypatch):
    import torch.distributed as dist

    from siglip.train import _store_of_this_attempt

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert _store_of_this_attempt(2) is None          # plain env:// or a rank-0 store: torch's own set-up
    server = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    restart = random.randint(0, 5)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    # A dead worker of the previous attempt left its address under the bare key.
    server.set("rank_0", "stale address")
    store = _store_of_this_attempt(2)
    store.set("rank_0", "fresh address")
    assert server.get(f"siglip/attempt-{restart}/rank_0") == b"fresh address"
    assert store.get("rank_0") == b"fresh address" and server.get("rank_0") == b"stale address"


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_torchrun_restarts_a_killed_rank_from_the_newest_checkpoint(tmp_path, two_process_run):
    want_dir, seed = two_process_run
    out, kill_after = tmp_path / "restarted", random.randint(3, 6)
    log = open(tmp_path / "torchrun.log", "w+")
    launcher = subprocess.Popen(torchrun("train", *DIST_FLAGS, *MICRO, "--seed", seed, "--out", str(out), "--resume",
                                         restarts=2), env=child_environment(), stdout=log, stderr=subprocess.STDOUT)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and launcher.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            killed = _worker_of_rank(launcher.pid, 1)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    assert killed is not None, "no worker to kill: the run ended first"
    try:
        status = launcher.wait(timeout=400)
    except subprocess.TimeoutExpired:
        for pid in [*_children(launcher.pid), launcher.pid]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        log.seek(0)
        pytest.fail(f"torchrun did not finish within 400 s of the kill; its log ends:\n{log.read()[-3000:]}")
    log.seek(0)
    output = log.read()
    assert status == 0, f"torchrun exited with {status}; its log ends:\n{output[-6000:]}"
    assert "resumed from" in output, output[-3000:]
    # Each step appears once in the log, and the run ends where an uninterrupted one does.
    assert [row["step"] for row in read_metrics(out)] == list(range(1, 9))
    want, got = final_weights(want_dir), final_weights(out)
    for name in want:
        assert torch.equal(want[name], got[name]), name


# ------------------------------------------------------------------------------------------------ --positives


def test_positives_flag_and_the_older_positive_ids_key(tmp_path):
    from siglip.train import upgrade_config_dict

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


# ------------------------------------------------------------------------------------------------ SigLiT's cache


def test_cache_image_features_needs_a_locked_image_tower():
    with pytest.raises(UserError, match="--cache-image-features needs --lock-image"):
        validate_config(TrainConfig(cache_image_features=True))
    validate_config(TrainConfig(cache_image_features=True, lock_image=True))
    model, towers = _tiny_towers(lock_image=False)
    with pytest.raises(ValueError, match="need a locked image tower"):
        towers(None, torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, model.config.vision_config.hidden_size))


@pytest.mark.parametrize("micro_batch", [None, 4])
def test_cached_image_features_give_the_text_tower_the_same_gradient(micro_batch):
    from siglip.feature_cache import ImageFeatureCache
    from siglip.train_step import frozen_image_encoder

    torch.manual_seed(random.randrange(2**31))
    model, towers = _tiny_towers(lock_image=True)
    model.vision_model.eval()
    size = model.config.vision_config.image_size
    n = 11
    images = torch.randn(8, 3, size, size)
    picks = [0, 1, 2, 3, 4, 5, 6, 7, 2, 5, 2]                 # an image may come twice in a batch (a refill)
    pixel_values, keys = images[picks], [f"image/{pick}" for pick in picks]
    input_ids = torch.randint(0, 64, (n, 8))
    positive_ids = torch.randint(0, 4, (n,))
    cache = ImageFeatureCache(capacity=8)
    encode = frozen_image_encoder(model, torch.device("cpu"), micro_batch, None)

    def gradients(image_features):
        model.zero_grad(set_to_none=True)
        value = forward_backward(towers, None if image_features is not None else pixel_values, input_ids,
                                 positive_ids, micro_batch=micro_batch, image_features=image_features)
        return value, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    want_loss, want = gradients(None)
    cached = cache.features(keys, pixel_values, encode)
    assert cache.encoded == 8 and cache.looked_up == 3 and cached.dtype == torch.float32
    got_loss, got = gradients(cached)
    # A second visit is served from the cache alone and gives the same features.
    assert torch.equal(cache.features(keys[::-1], pixel_values.flip(0), encode), cached.flip(0))
    assert cache.encoded == 8

    assert want.keys() == got.keys() and len(want) > 0
    assert not any(name.startswith("vision_model") for name in want)
    assert torch.allclose(got_loss, want_loss, rtol=1e-5, atol=0)
    overall = max(grad.abs().max().item() for grad in want.values())
    for name in want:
        scale = want[name].abs().max().item()
        error = (got[name] - want[name]).abs().max().item()
        if name.endswith("k_proj.bias"):                  # zero up to rounding (see the micro-batch test)
            assert scale <= 1e-5 * overall and error <= 1e-5 * overall, name
            continue
        assert error <= 1e-5 * scale, f"{name}: error {error:.2e} against {scale:.2e}"


def _count_image_tower_rows(monkeypatch) -> list[int]:
    """Patch training so that every image the image tower embeds is counted; returns the list of batch sizes."""
    import siglip.train as train_module

    calls: list[int] = []
    original = train_module._model_processor_source

    def counting(config, run):
        model, processor, source = original(config, run)
        model.vision_model.register_forward_hook(
            lambda module, args, output: calls.append(output.last_hidden_state.shape[0]))
        return model, processor, source

    monkeypatch.setattr(train_module, "_model_processor_source", counting)
    return calls


@pytest.mark.slow
def test_siglit_cache_embeds_each_image_once_and_survives_resume(tmp_path, monkeypatch):
    table = _write_table(tmp_path, rows=6, missing=set())
    # 6 steps of 4 over a table of 6 rows: every image comes back three to four times.
    base = TrainConfig(**QUICK, data=str(table), batch_size=4, steps=6, lr=2e-3, lock_image=True, evaluation=False,
                       checkpoint_every=3, micro_batch=3, seed=random.randrange(1000), out=str(tmp_path / "plain"))
    calls = _count_image_tower_rows(monkeypatch)
    train(base)
    assert sum(calls) == 6 * 4                             # without the cache: every sample of every step
    calls.clear()
    cached = replace(base, cache_image_features=True, out=str(tmp_path / "cached"))
    train(cached)
    assert sum(calls) == 6                                 # with it: each of the 6 images once
    want, got = final_weights(tmp_path / "plain"), final_weights(tmp_path / "cached")
    for name in want:
        # Rounding only (images embedded in other groupings); Adam may lift it for tiny gradients: allow a
        # twentieth of one step, and leave out the key biases, whose gradient is rounding noise (as for the
        # two-process test).
        if not name.endswith("k_proj.bias"):
            assert (got[name] - want[name]).abs().max().item() <= 0.05 * 2e-3, name

    # Resume from step 3: the cache is not in the checkpoint and is rebuilt, each image embedded once more.
    import shutil

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "cached", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    shutil.rmtree(resumed / "final")
    calls.clear()
    train(replace(cached, out=str(resumed), resume=True))
    assert sum(calls) == 6                                 # steps 4 to 6 visit all 6 rows again
    again = final_weights(resumed)
    for name in got:
        if not name.endswith("k_proj.bias"):
            assert (again[name] - got[name]).abs().max().item() <= 0.05 * 2e-3, name


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_with_the_cache_match_one_process_without(tmp_path):
    table = _write_table(tmp_path, rows=12, missing=set())
    # Each rank caches the images of its own slices (4 per step, 3 + 1 per micro-batch); 6 steps of 8 go round
    # the 12 rows four times.
    flags = [*QUICK_FLAGS, "--no-evaluation", "--data", str(table), "--batch-size", "8", "--steps", "6", "--lr",
             "2e-3", "--lock-image", "--num-workers", "0", "--seed", str(random.randrange(1000))]
    two, one = tmp_path / "two", tmp_path / "one"
    result = subprocess.run(torchrun("train", *flags, "--micro-batch", "3", "--cache-image-features", "--out",
                                     str(two)), env=child_environment(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    subprocess.run(siglip_command("train", *flags, "--out", str(one)), env=child_environment(), check=True,
                   capture_output=True, timeout=300)
    for got, want in zip(read_metrics(two), read_metrics(one), strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    want, got = final_weights(one), final_weights(two)
    for name in want:
        if not name.endswith("k_proj.bias"):       # rounding noise amplified by Adam (see the test above)
            assert (got[name] - want[name]).abs().max().item() <= 0.05 * 2e-3, name
