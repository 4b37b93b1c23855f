"""Checkpoints: an exact round trip, refusal of tampered files (never unpickled), atomic writes, pruning."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from siglip import checkpoint as ckpt
from siglip.optim import build_optimizer


def small_model() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3))
    model.register_parameter("logit_bias", torch.nn.Parameter(torch.tensor([-10.0])))
    return model


def trained_state(steps: int = 3):
    """A model, AdamW and its schedule after a few updates on random data, so every state is non-trivial."""
    model = small_model()
    optimizer, scheduler = build_optimizer(model, lr=1e-2, weight_decay=0.1, warmup_steps=2, total_steps=10,
                                           logit_lr_multiplier=5.0)
    for _ in range(steps):
        loss = model(torch.randn(8, 5)).square().mean() + model.logit_bias.square().sum()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def save(directory: Path, step: int, model, optimizer, scheduler, **extra) -> Path:
    return ckpt.save_checkpoint(
        directory, step, model_state=model.state_dict(), optimizer_state=optimizer.state_dict(),
        scheduler_state=scheduler.state_dict(), rng_states=[ckpt.capture_rng_state()],
        state={"samples_seen": 24, "config": {"lr": 1e-2, "micro_batch": None}}, **extra,
    )


def test_round_trip_restores_everything(tmp_path):
    model, optimizer, scheduler = trained_state()
    path = save(tmp_path, 3, model, optimizer, scheduler)
    draws = (random.random(), np.random.rand(), torch.rand(4))          # what the saved RNG states draw next

    loaded = ckpt.load_checkpoint(path)
    assert loaded.step == 3 and loaded.state["samples_seen"] == 24 and loaded.state["config"]["micro_batch"] is None
    fresh_model, fresh_optimizer, fresh_scheduler = trained_state(steps=0)
    fresh_model.load_state_dict(loaded.model_state)
    fresh_optimizer.load_state_dict(loaded.optimizer_state)
    fresh_scheduler.load_state_dict(loaded.scheduler_state)
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh_model.state_dict()[name]), name
    assert fresh_scheduler.state_dict() == scheduler.state_dict()
    want, got = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert want["param_groups"] == got["param_groups"]
    for index, values in want["state"].items():
        for key, value in values.items():
            assert torch.equal(value, got["state"][index][key]), (index, key)

    # The restored optimiser and schedule take the same next step, bit for bit.
    batch = torch.randn(8, 5)
    for m, o, s in ((model, optimizer, scheduler), (fresh_model, fresh_optimizer, fresh_scheduler)):
        (m(batch).square().mean() + m.logit_bias.square().sum()).backward()
        o.step()
        s.step()
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh_model.state_dict()[name]), name

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ckpt.restore_rng_state(loaded.rng_states[0])
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(4), draws[2])


class Payload:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _record_digest(path: Path, name: str) -> None:
    """Make the tampered file pass the digest check, so the format check itself is what must refuse it."""
    document = json.loads((path / "state.json").read_text())
    document["sha256"][name] = ckpt._sha256(path / name)
    (path / "state.json").write_text(json.dumps(document))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors"])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_in_place_of_a_tensor_file_is_refused_unrun(tmp_path, name, writer):
    model, optimizer, scheduler = trained_state(steps=1)
    path = save(tmp_path / "checkpoints", 1, model, optimizer, scheduler)
    marker = tmp_path / "payload_ran"
    with open(path / name, "wb") as handle:
        if writer == "pickle":
            pickle.dump({"weight": Payload(marker)}, handle)
        else:
            torch.save({"weight": Payload(marker)}, handle)
    _record_digest(path, name)
    with pytest.raises(ckpt.CheckpointError, match=rf"{name} is not a valid safetensors file.*never unpickled"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_pickle_in_place_of_the_state_file_is_refused_unrun(tmp_path):
    model, optimizer, scheduler = trained_state(steps=1)
    path = save(tmp_path / "checkpoints", 1, model, optimizer, scheduler)
    marker = tmp_path / "payload_ran"
    (path / "state.json").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ckpt.CheckpointError, match="state.json is not JSON"):
        ckpt.load_checkpoint(path)
    assert not marker.exists()


def test_modified_weights_fail_the_digest(tmp_path):
    model, optimizer, scheduler = trained_state(steps=1)
    path = save(tmp_path, 1, model, optimizer, scheduler)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    state["0.weight"][0, 0] += 1.0                                      # a valid safetensors file, other weights
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match="does not match the SHA-256"):
        ckpt.load_checkpoint(path)


def test_kill_during_write_keeps_the_previous_checkpoint(tmp_path):
    """A process SIGKILLed halfway through writing step 2 leaves step 1 whole and the newest."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint import trained_state, save
        from siglip import checkpoint as ckpt
        model, optimizer, scheduler = trained_state(steps=1)
        save({str(tmp_path)!r}, 1, model, optimizer, scheduler)
        real_save_file = ckpt.save_file
        def save_then_die(tensors, filename):
            real_save_file(tensors, filename)
            if filename.endswith("optimizer.safetensors"):
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.save_file = save_then_die
        save({str(tmp_path)!r}, 2, model, optimizer, scheduler)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "step_00000001"
    assert ckpt.load_checkpoint(tmp_path / "step_00000001").step == 1
    stale = ckpt.remove_stale_temporaries(tmp_path)
    assert [path.name.startswith(".tmp-step_00000002") for path in stale] == [True]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["step_00000001"]


def test_prune_keeps_the_newest(tmp_path):
    model, optimizer, scheduler = trained_state(steps=1)
    for step in (5, 10, 15, 20):
        save(tmp_path, step, model, optimizer, scheduler, keep=2)
    assert [path.name for path in ckpt.list_checkpoints(tmp_path)] == ["step_00000015", "step_00000020"]
    # Rewriting an existing step replaces it whole.
    save(tmp_path, 20, model, optimizer, scheduler, keep=2)
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path)).step == 20
    with pytest.raises(ValueError, match="keep must be at least 1"):
        ckpt.prune_checkpoints(tmp_path, 0)


# ----------------------------------------------------------------------------------------------------- final export


def tiny_model_and_processor(max_length: int = 16):
    """A width-32 SigLIP of ours and its processor, as `siglip train` builds them (left-padded BPE, 16 tokens)."""
    from transformers import SiglipConfig, SiglipModel

    from siglip.tokenizer import build_processor, train_tokenizer

    texts = [f"a {c} {s}" for c in ("red", "green", "blue", "white") for s in ("circle", "square", "star")] * 4
    tokenizer = train_tokenizer(texts, vocab_size=64, max_length=max_length)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8,
                  image_size=16)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    model.config.text_config.mask_pad_tokens = True
    return model, build_processor(tokenizer, image_size=16)


def test_exported_tokenizer_gives_the_training_embeddings_at_transformers_default_padding(tmp_path):
    """Training pads captions to 16 tokens and places them at the end of the 64-position table; transformers'
    usual call, processor(text=..., padding="max_length"), must find the same embedding in final/."""
    from transformers import AutoModel, AutoProcessor

    from siglip.model import encode_texts
    from siglip.tokenizer import tokenize

    model, processor = tiny_model_and_processor(max_length=16)
    # Captions that fit the 16 training tokens (a longer one is cut at 16 in training, at 64 in the export).
    captions = ["a red circle", "a white star", "green"]
    assert all(len(processor.tokenizer(caption)["input_ids"]) <= 16 for caption in captions)
    with torch.no_grad():
        trained = encode_texts(model, tokenize(processor, captions))          # (3, d) as training embeds them
    final = ckpt.export_final(model, processor, tmp_path / "final")
    assert processor.tokenizer.model_max_length == 16                          # the run's processor is unchanged
    exported = AutoProcessor.from_pretrained(final)
    assert exported.tokenizer.model_max_length == 64
    loaded = AutoModel.from_pretrained(final).eval()
    with torch.no_grad():
        inputs = exported(text=captions, padding="max_length", return_tensors="pt")
        got = torch.nn.functional.normalize(loaded.get_text_features(**inputs).pooler_output, dim=-1)
    # The same float32 operations on the same 64 positions, with the pads masked: 1e-5 bounds the rounding of
    # the trimmed forward against the full one (measured below 1e-6).
    assert torch.allclose(got, trained, atol=1e-5), (got - trained).abs().max()


def test_export_replaces_final_atomically_with_no_moment_without_it(tmp_path):
    import threading

    model, processor = tiny_model_and_processor()
    final = tmp_path / "final"
    ckpt.export_final(model, processor, final)
    missing, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            if not (final / "config.json").is_file():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for bias in range(-6, -1):
            with torch.no_grad():
                model.logit_bias.fill_(float(bias))
            ckpt.export_final(model, processor, final)
            assert json.loads((final / "config.json").read_text())["architectures"] == ["SiglipModel"]
    finally:
        stop.set()
        watcher.join()
    assert not missing, f"final/config.json was missing {len(missing)} times while final/ was replaced"
    from safetensors.torch import load_file

    assert load_file(final / "model.safetensors")["logit_bias"].item() == -2.0   # the newest export
    assert sorted(path.name for path in tmp_path.iterdir()) == ["final"]         # no temporary left behind


def test_export_without_an_atomic_exchange_still_replaces_final(tmp_path, monkeypatch):
    model, processor = tiny_model_and_processor()
    ckpt.export_final(model, processor, tmp_path / "final")
    monkeypatch.setattr(ckpt, "_exchange", lambda first, second: False)        # a system without renameat2
    with torch.no_grad():
        model.logit_bias.fill_(-3.0)
    ckpt.export_final(model, processor, tmp_path / "final")
    from safetensors.torch import load_file

    assert load_file(tmp_path / "final" / "model.safetensors")["logit_bias"].item() == -3.0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["final"]


@pytest.mark.parametrize("kind", ["siglip", "siglip2", "naflex"])
def test_a_google_checkpoint_exports_in_its_own_class_with_its_tokenizer(tmp_path, kind):
    """SigLIP v1, SigLIP 2 and NaFlex, loaded and exported: transformers reads final/ as the same class, gives the
    same embeddings and the same token ids, and the text config carries the tokenizer's own special-token ids."""
    from PIL import Image
    from transformers import AutoModel, AutoProcessor

    from google_checkpoints import build_checkpoint
    from siglip.model import encode_images, encode_texts, load_model
    from siglip.tokenizer import image_transform, tokenize

    source = build_checkpoint(kind, tmp_path / "google")
    model, processor = load_model(str(source))
    final = ckpt.export_final(model, processor, tmp_path / "final")
    config = json.loads((final / "config.json").read_text())
    assert config["model_type"] == ("siglip2" if kind == "naflex" else "siglip")
    assert config["architectures"] == [("Siglip2Model" if kind == "naflex" else "SiglipModel")]
    text_config = config["text_config"]
    tokenizer = processor.tokenizer
    assert (text_config["pad_token_id"], text_config["eos_token_id"], text_config["bos_token_id"]) == (
        tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)          # not 49406 / 49407
    assert all(value is None or 0 <= value < text_config["vocab_size"]
               for name, value in text_config.items() if name.endswith("_token_id"))
    texts = ["a red circle", "Two LARGE dogs on the grass!", "star"]
    original, exported = AutoProcessor.from_pretrained(source), AutoProcessor.from_pretrained(final)
    for text in texts:                                      # the same text gives the same ids before and after
        assert exported.tokenizer(text)["input_ids"] == original.tokenizer(text)["input_ids"]
    loaded = AutoModel.from_pretrained(final).eval()
    assert type(loaded) is type(model)
    rng = np.random.default_rng(random.randrange(2**32))          # from the test seed
    images = [Image.fromarray(rng.integers(0, 256, (int(rng.integers(9, 40)), int(rng.integers(9, 40)), 3),
                                           dtype=np.uint8)) for _ in range(3)]
    to_pixels = image_transform(processor)
    with torch.no_grad():
        for tower, inputs in ((encode_texts, tokenize(processor, texts)),
                              (encode_images, torch.stack([to_pixels(image) for image in images]))):
            assert torch.equal(tower(loaded, inputs), tower(model, inputs)), tower.__name__
