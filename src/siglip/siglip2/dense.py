"""Dense evaluation as pure functions: what the patch features know about each patch, and where the decoder points.

SigLIP 2's claims on dense features and localisation (Tschannen et al., 2025, sec. 3.4 and 3.5) are measured on
segmentation, depth and referring-expression sets; the shapes world grades the same two abilities exactly, because
it knows every object's pixels (siglip.data.shapes.regions):

- a linear probe: patch features of a frozen tower -> the patch's label (an object's colour or shape, or
  background), fitted on half of the held-out images and scored on the other half;
- referring-expression accuracy: the decoder's box for a phrase counts when its IoU with the object's box
  exceeds 0.5 (the usual RefCOCO criterion).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from siglip.data.sample import Region

MIN_COVERAGE = 0.25
"""A patch takes an object's label when the object covers at least this fraction of it; small objects rarely
cover half of a patch, so a majority rule would leave most of them unlabelled."""


def patch_labels(regions: Sequence[Region], grid: tuple[int, int], task: str, num_classes: int,
                 min_coverage: float = MIN_COVERAGE) -> np.ndarray:
    """(rows, cols) int64 label per patch: the label of the object covering most of the patch, when it covers at
    least `min_coverage` of it; else `num_classes`, the background class.

    regions: the image's Regions, each with an (H, W) coverage. The tower sees the image resized to its own square
        input, so patch (i, j) is the part [j W / cols, (j + 1) W / cols) x [i H / rows, (i + 1) H / rows) of the
        image; a patch's coverage is the area-weighted mean over the pixels it overlaps (grids that do not divide
        the image, such as 64 pixels into 14 patches, included).
    task: the Region.labels entry to read ("color", "shape").
    """
    rows, cols = grid
    if not regions:
        return np.full((rows, cols), num_classes, dtype=np.int64)
    per_patch = np.stack([patch_means(region.coverage, grid) for region in regions])    # (objects, rows, cols)
    best = per_patch.argmax(axis=0)
    object_labels = np.array([region.labels[task] for region in regions], dtype=np.int64)
    covered = per_patch.max(axis=0) >= min_coverage
    return np.where(covered, object_labels[best], num_classes)


def patch_means(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(H, W) per-pixel values -> (rows, cols) their area-weighted mean over each patch of a rows x cols grid laid
    over the image (a pixel split between two patches counts in each by the part it shares with it)."""
    height, width = values.shape
    return _overlaps(height, grid[0]) @ values.astype(np.float64) @ _overlaps(width, grid[1]).T


def _overlaps(pixels: int, patches: int) -> np.ndarray:
    """(patches, pixels): the fraction of patch k's span [k s, (k + 1) s), s = pixels / patches, that pixel p's span
    [p, p + 1) covers; each row sums to 1."""
    starts = np.arange(patches)[:, None] * pixels / patches
    stops = starts + pixels / patches
    pixel = np.arange(pixels)[None, :]
    overlap = np.clip(np.minimum(stops, pixel + 1) - np.maximum(starts, pixel), 0.0, None)
    return overlap / (pixels / patches)


def linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, background: int | None = None,
                 seed: int = 0, max_iter: int = 1000) -> dict[str, float]:
    """Fit a multinomial logistic regression on the patches of half the images, score it on the other half.

    Args:
        features: (N, P, D) frozen patch features of N images; labels: (N, P) ints in [0, num_classes).
        background: the background's label, if any (`patch_labels` gives it the last one): adds object_accuracy.
        seed: picks which half of the images trains (a seeded permutation); the fit itself is deterministic.

    Returns:
        accuracy: fraction of test patches labelled right; balanced_accuracy: the mean over the classes present in
        the test half of each class's recall (background is most patches, so plain accuracy has little headroom);
        object_accuracy (with `background`): accuracy on the test patches that show an object;
        chance_accuracy: the training half's most frequent label, scored on the test half;
        chance_balanced: 1 / the number of classes present in the test half; train_patches, test_patches.
        The standardisation and the classifier are fitted on the training half only; classes are weighted
        inversely to their frequency, so that rare labels are not ignored in favour of the background.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    if features.dim() != 3 or labels.shape != features.shape[:2]:
        raise ValueError(f"features must be (N, P, D) and labels (N, P), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    count = features.shape[0]
    if count < 2:
        raise ValueError(f"the probe needs at least 2 images (half to fit, half to score), got {count}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    fit_images, score_images = order[:count // 2], order[count // 2:]
    x = features.detach().double().cpu().numpy()
    y = labels.cpu().numpy()
    fit_x, fit_y = x[fit_images].reshape(-1, x.shape[-1]), y[fit_images].reshape(-1)
    score_x, score_y = x[score_images].reshape(-1, x.shape[-1]), y[score_images].reshape(-1)
    mean, std = fit_x.mean(axis=0), fit_x.std(axis=0) + 1e-8
    if len(np.unique(fit_y)) < 2:
        predicted = np.full_like(score_y, fit_y[0])
    else:
        # One BLAS thread: the problem is small (thousands of patches, D features), and on two cores shared with
        # training jobs a second thread made a fit 50x slower (4,800 patches of 128 features: 17 s against 0.33 s).
        with threadpool_limits(limits=1):
            probe = LogisticRegression(max_iter=max_iter, class_weight="balanced")
            probe.fit((fit_x - mean) / std, fit_y)
            predicted = probe.predict((score_x - mean) / std)
    right = predicted == score_y
    present = np.unique(score_y)
    majority = np.bincount(fit_y, minlength=num_classes).argmax()
    result = {
        "accuracy": float(right.mean()),
        "balanced_accuracy": float(np.mean([right[score_y == label].mean() for label in present])),
        "chance_accuracy": float((score_y == majority).mean()),
        "chance_balanced": 1.0 / len(present),
        "train_patches": int(fit_y.size),
        "test_patches": int(score_y.size),
    }
    if background is not None:
        objects = score_y != background
        result["object_accuracy"] = float(right[objects].mean()) if objects.any() else float("nan")
    return result


def box_iou(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(n, 4) and (n, 4) boxes (x0, y0, x1, y1) -> (n,) intersection over union of each pair (0 for two empty
    boxes)."""
    if first.shape != second.shape or first.dim() != 2 or first.shape[1] != 4:
        raise ValueError(f"boxes must both be (n, 4), got {tuple(first.shape)} and {tuple(second.shape)}")
    first, second = first.double(), second.double()
    width = (torch.minimum(first[:, 2], second[:, 2]) - torch.maximum(first[:, 0], second[:, 0])).clamp(min=0)
    height = (torch.minimum(first[:, 3], second[:, 3]) - torch.maximum(first[:, 1], second[:, 1])).clamp(min=0)
    intersection = width * height
    area = lambda box: (box[:, 2] - box[:, 0]).clamp(min=0) * (box[:, 3] - box[:, 1]).clamp(min=0)  # noqa: E731
    union = area(first) + area(second) - intersection
    return torch.where(union > 0, intersection / union.clamp(min=1e-300), torch.zeros_like(union))


def referring_accuracy(predicted: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of (n, 4) predicted boxes whose IoU with the (n, 4) target boxes exceeds `threshold`."""
    if len(predicted) == 0:
        raise ValueError("referring_accuracy needs at least one box")
    return float((box_iou(predicted, target) > threshold).double().mean())
