"""Self-distillation and masked prediction, the last stage of SigLIP 2 (Tschannen et al., 2025, sec. 2.3).

For the last fraction of training (20% in the paper) the image tower also learns from an EMA teacher, a moving
average of itself:

- local-to-global consistency (SILC, Naeem et al., 2024): the student sees local crops and matches the teacher's
  embedding of the whole image;
- masked prediction (TIPS, Maninis et al., 2024): the student sees the whole image with 50% of its patches replaced
  by a mask token and, at the masked patches, matches the teacher's patch features there.

Both are DINO's loss (Caron et al., 2021) in a space of K prototypes computed by projection heads: the teacher's
head output, centred and sharpened, is a target distribution, and the student's is scored against it,

    p_t = softmax((g_t(x) - c) / tau_t),    loss = -sum_k p_t[k] log softmax(g_s(x') / tau_s)[k],

once for the pooled embedding (x' a local crop) and once per masked patch (x' the masked image). The paper weighs
the two terms 1 and 0.25, and both again by 0.25 at B size (0.5 L, 1.0 So400m, 0.5 g); it uses "a single global
(teacher) view and 8 local (student) views"; at switch-on (80% of training) the teacher is the student's copy and
"the remaining additional parameters (heads, mask token and corresponding optimizer parameters)" start fresh (sec.
2.3, checked against the paper's text). For the rest the paper defers to SILC ("otherwise follow the augmentations,
loss and hyper parameters from [45]"); the temperatures and centring below are DINO's, on which SILC builds, and
not figures the SigLIP 2 paper states.

Exact under micro-batching and the ring: the teacher needs no gradients, so its targets are computed once per
batch (`teacher_logits`, under no_grad, a micro-batch at a time) and held as constants; each sample's loss depends
on its own targets only, so student micro-batches, each summed and divided by the whole batch's n
(`reduction="sum"`), add up to the whole batch's mean; DDP's gradient average over ranks of equal n then gives
the global batch's. The centres move once per step, from the whole global batch (`updated_center` all-reduces).
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from siglip.errors import UserError
from siglip.siglip2.vision import image_tokens

STUDENT_TEMPERATURE = 0.1
TEACHER_TEMPERATURE = 0.04
CENTER_MOMENTUM = 0.9
"""DINO's tau_s, tau_t and centre momentum, which SILC follows."""


def switch_on_step(total_steps: int, fraction: float) -> int:
    """The first step (counting from 0) of self-distillation and masked prediction: ceil(fraction * total_steps).

    `--siglip2-from 0.8` over 10 steps switches on at step 8: steps 8 and 9, the last 20%. The product is taken
    as the decimal the user wrote (0.7 * 10 is 7, not 7.000000000000001), so no float rounding moves the step.
    fraction 1 never switches on; 0 is on from the start.
    """
    if not (isinstance(fraction, (int, float)) and 0.0 <= fraction <= 1.0):
        raise UserError(f"--siglip2-from must be a fraction of training in [0, 1] (0.8: the last 20%), got {fraction}")
    if total_steps < 0:
        raise ValueError(f"total_steps must be >= 0, got {total_steps}")
    return math.ceil(Fraction(repr(float(fraction))) * total_steps)


def distillation_active(step: int, total_steps: int, fraction: float) -> bool:
    """Whether step `step` (from 0) trains with the teacher: step >= switch_on_step(total_steps, fraction)."""
    return step >= switch_on_step(total_steps, fraction)


class EmaTeacher(nn.Module):
    """An exponential moving average of a module: theta_t <- decay * theta_t + (1 - decay) * theta_s.

    Starts as an exact copy of the student (the paper's switch-on); its parameters never need gradients. Buffers
    are copied from the student at every update. Save it with `state_dict()` for a bitwise resume.
    """

    def __init__(self, student: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(student).requires_grad_(False)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, decay: float) -> None:
        """One EMA step towards the student's current parameters (decay in [0, 1]; 1 leaves the teacher still)."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        teacher = dict(self.module.named_parameters())
        students = dict(student.named_parameters())
        if teacher.keys() != students.keys():
            missing = sorted(teacher.keys() ^ students.keys())[:3]
            raise ValueError(f"the student's parameters are not the teacher's (e.g. {missing})")
        names = list(teacher)
        teacher_values = [teacher[name] for name in names]
        torch._foreach_mul_(teacher_values, decay)
        torch._foreach_add_(teacher_values, [students[name].detach() for name in names], alpha=1.0 - decay)
        student_buffers = dict(student.named_buffers())
        for name, buffer in self.module.named_buffers():
            buffer.copy_(student_buffers[name])


class ProjectionHead(nn.Module):
    """DINO's head: an MLP to a bottleneck, L2-normalised, then cosines to K unit-norm prototypes (its weight-
    normalised last layer with the norm fixed at 1). (..., width) -> (..., prototypes) logits in [-1, 1]."""

    def __init__(self, width: int, *, hidden: int = 2048, bottleneck: int = 256, prototypes: int = 65536):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) * 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(self.mlp(features), dim=-1), F.normalize(self.prototypes, dim=-1))


class DistillationHeads(nn.Module):
    """What only the last stage trains besides the tower: a head for the pooled embedding, one for patch features,
    and the mask token that replaces masked patches. The teacher holds an EMA copy of the heads too."""

    def __init__(self, vision_width: int, *, hidden: int = 2048, bottleneck: int = 256, prototypes: int = 65536,
                 patch_prototypes: int = 8192):
        super().__init__()
        self.global_head = ProjectionHead(vision_width, hidden=hidden, bottleneck=bottleneck, prototypes=prototypes)
        self.patch_head = ProjectionHead(vision_width, hidden=hidden, bottleneck=bottleneck,
                                         prototypes=patch_prototypes)
        self.mask_token = nn.Parameter(torch.randn(vision_width) * 0.02)


def head_sizes(vision_width: int) -> dict[str, int]:
    """Head sizes for a tower of width D: DINO's (MLP 2048, bottleneck 256, 65,536 prototypes; iBOT's 8,192 for
    patches) as caps, scaled down with D below them (4 D, D / 2, 64 D, 8 D), so that the heads of the tiny tower
    (D = 128: 512, 64, 8,192, 1,024) cost a fraction of the tower rather than many times it."""
    return {"hidden": min(2048, 4 * vision_width), "bottleneck": min(256, max(8, vision_width // 2)),
            "prototypes": min(65536, 64 * vision_width), "patch_prototypes": min(8192, 8 * vision_width)}


def heads_for(vision_width: int) -> DistillationHeads:
    """DistillationHeads of `head_sizes(vision_width)`."""
    return DistillationHeads(vision_width, **head_sizes(vision_width))


@torch.no_grad()
def teacher_logits(vision_model: nn.Module, heads: DistillationHeads, pixel_values: torch.Tensor,
                   chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's head outputs for the whole (unmasked) images: ((n, K) global, (n, P, Kp) per patch).

    Computed once per batch, `chunk` images at a time (the micro-batch), with no graph: memory holds one chunk's
    activations and the outputs. Pass the teacher's tower and heads (`EmaTeacher.module`).
    """
    step = chunk or pixel_values.shape[0]
    global_parts, patch_parts = [], []
    for start in range(0, pixel_values.shape[0], step):
        patches, pooled = image_tokens(vision_model, pixel_values[start:start + step])
        global_parts.append(heads.global_head(pooled).float())
        patch_parts.append(heads.patch_head(patches).float())
    return torch.cat(global_parts), torch.cat(patch_parts)


def teacher_distribution(logits: torch.Tensor, center: torch.Tensor, temperature: float = TEACHER_TEMPERATURE
                         ) -> torch.Tensor:
    """softmax((logits - center) / temperature) over the last axis: centring and sharpening keep the teacher from
    collapsing onto one prototype (DINO, sec. 3.1). (..., K) -> (..., K), constants for the student."""
    return torch.softmax((logits.detach() - center) / temperature, dim=-1)


def distillation_loss(student_logits: torch.Tensor, teacher_probabilities: torch.Tensor,
                      temperature: float = STUDENT_TEMPERATURE, *, reduction: str = "mean") -> torch.Tensor:
    """Local-to-global consistency: (n, V, K) student logits of V local crops against the teacher's (n, K)
    distribution of the whole image. Per image the mean over crops of -sum_k p_t[k] log softmax(s / tau_s)[k];
    "mean" averages the images, "sum" adds them (divide micro-batches by the whole batch's n)."""
    if student_logits.dim() != 3 or teacher_probabilities.shape != (student_logits.shape[0], student_logits.shape[2]):
        raise ValueError(f"student_logits must be (n, V, K) and teacher_probabilities (n, K), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_probabilities.shape)}")
    log_student = torch.log_softmax(_at_least_float32(student_logits) / temperature, dim=-1)
    per_crop = -(teacher_probabilities.unsqueeze(1) * log_student).sum(dim=-1)     # (n, V)
    return _reduce(per_crop.mean(dim=1), reduction)


def masked_prediction_loss(student_logits: torch.Tensor, teacher_probabilities: torch.Tensor,
                           patch_mask: torch.Tensor, temperature: float = STUDENT_TEMPERATURE, *,
                           reduction: str = "mean") -> torch.Tensor:
    """Masked prediction: (n, P, K) student patch logits of the masked image against the teacher's (n, P, K)
    distributions of the whole image, at the (n, P) masked patches only. Per image the mean over its masked patches
    of -sum_k p_t[k] log softmax(s / tau_s)[k] (0 without masked patches); "mean" or "sum" over images."""
    if student_logits.shape != teacher_probabilities.shape or patch_mask.shape != student_logits.shape[:2]:
        raise ValueError(f"student_logits and teacher_probabilities must be (n, P, K) and patch_mask (n, P), got "
                         f"{tuple(student_logits.shape)}, {tuple(teacher_probabilities.shape)}, "
                         f"{tuple(patch_mask.shape)}")
    log_student = torch.log_softmax(_at_least_float32(student_logits) / temperature, dim=-1)
    per_patch = -(teacher_probabilities * log_student).sum(dim=-1)                  # (n, P)
    weights = patch_mask.to(per_patch.dtype)
    return _reduce((per_patch * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0), reduction)


@torch.no_grad()
def updated_center(center: torch.Tensor, logits: torch.Tensor, momentum: float = CENTER_MOMENTUM,
                   group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """momentum * center + (1 - momentum) * the mean of the teacher's (..., K) logits over the global batch.

    All leading axes are averaged (images, and patches for the patch centre). Under a process group the sums and
    counts are all-reduced first, so every rank moves to the same centre.
    """
    flat = logits.detach().reshape(-1, logits.shape[-1]).to(center.dtype)
    total = torch.cat([flat.sum(dim=0), torch.tensor([flat.shape[0]], dtype=center.dtype, device=center.device)])
    if group is not None:
        dist.all_reduce(total, group=group)
    return momentum * center + (1.0 - momentum) * total[:-1] / total[-1]


def _reduce(per_example: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_example.mean()
    if reduction == "sum":
        return per_example.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _at_least_float32(values: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision values (under autocast), the values' own dtype otherwise (float64 in tests)."""
    return values.to(torch.promote_types(values.dtype, torch.float32))
