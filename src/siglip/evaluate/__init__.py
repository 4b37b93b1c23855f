"""Evaluation: zero-shot classification with prompt ensembles, and image-text retrieval (recall at k).

The metrics are pure functions of embeddings (`metrics.py`: `zeroshot_accuracy`, `multi_caption_recall`,
`retrieval_recall`); `evaluate` embeds a source's held-out split with a model (`embedding.py`), a batch at a time
as it reads it, and returns the contract's JSON; `run` is `siglip eval`.

Zero-shot (CLIP's recipe, Radford et al., 2021, sec. 3.1.4; used by SigLIP): each class name is written into
every prompt template of its task, the prompts are embedded, averaged over templates and re-normalised; an
image's prediction is the class whose embedding has the largest cosine with it. SigLIP's t and b are monotone
in the cosine (t > 0), so they do not change the prediction and are not used.

Retrieval with several captions per image (COCO's and Flickr30k's five): an image counts as found at k when any
of its captions is among its k most similar texts, and every caption is a query (siglip.evaluate.metrics).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch

from siglip.data.export import add_column_arguments
from siglip.errors import UserError
from siglip.evaluate.embedding import ImageEmbedder, class_embeddings, embed_images, embed_texts
from siglip.evaluate.metrics import multi_caption_recall, retrieval_recall, zeroshot_accuracy

if TYPE_CHECKING:
    from transformers import SiglipModel

    from siglip.data import Source

__all__ = ["ImageEmbedder", "class_embeddings", "embed_images", "embed_texts", "evaluate", "multi_caption_recall",
           "retrieval_recall", "zeroshot_accuracy"]

TASKS = ("zeroshot", "retrieval")
DEVICES = ("auto", "cpu", "cuda")


# ----------------------------------------------------------------------------------- evaluating a source


def evaluate(model: SiglipModel, processor: Any, source: Source, task: str = "zeroshot", *,
             batch_size: int = 256, device: str = "cpu", progress: bool = False) -> dict:
    """Zero-shot accuracy or retrieval recall of `model` on `source`'s held-out split, read one sample at a time.

    Args:
        model: a `SiglipModel` or `Siglip2Model` on `device`. Its train/eval mode is restored afterwards.
        processor: its processor (tokenizer and image processor as in training).
        source: a `siglip.data.Source`.
        task: "zeroshot": every task of the source (shapes: color, shape, count; digits: digit; files and image
            folders: label), each on the test samples that carry its label; "retrieval": every distinct image
            against every caption (a table's rows that share an image are one image with several captions).
        batch_size: images or texts per forward pass.
        device: where the inputs go ("cpu", "cuda").
        progress: show progress bars on stderr.

    Returns:
        zeroshot: {"task": "zeroshot", "accuracy", "chance", "n", "per_task": {name: {"accuracy", "chance",
        "classes", "n"}}, "skipped"}; accuracy and chance are the means over tasks, chance = 1 / classes,
        n = images used. retrieval: {"task": "retrieval", "image_to_text_r1", "_r5", "_r10", "text_to_image_r1",
        "_r5", "_r10", "n" (distinct images), "captions", "distinct_captions", "skipped"}. "skipped" counts the
        samples left out by kind (unreadable files, images without a caption, NaFlex images below one patch).
    """
    if task not in TASKS:
        raise UserError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if batch_size < 1:
        raise UserError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    skipped: Counter[str] = Counter()
    try:
        with torch.no_grad():
            if task == "zeroshot":
                result = _zeroshot(model, processor, source, skipped, batch_size, device, progress)
            else:
                result = _retrieval(model, processor, source, skipped, batch_size, device, progress)
    finally:
        model.train(was_training)
    return {**result, "skipped": dict(sorted(skipped.items()))}


def _zeroshot(model: SiglipModel, processor: Any, source: Source, skipped: Counter[str], batch_size: int,
              device: str, progress: bool) -> dict:
    tasks = {name: classes for name, classes in source.tasks.items() if classes}
    if not tasks:
        raise UserError(f"source {source.name!r} has no zero-shot labels; use --task retrieval, or give a labelled "
                        "source (a WebDataset 'cls' entry, a 'label' column with --classes FILE, or an image folder)")
    embedder = ImageEmbedder(model, processor, batch_size, device, skipped, progress)
    used: list[dict[str, int]] = []
    for sample in source.iter_test_samples(skipped):
        if any(name in sample.labels for name in tasks) and embedder.add(sample.image, sample.key):
            used.append(sample.labels)
    image_features = embedder.features()
    if not used:
        raise UserError(f"no held-out sample of {source.name!r} carries a label of the tasks {', '.join(tasks)}"
                        + (f" (skipped: {dict(skipped)})" if skipped else ""))
    per_task = {}
    for name, classes in tasks.items():
        rows = [row for row, labels in enumerate(used) if name in labels]
        if not rows:
            continue
        labels = torch.tensor([used[row][name] for row in rows])
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


def _retrieval(model: SiglipModel, processor: Any, source: Source, skipped: Counter[str], batch_size: int,
               device: str, progress: bool) -> dict:
    embedder = ImageEmbedder(model, processor, batch_size, device, skipped, progress)
    captions: list[str] = []
    caption_image: list[int] = []
    for item in source.iter_retrieval_images(skipped):
        if embedder.add(item.image, item.key):
            caption_image += [embedder.count - 1] * len(item.captions)
            captions += item.captions
    image_features = embedder.features()
    if not captions:
        raise UserError(f"source {source.name!r} has no held-out image with a caption to retrieve"
                        + (f" (skipped: {dict(skipped)})" if skipped else ""))
    text_features = embed_texts(model, processor, captions, batch_size, device, progress=progress)
    # Identical captions have identical embeddings: either one is a correct answer.
    caption_group: dict[str, int] = {}
    groups = torch.tensor([caption_group.setdefault(_normalise(caption), len(caption_group)) for caption in captions])
    recall = multi_caption_recall(image_features, text_features, torch.tensor(caption_image), (1, 5, 10),
                                  caption_groups=groups)
    return {"task": "retrieval", **recall, "n": len(image_features), "captions": len(captions),
            "distinct_captions": len(caption_group)}


def _default_templates() -> list[str]:
    from siglip.prompts import DEFAULT_TEMPLATES

    return list(DEFAULT_TEMPLATES)


def _normalise(caption: str) -> str:
    return re.sub(r"\s+", " ", caption.strip().lower())


# ------------------------------------------------------------------------------------------- siglip eval


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`siglip eval MODEL_DIR --data SOURCE [--task zeroshot|retrieval] [--classes FILE] [--templates FILE] [--json]`"""
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a `siglip train --out` DIR, its DIR/final, or a "
                        "Hugging Face SigLIP, SigLIP 2 or SigLIP 2 NaFlex checkpoint directory")
    parser.add_argument("--data", required=True, metavar="SOURCE", help="shapes, digits, WebDataset shards, a "
                        ".csv/.tsv/.jsonl file (rows that share an image: one image with several captions), or an "
                        "image folder (one sub-folder of images per class); its held-out split is evaluated")
    parser.add_argument("--task", choices=(*TASKS, "dense"), default="zeroshot", help="zero-shot classification "
                        "(default), image-text retrieval, or dense (shapes): a linear probe on the patch tokens and "
                        "the referring expressions of the decoder trained beside the model")
    parser.add_argument("--classes", metavar="FILE", help="class names, one a line, in label order (an image "
                        "folder: in sorted folder order)")
    parser.add_argument("--templates", metavar="FILE", help="prompt templates, one a line, with {} for the class")
    add_column_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--batch-size", type=int, default=256, help="images or texts per forward pass (256)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="cpu, cuda, or auto (cuda when available; "
                        "the default, as for siglip train)")
    parser.add_argument("--image-size", type=int, default=None, help="side in pixels the built-in worlds are drawn "
                        "at (default: the model's, which `siglip train` drew them at)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars on stderr (default: when stderr is a terminal)")
    parser.add_argument("--seed", type=int, default=0, help="the source's seed (held-out splits do not depend on it)")


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from siglip.data import open_source
    from siglip.model import load_model, model_image_size

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image-size must be a positive number of pixels, got {args.image_size}")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here; use --device cpu or auto")
    hf_logging.disable_progress_bar()
    model, processor = load_model(args.model_dir)
    model.to(device)
    source = open_source(args.data, split="test", seed=args.seed, classes_file=args.classes,
                         templates_file=args.templates, image_size=args.image_size or model_image_size(model),
                         with_regions=args.task == "dense", image_column=args.image_column,
                         caption_column=args.caption_column, label_column=args.label_column)
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if args.task == "dense":
        from siglip.siglip2.dense_eval import dense_table, evaluate_model_dir

        result = evaluate_model_dir(args.model_dir, model, processor, source, batch_size=args.batch_size,
                                    device=device)
    else:
        result = evaluate(model, processor, source, args.task, batch_size=args.batch_size, device=device,
                          progress=progress)
    if args.json:
        print(json.dumps(result))
    else:
        print(dense_table(result, source.name) if args.task == "dense" else format_table(result, source.name))
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
    else:
        lines = [f"retrieval on {source_name} ({result['n']} held-out images, {result['captions']} captions)",
                 f"{'direction':<15}{'R@1':>8}{'R@5':>8}{'R@10':>8}"]
        for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
            lines.append(f"{label:<15}" + "".join(f"{result[f'{direction}_r{k}']:>8.1%}" for k in (1, 5, 10)))
    if result.get("skipped"):
        lines.append("skipped: " + ", ".join(f"{count} {kind}" for kind, count in result["skipped"].items()))
    return "\n".join(lines)
