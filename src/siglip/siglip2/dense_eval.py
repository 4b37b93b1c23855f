"""`siglip eval MODEL_DIR --data shapes --task dense`: what a tower's patch features know, and where its decoder points.

On the held-out split of a source that knows its objects (shapes, opened with regions):

- probe: for each task with a per-object label (shapes: colour, shape), a linear probe on the frozen tower's patch
  tokens for each patch's label (the object covering it, or background), fitted on half of the images and scored on
  the other half (siglip.siglip2.dense.linear_probe). The paper's protocol (Tschannen et al., 2025, sec. 3.3.1,
  after TIPS) concatenates the pooled embedding to each patch; we probe the patch tokens alone, so that the figure
  is about the dense features and not about what the pooled embedding already says of a one-object image;
- referring: with the decoder trained beside the tower (DIR/decoder), each object's phrase is decoded to a box,
  correct when its IoU with the object's box exceeds 0.5 (RefCOCO's criterion, the paper's Table 5). Also reported
  over the images with several objects, where the phrase must pick one.

The JSON holds no NaN: a figure that cannot be computed is null.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from siglip.errors import UserError
from siglip.siglip2.boxes import DecoderVocabulary, TextEncoder, normalise_box, refer_prompt
from siglip.siglip2.decoder import LocCaDecoder, predict_boxes
from siglip.siglip2.decoder_files import SavedDecoder
from siglip.siglip2.dense import box_iou, linear_probe, patch_labels
from siglip.siglip2.vision import image_tokens

PROBE_TASKS = ("color", "shape")
"""The tasks every shapes object is labelled with (Region.labels)."""
IOU_THRESHOLD = 0.5


def check_dense_source(source: Any) -> None:
    """Refuse a source whose held-out samples do not say where their objects are."""
    if not getattr(source, "with_regions", False):
        raise UserError(f"--task dense needs a source that knows where its objects are; {source.name!r} does not "
                        "(use --data shapes)")


def dense_samples(source: Any) -> list:
    """The held-out samples, each with its regions."""
    check_dense_source(source)
    samples = [sample for sample in source.test_samples() if sample.regions]
    if not samples:
        raise UserError(f"the held-out split of {source.name!r} holds no image with objects to evaluate")
    return samples


@torch.no_grad()
def patch_features(model: torch.nn.Module, processor: Any, images: list, batch_size: int = 256,
                   device: str = "cpu") -> torch.Tensor:
    """PIL images -> (N, P, D) float32 patch tokens of the frozen image tower (its last hidden state), on the CPU."""
    from siglip.model import is_naflex
    from siglip.tokenizer import image_transform

    if is_naflex(model):
        raise UserError("--task dense reads a fixed-resolution tower's patch grid; a NaFlex model is not supported")
    to_pixels = image_transform(processor)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, len(images), batch_size):
            pixels = torch.stack([to_pixels(image) for image in images[start:start + batch_size]]).to(device)
            chunks.append(image_tokens(model.vision_model, pixels)[0].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)


def patch_grid(model: torch.nn.Module) -> tuple[int, int]:
    vision = model.config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    return side, side


def probe_patches(features: torch.Tensor, samples: list, grid: tuple[int, int], tasks: dict[str, list[str]],
                  seed: int = 0) -> dict[str, Any]:
    """The linear probe of every task in PROBE_TASKS: {task: linear_probe's figures and "classes"}, and their means."""
    per_task = {}
    for task in PROBE_TASKS:
        classes = len(tasks[task])
        labels = torch.stack([torch.from_numpy(patch_labels(sample.regions, grid, task, classes)).reshape(-1)
                              for sample in samples])                                           # (N, P)
        figures = linear_probe(features, labels, classes + 1, background=classes, seed=seed)
        per_task[task] = {**figures, "classes": classes + 1}
    means = {key: sum(entry[key] for entry in per_task.values()) / len(per_task)
             for key in ("accuracy", "balanced_accuracy", "object_accuracy", "chance_accuracy", "chance_balanced")}
    return {"probe": per_task, **means}


@torch.no_grad()
def referring_accuracy(decoder: LocCaDecoder, vocab: DecoderVocabulary, features: torch.Tensor, samples: list,
                       encode, device: str = "cpu", batch_size: int = 256) -> dict[str, Any]:
    """Every object of every image as a referring expression: {"accuracy", "n", "multi_object_accuracy",
    "multi_object_n", "iou_threshold", "mean_iou"}; features: (N, P, D) patch tokens of `samples`' images."""
    rows, prompts, targets, crowded = [], [], [], []
    for row, sample in enumerate(samples):
        for region in sample.regions:
            rows.append(row)
            prompts.append(refer_prompt(vocab, encode(region.phrase)))
            targets.append(normalise_box(region.box, *sample.image.size))
            crowded.append(len(sample.regions) > 1)
    decoder = decoder.to(device).eval()
    predicted = torch.cat([
        predict_boxes(decoder, vocab, features[rows[start:start + batch_size]].to(device),
                      prompts[start:start + batch_size])
        for start in range(0, len(rows), batch_size)])
    iou = box_iou(predicted, torch.tensor(targets, dtype=torch.float64))
    right = iou > IOU_THRESHOLD
    crowded = torch.tensor(crowded)
    return {"accuracy": float(right.double().mean()), "n": len(rows),
            "multi_object_accuracy": float(right[crowded].double().mean()) if crowded.any() else None,
            "multi_object_n": int(crowded.sum()), "iou_threshold": IOU_THRESHOLD, "mean_iou": float(iou.mean())}


def evaluate_dense(model: torch.nn.Module, processor: Any, source: Any, *, decoder: SavedDecoder | None = None,
                   batch_size: int = 256, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """The dense metrics of `model` (and its decoder, when given) on `source`'s held-out split, as JSON-able data:
    {"task": "dense", "n", "grid", "probe": {task: ...}, "accuracy", "balanced_accuracy", "object_accuracy",
    "chance_accuracy", "chance_balanced", "referring": {...} or None}."""
    samples = dense_samples(source)
    features = patch_features(model, processor, [sample.image for sample in samples], batch_size, device)
    grid = patch_grid(model)
    result: dict[str, Any] = {"task": "dense", "n": len(samples), "grid": list(grid)}
    result.update(probe_patches(features, samples, grid, source.tasks, seed))
    result["referring"] = None
    if decoder is not None:
        encode = TextEncoder(processor.tokenizer, decoder.text_length)
        result["referring"] = referring_accuracy(decoder.decoder, decoder.vocab, features, samples, encode, device,
                                                 batch_size)
    return without_nan(result)


def without_nan(value: Any) -> Any:
    """NaN floats -> None, recursively: strict JSON."""
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nan(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def evaluate_model_dir(model_dir: str, model: torch.nn.Module, processor: Any, source: Any, *, batch_size: int = 256,
                       device: str = "cpu") -> dict[str, Any]:
    """`siglip eval MODEL_DIR --task dense`: `evaluate_dense` with the decoder saved beside MODEL_DIR's final/ (when
    the run trained one; "decoder" in the result names it, or is null and "referring" with it)."""
    from siglip.siglip2.decoder_files import find_decoder, load_decoder

    check_dense_source(source)
    where = find_decoder(model_dir)
    decoder = load_decoder(where) if where is not None else None
    if decoder is not None and decoder.vocab.text_size != len(processor.tokenizer):
        raise UserError(f"the decoder in {where} was trained over a vocabulary of {decoder.vocab.text_size} text "
                        f"tokens, the model's tokenizer has {len(processor.tokenizer)}; they belong to different runs")
    result = evaluate_dense(model, processor, source, decoder=decoder, batch_size=batch_size, device=device)
    return {**result, "decoder": str(where) if where is not None else None}


def dense_table(result: dict[str, Any], source_name: str) -> str:
    """The small table `siglip eval --task dense` prints without --json."""
    lines = [f"dense on {source_name} ({result['n']} held-out images, a {result['grid'][0]} x {result['grid'][1]} "
             "patch grid): a linear probe on the frozen patch tokens",
             f"{'task':<8}{'classes':>8}{'accuracy':>10}{'balanced':>10}{'objects':>9}{'chance bal.':>13}"]
    for task, entry in result["probe"].items():
        objects = "-" if entry["object_accuracy"] is None else f"{entry['object_accuracy']:.1%}"
        lines.append(f"{task:<8}{entry['classes']:>8}{entry['accuracy']:>10.1%}{entry['balanced_accuracy']:>10.1%}"
                     f"{objects:>9}{entry['chance_balanced']:>13.1%}")
    referring = result.get("referring")
    if referring is None:
        lines.append("referring expressions: no decoder beside this model (train with --decoder-weight 1)")
    else:
        crowded = referring["multi_object_accuracy"]
        lines.append(f"referring expressions (IoU > {referring['iou_threshold']}): {referring['accuracy']:.1%} of "
                     f"{referring['n']}" + ("" if crowded is None else
                                           f"; {crowded:.1%} of the {referring['multi_object_n']} in images with "
                                           "several objects"))
    return "\n".join(lines)
