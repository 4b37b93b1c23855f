"""CLIP's softmax loss (Radford et al., 2021): on one process, and across a group through an all-gather.

The softmax normalises each row over the whole batch, so unlike the sigmoid loss it needs every candidate at once:
across D ranks both towers' rows are all-gathered (with gradients, `siglip.collectives.AllGatherWithGrad`) and each
rank scores its own n rows against all D * n. `siglip.loss.softmax_loss` is the public entry point.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from siglip.collectives import Agreement, AllGatherWithGrad, CommStats, all_gather_rows, require_agreement


def local_softmax_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    image_ids: torch.Tensor | None,
    text_ids: torch.Tensor | None,
    *,
    text_offset: int = 0,
    all_text_features: torch.Tensor | None = None,
    all_image_features: torch.Tensor | None = None,
    all_text_ids: torch.Tensor | None = None,
    all_image_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The softmax loss of n local rows against N candidates (N = n on one process, the gathered batch otherwise).

    Images are scored against `all_text_features` (N, d) and texts against `all_image_features`; the local pair
    i sits at candidate text_offset + i unless ids are given. Returns the sum of both directions' cross-entropy over
    the n local rows, divided by 2n.
    """
    acc = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    scale = logit_scale.reshape(()).to(acc)
    images, texts = image_features.to(acc), text_features.to(acc)
    all_texts = texts if all_text_features is None else all_text_features.to(acc)
    all_images = images if all_image_features is None else all_image_features.to(acc)
    n = images.shape[0]
    logits_per_image = scale * images @ all_texts.t()            # (n, N)
    logits_per_text = scale * texts @ all_images.t()             # (n, N)
    if image_ids is None:
        target = torch.arange(text_offset, text_offset + n, device=images.device)
        loss = F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_text, target)
    else:
        cand_text_ids = text_ids if all_text_ids is None else all_text_ids
        cand_image_ids = image_ids if all_image_ids is None else all_image_ids
        loss = _soft_cross_entropy(logits_per_image, image_ids, cand_text_ids) + _soft_cross_entropy(
            logits_per_text, text_ids, cand_image_ids
        )
    return loss / 2


def _soft_cross_entropy(logits: torch.Tensor, row_ids: torch.Tensor, candidate_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with the target spread uniformly over the candidates that share a row's id."""
    positive = (row_ids[:, None] == candidate_ids[None, :]).to(logits.dtype)     # (n, N)
    target = positive / positive.sum(dim=1, keepdim=True).clamp_min(1)
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def gathered_softmax_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    positive_ids: torch.Tensor | None = None,
    stats: CommStats | None = None,
) -> torch.Tensor:
    """CLIP's loss over a group: both towers all-gathered with gradients, this rank's rows scored against all D * n.

    Args:
        image_features, text_features: (n, d) this rank's L2-normalised rows, same dtype.
        logit_scale: t, the temperature itself (0-d or 1-element).
        group: the process group; every rank passes the same n, d and dtype.
        positive_ids: optional (n,) integer ids, gathered like the features; targets spread over each row's positives.
        stats: optional `CommStats` for bytes sent and synchronisation points.

    Returns:
        0-d tensor: (sum of this rank's image rows' and text rows' cross-entropies) / (2 n), so the mean over ranks
        is the global loss; the gradient reaching this rank's features is D times the global gradient.
    """
    needs_grad = torch.is_grad_enabled() and any(v.requires_grad for v in (image_features, text_features, logit_scale))
    setup = Agreement.agree(
        "softmax_loss", image_features, positive_ids, group, stats, call="softmax_loss", needs_grad=needs_grad
    )
    require_agreement(
        setup.shared, "needs_grad", "softmax_loss", "every rank must back-propagate through the loss (or none)"
    )
    all_images = AllGatherWithGrad.apply(image_features, group, stats)      # (D n, d)
    all_texts = AllGatherWithGrad.apply(text_features, group, stats)        # (D n, d)
    all_ids = None if positive_ids is None else all_gather_rows(positive_ids, group, stats, "forward")
    return local_softmax_loss(
        image_features, text_features, logit_scale, positive_ids, positive_ids,
        text_offset=setup.rank * setup.n,
        all_text_features=all_texts, all_image_features=all_images, all_text_ids=all_ids, all_image_ids=all_ids,
    )
