"""The optimiser and learning-rate schedule of a training run.

AdamW as the paper trains SigLIP (Zhai et al., 2023, Section 4): beta2 lowered to 0.95 for stability, weight decay
never on biases, norms, t' or b, and a linear warm-up followed by a cosine decay. The schedule is a plain `LambdaLR`
over a small callable object, so its whole state is numbers and travels as JSON.

Weight decay comes in two conventions (`WEIGHT_DECAY_MODES`):

    torch  torch.optim.AdamW's: every update multiplies each weight matrix (every parameter of 2 or more dims,
           embeddings included) by 1 - lr_k * wd, lr_k the scheduled learning rate. At lr 1e-3, wd 1e-4 is a
           factor of 1 - 1e-7 an update.
    paper  big_vision's, where SigLIP was trained: decay is added after the learning-rate scaling and before the
           schedule (big_vision/optax.py, `optax.add_decayed_weights`), so each update multiplies a kernel by
           1 - s_k * wd, s_k in [0, 1] the schedule's factor: wd is not multiplied by the peak lr. Only kernels
           decay (big_vision's default mask `.*/kernel$`): the weights of linear and convolution layers, not token
           or position embeddings nor the pooling head's probe. It is torch's convention with wd / lr in place of
           wd, and that is how it is built here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

WEIGHT_DECAY_MODES = ("torch", "paper")

# Parameters of SiglipModel that hold the learned temperature t' and bias b of the loss.
LOGIT_PARAMETERS = ("logit_scale", "logit_bias")


@dataclass
class WarmupCosine:
    """Learning-rate factor of update `step` (0-based): linear warm-up to 1, then a cosine down to `min_ratio`.

    Update k of a warm-up of W steps uses (k + 1) / W, so the first update already moves the weights and update
    W - 1 the full rate; after the warm-up the factor follows min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2
    with p = (k - W) / (T - W) for a run of T updates, so it would reach min_ratio at k = T, one past the last
    update (big_vision's schedule ends the same way).
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


def kernels(model: nn.Module) -> set[int]:
    """The ids of `model`'s kernels: the weights of its linear and convolution layers, and the input projections of
    nn.MultiheadAttention (the SigLIP pooling head), which big_vision keeps as Dense kernels too."""
    found = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            found.add(id(module.weight))
        elif isinstance(module, nn.MultiheadAttention):
            found.update(id(weight) for weight in (module.in_proj_weight, module.q_proj_weight, module.k_proj_weight,
                                                   module.v_proj_weight) if weight is not None)
    return found


def parameter_groups(
    model: nn.Module, *, lr: float, weight_decay: float, logit_lr_multiplier: float = 1.0,
    weight_decay_mode: str = "torch",
) -> list[dict]:
    """Split the trainable parameters into AdamW groups: decayed matrices, undecayed parameters, and t', b.

    Which parameters decay, and by how much, follows `weight_decay_mode` (see the module docstring): "torch" decays
    every parameter of 2 or more dims (linear and convolution kernels, embeddings) with coefficient weight_decay;
    "paper" decays the kernels only, with coefficient weight_decay / lr, so that AdamW's lr_k * coefficient is the
    schedule's factor times weight_decay. Biases and norm scales never decay, since decaying them only shifts
    activations. t' and b get their own group so their learning rate can be raised: Adam moves a scalar by about lr
    per step, so b needs |b_init - b*| / lr steps to settle. Frozen parameters (requires_grad False, e.g. a locked
    image tower) get no group and so no optimiser state.
    """
    if weight_decay_mode not in WEIGHT_DECAY_MODES:
        raise ValueError(f"weight_decay_mode must be one of {', '.join(WEIGHT_DECAY_MODES)}, got {weight_decay_mode!r}")
    kernel_ids = kernels(model) if weight_decay_mode == "paper" else set()
    decay, no_decay, logits = [], [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.split(".")[-1] in LOGIT_PARAMETERS:
            logits.append(parameter)
        elif id(parameter) in kernel_ids if weight_decay_mode == "paper" else parameter.dim() >= 2:
            decay.append(parameter)
        else:
            no_decay.append(parameter)
    coefficient = weight_decay / lr if weight_decay_mode == "paper" else weight_decay
    groups = [
        {"name": "decay", "params": decay, "weight_decay": coefficient, "lr": lr},
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
    weight_decay_mode: str = "torch",
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over `parameter_groups(model)` and its warm-up-cosine schedule.

    `lr` is the peak learning rate, reached after `warmup_steps` updates; `total_steps` is the length of the run.
    `weight_decay_mode` chooses the weight-decay convention ("torch" or "paper", see the module docstring).
    Call `scheduler.step()` after each `optimizer.step()`.
    """
    groups = parameter_groups(model, lr=lr, weight_decay=weight_decay, logit_lr_multiplier=logit_lr_multiplier,
                              weight_decay_mode=weight_decay_mode)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(beta1, beta2), eps=eps)
    schedule = WarmupCosine(warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler
