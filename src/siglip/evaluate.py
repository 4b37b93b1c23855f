"""Evaluation: zero-shot classification with prompt ensembles, and image-text retrieval (recall at k).

The metrics are pure functions of embeddings (`zeroshot_accuracy`, `retrieval_recall`); `evaluate` embeds a
source's held-out split with a model and returns the contract's JSON; `run` is `siglip eval`.

Zero-shot (CLIP's recipe, Radford et al., 2021, sec. 3.1.4; used by SigLIP): each class name is written into
every prompt template of its task, the prompts are embedded, averaged over templates and re-normalised; an
image's prediction is the class whose embedding has the largest cosine with it. SigLIP's t and b are monotone
in the cosine (t > 0), so they do not change the prediction and are not used.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from siglip.errors import UserError

if TYPE_CHECKING:
    from PIL.Image import Image
    from transformers import SiglipModel, SiglipProcessor

    from siglip.data import Sample, Source

TASKS = ("zeroshot", "retrieval")


# ---------------------------------------------------------------------------------------------- pure metrics


def zeroshot_accuracy(image_features: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images whose most similar class is their label.

    Args:
        image_features: (n, d) L2-normalised image embeddings.
        class_features: (k, d) L2-normalised class embeddings (one per class, in label order).
        labels: (n,) integer class indices in [0, k).

    Returns:
        Accuracy in [0, 1]; ties go to the lower class index.
    """
    if image_features.dim() != 2 or class_features.dim() != 2 or image_features.shape[1] != class_features.shape[1]:
        raise ValueError(f"image_features (n, d) and class_features (k, d) must share d, got "
                         f"{tuple(image_features.shape)} and {tuple(class_features.shape)}")
    if labels.shape != (image_features.shape[0],):
        raise ValueError(f"labels must have shape ({image_features.shape[0]},), got {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("zeroshot_accuracy needs at least one image")
    if labels.min() < 0 or labels.max() >= class_features.shape[0]:
        raise ValueError(f"labels must lie in [0, {class_features.shape[0]}), got [{labels.min()}, {labels.max()}]")
    similarities = image_features.float() @ class_features.float().T          # (n, k) cosines
    predictions = similarities.argmax(dim=1)
    return float((predictions == labels.to(predictions.device)).double().mean())


def retrieval_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    groups: torch.Tensor | None = None,
) -> dict[str, float]:
    """Recall at k in both directions: image i's match is text i (and text i's match is image i).

    Args:
        image_features: (n, d) L2-normalised image embeddings.
        text_features: (n, d) L2-normalised text embeddings; row i is image i's caption.
        ks: the cut-offs k.
        groups: optional (n,) integer ids: pairs i, j with equal ids count as matches of each other (e.g. two
            images with the same caption, whose text rows are identical). None: only i matches i.

    Returns:
        {"image_to_text_r{k}": F, "text_to_image_r{k}": F for each k}: the fraction of queries with a match among
        the k most similar candidates. A non-match tied with the best match counts as ranked above it, so a
        collapsed model that embeds everything alike scores 0, not 1.
    """
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image_features and text_features must both be (n, d), got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    n = image_features.shape[0]
    if n == 0:
        raise ValueError("retrieval_recall needs at least one pair")
    if any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    if groups is None:
        groups = torch.arange(n)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
    groups = groups.to(image_features.device)
    similarities = image_features.float() @ text_features.float().T            # (n images, n texts) cosines
    is_match = groups[:, None] == groups[None, :]                               # (n, n), symmetric
    results = {}
    for direction, scores in (("image_to_text", similarities), ("text_to_image", similarities.T)):
        best_match = scores.masked_fill(~is_match, float("-inf")).amax(dim=1, keepdim=True)   # (n, 1)
        # rank of the best match (0 = first) = non-matches scoring at least as high
        rank = ((scores >= best_match) & ~is_match).sum(dim=1)                                # (n,)
        for k in ks:
            results[f"{direction}_r{k}"] = float((rank < k).double().mean())
    return results


# ----------------------------------------------------------------------------------- embedding a source


def evaluate(model: SiglipModel, processor: SiglipProcessor, source: Source, task: str = "zeroshot", *,
             batch_size: int = 256, device: str = "cpu") -> dict:
    """Zero-shot accuracy or retrieval recall of `model` on `source`'s held-out split (`source.test_samples()`).

    Args:
        model: a `SiglipModel` on `device`. Its train/eval mode is restored afterwards.
        processor: its `SiglipProcessor` (tokenizer and image processor as in training).
        source: a `siglip.data.Source`.
        task: "zeroshot": every task of the source (shapes: color, shape, count; digits: digit; files: label),
            each on the test samples that carry its label; "retrieval": every test image against every caption.
        batch_size: images or texts per forward pass.
        device: where the inputs go ("cpu", "cuda").

    Returns:
        zeroshot: {"task": "zeroshot", "accuracy", "chance", "n", "per_task": {name: {"accuracy", "chance",
        "classes", "n"}}}; accuracy and chance are the means over tasks, chance = 1 / classes, n = images used.
        retrieval: {"task": "retrieval", "image_to_text_r1", "_r5", "_r10", "text_to_image_r1", "_r5", "_r10", "n"}.
    """
    if task not in TASKS:
        raise UserError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            samples = source.test_samples()
            if task == "zeroshot":
                return _zeroshot(model, processor, source, samples, batch_size, device)
            return _retrieval(model, processor, source, samples, batch_size, device)
    finally:
        model.train(was_training)


def _zeroshot(model: SiglipModel, processor: SiglipProcessor, source: Source, samples: list[Sample],
              batch_size: int, device: str) -> dict:
    tasks = {name: classes for name, classes in source.tasks.items() if classes}
    if not tasks:
        raise UserError(f"source {source.name!r} has no zero-shot labels; use --task retrieval, or give a labelled "
                        "source (a WebDataset 'cls' entry or a 'label' column, with --classes FILE)")
    used = [sample for sample in samples if any(name in sample.labels for name in tasks)]
    if not used:
        raise UserError(f"no held-out sample of {source.name!r} carries a label of the tasks {', '.join(tasks)}")
    image_features = embed_images(model, processor, [sample.image for sample in used], batch_size, device)
    per_task = {}
    for name, classes in tasks.items():
        rows = [row for row, sample in enumerate(used) if name in sample.labels]
        if not rows:
            continue
        labels = torch.tensor([used[row].labels[name] for row in rows])
        outside = labels[(labels < 0) | (labels >= len(classes))]
        if len(outside):
            raise UserError(f"source {source.name!r} task {name!r} has {len(classes)} classes but a test sample has "
                            f"label {int(outside[0])}; give every class name, in label order, with --classes FILE")
        templates = source.templates.get(name) or _default_templates()
        class_features = class_embeddings(model, processor, classes, templates, batch_size, device)
        per_task[name] = {
            "accuracy": zeroshot_accuracy(image_features[rows], class_features, labels),
            "chance": 1.0 / len(classes),
            "classes": len(classes),
            "n": len(rows),
        }
    return {
        "task": "zeroshot",
        "accuracy": sum(entry["accuracy"] for entry in per_task.values()) / len(per_task),
        "chance": sum(entry["chance"] for entry in per_task.values()) / len(per_task),
        "n": len(used),
        "per_task": per_task,
    }


def _retrieval(model: SiglipModel, processor: SiglipProcessor, source: Source, samples: list[Sample],
               batch_size: int, device: str) -> dict:
    if not samples:
        raise UserError(f"source {source.name!r} has no held-out samples to retrieve")
    image_features = embed_images(model, processor, [sample.image for sample in samples], batch_size, device)
    text_features = embed_texts(model, processor, [sample.caption for sample in samples], batch_size, device)
    # Identical captions have identical embeddings: either one is a correct answer.
    caption_group: dict[str, int] = {}
    groups = torch.tensor([caption_group.setdefault(_normalise(sample.caption), len(caption_group))
                           for sample in samples])
    recall = retrieval_recall(image_features, text_features, (1, 5, 10), groups=groups)
    return {"task": "retrieval", **recall, "n": len(samples), "distinct_captions": len(caption_group)}


def embed_images(model: SiglipModel, processor: SiglipProcessor, images: list[Image], batch_size: int,
                 device: str = "cpu") -> torch.Tensor:
    """PIL images -> (n, d) float32 L2-normalised embeddings, `batch_size` at a time, through the processor."""
    from siglip.model import encode_images
    from siglip.tokenizer import image_transform

    to_pixels = image_transform(processor)
    dtype = next(model.parameters()).dtype
    chunks = []
    for start in range(0, len(images), batch_size):
        pixel_values = torch.stack([to_pixels(image) for image in images[start:start + batch_size]])
        chunks.append(encode_images(model, pixel_values.to(device=device, dtype=dtype)).float().cpu())
    return torch.cat(chunks)


def embed_texts(model: SiglipModel, processor: SiglipProcessor, texts: list[str], batch_size: int,
                device: str = "cpu") -> torch.Tensor:
    """Strings -> (n, d) float32 L2-normalised embeddings, tokenised exactly as in training."""
    from siglip.model import encode_texts
    from siglip.tokenizer import tokenize

    chunks = []
    for start in range(0, len(texts), batch_size):
        input_ids = tokenize(processor, texts[start:start + batch_size])
        chunks.append(encode_texts(model, input_ids.to(device)).float().cpu())
    return torch.cat(chunks)


def class_embeddings(model: SiglipModel, processor: SiglipProcessor, classes: list[str], templates: list[str],
                     batch_size: int, device: str = "cpu") -> torch.Tensor:
    """(k, d) class embeddings: each class written into every template, embedded, averaged, re-normalised."""
    prompts = [template.replace("{}", name) for name in classes for template in templates]
    features = embed_texts(model, processor, prompts, batch_size, device)     # (k * T, d), class-major
    averaged = features.reshape(len(classes), len(templates), -1).mean(dim=1)
    return F.normalize(averaged, dim=-1)


def _default_templates() -> list[str]:
    from siglip.prompts import DEFAULT_TEMPLATES

    return list(DEFAULT_TEMPLATES)


def _normalise(caption: str) -> str:
    return re.sub(r"\s+", " ", caption.strip().lower())


# ------------------------------------------------------------------------------------------- siglip eval


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`siglip eval MODEL_DIR --data SOURCE [--task zeroshot|retrieval] [--classes FILE] [--templates FILE] [--json]`"""
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a `siglip train --out` DIR, its DIR/final, or a "
                        "Hugging Face SigLIP checkpoint directory")
    parser.add_argument("--data", required=True, metavar="SOURCE", help="shapes, digits, WebDataset shards, or a "
                        ".csv/.tsv/.jsonl file; its held-out split is evaluated")
    parser.add_argument("--task", choices=TASKS, default="zeroshot", help="zero-shot classification (default) or "
                        "image-text retrieval")
    parser.add_argument("--classes", metavar="FILE", help="class names, one a line, in label order")
    parser.add_argument("--templates", metavar="FILE", help="prompt templates, one a line, with {} for the class")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--batch-size", type=int, default=256, help="images or texts per forward pass (256)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--image-size", type=int, default=None, help="side in pixels the built-in worlds are drawn "
                        "at (default: the source's, as `siglip train` uses); the processor resizes to the model's")
    parser.add_argument("--seed", type=int, default=0, help="the source's seed (held-out splits do not depend on it)")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from siglip.data import open_source
    from siglip.model import load_model

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    hf_logging.disable_progress_bar()
    model, processor = load_model(args.model_dir)
    model.to(args.device)
    source = open_source(args.data, split="test", seed=args.seed, classes_file=args.classes,
                         templates_file=args.templates, image_size=args.image_size)
    result = evaluate(model, processor, source, args.task, batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result, source.name))
    sys.stdout.flush()
    return 0


def format_table(result: dict, source_name: str) -> str:
    """The small human-readable table `siglip eval` prints without --json."""
    if result["task"] == "zeroshot":
        lines = [f"zero-shot on {source_name} ({result['n']} held-out images)",
                 f"{'task':<12}{'classes':>8}{'n':>7}{'accuracy':>10}{'chance':>9}"]
        for name, entry in result["per_task"].items():
            lines.append(f"{name:<12}{entry['classes']:>8}{entry['n']:>7}{entry['accuracy']:>10.1%}"
                         f"{entry['chance']:>9.1%}")
        lines.append(f"{'mean':<12}{'':>8}{'':>7}{result['accuracy']:>10.1%}{result['chance']:>9.1%}")
        return "\n".join(lines)
    lines = [f"retrieval on {source_name} ({result['n']} held-out pairs)",
             f"{'direction':<15}{'R@1':>8}{'R@5':>8}{'R@10':>8}"]
    for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
        lines.append(f"{label:<15}" + "".join(f"{result[f'{direction}_r{k}']:>8.1%}" for k in (1, 5, 10)))
    return "\n".join(lines)
