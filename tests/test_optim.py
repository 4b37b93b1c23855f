"""siglip.optim: the paper's optimiser recipe, pinned by what an update does to each parameter.

Weight decay on weight matrices only (never on biases, norms, t' or b), in torch's or big_vision's convention; the
learning-rate multiplier of t' and b; a linear warm-up then a cosine; beta2 = 0.95.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from siglip.optim import WarmupCosine, build_optimizer, parameter_groups
from train.runs import tiny_towers

NEVER_DECAYED = ("bias", "logit_scale", "logit_bias")
"""Name endings of parameters that never decay (norms are found by "norm" in the name)."""

# Moving a schedule ahead without updates (to reach update k) is what these tests mean to do.
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")


def never_decayed(name: str) -> bool:
    return name.endswith(NEVER_DECAYED) or "norm" in name


def kernel(name: str) -> bool:
    """Weights of linear and convolution layers (q/k/v/out projections, MLPs, heads, the patch embedding) and the
    pooling head's attention input projection."""
    return name.endswith(("proj.weight", "fc1.weight", "fc2.weight", "head.weight", "patch_embedding.weight",
                          "in_proj_weight"))


def one_update_without_gradient(mode: str, lr: float, weight_decay: float, warmup_steps: int, step: int):
    """Parameters before and after update number `step` (0-based) with zero gradients, which leave Adam's own
    update at exactly zero: what changes a parameter is its weight decay alone. Returns (before, after, s_k)."""
    model, _ = tiny_towers()
    total = warmup_steps + 10
    optimizer, scheduler = build_optimizer(model, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                           total_steps=total, weight_decay_mode=mode)
    for _ in range(step):
        scheduler.step()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    after = {name: p.detach().clone() for name, p in model.named_parameters()}
    return before, after, WarmupCosine(warmup_steps, total)(step)


@pytest.mark.parametrize("mode", ["torch", "paper"])
def test_weight_decay_reaches_weight_matrices_only(mode):
    lr, weight_decay, step = random.choice([1e-3, 0.5]), 0.1, random.randrange(6)
    before, after, factor = one_update_without_gradient(mode, lr, weight_decay, warmup_steps=3, step=step)
    # torch: the scheduled learning rate times wd; paper (big_vision): the schedule's factor times wd, whatever lr.
    shrink = 1 - (lr * factor * weight_decay if mode == "torch" else factor * weight_decay)
    decayed = []
    for name in before:
        if never_decayed(name):
            assert torch.equal(after[name], before[name]), f"{name} decayed"
            continue
        # torch decays every matrix, embeddings and the pooling probe included; paper (.*/kernel$) only kernels.
        if mode == "torch" or kernel(name):
            torch.testing.assert_close(after[name], before[name] * shrink, rtol=2 * torch.finfo().eps, atol=0)
            decayed.append(name)
        else:
            assert torch.equal(after[name], before[name]), f"{name} is not a kernel but decayed"
    assert any("patch_embedding" in name for name in decayed) and any("in_proj" in name for name in decayed)
    if mode == "paper":
        assert not any("embedding.weight" in name and "patch" not in name for name in decayed)
        assert "vision_model.head.probe" not in decayed


def test_paper_weight_decay_does_not_scale_with_the_learning_rate():
    shrinks = []
    for lr in (1e-4, 1e-2):
        before, after, factor = one_update_without_gradient("paper", lr, 1e-2, warmup_steps=4, step=1)
        name = "text_model.encoder.layers.0.mlp.fc1.weight"
        # The least-squares factor from before to after: an entry initialised at exactly 0 (seed 119904950 has
        # one) makes an entrywise ratio 0 / 0.
        was, now = before[name].double(), after[name].double()
        shrinks.append(((now * was).sum() / (was * was).sum()).item())
        assert shrinks[-1] == pytest.approx(1 - factor * 1e-2, abs=1e-7)
    assert shrinks[0] == pytest.approx(shrinks[1], abs=1e-7)


def test_logit_parameters_take_the_multiplied_learning_rate():
    model, _ = tiny_towers()
    lr, multiplier, warmup = 1e-3, random.choice([3.0, 10.0]), 4
    optimizer, scheduler = build_optimizer(model, lr=lr, weight_decay=1e-4, logit_lr_multiplier=multiplier,
                                           warmup_steps=warmup, total_steps=20)
    groups = {group["name"]: group for group in optimizer.param_groups}
    assert groups["logit"]["weight_decay"] == 0.0
    assert {id(p) for p in groups["logit"]["params"]} == {id(model.logit_scale), id(model.logit_bias)}
    for step in range(20):
        assert groups["logit"]["lr"] == pytest.approx(multiplier * groups["decay"]["lr"], rel=1e-12), step
        scheduler.step()
    # Adam's first update moves a scalar by its learning rate: g / sqrt(g^2) = sign(g).
    optimizer, scheduler = build_optimizer(model, lr=lr, weight_decay=1e-4, logit_lr_multiplier=multiplier,
                                           warmup_steps=warmup, total_steps=20)
    scale, bias = model.logit_scale.item(), model.logit_bias.item()
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    model.logit_scale.grad.fill_(0.3)
    model.logit_bias.grad.fill_(-2.0)
    optimizer.step()
    first = lr * multiplier / warmup
    assert model.logit_scale.item() == pytest.approx(scale - first, abs=1e-7)
    assert model.logit_bias.item() == pytest.approx(bias + first, abs=1e-7)


def test_warmup_then_cosine_learning_rates():
    lr, warmup, total, floor = 2e-3, random.randint(1, 8), random.randint(12, 40), random.choice([0.0, 0.1])
    model, _ = tiny_towers()
    optimizer, scheduler = build_optimizer(model, lr=lr, weight_decay=0.0, warmup_steps=warmup, total_steps=total,
                                           min_lr_ratio=floor)
    seen = []
    for _ in range(total):
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    for k, got in enumerate(seen):
        if k < warmup:
            want = lr * (k + 1) / warmup                                       # linear, from lr / W up to lr
        else:
            progress = (k - warmup) / (total - warmup)
            want = lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert got == pytest.approx(want, rel=1e-12), k
    assert seen[warmup - 1] == pytest.approx(lr) and max(seen) == pytest.approx(lr)
    assert all(a < b for a, b in zip(seen[:warmup], seen[1:warmup], strict=False))
    assert all(a > b for a, b in zip(seen[warmup:], seen[warmup + 1:], strict=False))
    assert seen[-1] > lr * floor


def test_defaults_follow_the_paper():
    from siglip.train import TrainConfig

    config = TrainConfig()
    assert (config.beta1, config.beta2, config.weight_decay, config.grad_clip) == (0.9, 0.95, 1e-4, 1.0)
    assert (config.init_logit_scale, config.init_logit_bias) == (10.0, -10.0)
    model, _ = tiny_towers()
    optimizer, _ = build_optimizer(model, lr=1e-3, weight_decay=config.weight_decay, beta2=config.beta2)
    assert all(group["betas"] == (0.9, 0.95) for group in optimizer.param_groups)


def test_a_locked_tower_gets_no_group():
    model, _ = tiny_towers(lock_image=True)
    grouped = {id(p) for group in parameter_groups(model, lr=1e-3, weight_decay=1e-4) for p in group["params"]}
    for name, parameter in model.named_parameters():
        assert (id(parameter) in grouped) == (not name.startswith("vision_model")), name
    with pytest.raises(ValueError, match="weight_decay_mode must be one of torch, paper, got 'l2'"):
        parameter_groups(model, lr=1e-3, weight_decay=1e-4, weight_decay_mode="l2")
