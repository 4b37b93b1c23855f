"""Evaluation: zero-shot classification with prompt ensembles, and image-text retrieval (recall at k).

The metrics are pure functions of embeddings (`zeroshot_accuracy`, `multi_caption_recall`, `retrieval_recall`);
`evaluate` embeds a source's held-out split with a model, a batch at a time as it reads it, and returns the
contract's JSON; `run` is `siglip eval`.

Zero-shot (CLIP's recipe, Radford et al., 2021, sec. 3.1.4; used by SigLIP): each class name is written into
every prompt template of its task, the prompts are embedded, averaged over templates and re-normalised; an
image's prediction is the class whose embedding has the largest cosine with it. SigLIP's t and b are monotone
in the cosine (t > 0), so they do not change the prediction and are not used.

Retrieval with several captions per image (COCO's and Flickr30k's five): an image counts as found at k when any
of its captions is among its k most similar texts; every caption is a query that counts when its image is among
its k most similar images. The similarities are formed a block at a time and each query keeps its best k so far,
so a set of n images and m captions never needs the n x m matrix.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from siglip.errors import UserError

if TYPE_CHECKING:
    from PIL.Image import Image
    from transformers import SiglipModel

    from siglip.data import Source

logger = logging.getLogger("siglip.evaluate")

TASKS = ("zeroshot", "retrieval")
DEVICES = ("auto", "cpu", "cuda")


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
    """Recall at k in both directions for one caption per image: image i's match is text i (and text i's, image i).

    Args:
        image_features: (n, d) L2-normalised image embeddings.
        text_features: (n, d) L2-normalised text embeddings; row i is image i's caption.
        ks: the cut-offs k.
        groups: optional (n,) integer ids: pairs i, j with equal ids count as matches of each other (e.g. two
            images with the same caption, whose text rows are identical). None: only i matches i.

    Returns:
        {"image_to_text_r{k}": F, "text_to_image_r{k}": F for each k}, as `multi_caption_recall`.
    """
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"image_features and text_features must both be (n, d), got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    n = image_features.shape[0]
    if groups is not None and groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {tuple(groups.shape)}")
    return multi_caption_recall(image_features, text_features, torch.arange(n), ks, caption_groups=groups)


def multi_caption_recall(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    caption_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    caption_groups: torch.Tensor | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall at k both ways when an image has several captions (COCO, Flickr30k: five), without the n x m matrix.

    Text j answers image i when it is one of image i's captions, or, with `caption_groups`, when it shares its
    group with one of them (identical captions have identical embeddings, so either is as right). Image i answers
    text j when text j answers image i.

    Args:
        image_features: (n, d) L2-normalised embeddings of the distinct images.
        text_features: (m, d) L2-normalised embeddings of every caption.
        caption_image: (m,) int: the image each caption belongs to, in [0, n); every image needs one caption.
        ks: the cut-offs k.
        caption_groups: optional (m,) int ids; None: each caption its own group.
        chunk: images and texts per block: the similarities are formed `chunk` x `chunk` at a time, and each
            query keeps only its best max(ks) candidates so far (a streaming top-k), so memory is O((n + m) k).

    Returns:
        {"image_to_text_r{k}": the fraction of images with an answer among their k most similar texts,
        "text_to_image_r{k}": the fraction of texts whose image is among their k most similar images}.
        A wrong candidate tied with a right one counts as ranked above it, so a collapsed model that embeds
        everything alike scores 0, not 1.
    """
    n, m = image_features.shape[0], text_features.shape[0]
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image_features (n, d) and text_features (m, d) must share d, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if n == 0 or m == 0:
        raise ValueError("multi_caption_recall needs at least one image and one caption")
    if caption_image.shape != (m,) or caption_image.min() < 0 or caption_image.max() >= n:
        raise ValueError(f"caption_image must be ({m},) image indices in [0, {n}), got shape "
                         f"{tuple(caption_image.shape)}")
    if torch.bincount(caption_image, minlength=n).min() == 0:
        raise ValueError("every image needs at least one caption in caption_image")
    if any(not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    device = image_features.device
    groups = torch.arange(m) if caption_groups is None else caption_groups.long().cpu()
    if groups.shape != (m,):
        raise ValueError(f"caption_groups must have shape ({m},), got {tuple(groups.shape)}")
    image_groups = _groups_of_images(caption_image.long().cpu(), groups, n).to(device)      # (n, G), padded
    groups = groups.to(device)
    depth = max(ks)
    dtype = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    images, texts = image_features.to(dtype), text_features.to(dtype)
    # Running best candidates: float64 keys (see _ranking_keys) and whether each is a right answer.
    text_keys = torch.full((m, 0), float("-inf"), dtype=torch.float64, device=device)
    text_right = torch.zeros((m, 0), dtype=torch.bool, device=device)
    image_hits = {k: 0 for k in ks}
    text_step = max(1, chunk // max(1, image_groups.shape[1]))        # bounds the (chunk, G, text_step) mask
    for first_image in range(0, n, chunk):
        rows = slice(first_image, min(first_image + chunk, n))
        image_keys = torch.full((rows.stop - rows.start, 0), float("-inf"), dtype=torch.float64, device=device)
        image_right = torch.zeros((rows.stop - rows.start, 0), dtype=torch.bool, device=device)
        for first_text in range(0, m, text_step):
            columns = slice(first_text, min(first_text + text_step, m))
            scores = images[rows] @ texts[columns].T                                      # (c, t) similarities
            right = (image_groups[rows, :, None] == groups[None, None, columns]).any(dim=1)   # (c, t)
            keys = _ranking_keys(scores, right)
            image_keys, image_right = _best(image_keys, image_right, keys, right, depth)
            updated = _best(text_keys[columns], text_right[columns], keys.T, right.T, depth)
            text_keys, text_right = _put_rows(text_keys, text_right, columns, *updated, depth)
        for k in ks:
            image_hits[k] += int(image_right[:, :k].any(dim=1).sum())
    results = {f"image_to_text_r{k}": image_hits[k] / n for k in ks}
    results.update({f"text_to_image_r{k}": float(text_right[:, :k].any(dim=1).double().mean()) for k in ks})
    return results


def _groups_of_images(caption_image: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    """(n, G) int64: the distinct caption groups of each image, padded with a value below every group."""
    pairs = torch.unique(torch.stack([caption_image, groups]), dim=1)          # (2, p), sorted by image
    counts = torch.bincount(pairs[0], minlength=n)
    table = torch.full((n, int(counts.max())), int(groups.min()) - 1, dtype=torch.long)
    slot = torch.arange(pairs.shape[1]) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    table[pairs[0], slot] = pairs[1]
    return table


def _ranking_keys(scores: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """float64 keys that order candidates by score, a wrong one above a right one of the same score.

    A right answer's key is its score moved down to the next float64 below it: below a wrong answer's equal score,
    and for float32 scores still above every lower float32 score (float64 steps are 2^29 times finer). (Float64
    scores, from float64 features, are ordered exactly but for a wrong score one float64 step below a right one.)
    """
    keys = scores.double()
    return torch.where(right, torch.nextafter(keys, torch.full_like(keys, float("-inf"))), keys)


def _best(keys: torch.Tensor, right: torch.Tensor, new_keys: torch.Tensor, new_right: torch.Tensor,
          depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `depth` largest keys of each row among the kept ones and a new block, best first, with their flags."""
    keys, right = torch.cat([keys, new_keys], dim=1), torch.cat([right, new_right], dim=1)
    top = keys.topk(min(depth, keys.shape[1]), dim=1)
    return top.values, right.gather(1, top.indices)


def _put_rows(keys: torch.Tensor, right: torch.Tensor, rows: slice, new_keys: torch.Tensor, new_right: torch.Tensor,
              depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Write rows of a running top-k table whose width grows until it reaches `depth`."""
    if keys.shape[1] < new_keys.shape[1]:
        width = new_keys.shape[1]
        keys = torch.cat([keys, keys.new_full((keys.shape[0], width - keys.shape[1]), float("-inf"))], dim=1)
        right = torch.cat([right, right.new_zeros((right.shape[0], width - right.shape[1]))], dim=1)
    keys[rows, :new_keys.shape[1]] = new_keys
    right[rows, :new_right.shape[1]] = new_right
    return keys, right


# ----------------------------------------------------------------------------------- embedding a source


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


class ImageEmbedder:
    """Embeds images as they arrive, `batch_size` at a time, keeping only their (k, d) embeddings.

    An image the processor refuses (a NaFlex image below one patch) is left out and counted by kind in `skipped`,
    or raised when `strict`.
    """

    def __init__(self, model: SiglipModel, processor: Any, batch_size: int, device: str, skipped: Counter[str],
                 progress: bool = False, strict: bool = False):
        from tqdm.auto import tqdm

        from siglip.tokenizer import image_transform

        self.model, self.batch_size, self.device, self.skipped = model, batch_size, device, skipped
        self.strict = strict
        self.to_pixels = image_transform(processor)
        self.pending: list[torch.Tensor] = []
        self.chunks: list[torch.Tensor] = []
        self.count = 0
        """Images accepted so far (embedded or pending)."""
        self.bar = tqdm(desc="images", unit="image", disable=not progress, leave=False)

    def add(self, image: Image, key: str = "") -> bool:
        """Queue one PIL image; False (and counted) if the processor refuses it."""
        from siglip.tokenizer import ImageTooSmall

        try:
            self.pending.append(self.to_pixels(image))
        except ImageTooSmall as error:
            if self.strict:
                raise
            logger.warning("skipping %s: %s", key or "an image", error)
            self.skipped[error.kind] += 1
            return False
        self.count += 1
        if len(self.pending) == self.batch_size:
            self._flush()
        return True

    def features(self) -> torch.Tensor:
        """(k, d) float32 L2-normalised embeddings of the accepted images, in order, on the CPU."""
        self._flush()
        self.bar.close()
        width = self.model.config.vision_config.hidden_size
        return torch.cat(self.chunks) if self.chunks else torch.zeros(0, width)

    def _flush(self) -> None:
        from siglip.model import encode_images

        if self.pending:
            pixel_values = torch.stack(self.pending).to(self.device)
            self.chunks.append(encode_images(self.model, pixel_values).float().cpu())
            self.bar.update(len(self.pending))
            self.pending = []


def embed_images(model: SiglipModel, processor: Any, images: list[Image], batch_size: int,
                 device: str = "cpu") -> torch.Tensor:
    """PIL images -> (n, d) float32 L2-normalised embeddings, `batch_size` at a time, through the processor.
    Every image must be usable (a NaFlex image below one patch raises `siglip.tokenizer.ImageTooSmall`)."""
    embedder = ImageEmbedder(model, processor, batch_size, device, Counter(), strict=True)
    for image in images:
        embedder.add(image)
    return embedder.features()


def embed_texts(model: SiglipModel, processor: Any, texts: list[str], batch_size: int, device: str = "cpu", *,
                progress: bool = False) -> torch.Tensor:
    """Strings -> (n, d) float32 L2-normalised embeddings, tokenised exactly as in training."""
    from tqdm.auto import tqdm

    from siglip.model import encode_texts
    from siglip.tokenizer import tokenize

    chunks = []
    with tqdm(total=len(texts), desc="texts", unit="text", disable=not progress, leave=False) as bar:
        for start in range(0, len(texts), batch_size):
            input_ids = tokenize(processor, texts[start:start + batch_size])
            chunks.append(encode_texts(model, input_ids.to(device)).float().cpu())
            bar.update(len(input_ids))
    return torch.cat(chunks)


def class_embeddings(model: SiglipModel, processor: Any, classes: list[str], templates: list[str],
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
                        "Hugging Face SigLIP, SigLIP 2 or SigLIP 2 NaFlex checkpoint directory")
    parser.add_argument("--data", required=True, metavar="SOURCE", help="shapes, digits, WebDataset shards, a "
                        ".csv/.tsv/.jsonl file (rows that share an image: one image with several captions), or an "
                        "image folder (one sub-folder of images per class); its held-out split is evaluated")
    parser.add_argument("--task", choices=TASKS, default="zeroshot", help="zero-shot classification (default) or "
                        "image-text retrieval")
    parser.add_argument("--classes", metavar="FILE", help="class names, one a line, in label order (an image "
                        "folder: in sorted folder order)")
    parser.add_argument("--templates", metavar="FILE", help="prompt templates, one a line, with {} for the class")
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
                         templates_file=args.templates, image_size=args.image_size or model_image_size(model))
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    result = evaluate(model, processor, source, args.task, batch_size=args.batch_size, device=device,
                      progress=progress)
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
    else:
        lines = [f"retrieval on {source_name} ({result['n']} held-out images, {result['captions']} captions)",
                 f"{'direction':<15}{'R@1':>8}{'R@5':>8}{'R@10':>8}"]
        for direction, label in (("image_to_text", "image -> text"), ("text_to_image", "text -> image")):
            lines.append(f"{label:<15}" + "".join(f"{result[f'{direction}_r{k}']:>8.1%}" for k in (1, 5, 10)))
    if result.get("skipped"):
        lines.append("skipped: " + ", ".join(f"{count} {kind}" for kind, count in result["skipped"].items()))
    return "\n".join(lines)
