"""The SigLIP 2 recipe's added losses for a slice of a batch, and what they read: the views and the teacher's targets.

Per image i, with the weights of Tschannen et al. (2025), sec. 2.2 and 2.3:

    decoder_weight * L_decoder(i) + distillation_weight * (1 * L_consistency(i) + 0.25 * L_masked(i))

- L_decoder: the LocCa decoder's teacher-forced loss on the image's targets (caption, and with regions a referring
  expression and a grounded caption), read from the patch tokens of the original image (the same forward pass the
  contrastive loss uses);
- L_consistency: the student's embeddings of `LOCAL_VIEWS` local crops against the teacher's of the whole image;
- L_masked: the student's patch features of the image with half its patches masked, against the teacher's of the
  whole image, at the masked patches.

The paper weighs the decoder equally with the sigmoid loss (decoder_weight 1), the last two terms 1 and 0.25, and both
again by 0.25 for B-sized models (0.5 L, 1.0 So400m, 0.5 g): distillation_weight 0.25 for our small towers. It
uses "a single global (teacher) view and 8 local (student) views" and the original image for the SigLIP and LocCa
losses (sec. 2.3); we do the same, without the global view's augmentation (the shapes world has none to offer).

Exactness: `student_losses` returns sums over the slice; divided by the batch's n they add up over micro-batches to
the batch's mean. The views and masks are drawn for the whole global batch from (seed, step) and sliced
(`draw_views`), and the teacher's targets are computed once per batch without a graph (`teacher_targets`), so
neither depends on how the batch is split into micro-batches or ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from siglip.siglip2.decoder import LocCaDecoder
from siglip.siglip2.distill import (
    DistillationHeads,
    distillation_loss,
    masked_prediction_loss,
    teacher_distribution,
    teacher_logits,
    updated_center,
)
from siglip.siglip2.views import crop_views, local_crop_boxes, patch_masks
from siglip.siglip2.vision import image_tokens

CONSISTENCY_WEIGHT, MASKED_WEIGHT = 1.0, 0.25
"""The paper's weights of local-to-global consistency and masked prediction (sec. 2.3), before the model-size factor."""
MASK_RATIO = 0.5
"""Share of the student's patches replaced by the mask token (sec. 2.3: 50%)."""
LOCAL_VIEWS = 8
"""Local crops the student sees per image (sec. 2.3: 8)."""

DECODER, CONSISTENCY, MASKED = "decoder", "consistency", "masked"


@dataclass(frozen=True)
class RecipeWeights:
    """How much each added loss counts beside the contrastive loss (whose weight is 1)."""

    decoder: float = 1.0
    distillation: float = 0.25
    """Multiplies CONSISTENCY_WEIGHT and MASKED_WEIGHT: the paper's model-size factor (0.25 for B)."""


class Siglip2Parts(nn.Module):
    """What the recipe trains beside the towers: the decoder, and the distillation heads with the mask token.

    Either may be None (a run with only the decoder, or only self-distillation)."""

    def __init__(self, decoder: LocCaDecoder | None, heads: DistillationHeads | None):
        super().__init__()
        self.decoder = decoder
        self.heads = heads


def local_crop_side(image_size: int, patch_size: int) -> int:
    """Side in pixels at which the student reads a local crop: half the image's, in whole patches, at least one
    patch (DINO reads 96 px crops of 224 px images: 0.43)."""
    return max(patch_size, (image_size // 2) // patch_size * patch_size)


def view_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step `step`'s crops and masks: a function of (seed, step) alone, so a resumed run draws
    what an uninterrupted one draws."""
    state = np.random.SeedSequence([seed, step, 0x5162]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def draw_views(seed: int, step: int, global_batch: int, image_size: int, patch_size: int, rows: slice,
               views: int = LOCAL_VIEWS) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's rows of the global batch's draws: ((b, views, 4) int64 crop boxes in pixels, (b, P) bool patch
    masks), P = (image_size / patch_size)^2. Drawn for all `global_batch` images and sliced, so that an image's views
    depend on its place in the global batch only."""
    generator = view_generator(seed, step)
    boxes = local_crop_boxes(global_batch, views, (image_size, image_size), generator)
    masks = patch_masks(global_batch, (image_size // patch_size) ** 2, MASK_RATIO, generator)
    return boxes[rows], masks[rows]


def crops_of(pixel_values: torch.Tensor, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """(b, 3, S, S) images and (b, V, 4) boxes -> (b, V, 3, side, side) crops on the images' device."""
    return crop_views(pixel_values, boxes.to(pixel_values.device), side)


@torch.no_grad()
def teacher_targets(teacher: nn.Module, pixel_values: torch.Tensor, centers: dict[str, torch.Tensor], *,
                    chunk: int | None = None, autocast_dtype: torch.dtype | None = None,
                    group: dist.ProcessGroup | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The teacher's target distributions for a batch, computed once: ((b, K) global, (b, P, Kp) per patch), and the
    centres moved by this batch (DINO: targets are centred with the centre before the batch's own update).

    teacher: an `EmaTeacher` whose module holds "vision" (the tower) and "heads" (DistillationHeads).
    centers: {"global": (K,), "patch": (Kp,)} float32; group: all-reduce the centres' batch means over the ranks.
    """
    autocast = (torch.autocast(pixel_values.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        global_logits, patch_logits = teacher_logits(teacher.module["vision"], teacher.module["heads"], pixel_values,
                                                     chunk)
    global_targets = teacher_distribution(global_logits, centers["global"])
    patch_targets = teacher_distribution(patch_logits, centers["patch"])
    moved = {"global": updated_center(centers["global"], global_logits, group=group),
             "patch": updated_center(centers["patch"], patch_logits, group=group)}
    return global_targets, patch_targets, moved


def student_losses(parts: Siglip2Parts, vision_model: nn.Module, pixel_values: torch.Tensor,
                   patch_tokens: torch.Tensor, inputs: dict[str, torch.Tensor], weights: RecipeWeights
                   ) -> dict[str, torch.Tensor]:
    """The added losses of a slice of n images, each weighted and SUMMED over the images (0-d tensors).

    Args:
        vision_model: the student's image tower; patch_tokens: its (n, P, D) output on `pixel_values` (n, 3, S, S),
            the pass the contrastive loss reads too.
        inputs: this slice of the batch's recipe inputs. "decoder_tokens" and "decoder_scored" ((n, K, T), from
            `boxes.stack_targets`) give the decoder's term; "crops" ((n, V, 3, s, s)), "global_targets" ((n, K)),
            "patch_mask" ((n, P)) and "patch_targets" ((n, P, Kp)) the last stage's two terms, when it is on.

    Returns:
        {"decoder": ..., "consistency": ..., "masked": ...}, each term present when its inputs are.
    """
    terms = {}
    if "decoder_tokens" in inputs:
        per_image = parts.decoder.sample_losses(patch_tokens, inputs["decoder_tokens"], inputs["decoder_scored"])
        terms[DECODER] = weights.decoder * per_image.sum()
    if "crops" in inputs:
        crops = inputs["crops"]
        n, views = crops.shape[:2]
        _, pooled = image_tokens(vision_model, crops.flatten(0, 1), interpolate_pos_encoding=True)   # (n V, D)
        local_logits = parts.heads.global_head(pooled).reshape(n, views, -1)                       # (n, V, K)
        terms[CONSISTENCY] = (weights.distillation * CONSISTENCY_WEIGHT
                              * distillation_loss(local_logits, inputs["global_targets"], reduction="sum"))
        masked_tokens, _ = image_tokens(vision_model, pixel_values, patch_mask=inputs["patch_mask"],
                                        mask_token=parts.heads.mask_token)                        # (n, P, D)
        terms[MASKED] = weights.distillation * MASKED_WEIGHT * masked_prediction_loss(
            parts.heads.patch_head(masked_tokens), inputs["patch_targets"], inputs["patch_mask"], reduction="sum")
    return terms
