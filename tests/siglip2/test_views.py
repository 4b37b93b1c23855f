"""The student's views: local crops inside the image at the stated scales, masks of exactly the ratio, all drawn
reproducibly from a generator."""

from __future__ import annotations

import random

import pytest
import torch

from siglip.siglip2.views import crop_views, local_crop_boxes, patch_masks


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_local_crops_lie_inside_the_image_at_the_stated_scale():
    height, width = random.randint(16, 64), random.randint(16, 64)
    n, views, seed = random.randint(1, 6), random.randint(1, 8), random.randrange(10**6)
    boxes = local_crop_boxes(n, views, (height, width), generator(seed))
    assert boxes.shape == (n, views, 4) and boxes.dtype == torch.int64
    x0, y0, x1, y1 = boxes.unbind(-1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= width).all() and (y1 <= height).all()
    assert (x1 > x0).all() and (y1 > y0).all()
    assert torch.equal(boxes, local_crop_boxes(n, views, (height, width), generator(seed)))
    assert not torch.equal(boxes, local_crop_boxes(n, views, (height, width), generator(seed + 1)))


def test_crop_areas_are_the_drawn_areas_up_to_whole_pixels():
    # A square image is never clipped (a side is at most sqrt(0.4 * 4/3) = 0.73 of the image's). Rounding moves
    # each side of w * h = a by at most 1/2, so the area by at most (sqrt(a r) + sqrt(a / r)) / 2 + 1/4, which for
    # r in [3/4, 4/3] is at most 1.011 sqrt(a) + 1/4; a - 1.011 sqrt(a) and a + 1.011 sqrt(a) grow with a.
    side = random.randint(16, 300)
    boxes = local_crop_boxes(50, 4, (side, side), generator(random.randrange(10**6)))
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).double()
    low, high = 0.05 * side**2, 0.4 * side**2
    assert (area >= low - 1.011 * low**0.5).all() and (area <= high + 1.011 * high**0.5 + 0.25).all()


def test_crop_areas_spread_over_the_scale_range():
    boxes = local_crop_boxes(500, 4, (200, 200), generator(random.randrange(10**6)))
    fraction = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).double() / 200 ** 2
    # 2000 crops of an area drawn uniformly in [0.05, 0.4] (rounding moves it by under 1%): quantiles near 0.05 + 0.35 q
    for q in (0.1, 0.5, 0.9):
        assert abs(fraction.quantile(q).item() - (0.05 + 0.35 * q)) < 0.03


def test_crops_are_the_boxed_pixels_resized():
    pixels = torch.randn(2, 3, 20, 24, dtype=torch.float64)
    # resizing a box to its own size is the identity
    square = torch.tensor([[[3, 2, 13, 12]], [[10, 5, 20, 15]]])
    crops = crop_views(pixels, square, 10)
    assert crops.shape == (2, 1, 3, 10, 10)
    assert torch.equal(crops[0, 0], pixels[0, :, 2:12, 3:13]) and torch.equal(crops[1, 0], pixels[1, :, 5:15, 10:20])
    constant = torch.full((1, 3, 20, 24), 0.25, dtype=torch.float64)
    resized = crop_views(constant, torch.tensor([[[1, 1, 7, 9], [0, 0, 24, 20]]]), 16)
    torch.testing.assert_close(resized, torch.full_like(resized, 0.25), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="non-empty part"):
        crop_views(pixels, torch.tensor([[[0, 0, 25, 20]], [[0, 0, 5, 5]]]), 8)


def test_masks_hold_exactly_the_ratio_and_replay_from_their_generator():
    n, patches, seed = random.randint(1, 50), random.choice([4, 16, 49, 196]), random.randrange(10**6)
    mask = patch_masks(n, patches, 0.5, generator(seed))
    assert mask.shape == (n, patches) and mask.dtype == torch.bool
    assert (mask.sum(dim=1) == round(0.5 * patches)).all()
    assert torch.equal(mask, patch_masks(n, patches, 0.5, generator(seed)))
    ratio = random.random()
    assert (patch_masks(n, patches, ratio, generator(seed)).sum(dim=1) == round(ratio * patches)).all()
    assert not patch_masks(3, 16, 0.0, generator(seed)).any() and patch_masks(3, 16, 1.0, generator(seed)).all()
    with pytest.raises(ValueError, match="ratio must be in"):
        patch_masks(1, 16, 1.5, generator(seed))


def test_every_patch_is_masked_equally_often():
    mask = patch_masks(4000, 16, 0.5, generator(random.randrange(10**6)))
    # each patch's frequency: mean of 4000 draws of probability 1/2, standard error 0.0079; 5 of them as margin
    assert (mask.double().mean(dim=0) - 0.5).abs().max() < 0.04
