"""The pairwise sigmoid loss of SigLIP (Zhai et al., 2023, Algorithm 1), computed in tiles.

The B x B logit matrix never exists: each tile of rows x columns is formed, reduced to its loss and its gradients,
and dropped. Because the loss is a scalar, its gradients can be formed in the forward pass and merely scaled by the
incoming gradient in backward. Per tile that is three matrix products: the similarities, the image gradient and the
text gradient; between them, the element-wise work (logit, softplus, sigmoid, the positives' sign) happens in place
on one tile buffer, by the pure-PyTorch `torch_tile` or a fused kernel of `siglip.kernels`.

`sigmoid_block` is the kernel: one block of images against one block of texts, returning sums (not means),
so that the single-device loss and every block of the ring (``siglip.ring``) share it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from siglip import kernels

# Tiles are two-dimensional so that a tile stays in the last-level cache between its product and its element-wise
# pass, and the text-gradient product g^T x has an inner dimension (the tile's rows) deep enough for the BLAS to run
# near its peak. The PyTorch tile makes several tile-sized temporaries, so its tiles are 1024 x 1024 (4 MB in
# float32); the fused kernel works in place and takes 2048 x 2048 (16 MB): each tile is four parallel regions (three
# products and the kernel), and fewer, larger tiles lose less at each region's barrier when the cores are shared.
# The measurements behind both choices are in docs/benchmarks.md ("Tile shape").
TILE_ROWS = 1024
TILE_COLS = 1024
FUSED_TILE_ROWS = 2048
FUSED_TILE_COLS = 2048


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


def auto_chunk(rows: int, cols: int, backend: str = "torch") -> int:
    """Image rows per tile when the caller does not choose (the column count does not change it)."""
    return max(1, min(rows, FUSED_TILE_ROWS if backend == "cpu_fused" else TILE_ROWS))


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
    column_chunk: int | None = None,
    backend: str = "auto",
) -> BlockResult:
    """Loss and gradients of one block of the pairwise sigmoid loss, tile by tile.

    Args:
        image_features: (c, d), float32/float64/bfloat16/float16. The CPU backends widen 16-bit inputs to float32
            (see `accumulation_dtype`); the Triton backend reads them as they are and accumulates in float32.
        text_features: (m, d), same dtype and device.
        logit_scale: t, the temperature itself (not its log).
        logit_bias: b.
        diagonal_offset: positives sit at (i, i + offset); None means this block holds no diagonal.
            Ignored when ids are given.
        image_ids, text_ids: (c,) and (m,) integer ids; a pair is positive where they are equal.
        chunk: image rows per tile; None picks TILE_ROWS (FUSED_TILE_ROWS for the fused kernel).
        column_chunk: text columns per tile; None picks TILE_COLS (FUSED_TILE_COLS for the fused kernel).
        backend: "auto", "torch", "cpu_fused" or "triton" (see `siglip.kernels`).

    Returns:
        A `BlockResult` of sums over the block (no normalisation), in the accumulation dtype.
    """
    rows, dim = image_features.shape
    cols = text_features.shape[0]
    use_ids = image_ids is not None and text_ids is not None
    name = kernels.resolve(backend, image_features.device, image_features.dtype, rows, cols)
    if name == "triton":
        from siglip.kernels import triton as triton_kernels

        return triton_kernels.sigmoid_block(
            image_features, text_features, logit_scale, logit_bias,
            diagonal_offset=None if use_ids else diagonal_offset,
            image_ids=image_ids if use_ids else None, text_ids=text_ids if use_ids else None,
        )

    acc = accumulation_dtype(image_features.dtype)
    images = image_features.to(acc).contiguous()
    texts = text_features.to(acc).contiguous()
    chunk = auto_chunk(rows, cols, name) if chunk is None else max(1, min(int(chunk), rows))
    if column_chunk is None:
        column_chunk = FUSED_TILE_COLS if name == "cpu_fused" else TILE_COLS
    column_chunk = min(max(1, int(column_chunk)), cols)
    if name == "cpu_fused":
        from siglip.kernels import cpu_fused

        tile = cpu_fused.sigmoid_tile
        if use_ids:
            # The kernel compares int32 ids: renumber both sides through one table so equal ids stay equal.
            _, compact = torch.unique(torch.cat([image_ids.reshape(-1), text_ids.reshape(-1)]), return_inverse=True)
            compact = compact.to(torch.int32)
            image_ids, text_ids = compact[:rows], compact[rows:]
    else:
        tile = torch_tile

    grad_image = torch.empty(rows, dim, dtype=acc, device=images.device)
    grad_text = torch.zeros(cols, dim, dtype=acc, device=images.device)
    buffer = torch.empty(chunk * column_chunk, dtype=acc, device=images.device)
    loss = grad_bias = grad_scale = 0.0           # Python floats or 0-d tensors, depending on the tile function
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        tile_images = images[start:stop]                          # (r, d)
        image_grad = grad_image[start:stop].zero_()               # (r, d): sum_j g_ij y_j over all column tiles
        for col_start in range(0, cols, column_chunk):
            col_stop = min(col_start + column_chunk, cols)
            tile_texts = texts[col_start:col_stop]                # (k, d)
            scores = torch.mm(tile_images, tile_texts.t(), out=buffer[: (stop - start) * (col_stop - col_start)]
                              .view(stop - start, col_stop - col_start))   # (r, k): <x_i, y_j>
            tile_loss, tile_grad_sum = tile(
                scores, logit_scale, logit_bias,
                first_diagonal_column=None if use_ids or diagonal_offset is None
                else start + diagonal_offset - col_start,
                row_ids=image_ids[start:stop] if use_ids else None,
                column_ids=text_ids[col_start:col_stop] if use_ids else None,
            )                                                     # scores now holds g_ij = d loss / d logit_ij
            loss = loss + tile_loss
            grad_bias = grad_bias + tile_grad_sum
            image_grad.addmm_(scores, tile_texts)                 # (r, d) += g y
            grad_text[col_start:col_stop].addmm_(scores.t(), tile_images, alpha=logit_scale)  # (k, d) += t g^T x
        # d loss / d t = sum_ij g_ij <x_i, y_j> = sum_i <x_i, sum_j g_ij y_j>: no second pass over any tile.
        grad_scale = grad_scale + torch.dot(image_grad.reshape(-1), tile_images.reshape(-1))
        image_grad.mul_(logit_scale)
    as_tensor = lambda value: torch.as_tensor(value, dtype=acc, device=images.device)  # noqa: E731
    return BlockResult(as_tensor(loss), grad_image, grad_text, as_tensor(grad_scale), as_tensor(grad_bias))


def torch_tile(
    scores: torch.Tensor,
    logit_scale: float,
    logit_bias: float,
    *,
    first_diagonal_column: int | None = None,
    row_ids: torch.Tensor | None = None,
    column_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The element-wise part of one tile in eager PyTorch, in place: the reference for the fused kernels.

    Args:
        scores: (r, k) similarities <x_i, y_j>, overwritten with g_ij = d loss / d logit_ij.
        logit_scale, logit_bias: t and b.
        first_diagonal_column: row i's positive is column i + first_diagonal_column, where inside the tile.
        row_ids, column_ids: (r,) and (k,) ids; a pair is positive where they are equal (takes precedence).

    Returns:
        (sum_ij loss_ij, sum_ij g_ij) as 0-d tensors of the scores' dtype.
    """
    logits = scores.mul_(logit_scale).add_(logit_bias)           # t <x_i, y_j> + b
    # Flip the sign of the positives' logits so every entry reads as a negative: the loss of a pair with label
    # l is softplus(-l * logit), its derivative -l * sigmoid(-l * logit).
    positive = None
    diagonal = None
    if row_ids is not None:
        positive = row_ids[:, None] == column_ids[None, :]
        torch.where(positive, -logits, logits, out=logits)
    elif first_diagonal_column is not None:
        diagonal = _diagonal_view(logits, first_diagonal_column)
        if diagonal is not None:
            diagonal.neg_()
    loss = torch.logaddexp(logits, logits.new_zeros(())).sum()    # softplus, exact for any logit
    grad = logits.sigmoid_()                                        # d/dz softplus(z) = sigmoid(z), in place
    if positive is not None:
        torch.where(positive, -grad, grad, out=grad)
    elif diagonal is not None:
        diagonal.neg_()
    return loss, grad.sum()


def _diagonal_view(tile: torch.Tensor, first_col: int) -> torch.Tensor | None:
    """A view of the entries (r, first_col + r) of a (c, cols) tile that fall inside it, or None."""
    rows, cols = tile.shape
    row0 = max(0, -first_col)
    row1 = min(rows, cols - first_col)
    if row1 <= row0:
        return None
    return tile[row0:row1].diagonal(offset=first_col + row0)


class TiledSigmoidLoss(torch.autograd.Function):
    """Single-device sigmoid loss whose gradients are formed in the forward pass."""

    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, logit_bias, positive_ids, chunk, backend="auto"):
        n = image_features.shape[0]
        ids = positive_ids
        result = sigmoid_block(
            image_features,
            text_features,
            float(logit_scale.detach().reshape(())),
            float(logit_bias.detach().reshape(())),
            diagonal_offset=None if ids is not None else 0,
            image_ids=ids,
            text_ids=ids,
            chunk=chunk,
            backend=backend,
        )
        # Algorithm 1 divides the sum over all pairs by the number of images. In place where no cast is needed:
        # at n = 16384, d = 256 a copy of both gradients would be 32 MB on top of the loss's own working set.
        ctx.save_for_backward(
            _scaled(result.grad_image, 1.0 / n, image_features.dtype),
            _scaled(result.grad_text, 1.0 / n, text_features.dtype),
            (result.grad_scale / n).to(logit_scale.dtype).reshape(logit_scale.shape),
            (result.grad_bias / n).to(logit_bias.dtype).reshape(logit_bias.shape),
        )
        # The value stays in the accumulation dtype: a bf16 loss would round away what fp32 accumulation kept.
        return result.loss / n

    @staticmethod
    def backward(ctx, grad_output):
        grad_image, grad_text, grad_scale, grad_bias = ctx.saved_tensors
        if grad_output.device.type == "cpu" and grad_output.item() == 1.0:
            # loss.backward() on the loss itself: hand the saved gradients over as they are. Autograd releases its
            # saved copies before accumulating, so it adopts these tensors instead of copying them (2 n d values
            # fewer at the peak); where it cannot (retain_graph=True, or .grad already set) it copies or adds.
            return grad_image, grad_text, grad_scale, grad_bias, None, None, None
        return (
            grad_image * grad_output.to(grad_image.dtype),
            grad_text * grad_output.to(grad_text.dtype),
            grad_scale * grad_output.to(grad_scale.dtype),
            grad_bias * grad_output.to(grad_bias.dtype),
            None,
            None,
            None,
        )


def _scaled(value: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """value * factor as `dtype`, reusing value's memory when the dtype does not change."""
    return value.mul_(factor) if value.dtype == dtype else (value * factor).to(dtype)
