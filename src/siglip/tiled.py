"""The pairwise sigmoid loss of SigLIP (Zhai et al., 2023, Algorithm 1), computed in row tiles.

The B x B logit matrix never exists: each tile of rows is formed, reduced to its loss and its gradients,
and dropped. Because the loss is a scalar, its gradients can be formed in the forward pass and merely
scaled by the incoming gradient in backward. Per tile that is three matrix products: the logits, the
image gradient and the text gradient.

`sigmoid_block` is the kernel: one block of images against one block of texts, returning sums (not means),
so that the single-device loss and every block of the ring (``siglip.ring``) share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Per tile we keep the logits and one work buffer alive. 2^20 elements (4 MB in float32) per buffer keeps a tile's
# element-wise passes inside the last-level cache of a laptop CPU while the products stay large enough to run at speed.
TILE_ELEMENTS = 1 << 20


@dataclass
class BlockResult:
    """Sums over one block of `c` images against `m` texts, in the accumulation dtype.

    loss: 0-d, sum_ij softplus(-z_ij * logit_ij), not yet divided by anything.
    grad_image: (c, d), d loss / d image_features.
    grad_text: (m, d), d loss / d text_features.
    grad_scale: 0-d, d loss / d t (the scale itself, not its log).
    grad_bias: 0-d, d loss / d b.
    """

    loss: torch.Tensor
    grad_image: torch.Tensor
    grad_text: torch.Tensor
    grad_scale: torch.Tensor
    grad_bias: torch.Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, bfloat16 and float16 all accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def auto_chunk(rows: int, cols: int) -> int:
    """Rows per tile so that a tile of `cols` logits holds about TILE_ELEMENTS values."""
    return max(1, min(rows, TILE_ELEMENTS // max(cols, 1)))


def sigmoid_block(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float,
    logit_bias: float,
    *,
    diagonal_offset: int | None = None,
    image_ids: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
    chunk: int | None = None,
) -> BlockResult:
    """Loss and gradients of one block of the pairwise sigmoid loss, tile by tile.

    Args:
        image_features: (c, d) in the accumulation dtype (see `accumulation_dtype`).
        text_features: (m, d), same dtype.
        logit_scale: t, the temperature itself (not its log).
        logit_bias: b.
        diagonal_offset: positives sit at (i, i + offset); None means this block holds no diagonal.
            Ignored when ids are given.
        image_ids, text_ids: (c,) and (m,) integer ids; a pair is positive where they are equal.
        chunk: image rows per tile; None picks one so a tile holds about TILE_ELEMENTS logits.

    Returns:
        A `BlockResult` of sums over the block (no normalisation).
    """
    rows, dim = image_features.shape
    cols = text_features.shape[0]
    chunk = auto_chunk(rows, cols) if chunk is None else max(1, min(int(chunk), rows))
    dtype, device = image_features.dtype, image_features.device
    use_ids = image_ids is not None and text_ids is not None

    grad_image = torch.empty(rows, dim, dtype=dtype, device=device)
    grad_text = torch.zeros(cols, dim, dtype=dtype, device=device)
    loss = torch.zeros((), dtype=dtype, device=device)
    grad_scale = torch.zeros((), dtype=dtype, device=device)
    grad_bias = torch.zeros((), dtype=dtype, device=device)
    bias = torch.tensor(logit_bias, dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    text_t = text_features.t()

    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        images = image_features[start:stop]                       # (c, d)
        logits = torch.addmm(bias, images, text_t, alpha=logit_scale)  # (c, m): t * <x_i, y_j> + b

        # Flip the sign of the positives' logits so every entry reads as a negative: the loss of a pair with label
        # l is softplus(-l * logit), its derivative -l * sigmoid(-l * logit).
        if use_ids:
            positive = image_ids[start:stop, None] == text_ids[None, :]
            logits = torch.where(positive, -logits, logits)
        elif diagonal_offset is not None:
            diag = _diagonal_view(logits, start + diagonal_offset, cols)
            if diag is not None:
                diag.neg_()

        loss += torch.logaddexp(logits, zero).sum()               # softplus, exact for any logit
        grad = logits.sigmoid_()                                  # d/dz softplus(z) = sigmoid(z), in place
        if use_ids:
            grad = torch.where(positive, -grad, grad)
        elif diagonal_offset is not None:
            diag = _diagonal_view(grad, start + diagonal_offset, cols)
            if diag is not None:
                diag.neg_()

        grad_bias += grad.sum()
        grad_rows = grad @ text_features                          # (c, d): sum_j g_ij y_j
        # d loss / d t = sum_ij g_ij <x_i, y_j> = sum_i <x_i, sum_j g_ij y_j>: no second pass over the tile.
        grad_scale += (grad_rows * images).sum()
        grad_image[start:stop] = grad_rows.mul_(logit_scale)
        grad_text.addmm_(grad.t(), images, alpha=logit_scale)    # (m, d) += t * g^T x
    return BlockResult(loss, grad_image, grad_text, grad_scale, grad_bias)


def _diagonal_view(tile: torch.Tensor, first_col: int, cols: int) -> torch.Tensor | None:
    """A view of the entries (r, first_col + r) of a (c, cols) tile that fall inside it, or None."""
    rows = tile.shape[0]
    row0 = max(0, -first_col)
    row1 = min(rows, cols - first_col)
    if row1 <= row0:
        return None
    return tile[row0:row1].diagonal(offset=first_col + row0)


class TiledSigmoidLoss(torch.autograd.Function):
    """Single-device sigmoid loss whose gradients are formed in the forward pass."""

    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, logit_bias, positive_ids, chunk):  # noqa: D401
        n = image_features.shape[0]
        acc = accumulation_dtype(image_features.dtype)
        ids = positive_ids
        result = sigmoid_block(
            image_features.to(acc),
            text_features.to(acc),
            float(logit_scale.detach().reshape(())),
            float(logit_bias.detach().reshape(())),
            diagonal_offset=None if ids is not None else 0,
            image_ids=ids,
            text_ids=ids,
            chunk=chunk,
        )
        # Algorithm 1 divides the sum over all pairs by the number of images.
        ctx.save_for_backward(
            (result.grad_image / n).to(image_features.dtype),
            (result.grad_text / n).to(text_features.dtype),
            (result.grad_scale / n).to(logit_scale.dtype).reshape(logit_scale.shape),
            (result.grad_bias / n).to(logit_bias.dtype).reshape(logit_bias.shape),
        )
        # The value stays in the accumulation dtype: a bf16 loss would round away what fp32 accumulation kept.
        return result.loss / n

    @staticmethod
    def backward(ctx, grad_output):
        grad_image, grad_text, grad_scale, grad_bias = ctx.saved_tensors
        return (
            grad_image * grad_output.to(grad_image.dtype),
            grad_text * grad_output.to(grad_text.dtype),
            grad_scale * grad_output.to(grad_scale.dtype),
            grad_bias * grad_output.to(grad_bias.dtype),
            None,
            None,
        )
