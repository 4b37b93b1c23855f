"""One training run: an arm on one seed's prepared data, and its held-out scores.

The production loop (`siglip train`) streams, checkpoints and logs; a study needs many short runs and hooks that loop
does not expose (a masked loss, corrupted pairs, a locked tower with cached features). So a trial builds the model
(`siglip.model`), steps AdamW under warm-up and cosine decay (`siglip.optim`), and scores the result with
`siglip.evaluate`'s pure metrics. It keeps per-step curves (loss, t, b, gradient norm) and a digest of the batch
order, so a report can show that two arms of one seed saw the same data.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from siglip.experiments.design import HEADLINE, LOCKED, Arm, StepInputs, TrainBatch, TrialResult
from siglip.experiments.prepared import PreparedData, batch_indices, headline_tasks

CORRUPTION_STREAM = 7_919
"""Offset of the corruption generator's seed from the objective's: the two draw independent streams."""


def log(message: str) -> None:
    """Progress on stderr, so long full runs show where they are."""
    print(message, file=sys.stderr, flush=True)


def build_arm_model(arm: Arm, seed: int, data: PreparedData, preset: str,
                    tower_state: dict[str, torch.Tensor] | None = None):
    """A fresh model for `arm`, its weights drawn from `seed` without touching the global RNG.

    Two arms of one seed start from the same weights (their architecture is the same); a locked arm then loads the
    pretrained tower and freezes it.
    """
    from siglip.model import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(preset, vocab_size=data.vocab_size, max_text_length=data.max_text_length,
                            image_size=data.image_size, init_logit_scale=arm.init_logit_scale,
                            init_logit_bias=arm.logit_bias_at_start())
    if arm.image_tower == LOCKED:
        if tower_state is None:
            raise ValueError(f"arm {arm.name!r} locks a pretrained image tower, but no tower weights were given")
        model.vision_model.load_state_dict(tower_state)
        model.vision_model.requires_grad_(False)
    if not arm.learn_logit_bias:
        model.logit_bias.requires_grad_(False)
    return model


def plain_loss(arm: Arm) -> Callable[[StepInputs], torch.Tensor]:
    """The production losses of `siglip.loss` as an objective."""
    from siglip.loss import sigmoid_loss, softmax_loss

    if arm.loss == "sigmoid":
        return lambda inputs: sigmoid_loss(inputs.image_features, inputs.text_features, inputs.logit_scale,
                                           inputs.logit_bias, positive_ids=inputs.positive_ids)
    if arm.loss == "softmax":
        return lambda inputs: softmax_loss(inputs.image_features, inputs.text_features, inputs.logit_scale,
                                           positive_ids=inputs.positive_ids)
    raise ValueError(f"arm {arm.name!r}: loss must be 'sigmoid' or 'softmax', got {arm.loss!r}")


def run_trial(arm: Arm, seed: int, data: PreparedData, *, preset: str = "tiny",
              tower_state: dict[str, torch.Tensor] | None = None,
              locked_features: tuple[torch.Tensor, torch.Tensor] | None = None) -> TrialResult:
    """Train `arm` on `data` with `seed` and score it on the held-out split.

    Args:
        arm: the setting. seed: fixes the initial weights, the batch order and every random draw.
        data: the seed's prepared source (`prepare_data(scale, seed)`).
        preset: the model preset.
        tower_state: the pretrained image tower (arms with image_tower "locked").
        locked_features: (pool (N, d), test (M, d)) image features of that tower, computed once per seed.

    A run that reaches a non-finite loss stops there, `diverged` is set, and its held-out metrics are chance's.
    """
    from siglip.model import encode_images, encode_texts, scale_and_bias
    from siglip.optim import build_optimizer

    locked = arm.image_tower == LOCKED
    if locked and (locked_features is None or arm.corruption is not None):
        raise ValueError(f"arm {arm.name!r}: a locked tower needs its cached features and takes no corruption")
    started = time.perf_counter()
    model = build_arm_model(arm, seed, data, preset, tower_state)
    extra = arm.objective.modules(model) if arm.objective is not None else None
    trained = torch.nn.ModuleDict({"model": model, **({"extra": extra} if extra is not None else {})}).train()
    optimizer, schedule = build_optimizer(
        trained, lr=arm.lr, weight_decay=arm.weight_decay, beta2=arm.beta2,
        warmup_steps=max(1, round(arm.warmup_fraction * arm.steps)), total_steps=arm.steps,
    )
    objective = arm.objective or plain_loss(arm)
    generator = torch.Generator().manual_seed(seed)
    corruption_generator = torch.Generator().manual_seed(seed + CORRUPTION_STREAM)
    parameters = [parameter for parameter in trained.parameters() if parameter.requires_grad]
    curves: dict[str, list[float]] = {"loss": [], "logit_scale": [], "logit_bias": [], "grad_norm": []}
    digest = hashlib.sha1()
    diverged, duplicates = False, 0
    for step in range(arm.steps):
        index = batch_indices(step, arm.batch_size, data.pool, seed)
        digest.update(index.numpy().tobytes())
        batch = TrainBatch(data.pixel_values[index], data.input_ids[index], data.positive_ids[index])
        # Ordered pairs (i, j), i != j, with equal ids: the positives diagonal labels would call negatives.
        duplicates += int((batch.positive_ids[:, None] == batch.positive_ids[None, :]).sum()) - arm.batch_size
        if arm.corruption is not None:
            batch = arm.corruption(batch, data, corruption_generator)
        image_features = locked_features[0][index] if locked else encode_images(model, batch.pixel_values)
        scale, bias = scale_and_bias(model)
        inputs = StepInputs(image_features, encode_texts(model, batch.input_ids), scale, bias,
                            batch.positive_ids if arm.positive_ids else None, generator, batch, model, extra, step)
        loss = objective(inputs)
        value = float(loss.detach())
        curves["loss"].append(value)
        curves["logit_scale"].append(float(scale.detach()))
        curves["logit_bias"].append(float(bias.detach()))
        if not math.isfinite(value):
            diverged = True
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        limit = arm.grad_clip if arm.grad_clip is not None else math.inf
        curves["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(parameters, limit)))
        optimizer.step()
        schedule.step()
    if diverged:
        metrics = dict(data.chance())            # a diverged model is unusable: it scores what learning nothing does
    else:
        metrics = evaluate(model, data, test_image_features=locked_features[1] if locked else None)
    metrics.update(run_summary(curves), duplicates_per_batch=duplicates / len(curves["loss"]))
    result = TrialResult(arm.name, seed, metrics, data.chance(), curves, time.perf_counter() - started, diverged,
                         digest.hexdigest(), os.getloadavg()[0])
    log(f"  {arm.name} (seed {seed}): {len(curves['loss'])} steps x {arm.batch_size} in {result.seconds:.0f} s, "
        f"loss {curves['loss'][-1]:.3f}, {HEADLINE} {metrics[HEADLINE]:.3f}, i2t R@1 {metrics['i2t_r1']:.3f}")
    return result


def run_summary(curves: dict[str, list[float]]) -> dict[str, float]:
    """Scalars of a run's curves: first loss, mean of the last twentieth of the losses, final t and b."""
    losses = curves["loss"]
    tail = losses[-max(1, len(losses) // 20):]
    return {"initial_loss": losses[0], "final_loss": sum(tail) / len(tail),
            "logit_scale": curves["logit_scale"][-1], "logit_bias": curves["logit_bias"][-1]}


@torch.no_grad()
def embed(encode: Callable, model, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Encode (n, ...) inputs in chunks with `encode(model, chunk)`; returns (n, d) L2-normalised embeddings."""
    return torch.cat([encode(model, inputs[start:start + batch_size])
                      for start in range(0, inputs.shape[0], batch_size)])


@torch.no_grad()
def evaluate(model, data: PreparedData, *, test_image_features: torch.Tensor | None = None) -> dict[str, float]:
    """Held-out scores: zero-shot accuracy per task and the headline mean, retrieval R@1, mean pair logits.

    Keys: "zeroshot/TASK", "zeroshot" (mean over `headline_tasks`), "i2t_r1" and "t2i_r1" (identical captions count
    as one another's match, as `siglip eval` counts them), "logit/positive" and "logit/negative" (mean of
    t <x, y> + b over the held-out image-caption pairs that match and that do not).
    """
    from siglip.evaluate import retrieval_recall, zeroshot_accuracy
    from siglip.model import encode_images, encode_texts, scale_and_bias

    model.eval()
    image_features = (test_image_features if test_image_features is not None
                      else embed(encode_images, model, data.test_pixel_values))                     # (M, d)
    metrics: dict[str, float] = {}
    for column, (task, names) in enumerate(data.tasks.items()):
        prompts = embed(encode_texts, model, data.class_input_ids[task])                             # (K * P, d)
        # Prompt ensembling as in CLIP: the mean of the templates' embeddings, renormalised.
        class_features = F.normalize(prompts.view(len(names), data.templates_per_task[task], -1).mean(1), dim=-1)
        labels = data.test_labels[:, column]
        known = labels >= 0
        if bool(known.any()):
            metrics[f"zeroshot/{task}"] = float(zeroshot_accuracy(image_features[known], class_features,
                                                                  labels[known]))
    per_task = {task: metrics[f"zeroshot/{task}"] for task in data.tasks if f"zeroshot/{task}" in metrics}
    kept = headline_tasks(list(per_task))
    metrics[HEADLINE] = sum(per_task[task] for task in kept) / len(kept) if kept else math.nan
    text_features = embed(encode_texts, model, data.test_input_ids)                                 # (M, d)
    groups = data.test_input_ids.unique(dim=0, return_inverse=True)[1]
    recall = retrieval_recall(image_features, text_features, ks=(1,), groups=groups)
    metrics["i2t_r1"], metrics["t2i_r1"] = float(recall["image_to_text_r1"]), float(recall["text_to_image_r1"])
    scale, bias = scale_and_bias(model)
    logits = scale * image_features @ text_features.T + bias                                        # (M, M)
    matches = groups[:, None] == groups[None, :]
    metrics["logit/positive"] = float(logits[matches].mean())
    metrics["logit/negative"] = float(logits[~matches].mean()) if bool((~matches).any()) else math.nan
    model.train()
    return metrics
