"""What a `siglip train` run reports: its metrics rows, held-out evaluation, the end-of-run table and plots."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from siglip.train.config import TrainConfig
from siglip.train.processes import Processes
from siglip.train.run_directory import RunDirectory
from siglip.train.step import PairTransform


def scale_and_bias_values(model: nn.Module) -> tuple[float, float]:
    from siglip.model import scale_and_bias

    scale, bias = scale_and_bias(model)
    return float(scale.detach().reshape(())), float(bias.detach().reshape(()))


def train_row(model: nn.Module, step: int, loss: torch.Tensor, lr: float, grad_norm: torch.Tensor,
              samples_per_s: float, samples_seen: int, bad: Counter[str], truncated: int,
              skipped_updates: int) -> dict[str, Any]:
    """One metrics.jsonl row. A non-finite loss or gradient norm (an update that was skipped) is written as null,
    so that the file stays strict JSON; `update_skipped` marks that row."""
    scale, bias = scale_and_bias_values(model)
    loss_value, norm = float(loss), float(grad_norm)
    row = {"step": step, "loss": loss_value if math.isfinite(loss_value) else None, "logit_scale": scale,
           "logit_bias": bias, "lr": lr, "samples_per_s": samples_per_s, "samples_seen": samples_seen,
           "grad_norm": norm if math.isfinite(norm) else None, "bad_samples": sum(bad.values()),
           "truncated_captions": truncated, "skipped_updates": skipped_updates}
    if not (math.isfinite(loss_value) and math.isfinite(norm)):
        row["update_skipped"] = True
    row.update({f"bad/{kind}": count for kind, count in sorted(bad.items())})
    return row


def evaluate_held_out(model: nn.Module, processor: Any, source: Any, config: TrainConfig, processes: Processes) -> dict:
    """Zero-shot (when the source has tasks) and retrieval on the held-out split, on rank 0; {} on the others."""
    results: dict[str, Any] = {}
    if processes.is_main and source.test_samples():
        from siglip.evaluate import evaluate

        model.eval()
        tasks = ["zeroshot", "retrieval"] if source.tasks else ["retrieval"]
        for task in tasks:
            results[task] = evaluate(model, processor, source, task, batch_size=config.eval_batch_size,
                                     device=str(processes.device))
    processes.barrier()
    return results


class HeldOut:
    """A source whose held-out split is read once and kept: evaluation asks for it at every evaluation."""

    def __init__(self, source: Any):
        self.source = source
        self._samples: list | None = None

    def test_samples(self) -> list:
        if self._samples is None:
            self._samples = self.source.test_samples()
        return self._samples

    def iter_test_samples(self, skipped: Any = None) -> Any:
        """The held-out split as cached (its bad samples were skipped, and logged, when it was first read)."""
        return iter(self.test_samples())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)


def flatten_eval(results: dict[str, Any]) -> dict[str, float]:
    """{"zeroshot": {...}, "retrieval": {...}} -> flat metric names such as zeroshot/color/accuracy."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            if key == "per_task":
                for name, per in value.items():
                    flat.update({f"{task}/{name}/{k}": v for k, v in per.items() if isinstance(v, (int, float))})
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{task}/{key}"] = value
    return flat


HELD_OUT_SOURCES = ("shapes", "digits")
"""Sources with a held-out split of their own; a file source's "held-out split" is every sample of its files."""


def evaluated_on(config: TrainConfig, images: int) -> str:
    """What the summary's evaluation was scored on, said as it is."""
    if config.data in HELD_OUT_SOURCES:
        return f"held-out split, {images} images"
    return (f"every sample of {config.data}, the training data itself, {images} images: a file source has no "
            "held-out split; evaluate on another file with siglip eval")


def summary_table(config: TrainConfig, result: dict[str, Any]) -> str:
    """The end-of-run table: zero-shot accuracy per task against chance, retrieval R@1, t, b, bad samples, captions
    cut short, skipped updates, time. Under torchrun the first line names the processes and the per-rank batch."""
    from siglip.train.captions import truncation_line

    world_size = result.get("world_size", 1)
    batch = f"batch {config.batch_size}"
    if world_size > 1:
        batch = f"global batch {config.batch_size} ({world_size} processes x {config.batch_size // world_size})"
    lines = [
        "",
        f"siglip train: {config.init or config.model} on {config.data}, {result['step']} steps of {batch}, "
        f"{config.loss} loss -> {Path(config.out) / 'final'}",
    ]
    zeroshot = result.get("zeroshot")
    if zeroshot:
        lines.append(f"  {'zero-shot task':<16}{'accuracy':>10}{'chance':>10}{'x chance':>10}")
        for name, per in zeroshot["per_task"].items():
            ratio = per["accuracy"] / per["chance"] if per["chance"] else float("nan")
            lines.append(f"  {name:<16}{per['accuracy']:>10.1%}{per['chance']:>10.1%}{ratio:>10.1f}")
        lines.append(f"  ({evaluated_on(config, zeroshot['n'])})")
    retrieval = result.get("retrieval")
    if retrieval:
        lines.append(f"  retrieval R@1: image->text {retrieval['image_to_text_r1']:.1%}, "
                     f"text->image {retrieval['text_to_image_r1']:.1%} ({retrieval['n']} pairs)")
        if not zeroshot:
            lines.append(f"  ({evaluated_on(config, retrieval['n'])})")
    lines.append(f"  final t = {result['logit_scale']:.3g}, b = {result['logit_bias']:.3g}")
    bad = result.get("bad_samples") or {}
    skipped = ", ".join(f"{kind} {count}" for kind, count in sorted(bad.items())) if bad else "none"
    lines.append(f"  bad samples skipped: {skipped}")
    if "truncated_captions" in result:
        lines.append("  " + truncation_line(result["truncated_captions"], result["step"] * config.batch_size,
                                            result.get("text_length", config.max_text_length), config.init is None))
    if result.get("skipped_updates"):
        lines.append(f"  updates skipped (non-finite loss or gradient norm): {result['skipped_updates']}")
    lines.append(f"  wall time {result['wall_time_s']:.1f} s (training steps {result['trained_seconds']:.1f} s)")
    return "\n".join(lines)


def draw_plots(run: RunDirectory, model: nn.Module, processor: Any, source: Any, config: TrainConfig) -> None:
    from siglip import plots

    plots.plot_loss(run.rows, run.out / "loss.png")
    plots.plot_scale_bias(run.rows, run.out / "scale_bias.png")
    probabilities, captions = pair_probabilities(model, processor, source, config, count=16)
    if captions:
        title = ("sigmoid(t <x, y> + b)" if config.loss == "sigmoid" else "softmax over texts of t <x, y>")
        plots.plot_pairs(probabilities, captions, run.out / "pairs.png", title=f"held-out pairs: {title}")


def pair_probabilities(model: nn.Module, processor: Any, source: Any, config: TrainConfig,
                       count: int = 16) -> tuple[torch.Tensor, list[str]]:
    """(k, k) pair probabilities of up to `count` held-out samples, and their captions.

    The samples differ in their labels (for shapes: one image per held-out colour-shape pair, and one per count),
    or, for a source without labels, in their captions; so a caption is true of its own image only, and the
    diagonal is the right answer. Sigmoid models: sigmoid(t <x_i, y_j> + b), each pair judged alone as SigLIP
    does. Softmax models: the row-wise softmax of t <x_i, y_j>, since their bias is meaningless.
    """
    from siglip.model import encode_images, encode_texts

    chosen, seen = [], set()
    for sample in source.test_samples():
        key = tuple(sorted(sample.labels.items())) if sample.labels else sample.caption
        if key not in seen:
            seen.add(key)
            chosen.append(sample)
        if len(chosen) == count:
            break
    if not chosen:
        return torch.empty(0, 0), []
    transform = PairTransform(processor)
    encoded = [transform(sample) for sample in chosen]
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        images = encode_images(model, torch.stack([e["pixel_values"] for e in encoded]).to(device)).float()
        texts = encode_texts(model, torch.stack([e["input_ids"] for e in encoded]).to(device)).float()
        scale, bias = scale_and_bias_values(model)
        logits = scale * images @ texts.T
        probabilities = torch.sigmoid(logits + bias) if config.loss == "sigmoid" else logits.softmax(dim=1)
    return probabilities.cpu(), [sample.caption for sample in chosen]
