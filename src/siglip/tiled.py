"""The pairwise sigmoid loss of SigLIP (Zhai et al., 2023, Algorithm 1) on one device, computed in tiles.

The B x B logit matrix never exists: the kernel (`siglip.kernels`) forms each tile of rows x columns, reduces it to
its loss and its gradients, and drops it. Because the loss is a scalar, its gradients are formed in the forward pass
and merely scaled by the incoming gradient in backward (`TiledSigmoidLoss`).

`sigmoid_block` is the entry to the kernels: one block of images against one block of texts, returning sums (not
means), so that the single-device loss and every block of the ring (`siglip.ring`) share it.
"""

from __future__ import annotations

import torch

from siglip import kernels
from siglip.kernels.block import Block, BlockResult


def sigmoid_block(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor,
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
            (`siglip.kernels.block.accumulation_dtype`); the Triton backend reads them as they are and accumulates
            in float32.
        text_features: (m, d), same dtype and device.
        logit_scale: t, the temperature itself (not its log): a float or a 0-d tensor on the features' device. A
            tensor is read on the device, so a CUDA call never waits for the device (`siglip.kernels.block.Block`).
        logit_bias: b, a float or a 0-d tensor.
        diagonal_offset: positives sit at (i, i + offset); None means this block holds no diagonal.
            Ignored when ids are given.
        image_ids, text_ids: (c,) and (m,) integer ids; a pair is positive where they are equal.
        chunk: image rows per tile; None lets the kernel choose (its TILE_ROWS).
        column_chunk: text columns per tile; None lets the kernel choose (its TILE_COLS).
        backend: "auto", "torch", "cpu_fused" or "triton" (see `siglip.kernels`).

    Returns:
        A `BlockResult` of sums over the block (no normalisation), in the accumulation dtype.
    """
    rows, cols = image_features.shape[0], text_features.shape[0]
    name = kernels.resolve(backend, image_features.device, image_features.dtype, rows, cols)
    use_ids = image_ids is not None and text_ids is not None
    block = Block(image_features, text_features, logit_scale, logit_bias,
                  diagonal_offset=None if use_ids else diagonal_offset,
                  image_ids=image_ids if use_ids else None, text_ids=text_ids if use_ids else None)
    return kernels.kernel(name)(block, chunk=chunk, column_chunk=column_chunk)


class TiledSigmoidLoss(torch.autograd.Function):
    """Single-device sigmoid loss whose gradients are formed in the forward pass."""

    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, logit_bias, positive_ids, chunk, backend="auto"):
        n = image_features.shape[0]
        ids = positive_ids
        result = sigmoid_block(
            image_features,
            text_features,
            logit_scale.detach().reshape(()),          # tensors, not floats: float() would sync a CUDA device
            logit_bias.detach().reshape(()),
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
