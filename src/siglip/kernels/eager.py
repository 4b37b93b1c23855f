"""The eager PyTorch kernel of the sigmoid loss: any device, any float dtype, always available.

The reference every other backend is tested against. Its tile makes several tile-sized temporaries, so its tiles
are 1024 x 1024 (4 MB in float32), small enough to stay in the last-level cache between a tile's product and its
element-wise pass; the measurements behind the choice are in docs/benchmarks.md ("Tile shape").
"""

from __future__ import annotations

import torch

from siglip.kernels.block import Block, BlockResult
from siglip.kernels.tile_loop import run_tiles

TILE_ROWS = 1024
TILE_COLS = 1024


def sigmoid_block(block: Block, *, chunk: int | None = None, column_chunk: int | None = None) -> BlockResult:
    """Loss and gradients of one block (see `siglip.kernels.block.BlockKernel`), tile by tile in eager PyTorch."""
    return run_tiles(block, torch_tile, chunk=chunk or TILE_ROWS, column_chunk=column_chunk or TILE_COLS)


def torch_tile(
    scores: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
    *,
    first_diagonal_column: int | None = None,
    row_ids: torch.Tensor | None = None,
    column_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The element-wise part of one tile (a `siglip.kernels.tile_loop.TileFunction`) in eager PyTorch, in place:
    the reference for the fused kernels. Returns 0-d tensors of the scores' dtype."""
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
