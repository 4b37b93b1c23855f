"""Ground truth for the losses: the paper's formulas written literally, on the full matrix, in float64."""

from __future__ import annotations

import torch


def label_matrix(n: int, m: int | None = None, image_ids=None, text_ids=None, offset: int = 0) -> torch.Tensor:
    """z: +1 for positive pairs, -1 otherwise; identity labels (shifted by offset) unless ids are given."""
    m = n if m is None else m
    if image_ids is not None:
        return torch.where(image_ids[:, None] == text_ids[None, :], 1.0, -1.0).double()
    z = -torch.ones(n, m, dtype=torch.float64)
    for i in range(n):
        if 0 <= i + offset < m:
            z[i, i + offset] = 1.0
    return z


def reference_sigmoid_loss(x, y, t, b, positive_ids=None) -> torch.Tensor:
    """Algorithm 1 of the paper: -sum(log_sigmoid(z * (t x y^T + b))) / n, in float64 with autograd."""
    n = x.shape[0]
    logits = t.double().reshape(()) * x.double() @ y.double().t() + b.double().reshape(())
    z = label_matrix(n, image_ids=positive_ids, text_ids=positive_ids)
    return -torch.nn.functional.logsigmoid(z * logits).sum() / n


def scalar_gradient_scales(x, y, t, b, positive_ids=None) -> tuple[float, float]:
    """The size of the sums behind d loss / d t and d loss / d b: (1/n) sum_ij |g_ij s_ij| and (1/n) sum_ij |g_ij|.

    Both gradients are sums of n^2 terms of either sign that can cancel to far below any one term; rounding error
    is relative to these magnitudes, not to the (possibly tiny) result.
    """
    n = x.shape[0]
    s = x.double() @ y.double().t()
    z = label_matrix(n, image_ids=positive_ids, text_ids=positive_ids)
    logits = t.double().reshape(()) * s + b.double().reshape(())
    g = -z * torch.sigmoid(-z * logits)
    return (g * s).abs().sum().item() / n, g.abs().sum().item() / n


def reference_softmax_loss(x, y, t, positive_ids=None) -> torch.Tensor:
    """CLIP: the mean of the two cross-entropies, targets spread uniformly over each row's positives."""
    n = x.shape[0]
    logits = t.double().reshape(()) * x.double() @ y.double().t()
    if positive_ids is None:
        target = torch.eye(n, dtype=torch.float64)
    else:
        target = (positive_ids[:, None] == positive_ids[None, :]).double()
    image_to_text = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(target.t() / target.t().sum(1, keepdim=True) * logits.t().log_softmax(1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def unit_rows(n: int, d: int, dtype=torch.float64, generator=None) -> torch.Tensor:
    """n random rows of unit L2 norm."""
    x = torch.randn(n, d, dtype=torch.float64, generator=generator)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def loss_and_grads(fn, x, y, t, b=None, **kwargs):
    """Value and gradients (x, y, t[, b]) of fn(x, y, t[, b]) on fresh leaf copies."""
    leaves = [v.detach().clone().requires_grad_(True) for v in (x, y, t) + ((b,) if b is not None else ())]
    value = fn(*leaves, **kwargs)
    value.backward()
    return value.detach(), [leaf.grad for leaf in leaves]
