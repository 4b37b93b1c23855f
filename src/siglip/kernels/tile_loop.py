"""The tile loop the two CPU kernels share: a block cut into tiles of rows x columns, each reduced and dropped.

Per tile that is three matrix products (the similarities, the image gradient and the text gradient) and, between
them, the element-wise work (logit, softplus, sigmoid, the positives' sign) done in place on one tile buffer by a
`TileFunction`: the pure-PyTorch one of `siglip.kernels.eager` or the fused C one of `siglip.kernels.cpu_fused`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from siglip.kernels.block import Block, BlockResult, accumulation_dtype


class TileFunction(Protocol):
    """The element-wise part of one tile, in place.

    scores: (r, k) similarities <x_i, y_j>, overwritten with g_ij = d loss / d logit_ij.
    logit_scale, logit_bias: t and b: Python floats on the CPU, 0-d tensors of the scores' dtype and device elsewhere.
    first_diagonal_column: row i's positive is column i + first_diagonal_column, where inside the tile; None (and
        no ids): every pair is a negative.
    row_ids, column_ids: (r,) and (k,) ids; a pair is positive where they are equal (takes precedence).
    Returns (sum_ij loss_ij, sum_ij g_ij), as floats or 0-d tensors.
    """

    def __call__(self, scores: torch.Tensor, logit_scale: float | torch.Tensor, logit_bias: float | torch.Tensor, *,
                 first_diagonal_column: int | None = None, row_ids: torch.Tensor | None = None,
                 column_ids: torch.Tensor | None = None) -> tuple[torch.Tensor | float, torch.Tensor | float]: ...


def run_tiles(block: Block, tile: TileFunction, *, chunk: int, column_chunk: int) -> BlockResult:
    """Loss and gradients of `block`, `chunk` image rows by `column_chunk` text columns at a time.

    The features are widened to the accumulation dtype (16-bit inputs compute in float32). Returns sums.
    """
    rows, dim = block.image_features.shape
    cols = block.text_features.shape[0]
    acc = accumulation_dtype(block.image_features.dtype)
    images = block.image_features.to(acc).contiguous()
    texts = block.text_features.to(acc).contiguous()
    chunk = max(1, min(int(chunk), rows))
    column_chunk = min(max(1, int(column_chunk)), cols)
    scale, bias = scalar_operands(block, acc)
    use_ids = block.uses_ids

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
                scores, scale, bias,
                first_diagonal_column=None if use_ids or block.diagonal_offset is None
                else start + block.diagonal_offset - col_start,
                row_ids=block.image_ids[start:stop] if use_ids else None,
                column_ids=block.text_ids[col_start:col_stop] if use_ids else None,
            )                                                     # scores now holds g_ij = d loss / d logit_ij
            loss = loss + tile_loss
            grad_bias = grad_bias + tile_grad_sum
            image_grad.addmm_(scores, tile_texts)                 # (r, d) += g y
            grad_text[col_start:col_stop].addmm_(scores.t(), tile_images)      # (k, d) += g^T x
        # d loss / d t = sum_ij g_ij <x_i, y_j> = sum_i <x_i, sum_j g_ij y_j>: no second pass over any tile.
        grad_scale = grad_scale + torch.dot(image_grad.reshape(-1), tile_images.reshape(-1))
        image_grad.mul_(scale)
    grad_text.mul_(scale)                         # d logit / d y = t x: t applied once, to the whole sum
    as_tensor = lambda value: torch.as_tensor(value, dtype=acc, device=images.device)  # noqa: E731
    return BlockResult(as_tensor(loss), grad_image, grad_text, as_tensor(grad_scale), as_tensor(grad_bias))


def scalar_operands(block: Block, acc: torch.dtype) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """t and b as the tile loop uses them: Python floats on the CPU, where reading a tensor costs nothing (the fused
    C tile takes floats); elsewhere 0-d tensors of the accumulation dtype on the features' device, so that no value
    is read back to the host (no host-device synchronisation)."""
    device = block.image_features.device
    if device.type == "cpu":
        return float(block.logit_scale), float(block.logit_bias)
    return tuple(torch.as_tensor(value, device=device).detach().reshape(()).to(acc)
                 for value in (block.logit_scale, block.logit_bias))
