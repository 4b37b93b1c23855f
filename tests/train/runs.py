"""What the training tests share: a run small enough for a test, its outputs, and the commands that start one."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from siglip.train.step import ContrastiveTowers

ROOT = Path(__file__).resolve().parents[2]


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


def write_table(folder: Path, rows: int, missing: set[int]) -> Path:
    from PIL import Image

    lines = ["image,caption"]
    for row in range(rows):
        color = ["red", "green", "blue"][row % 3]
        if row not in missing:
            Image.new("RGB", (20, 20), color).save(folder / f"{row}.png")
        lines.append(f"{row}.png,a {color} square number {row}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def with_attention_dropout(model, probability: float) -> None:
    """Turn on attention dropout in every SigLIP attention layer (the presets have none; --init checkpoints may)."""
    from transformers.models.siglip.modeling_siglip import SiglipAttention

    layers = [module for module in model.modules() if isinstance(module, SiglipAttention)]
    assert layers, "no SiglipAttention layer found"
    for module in layers:
        module.dropout = probability


def tiny_towers(lock_image: bool = False):
    from siglip.model import build_model

    model = build_model("tiny", vocab_size=64, max_text_length=8, init_logit_scale=10.0, init_logit_bias=-5.0)
    if lock_image:
        model.vision_model.requires_grad_(False)
    return model, ContrastiveTowers(model, lock_image=lock_image)


DIST_FLAGS = [*QUICK_FLAGS, "--data", "shapes", "--batch-size", "16", "--steps", "8", "--lr", "2e-3",
              "--checkpoint-every", "2", "--num-workers", "0"]


MICRO = ["--micro-batch", "3"]


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "--max-restarts", str(restarts), "-m", "siglip", *args]
