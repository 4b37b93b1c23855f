"""What the student sees in SigLIP 2's self-distillation (Tschannen et al., 2025, sec. 2.3): local crops of the
image, and the image with half of its patches masked.

Every draw comes from a `torch.Generator` passed in, so a step's crops and masks are a function of its seed. To
stay the same under micro-batching and any number of ranks, draw them for the GLOBAL batch from a generator seeded
by (seed, step), then give each rank, and each micro-batch, its slice: the draws then depend on a sample's place
in the global batch only, never on how the batch is split.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOCAL_SCALE = (0.05, 0.4)
"""Area of a local crop as a fraction of the image's: DINO's local crops (Caron et al., 2021), which SILC follows."""
LOCAL_RATIO = (3 / 4, 4 / 3)
"""Aspect ratio (width / height) of a local crop, drawn log-uniformly in this range."""


def local_crop_boxes(
    n: int,
    views: int,
    image_size: tuple[int, int],
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = LOCAL_SCALE,
    ratio: tuple[float, float] = LOCAL_RATIO,
) -> torch.Tensor:
    """(n, views, 4) int64 crop boxes (x0, y0, x1, y1) in pixels, 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H.

    A crop's area is a fraction of the image's drawn uniformly from `scale`, its aspect ratio log-uniformly from
    `ratio`; sides are rounded to whole pixels and clipped to the image (so a crop near the image's shape may come
    out smaller than drawn), and its corner is uniform over the places where it fits.
    """
    height, width = image_size
    if n < 0 or views < 1 or height < 1 or width < 1:
        raise ValueError(f"need n >= 0, views >= 1 and a positive image size, got {n}, {views}, {image_size}")
    if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"scale must lie in (0, 1] and ratio be positive, each (low, high), got {scale} and {ratio}")
    draws = torch.rand(4, n, views, generator=generator, dtype=torch.float64)
    area = (scale[0] + (scale[1] - scale[0]) * draws[0]) * (height * width)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * draws[1])
    crop_width = torch.sqrt(area * aspect).round().clamp(1, width)          # width / height = aspect
    crop_height = torch.sqrt(area / aspect).round().clamp(1, height)
    x0 = torch.floor(draws[2] * (width - crop_width + 1)).clamp(max=width - crop_width)
    y0 = torch.floor(draws[3] * (height - crop_height + 1)).clamp(max=height - crop_height)
    return torch.stack([x0, y0, x0 + crop_width, y0 + crop_height], dim=-1).to(torch.int64)


def crop_views(pixel_values: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(n, C, H, W) images and (n, V, 4) boxes -> (n, V, C, size, size): each crop resized (bilinear, antialiased).

    The tower reads a crop of another size than its images with `interpolate_pos_encoding=True`
    (siglip.siglip2.vision.image_tokens).
    """
    n, _, height, width = pixel_values.shape
    if boxes.dim() != 3 or boxes.shape[0] != n or boxes.shape[2] != 4:
        raise ValueError(f"boxes must be ({n}, V, 4), got {tuple(boxes.shape)}")
    x0, y0, x1, y1 = boxes.unbind(-1)
    if (x0 < 0).any() or (y0 < 0).any() or (x1 > width).any() or (y1 > height).any() or (x1 <= x0).any() \
            or (y1 <= y0).any():
        raise ValueError(f"every box must be a non-empty part of the {width} x {height} image")
    crops = [F.interpolate(pixel_values[image:image + 1, :, top:bottom, left:right], size=(size, size),
                           mode="bilinear", align_corners=False, antialias=True)
             for image in range(n) for left, top, right, bottom in boxes[image].tolist()]
    return torch.cat(crops).reshape(n, boxes.shape[1], pixel_values.shape[1], size, size)


def patch_masks(n: int, num_patches: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(n, num_patches) bool: in each row exactly round(ratio * num_patches) patches, uniformly drawn, are True.

    SigLIP 2 masks 50% of the student's patches (ratio 0.5) for masked prediction.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    masked = round(ratio * num_patches)
    # A uniformly random permutation per row (argsort of i.i.d. uniforms); its first `masked` entries are masked.
    order = torch.rand(n, num_patches, generator=generator).argsort(dim=1)
    mask = torch.zeros(n, num_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, :masked], True)
    return mask
