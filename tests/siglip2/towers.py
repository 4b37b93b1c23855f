"""A tiny SigLIP image tower for the SigLIP 2 tests: seconds on two shared cores."""

from __future__ import annotations

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel


def tiny_vision_model(*, image_size: int = 32, patch_size: int = 8, width: int = 32,
                      dtype: torch.dtype = torch.float64) -> SiglipVisionModel:
    """A randomly initialised SigLIP vision tower (2 layers, 2 heads), in eval mode, in `dtype`."""
    config = SiglipVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                num_attention_heads=2, image_size=image_size, patch_size=patch_size)
    return SiglipVisionModel(config).to(dtype).eval()
