"""The one interface every sigmoid-loss kernel implements: a block of the loss in, its sums and gradients out.

A block is `c` images against `m` texts with the positives' positions. The single-device loss (`siglip.tiled`) runs
one block, the whole batch against itself; each hop of the ring (`siglip.ring`) runs one, its images against a
visiting text block. A kernel returns sums (not means), formed in one pass: the loss is a scalar, so its gradients
can be formed in the forward pass and only scaled in backward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class Block:
    """One block of the pairwise sigmoid loss."""

    image_features: torch.Tensor
    """(c, d) float32, float64, bfloat16 or float16."""
    text_features: torch.Tensor
    """(m, d), same dtype and device."""
    logit_scale: float | torch.Tensor
    """t, the temperature itself (not its log): a float, or a 0-d tensor on the features' device, which the kernels
    read on the device (no host-device synchronisation; on the CPU reading it costs nothing)."""
    logit_bias: float | torch.Tensor
    """b, as a float or a 0-d tensor like `logit_scale`."""
    diagonal_offset: int | None = None
    """Positives sit at (i, i + offset); None: the block holds no diagonal. Ignored when ids are given."""
    image_ids: torch.Tensor | None = None
    """(c,) integer ids; with `text_ids`, a pair is positive where the two ids are equal."""
    text_ids: torch.Tensor | None = None
    """(m,) integer ids."""

    @property
    def uses_ids(self) -> bool:
        return self.image_ids is not None and self.text_ids is not None


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


class BlockKernel(Protocol):
    """`sigmoid_block` of each backend module (`eager`, `cpu_fused`, `triton`).

    chunk, column_chunk: image rows and text columns per tile; None lets the kernel choose. The tile loops of the CPU
    kernels honour them; the Triton kernel tiles by its own block sizes and ignores them.
    """

    def __call__(self, block: Block, *, chunk: int | None = None, column_chunk: int | None = None) -> BlockResult: ...


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, bfloat16 and float16 all accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
