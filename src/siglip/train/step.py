"""One training step of `siglip train`, from a sample to the gradients: the contrastive machinery.

    Sample -> PairTransform -> {"pixel_values", "input_ids"} -> ContrastiveTowers (image and text towers, t, b)
    -> contrastive_loss (siglip.loss: sigmoid or softmax) -> backward, whole or in micro-batches (forward_backward)

`frozen_image_encoder` embeds images with a locked image tower, the micro-batch at a time, for the image-feature
cache of SigLiT (siglip.train.feature_cache); `forward_backward` then takes the cached embeddings instead of pixels.
Nothing here knows about processes, data loading, optimisers or checkpoints: the loop (siglip.train.loop) wires those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class PairTransform:
    """Sample -> {"pixel_values": (3, S, S) float32 or (1 + P, 3 p^2) packed NaFlex patches (siglip.model.pack_patches),
    "input_ids": (L,) int64}; picklable, runs in DataLoader workers."""

    augments_images = False
    """The image transform is the processor's resize and normalisation, the same pixels for an image at every visit:
    cached image features stay exact. A transform with random augmentation must say True here, and
    --cache-image-features then refuses it (a cached embedding would freeze one augmented view)."""

    def __init__(self, processor: Any):
        from siglip.tokenizer import image_transform, text_length, text_transform
        from siglip.train.captions import TruncationCheck

        self.image = image_transform(processor)
        self.text = text_transform(processor)
        self.truncated = TruncationCheck(processor.tokenizer, text_length(processor.tokenizer))

    def __call__(self, sample: Any) -> dict[str, torch.Tensor]:
        """The tensors above, and "caption_truncated": a 0-d bool, True when the caption is longer than the text
        length and loses its end (the loop counts these: siglip.train.captions)."""
        from siglip.data.sample import BadSample
        from siglip.tokenizer import ImageTooSmall

        try:
            pixel_values = self.image(sample.image)
        except ImageTooSmall as error:      # a NaFlex image below one patch: skipped and counted like a bad file
            raise BadSample(error.kind, sample.key, str(error)) from None
        return {"pixel_values": pixel_values, **self.caption_tensors(sample.caption)}

    def caption_tensors(self, caption: str) -> dict[str, torch.Tensor]:
        """caption -> {"input_ids": (L,) int64, "caption_truncated": 0-d bool}."""
        input_ids = self.text(caption)
        return {"input_ids": input_ids, "caption_truncated": CUT_SHORT if self.truncated(caption, input_ids) else WHOLE}


CUT_SHORT, WHOLE = torch.tensor(True), torch.tensor(False)
"""The two values of "caption_truncated", made once: a new 0-d tensor a sample costs more than the check itself."""


class ContrastiveTowers(nn.Module):
    """The two towers as one module whose forward returns what the loss needs.

    DistributedDataParallel synchronises gradients only for computation that runs inside its forward, so the
    image tower, the text tower and t, b all come out of this one call.
    """

    def __init__(self, model: nn.Module, lock_image: bool = False):
        super().__init__()
        self.model = model
        self.lock_image = lock_image

    def forward(
        self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor, image_features: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n, 3, S, S) images and (n, L) token ids -> (n, d) image and (n, d) text embeddings (L2-normalised),
        t = exp(t') and b.

        image_features: (n, d) embeddings of a locked image tower computed earlier (siglip.train.feature_cache); they
        are returned as they are and pixel_values may be None.
        """
        from siglip.model import encode_images, encode_texts, scale_and_bias

        if image_features is not None:
            if not self.lock_image:
                raise ValueError("precomputed image_features need a locked image tower (lock_image=True): "
                                 "a trained tower's embeddings change at every step")
        elif self.lock_image:
            with torch.no_grad():
                image_features = encode_images(self.model, pixel_values)
        else:
            image_features = encode_images(self.model, pixel_values)
        text_features = encode_texts(self.model, input_ids)
        logit_scale, logit_bias = scale_and_bias(self.model)
        return image_features, text_features, logit_scale, logit_bias


def contrastive_loss(
    loss: str,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    group: dist.ProcessGroup | None,
    positive_ids: torch.Tensor | None,
) -> torch.Tensor:
    """The chosen loss (siglip.loss) on float32 features; this rank's share divided by its local batch.

    A run that diverges can hold a t' whose exp overflows, or a b that is NaN. The public loss refuses a
    non-finite t or b with a ValueError; here the loss runs on t = 1, b = 0 instead and its value is made NaN, so
    that the update is skipped (siglip.train.guard) while every rank still takes part in the same collectives.
    """
    from siglip.loss import sigmoid_loss, softmax_loss

    image_features, text_features = image_features.float(), text_features.float()
    logit_scale, logit_bias = logit_scale.float(), logit_bias.float()
    finite = torch.isfinite(logit_scale) & torch.isfinite(logit_bias)          # on the device: no host sync
    logit_scale = torch.where(finite, logit_scale, torch.ones_like(logit_scale))
    logit_bias = torch.where(finite, logit_bias, torch.zeros_like(logit_bias))
    if loss == "sigmoid":
        value = sigmoid_loss(image_features, text_features, logit_scale, logit_bias, group,
                             positive_ids=positive_ids)
    else:
        value = softmax_loss(image_features, text_features, logit_scale, group, positive_ids=positive_ids)
    return torch.where(finite.reshape(()), value, torch.full_like(value, float("nan")))


def forward_backward(
    towers: nn.Module,
    pixel_values: torch.Tensor | None,
    input_ids: torch.Tensor,
    positive_ids: torch.Tensor | None,
    *,
    loss: str = "sigmoid",
    group: dist.ProcessGroup | None = None,
    micro_batch: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    image_features: torch.Tensor | None = None,
    recipe_inputs: dict[str, torch.Tensor] | None = None,
    terms: dict[str, float] | None = None,
) -> torch.Tensor:
    """Forward and backward of one step; gradients accumulate into the parameters' .grad. Returns the loss (0-d).

    Args:
        towers: a `ContrastiveTowers`, possibly wrapped in DistributedDataParallel.
        pixel_values: (n, 3, S, S) this rank's images (None when image_features are given); input_ids: (n, L) their
            captions.
        positive_ids: (n,) int64 ids or None (identity labels).
        micro_batch: encode `micro_batch` samples at a time. The loss needs every embedding of the contrastive
            batch at once, but not every activation: (1) embed the whole batch without a graph, (2) compute the
            loss and its gradient with respect to the embeddings, t and b, (3) re-embed each micro-batch with a
            graph and backpropagate its slice of that gradient. By the chain rule the parameter gradient equals
            the full batch's; memory holds one micro-batch's activations. Costs one extra forward pass. The
            random state (dropout) is saved before each micro-batch's first pass and restored before its second
            (as GradCache does), so both passes draw the same masks and the gradient is that of the loss computed.
        autocast_dtype: run the towers under autocast to this dtype (bfloat16 on CUDA); the loss runs in float32.
        image_features: (n, d) embeddings of the locked image tower, looked up in the image-feature cache: the image
            tower is not run. They enter the loss as the tower's own output would (constants either way).
        recipe_inputs: the SigLIP 2 recipe's per-image inputs ((n, ...) tensors, siglip.train.recipe), for towers
            that return a fifth output, {term: its weighted sum over the images} (siglip.train.recipe.Siglip2Towers).
            Each term is divided by n and added to the loss; a sum over images, it splits over micro-batches
            exactly, each slice's added to the second pass's surrogate (the first pass computes no term).
        terms: if given, filled with the loss's parts as floats: "contrastive", and each recipe term over n.
    """
    device_type = input_ids.device.type
    autocast = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    n = input_ids.shape[0]

    def run_towers(part: slice, with_recipe: bool = False) -> tuple:
        images = None if pixel_values is None else pixel_values[part]
        cached = None if image_features is None else image_features[part]
        if with_recipe and recipe_inputs is not None:
            return towers(images, input_ids[part], cached, {name: value[part] for name, value in recipe_inputs.items()})
        return towers(images, input_ids[part], cached)

    added: dict[str, torch.Tensor] = {}          # each recipe term summed over the images, detached

    def with_terms(objective: torch.Tensor, outputs: tuple) -> torch.Tensor:
        """`objective` plus the recipe's terms of a towers call over n (their values kept for `terms`)."""
        if len(outputs) < 5 or not outputs[4]:
            return objective
        for name, value in outputs[4].items():
            added[name] = added.get(name, 0.0) + value.detach().float()
        return objective + sum(outputs[4].values()) / n

    def report(contrastive: torch.Tensor) -> torch.Tensor:
        total = contrastive.detach() + sum(added.values()) / n if added else contrastive.detach()
        if terms is not None:
            terms.clear()
            terms["contrastive"] = float(contrastive.detach())
            terms.update({name: float(value) / n for name, value in added.items()})
        return total

    if micro_batch is None or micro_batch >= n:
        with autocast:
            outputs = run_towers(slice(0, n), with_recipe=True)
        images, text_features, logit_scale, logit_bias = outputs[:4]
        value = contrastive_loss(loss, images, text_features, logit_scale, logit_bias, group, positive_ids)
        with_terms(value, outputs).backward()
        return report(value)

    slices = [slice(start, min(start + micro_batch, n)) for start in range(0, n, micro_batch)]
    random_states, parts = [], []
    with torch.no_grad(), autocast:
        for part in slices:
            random_states.append(_random_state(input_ids.device))
            parts.append(run_towers(part))
    all_images = torch.cat([p[0] for p in parts]).float().requires_grad_(True)     # (n, d) leaves
    text_features = torch.cat([p[1] for p in parts]).float().requires_grad_(True)
    logit_scale = parts[0][2].detach().float().requires_grad_(True)
    logit_bias = parts[0][3].detach().float().requires_grad_(True)
    value = contrastive_loss(loss, all_images, text_features, logit_scale, logit_bias, group, positive_ids)
    value.backward()

    if image_features is None and getattr(getattr(towers, "module", towers), "lock_image", False):
        # A locked tower's embeddings are constants: the second pass reuses the first pass's instead of
        # running the image tower again.
        image_features = torch.cat([p[0] for p in parts])
    no_sync = getattr(towers, "no_sync", None)
    for index, part in enumerate(slices):
        last = index == len(slices) - 1
        _restore_random_state(random_states[index], input_ids.device)       # the first pass's dropout masks
        # DDP all-reduces on the last backward only; the earlier ones accumulate locally.
        with (no_sync() if no_sync is not None and not last else contextlib.nullcontext()), autocast:
            outputs = run_towers(part, with_recipe=True)
        images, texts, scale, bias = outputs[:4]
        # A surrogate whose gradient with respect to the parameters is J^T g for this slice's embeddings, plus the
        # slice's recipe terms (their own parameter gradient: each image's term depends on that image alone).
        surrogate = with_terms((texts.float() * text_features.grad[part]).sum(), outputs)
        if images.requires_grad:
            surrogate = surrogate + (images.float() * all_images.grad[part]).sum()
        if last:
            # t and b enter the loss once: their gradient is applied through the last micro-batch's graph.
            surrogate = surrogate + (scale.float() * logit_scale.grad).sum()
            if bias.requires_grad and logit_bias.grad is not None:
                surrogate = surrogate + (bias.float() * logit_bias.grad).sum()
        surrogate.backward()
    return report(value)


def frozen_image_encoder(model: nn.Module, device: torch.device, chunk: int | None,
                         autocast_dtype: torch.dtype | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """(m, 3, S, S) CPU pixels -> (m, d) embeddings of the locked image tower, `chunk` images a tower call (the
    micro-batch, or the local batch: a cache fill never needs more activation memory than a training step).

    Every call of the tower runs exactly `chunk` images, the last group padded with copies of its last image, so
    that an image's embedding is a function of the image alone. A CPU matrix product rounds a row differently for
    a different number of rows, but not for other neighbours in a product of the same size (tests/train/
    test_step.py checks it on the tiny tower): without the padding, an image cached at its first visit would
    depend on how many other images were new in that batch, which differs between a resumed run and an
    uninterrupted one. chunk None runs all m images in one call.
    """
    from siglip.model import encode_images

    def encode(pixel_values: torch.Tensor) -> torch.Tensor:
        count = pixel_values.shape[0]
        group = chunk or count
        autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        embeddings = []
        with torch.no_grad(), autocast:
            for start in range(0, count, group):
                images = pixel_values[start:start + group]
                real = images.shape[0]
                if real < group:
                    images = torch.cat([images, images[-1:].expand(group - real, *images.shape[1:])])
                embeddings.append(encode_images(model, images.to(device)).float()[:real])
        return torch.cat(embeddings)

    return encode


def _random_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's CPU random state and, on a CUDA device, that device's: what dropout draws from."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _restore_random_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
