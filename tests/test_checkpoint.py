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
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    model, optimizer, scheduler = trained_state()
    random.seed(os.urandom(8))
    np.random.seed(int.from_bytes(os.urandom(4), "little"))
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
