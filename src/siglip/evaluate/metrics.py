"""The evaluation metrics, as pure functions of embeddings: zero-shot accuracy, and retrieval recall at k with one or
several captions per image.

Retrieval with several captions per image (COCO's and Flickr30k's five): an image counts as found at k when any
of its captions is among its k most similar texts; every caption is a query that counts when its image is among
its k most similar images. The similarities are formed a block at a time and each query keeps its best k so far,
so a set of n images and m captions never needs the n x m matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
