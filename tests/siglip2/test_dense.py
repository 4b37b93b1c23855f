"""Dense evaluation: per-patch labels from regions, the linear probe where the answer is known, IoU by hand."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from siglip.data.sample import Region
from siglip.data.shapes import Thing, draw_placed, place, regions
from siglip.prompts import COLOR_NAMES, SHAPE_NAMES, SIZE_NAMES
from siglip.siglip2.dense import box_iou, linear_probe, patch_labels, patch_means, referring_accuracy


def square_region(x0: int, y0: int, x1: int, y1: int, size: int, color: int) -> Region:
    coverage = np.zeros((size, size), dtype=np.float32)
    coverage[y0:y1, x0:x1] = 1.0
    return Region(box=(x0, y0, x1, y1), phrase="", labels={"color": color}, coverage=coverage)


def test_a_patch_takes_the_label_of_the_object_covering_most_of_it():
    # 16 x 16 image, 4 x 4 patches of 4 x 4 pixels; background is class 8
    first = square_region(0, 0, 6, 4, 16, color=3)         # all of patch (0, 0), half of (0, 1)
    second = square_region(6, 0, 10, 2, 16, color=5)       # a quarter of (0, 1), a quarter of (0, 2)
    third = square_region(12, 12, 13, 16, 16, color=1)     # a quarter of (3, 3)
    labels = patch_labels([first, second, third], (4, 4), "color", 8)
    want = np.full((4, 4), 8)
    want[0, 0], want[0, 1], want[0, 2], want[3, 3] = 3, 3, 5, 1
    assert labels.tolist() == want.tolist()
    assert (patch_labels([first, second, third], (4, 4), "color", 8, min_coverage=0.3) == 8).sum() == 14
    assert (patch_labels([], (2, 2), "color", 8) == 8).all()


def test_a_grid_that_does_not_divide_the_image_weighs_pixels_by_their_overlap():
    # 10 pixels into 4 patches of 2.5: pixel 2 is half in patch 0, half in patch 1
    region = square_region(0, 0, 3, 10, 10, color=2)        # columns 0, 1, 2 of every row
    labels = patch_labels([region], (4, 4), "color", 8, min_coverage=0.2)
    # patch column 0 holds pixels 0, 1 and half of 2: all covered; column 1 holds half of 2, 3, 4: 0.5 / 2.5 = 0.2
    assert labels.tolist() == [[2, 2, 8, 8]] * 4
    assert (patch_labels([region], (4, 4), "color", 8, min_coverage=0.21)[:, 1] == 8).all()
    # the per-patch means keep the total (each patch weighs (64 / 14)^2 pixels) and are block means on a divisor
    coverage = np.random.rand(64, 64)
    np.testing.assert_allclose(patch_means(coverage, (14, 14)).sum() * (64 / 14) ** 2, coverage.sum(), rtol=1e-12)
    np.testing.assert_allclose(patch_means(coverage, (4, 8)), coverage.reshape(4, 16, 8, 8).mean(axis=(1, 3)),
                               rtol=1e-12)


@pytest.mark.parametrize("image_size,grid", [(64, 4), (64, 8), (32, 4)])
def test_patch_labels_agree_with_the_pixel_colours(image_size, grid):
    # Where a patch is labelled with an object's colour, that much of the patch shows that colour over the grey:
    # per pixel, (pixel - grey) / (colour - grey) on the most contrasting channel is the covered fraction (up to 8-bit
    # rounding, under 0.006); its mean over the patch is at least 0.25. Background patches show less of every object.
    side = image_size // grid
    for _ in range(30):
        rng = random.Random(random.randrange(10**9))
        things = [Thing(rng.choice(COLOR_NAMES), rng.choice(SHAPE_NAMES), rng.choice(SIZE_NAMES), cell)
                  for cell in rng.sample(range(4), rng.randint(1, 3))]
        grey, placed = place(things, rng, image_size)
        pixels = np.asarray(draw_placed(grey, placed, image_size)).astype(float)
        found = regions(placed, image_size)
        labels = patch_labels(found, (grid, grid), "color", len(COLOR_NAMES))
        shown = []                                          # (objects, grid, grid): the fraction each patch shows
        for item in placed:
            channel = int(np.argmax(np.abs(np.array(item.color) - grey)))
            fraction = (pixels[..., channel] - grey) / (item.color[channel] - grey)
            mine = np.zeros_like(fraction)
            x0, y0, x1, y1 = map(int, regions([item], image_size)[0].box)
            mine[y0:y1, x0:x1] = fraction[y0:y1, x0:x1]    # the object's own box: other objects are other colours
            shown.append(mine.reshape(grid, side, grid, side).mean(axis=(1, 3)))
        shown = np.stack(shown)
        for row in range(grid):
            for col in range(grid):
                if labels[row, col] == len(COLOR_NAMES):
                    assert shown[:, row, col].max() < 0.25 + 0.006
                else:
                    best = int(shown[:, row, col].argmax())
                    assert shown[best, row, col] >= 0.25 - 0.006
                    assert labels[row, col] == COLOR_NAMES.index(placed[best].thing.color)


def test_the_probe_reads_labels_that_are_linearly_there():
    images, patches, dim, classes = 40, 16, 12, 5
    labels = torch.randint(0, classes, (images, patches))
    directions = torch.randn(classes, dim)
    features = directions[labels] + 0.1 * torch.randn(images, patches, dim)
    result = linear_probe(features, labels, classes, background=classes - 1, seed=random.randrange(10**6))
    assert result["train_patches"] == result["test_patches"] == images // 2 * patches
    # classes 1 / 0.1 apart in 12 dimensions do not overlap: anything short of all right is a bug
    assert result["accuracy"] == result["balanced_accuracy"] == result["object_accuracy"] == 1.0
    assert result["chance_balanced"] == 1 / classes


def test_the_probe_is_at_chance_on_features_that_know_nothing():
    images, patches, dim, classes = 60, 16, 8, 4
    labels = torch.randint(0, classes, (images, patches))
    result = linear_probe(torch.randn(images, patches, dim), labels, classes, seed=random.randrange(10**6))
    # 480 test patches: a balanced accuracy's standard error at chance is about sqrt(0.25 * 0.75 / 480) = 0.02;
    # the probe may also overfit 8 weights a class to noise. 0.1 is five standard errors.
    assert abs(result["balanced_accuracy"] - 0.25) < 0.1 and "object_accuracy" not in result
    skewed = torch.where(torch.rand(images, patches) < 0.8, 0, labels)
    assert linear_probe(torch.randn(images, patches, dim), skewed, classes)["chance_accuracy"] > 0.7
    with pytest.raises(ValueError, match="labels must lie in"):
        linear_probe(torch.randn(4, 2, 3), torch.full((4, 2), classes), classes)


def test_iou_by_hand():
    first = torch.tensor([[0, 0, 2, 1], [0, 0, 4, 4], [0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 3, 3], [0, 0, 0, 0]])
    second = torch.tensor([[1, 0, 3, 1], [1, 1, 3, 3], [1, 0, 2, 1], [0, 0, 1, 1], [2, 0, 4, 2], [0, 0, 0, 0]])
    want = torch.tensor([1 / 3, 4 / 16, 0.0, 1.0, 1 / 7, 0.0], dtype=torch.float64)
    torch.testing.assert_close(box_iou(first, second), want, rtol=1e-15, atol=0)
    torch.testing.assert_close(box_iou(second, first), want, rtol=1e-15, atol=0)
    # IoU 1/3, 1/4, 0, 1, 1/7, 0 > 0.5: one of six
    assert referring_accuracy(first, second) == 1 / 6
    assert referring_accuracy(first, second, threshold=0.3) == 2 / 6
    with pytest.raises(ValueError, match="both be \\(n, 4\\)"):
        box_iou(first, second[:2])
