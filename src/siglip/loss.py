"""The contrastive losses: SigLIP's pairwise sigmoid loss and CLIP's softmax loss.

This is the public face of the losses: it checks the input and dispatches. The sigmoid loss runs through the tiled
kernel in `siglip.tiled` on one process and through the ring in `siglip.ring` across a process group; the softmax
loss (`siglip.softmax`) is the plain full-matrix CLIP loss, all-gathered across a group.

Normalisation, for both losses: each process returns its own share of the global objective divided by its
local batch `n`, so the mean over ranks is the global loss and the gradient reaching a rank's own features
is world_size times the global gradient (DistributedDataParallel's mean then gives the exact global gradient).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from siglip import ring as ring_module
from siglip.collectives import join_agreement_after_invalid_input
from siglip.kernels import BACKENDS
from siglip.softmax import gathered_softmax_loss, local_softmax_loss
from siglip.tiled import TiledSigmoidLoss

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    group: torch.distributed.ProcessGroup | None = None,
    *,
    positive_ids: torch.Tensor | None = None,
    chunk: int | None = None,
    ring: str = "auto",
    backend: str = "auto",
) -> torch.Tensor:
    """SigLIP's loss: -(1/n) sum_ij log sigmoid(z_ij (t <x_i, y_j> + b)), never building the n x n matrix.

    Args:
        image_features: (n, d) L2-normalised image embeddings, float32/float64/bfloat16/float16.
        text_features: (n, d) L2-normalised text embeddings; row i matches image i.
        logit_scale: t, the temperature itself (already exponentiated), a 0-d or 1-element tensor.
        logit_bias: b, a 0-d or 1-element tensor.
        group: a torch.distributed process group; None (or world size 1) computes locally. With D > 1 ranks
            each passes its own n rows and the text features travel around a ring.
        positive_ids: optional (n,) integer ids; image i and text j are positive when their ids are equal.
            None means the identity labels (z_ii = +1, z_ij = -1 otherwise).
        chunk: image rows per tile; None picks one automatically.
        ring: which ring implementation runs under a group ("auto" picks the fastest measured).
        backend: the kernel of each block (on one process, and of each rank's blocks under a group): "torch",
            "cpu_fused" (CPU, float32 arithmetic), "triton" (CUDA) or "auto", the fastest for the features' device
            and dtype (see `siglip.kernels`).

    On CUDA nothing here reads a tensor's value back to the host: t and b reach the kernel as 0-d device tensors,
    and the finiteness of t and b is checked on the CPU only (a check on the device would wait for it on every
    call); a non-finite t or b on CUDA gives a non-finite loss and gradients instead of a ValueError. Under a group
    the ranks' agreement (one all-gather of a few integers, read on the host) is a synchronisation by design.

    Returns:
        0-d tensor: this rank's share of the loss divided by n (float32 for 16-bit inputs; float64 stays float64).
    """
    world = _world_size(group)
    with _invalid_input_stops_every_rank("sigmoid_loss", group, world, image_features):
        _check_features(image_features, text_features)
        _check_scalar("logit_scale", logit_scale, image_features.device)
        _check_scalar("logit_bias", logit_bias, image_features.device)
        _check_ids(positive_ids, image_features)
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be a positive integer or None, got {chunk!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if world > 1:
        return ring_module.ring_sigmoid_loss(
            image_features, text_features, logit_scale, logit_bias, group,
            positive_ids=positive_ids, chunk=chunk, implementation=ring, backend=backend,
        )
    return TiledSigmoidLoss.apply(image_features, text_features, logit_scale, logit_bias, positive_ids, chunk, backend)


def softmax_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    group: torch.distributed.ProcessGroup | None = None,
    *,
    positive_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """CLIP's loss: (CE(t X Y^T, I) + CE(t Y X^T, I)) / 2, mean over rows.

    Args:
        image_features, text_features: (n, d) L2-normalised embeddings, row i of each a matching pair.
        logit_scale: t, the temperature itself, a 0-d or 1-element tensor.
        group: a process group; with D > 1 ranks the other ranks' features are all-gathered (with gradients) and
            each rank's rows are scored against the global batch.
        positive_ids: optional (n,) integer ids; the target of each row is spread uniformly over its positives.

    Returns:
        0-d tensor: this rank's share of the loss divided by n (float32 for 16-bit inputs).

    As for `sigmoid_loss`, the finiteness of t is checked on the CPU only: on a GPU the check would make the host
    wait for the device on every call, and a non-finite t gives a non-finite loss instead.
    """
    world = _world_size(group)
    with _invalid_input_stops_every_rank("softmax_loss", group, world, image_features):
        _check_features(image_features, text_features)
        _check_scalar("logit_scale", logit_scale, image_features.device)
        _check_ids(positive_ids, image_features)
    if world > 1:
        return gathered_softmax_loss(image_features, text_features, logit_scale, group, positive_ids=positive_ids)
    return local_softmax_loss(image_features, text_features, logit_scale, positive_ids, positive_ids)


class SigmoidLoss(nn.Module):
    """The sigmoid loss with its learned temperature t = exp(t') and bias b.

    Starts at t' = log(10) and b = -10, the paper's initialisation: the bias keeps the first steps near the prior
    that almost every pair is a negative. `chunk` and `backend` are passed to `sigmoid_loss` as they are.
    """

    def __init__(self, init_logit_scale: float = 10.0, init_logit_bias: float = -10.0, chunk: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.backend = backend
        if not (init_logit_scale > 0 and math.isfinite(init_logit_scale)):
            raise ValueError(f"init_logit_scale must be a finite positive number, got {init_logit_scale!r}")
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)))
        self.chunk = chunk

    @property
    def logit_scale(self) -> torch.Tensor:
        """t = exp(t'), a 0-d tensor that carries gradients to t'."""
        return self.log_logit_scale.exp()

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        group: torch.distributed.ProcessGroup | None = None,
        *,
        positive_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return sigmoid_loss(
            image_features, text_features, self.logit_scale, self.logit_bias, group,
            positive_ids=positive_ids, chunk=self.chunk, backend=self.backend,
        )


@contextlib.contextmanager
def _invalid_input_stops_every_rank(what: str, group, world: int, image_features) -> Iterator[None]:
    """Under a group, a ValueError on one rank must reach its peers, who would otherwise wait in the ring forever."""
    try:
        yield
    except ValueError as error:
        if world > 1:
            device = image_features.device if isinstance(image_features, torch.Tensor) else _group_device(group)
            join_agreement_after_invalid_input(what, group, device, error)
        raise


def _group_device(group) -> torch.device:
    backend = torch.distributed.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _world_size(group: torch.distributed.ProcessGroup | None) -> int:
    if group is None:
        return 1
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialised; call init_process_group first")
    return torch.distributed.get_world_size(group)


def _check_features(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    for name, value in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [n, d], got {type(value).__name__}")
        if value.dim() != 2:
            raise ValueError(f"{name} must have shape [n, d], got shape {tuple(value.shape)}")
        if value.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float64, bfloat16 or float16, got {value.dtype}")
        if value.shape[0] == 0 or value.shape[1] == 0:
            raise ValueError(f"{name} must hold at least one row of at least one feature, got {tuple(value.shape)}")
    if image_features.shape != text_features.shape:
        raise ValueError(
            f"image_features and text_features must have the same shape [n, d], got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )
    if image_features.dtype != text_features.dtype:
        raise ValueError(
            f"image_features and text_features must share a dtype, got {image_features.dtype} and {text_features.dtype}"
        )
    if image_features.device != text_features.device:
        raise ValueError(
            f"image_features and text_features must be on one device, got {image_features.device} "
            f"and {text_features.device}"
        )


def _check_scalar(name: str, value: torch.Tensor, device: torch.device) -> None:
    """Shape, dtype and device of t or b; its finiteness where reading it is free (the CPU), never on a GPU, where
    the read would make the host wait for the device on every call."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a 0-d or 1-element tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(f"{name} must be a 0-d or 1-element tensor, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} must be on the features' device {device}, got {value.device}")
    if value.device.type == "cpu" and not math.isfinite(float(value.detach().reshape(()))):
        raise ValueError(f"{name} must be finite, got {float(value.detach().reshape(()))}")


def _check_ids(positive_ids: torch.Tensor | None, image_features: torch.Tensor) -> None:
    if positive_ids is None:
        return
    n = image_features.shape[0]
    if not isinstance(positive_ids, torch.Tensor) or positive_ids.dtype.is_floating_point or positive_ids.is_complex():
        seen = getattr(positive_ids, "dtype", type(positive_ids))
        raise ValueError(f"positive_ids must be an integer tensor of shape [{n}], got {seen}")
    if positive_ids.shape != (n,):
        raise ValueError(f"positive_ids must have shape [{n}] (one id per pair), got {tuple(positive_ids.shape)}")
    if positive_ids.device != image_features.device:
        raise ValueError(
            f"positive_ids must be on the features' device {image_features.device}, got {positive_ids.device}"
        )
