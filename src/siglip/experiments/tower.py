"""The pretrained, locked image tower of LiT and SigLiT: trained once, cached as safetensors, reused by every run.

The paper's SigLiT (and its study of negatives) trains a text tower against a frozen image tower pretrained on other
data. Here the tower is pretrained with supervision on its own seed's pool of the source: a cosine classifier per
zero-shot task (for `shapes`: colour, shape and count of the training pairs) on the tower's L2-normalised embedding.
Its weights are written to CACHE_DIR/image-tower-KEY.safetensors, KEY a digest of the `TowerSpec` (and of this
module's format version), so a second study, or a second run of the same one, loads them instead of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from siglip.experiments.design import Arm, Scale, TowerSpec
from siglip.experiments.prepared import batch_indices, prepare_data
from siglip.experiments.trial import build_arm_model, log

FORMAT_VERSION = 1
"""Part of the cache key: bump it when pretraining changes in a way the spec does not show."""

HEAD_SCALE = 10.0
"""Fixed logit scale of the supervised heads on unit-norm embeddings (a cosine classifier)."""

CACHE_ENV = "SIGLIP_CACHE_DIR"


@dataclass(frozen=True)
class Tower:
    """A pretrained image tower and where it came from."""

    state: dict[str, torch.Tensor]
    """`model.vision_model.state_dict()` of the tower."""
    path: Path
    cache_hit: bool
    """True when the weights were loaded from the cache, False when they were trained by this call."""
    train_accuracy: float
    """Supervised accuracy (mean over tasks) on the last tenth of pretraining's batches."""
    seconds: float
    """Time of this call: loading on a hit, pretraining on a miss."""


def default_cache_dir() -> Path:
    """$SIGLIP_CACHE_DIR, else ~/.cache/siglip."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "siglip")


def cache_key(spec: TowerSpec) -> str:
    """16 hex digits of SHA-256 over the spec's fields and FORMAT_VERSION: equal specs share one file."""
    text = json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tower_path(spec: TowerSpec, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / f"image-tower-{cache_key(spec)}.safetensors"


def pretrained_image_tower(spec: TowerSpec, cache_dir: str | Path | None = None) -> Tower:
    """The tower of `spec`: loaded from the cache when its file exists, else pretrained and written there.

    The file is written to a temporary name and renamed, so a run stopped half-way never leaves a torn file.
    """
    from safetensors.torch import load_file, safe_open, save_file

    started = time.perf_counter()
    path = tower_path(spec, cache_dir if cache_dir is not None else default_cache_dir())
    if path.is_file():
        with safe_open(str(path), framework="pt") as handle:
            accuracy = float(handle.metadata().get("train_accuracy", "nan"))
        return Tower(load_file(str(path)), path, True, accuracy, time.perf_counter() - started)
    log(f"pretraining the image tower ({spec.steps} steps of {spec.batch_size}); it is cached at {path}")
    state, accuracy = pretrain(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    metadata = {"spec": json.dumps(dataclasses.asdict(spec), sort_keys=True), "train_accuracy": f"{accuracy:.6f}"}
    save_file({name: value.contiguous() for name, value in state.items()}, str(partial), metadata=metadata)
    os.replace(partial, path)
    return Tower(state, path, False, accuracy, time.perf_counter() - started)


def pretrain(spec: TowerSpec) -> tuple[dict[str, torch.Tensor], float]:
    """Supervised pretraining of an image tower on its seed's pool: one cosine-classifier head per task.

    Returns:
        The vision tower's state dict and its training accuracy over the last tenth of the steps (mean over tasks).
    """
    from siglip.model import encode_images
    from siglip.optim import build_optimizer

    data = prepare_data(Scale(data=spec.data, preset=spec.preset, pool_size=spec.pool_size, corpus_size=64),
                        spec.seed, with_test=False)
    model = build_arm_model(Arm("pretrain", spec.batch_size, spec.steps), spec.seed, data, spec.preset)
    width = encode_images(model, data.pixel_values[:2]).shape[1]
    generator = torch.Generator().manual_seed(spec.seed)
    heads = torch.nn.ModuleList(torch.nn.Linear(width, len(names), bias=False) for names in data.tasks.values())
    for head in heads:
        torch.nn.init.normal_(head.weight, std=width**-0.5, generator=generator)
    trained = torch.nn.ModuleDict({"tower": model.vision_model, "heads": heads})
    optimizer, schedule = build_optimizer(trained, lr=spec.lr, weight_decay=spec.weight_decay, beta2=0.95,
                                          warmup_steps=max(1, round(0.1 * spec.steps)), total_steps=spec.steps)
    correct, seen = 0, 0
    for step in range(spec.steps):
        index = batch_indices(step, spec.batch_size, data.pool, spec.seed)
        features = encode_images(model, data.pixel_values[index])                 # (n, d), unit norm
        labels = data.labels[index]                                              # (n, T), -1: no label
        loss = torch.zeros(())
        for column, head in enumerate(heads):
            known = labels[:, column] >= 0
            if not bool(known.any()):
                continue
            logits = HEAD_SCALE * F.linear(features[known], F.normalize(head.weight, dim=1))
            loss = loss + F.cross_entropy(logits, labels[known, column])
            if step >= spec.steps - max(1, spec.steps // 10):
                correct += int((logits.argmax(1) == labels[known, column]).sum())
                seen += int(known.sum())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    state = {name: value.detach().clone() for name, value in model.vision_model.state_dict().items()}
    return state, correct / max(1, seen)
