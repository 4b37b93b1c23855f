"""The optimiser and learning-rate schedule of a training run.

AdamW as the paper trains SigLIP (Zhai et al., 2023, Section 4): beta2 lowered to 0.95 for stability, weight decay on
the weight matrices only (never on biases, norms, t' or b), and a linear warm-up followed by a cosine decay. The
schedule is a plain `LambdaLR` over a small callable object, so its whole state is numbers and travels as JSON.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Parameters of SiglipModel that hold the learned temperature t' and bias b of the loss.
LOGIT_PARAMETERS = ("logit_scale", "logit_bias")


@dataclass
class WarmupCosine:
    """Learning-rate factor of update `step` (0-based): linear warm-up to 1, then a cosine down to `min_ratio`.

    Update k of a warm-up of W steps uses (k + 1) / W, so the first update already moves the weights; after the
    warm-up the factor follows min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2, p going from 0 to 1 over the
    remaining updates.
    """

    warmup_steps: int
    total_steps: int
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def parameter_groups(
    model: nn.Module, *, lr: float, weight_decay: float, logit_lr_multiplier: float = 1.0
) -> list[dict]:
    """Split the trainable parameters into AdamW groups: decayed matrices, undecayed vectors, and t', b.

    Matrices (dim >= 2: linear and convolution kernels, embeddings) take weight decay; biases and norm scales
    (dim <= 1) do not, since decaying them only shifts activations. t' and b get their own group so their learning
    rate can be raised: Adam moves a scalar by about lr per step, so b needs |b_init - b*| / lr steps to settle.
    Frozen parameters (requires_grad False, e.g. a locked image tower) get no group and so no optimiser state.
    """
    decay, no_decay, logits = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.split(".")[-1] in LOGIT_PARAMETERS:
            logits.append(parameter)
        elif parameter.dim() >= 2:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr": lr},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": lr},
        {"name": "logit", "params": logits, "weight_decay": 0.0, "lr": lr * logit_lr_multiplier},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    beta1: float = 0.9,
    beta2: float = 0.95,
    eps: float = 1e-8,
    logit_lr_multiplier: float = 1.0,
    warmup_steps: int = 0,
    total_steps: int = 1,
    min_lr_ratio: float = 0.0,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `parameter_groups(model)` and its warm-up-cosine schedule.

    `lr` is the peak learning rate, reached after `warmup_steps` updates; `total_steps` is the length of the run.
    Call `scheduler.step()` after each `optimizer.step()`.
    """
    groups = parameter_groups(model, lr=lr, weight_decay=weight_decay, logit_lr_multiplier=logit_lr_multiplier)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps)
    schedule = WarmupCosine(warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler
