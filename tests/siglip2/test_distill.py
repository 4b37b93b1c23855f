"""Self-distillation and masked prediction: the switch-on step, the EMA update and both losses against their
literal formulas; the teacher's targets the same in any chunking."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch
from torch import nn

from siglip.errors import UserError
from siglip.siglip2.distill import (
    DistillationHeads,
    EmaTeacher,
    ProjectionHead,
    distillation_active,
    distillation_loss,
    masked_prediction_loss,
    switch_on_step,
    teacher_distribution,
    teacher_logits,
    updated_center,
)

from .towers import tiny_vision_model


def test_the_switch_on_step_is_the_exact_fraction_of_training_rounded_up():
    assert switch_on_step(10, 0.8) == 8 and switch_on_step(10, 0.7) == 7 and switch_on_step(7, 0.7) == 5
    assert switch_on_step(10, 1.0) == 10 and switch_on_step(10, 0.0) == 0 and switch_on_step(0, 0.8) == 0
    for _ in range(100):
        total = random.randint(1, 100_000)
        written = f"{random.randint(0, 999) / 1000:.3f}"          # a fraction as a user writes it
        first = switch_on_step(total, float(written))
        assert first == math.ceil(Fraction(written) * total)       # exact rational arithmetic
        around = range(max(0, first - 3), min(total, first + 3))          # off before the step, on from it
        assert [distillation_active(step, total, float(written)) for step in around] == [s >= first for s in around]
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(UserError, match="--siglip2-from must be a fraction"):
            switch_on_step(100, bad)


class Pair(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 3).double()
        self.scale = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(2, dtype=torch.float64))


def test_the_teacher_moves_by_the_ema_formula():
    student = Pair()
    teacher = EmaTeacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher.module.parameters(), student.parameters(), strict=True))
    for _ in range(5):
        before = {name: value.clone() for name, value in teacher.module.named_parameters()}
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.add_(torch.randn_like(parameter))
            student.count.add_(1)
        decay = random.random()
        teacher.update(student, decay)
        for name, value in teacher.module.named_parameters():
            moved = dict(student.named_parameters())[name].detach()
            want = decay * before[name] + (1 - decay) * moved
            # float64: the two ways round differently, each by an ulp or two of the larger operand
            scale = before[name].abs() + moved.abs()
            assert ((value - want).abs() <= 4 * torch.finfo(torch.float64).eps * scale).all()
        assert torch.equal(teacher.module.count, student.count)
    frozen = {name: value.clone() for name, value in teacher.module.named_parameters()}
    teacher.update(student, 1.0)
    assert all(torch.equal(value, frozen[name]) for name, value in teacher.module.named_parameters())
    teacher.update(student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.module.parameters(), student.parameters(), strict=True))
    with pytest.raises(ValueError, match="decay must be in"):
        teacher.update(student, 1.5)
    with pytest.raises(ValueError, match="not the teacher's"):
        teacher.update(nn.Linear(5, 3), 0.9)


def literal_cross_entropy(teacher_probabilities: torch.Tensor, student_logits: torch.Tensor, tau: float):
    """-sum_k p_t[k] log(exp(s[k] / tau) / sum_j exp(s[j] / tau)), term by term."""
    scaled = student_logits / tau
    normaliser = torch.log(torch.exp(scaled).sum())
    return -sum(teacher_probabilities[k] * (scaled[k] - normaliser) for k in range(len(scaled)))


def test_the_teacher_distribution_is_the_centred_sharpened_softmax():
    logits, center, tau = torch.randn(4, 7, dtype=torch.float64), torch.randn(7, dtype=torch.float64), 0.04
    got = teacher_distribution(logits, center, tau)
    for row in range(4):
        shifted = torch.exp((logits[row] - center) / tau)
        torch.testing.assert_close(got[row], shifted / shifted.sum(), rtol=1e-12, atol=1e-15)


def test_distillation_loss_matches_its_formula():
    n, views, k, tau = random.randint(1, 5), random.randint(1, 4), random.randint(2, 9), 0.1
    student = torch.randn(n, views, k, dtype=torch.float64)
    teacher = teacher_distribution(torch.randn(n, k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64))
    want = sum(sum(literal_cross_entropy(teacher[i], student[i, v], tau) for v in range(views)) / views
               for i in range(n)) / n
    # float64, the same terms in another order. A near one-hot teacher can make the loss tiny (1e-10) while each
    # term subtracts a log-sum-exp of about |s| / tau = 30: the rounding is absolute, ~1e-14, hence atol 1e-12
    torch.testing.assert_close(distillation_loss(student, teacher, tau), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(distillation_loss(student, teacher, tau, reduction="sum"), want * n, rtol=1e-12,
                               atol=1e-12)


def test_masked_prediction_loss_matches_its_formula_at_masked_patches_only():
    n, patches, k, tau = random.randint(2, 5), 8, random.randint(2, 9), 0.1
    student = torch.randn(n, patches, k, dtype=torch.float64, requires_grad=True)
    teacher = torch.softmax(torch.randn(n, patches, k, dtype=torch.float64), dim=-1)
    mask = torch.rand(n, patches) < 0.5
    mask[0] = False                                                 # an image without masked patches adds 0
    terms = []
    for i in range(n):
        masked = [literal_cross_entropy(teacher[i, p], student[i, p].detach(), tau) for p in range(patches)
                  if mask[i, p]]
        terms.append(sum(masked) / len(masked) if masked else torch.zeros((), dtype=torch.float64))
    want = sum(terms) / n
    got = masked_prediction_loss(student, teacher, mask, tau)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)              # as for distillation_loss
    got.backward()
    assert (student.grad[~mask] == 0).all() and (student.grad[mask] != 0).any()
    split = random.randint(1, n - 1)
    parts = sum(masked_prediction_loss(student[part], teacher[part], mask[part], tau, reduction="sum")
                for part in (slice(0, split), slice(split, n))) / n
    torch.testing.assert_close(parts, got, rtol=1e-12, atol=1e-12)    # micro-batches add up to the batch


def test_the_center_moves_towards_the_batch_mean():
    center, momentum = torch.randn(6, dtype=torch.float64), random.random()
    logits = torch.randn(3, 5, 6, dtype=torch.float64)             # images x patches x prototypes
    want = momentum * center + (1 - momentum) * logits.reshape(-1, 6).mean(dim=0)
    # float64 values of order 1 summed two ways: a few ulps of the largest term
    torch.testing.assert_close(updated_center(center, logits, momentum), want, rtol=1e-14, atol=1e-14)


def test_teacher_targets_need_no_graph_and_do_not_depend_on_the_chunk():
    tower = tiny_vision_model()
    heads = DistillationHeads(32, hidden=16, bottleneck=8, prototypes=11, patch_prototypes=5).double()
    pixels = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    whole_global, whole_patches = teacher_logits(tower, heads, pixels)
    assert whole_global.shape == (5, 11) and whole_patches.shape == (5, 16, 5)
    assert not whole_global.requires_grad and not whole_patches.requires_grad
    chunked_global, chunked_patches = teacher_logits(tower, heads, pixels, chunk=2)
    # float64; batches of 2 and 5 may round differently in the matrix products
    torch.testing.assert_close(chunked_global, whole_global, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked_patches, whole_patches, rtol=1e-12, atol=1e-12)


def test_the_projection_head_gives_cosines_to_its_prototypes():
    head = ProjectionHead(12, hidden=10, bottleneck=4, prototypes=7).double()
    features = torch.randn(3, 5, 12, dtype=torch.float64)
    logits = head(features)
    assert logits.shape == (3, 5, 7) and logits.abs().max() <= 1 + 1e-12
    with torch.no_grad():
        head.prototypes[2] = 0
        head.prototypes[2, 0] = 1.0
    direction = torch.nn.functional.normalize(head.mlp(features), dim=-1)
    torch.testing.assert_close(head(features)[..., 2], direction[..., 0], rtol=1e-12, atol=1e-12)
