"""The image tower's unpooled patch tokens, with some patches replaced by a mask token before the encoder.

The decoder (siglip.siglip2.decoder) cross-attends to the tower's last hidden state, the (n, P, D) patch tokens
after the final layer norm, and masked prediction (siglip.siglip2.distill) replaces half of the student's embedded
patches with a learned mask token (TIPS, Maninis et al., 2024, as SigLIP 2 uses it in sec. 2.3). transformers'
vision model has no mask input, so the mask enters through a forward hook on the patch embedding: the token
replaces the patch's projection before its position embedding is added, as in iBOT and BEiT, and the rest of the
forward is transformers' own.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def image_tokens(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    *,
    patch_mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
    interpolate_pos_encoding: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, H, W) pixels -> ((n, P, D) patch tokens, (n, D) pooled embedding, not normalised).

    Args:
        vision_model: a SigLIP vision tower (`SiglipModel.vision_model`, or a `SiglipVisionModel`).
        patch_mask: (n, P) bool, True where a patch is replaced by `mask_token` ((D,) float), P = (H / p) * (W / p)
            in row-major order.
        interpolate_pos_encoding: resize the position embeddings to an image of another size (local crops).
    """
    if (patch_mask is None) != (mask_token is None):
        raise ValueError("patch_mask and mask_token go together: give both or neither")
    hook = contextlib.nullcontext()
    if patch_mask is not None:
        hook = _masked_patches(vision_model.embeddings.patch_embedding, patch_mask, mask_token)
    with hook:
        output = vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    return output.last_hidden_state, output.pooler_output


@contextlib.contextmanager
def _masked_patches(patch_embedding: nn.Module, patch_mask: torch.Tensor, mask_token: torch.Tensor):
    def replace(module: nn.Module, inputs: tuple, projected: torch.Tensor) -> torch.Tensor:
        n, width, rows, cols = projected.shape                   # (n, D, H / p, W / p) before flattening
        if patch_mask.shape != (n, rows * cols):
            raise ValueError(f"patch_mask must be ({n}, {rows * cols}) for these images, got {tuple(patch_mask.shape)}")
        where = patch_mask.reshape(n, 1, rows, cols)
        return torch.where(where, mask_token.to(projected.dtype).reshape(1, width, 1, 1), projected)

    handle = patch_embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()
