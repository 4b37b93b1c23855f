"""siglip.train.guard: non-finite updates are found, agreed on by every rank, counted, and stop a diverged run."""

from __future__ import annotations

import math
import random

import pytest
import torch

from siglip.train.guard import (
    DivergenceGuard,
    agree_on_update,
    grad_clip_norm,
    holds_non_finite,
    non_finite_state_message,
)
from train.runs import tiny_towers

NON_FINITE = (math.nan, math.inf, -math.inf)


def test_an_update_is_good_only_when_loss_and_gradient_norm_are_finite():
    loss, norm = torch.tensor(random.uniform(0.1, 9.0)), torch.tensor(random.uniform(0.0, 5.0))
    finite, mean = agree_on_update(loss, norm, world_size=1)
    assert finite and mean.item() == loss.item()
    for bad in NON_FINITE:
        assert not agree_on_update(torch.tensor(bad), norm, world_size=1)[0]
        assert not agree_on_update(loss, torch.tensor(bad), world_size=1)[0]


def test_the_guard_counts_skips_and_says_when_the_run_diverged(tmp_path):
    limit = random.randint(2, 6)
    guard = DivergenceGuard(limit)
    for finite in (False, True, False):
        guard.record(finite)
    assert (guard.skipped, guard.consecutive, guard.diverged) == (2, 1, False)
    for _ in range(limit - 1):
        guard.record(False)
    assert guard.diverged and guard.consecutive == limit and guard.skipped == limit + 1
    restored = DivergenceGuard(limit)
    restored.load_state(guard.state())
    assert restored.state() == guard.state() == {"skipped_updates": limit + 1, "consecutive_skips": limit}

    checkpoint = tmp_path / "checkpoints" / "step_00000012"
    message = guard.message(17, checkpoint)
    assert "\n" not in message
    assert message.startswith(f"stopped at step 17: the last {limit} updates had a non-finite loss or gradient norm")
    assert f"newest good checkpoint: {checkpoint}" in message and "--lr" in message and "--warmup-steps" in message
    assert "newest good checkpoint: none was written" in guard.message(3, None)
    with pytest.raises(ValueError, match="max_consecutive must be at least 1"):
        DivergenceGuard(0)


def test_a_non_finite_value_anywhere_in_the_state_is_found():
    model, _ = tiny_towers()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    assert not holds_non_finite(model, optimizer)                   # a healthy state
    state = random.choice(list(optimizer.state.values()))
    state[random.choice(["exp_avg", "exp_avg_sq"])].view(-1)[0] = random.choice(NON_FINITE)
    assert holds_non_finite(model, optimizer)
    model, _ = tiny_towers()
    with torch.no_grad():
        model.logit_bias.fill_(math.nan)
    assert holds_non_finite(model, torch.optim.AdamW(model.parameters()))
    assert non_finite_state_message(4).startswith("stopped at step 4: the weights or the optimiser state hold a non-")


def test_clipping_off_still_measures_the_norm():
    assert grad_clip_norm(1.0) == 1.0 and grad_clip_norm(0.0) == math.inf
    gradients = [torch.randn(5, 3), torch.randn(7)]
    parameters = [torch.nn.Parameter(torch.zeros_like(g)) for g in gradients]
    for parameter, gradient in zip(parameters, gradients, strict=True):
        parameter.grad = gradient.clone()
    norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip_norm(0.0))
    assert norm.item() == pytest.approx(torch.cat([g.flatten() for g in gradients]).norm().item(), rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(parameters, gradients, strict=True))   # not clipped


def _agree_in_a_world(rank: int, world_size: int, bad_rank: int | None, bad_value: float) -> tuple[bool, float]:
    loss = torch.tensor(bad_value if rank == bad_rank else 1.0 + rank)
    finite, mean = agree_on_update(loss, torch.tensor(2.0), world_size)
    return finite, mean.item()


@pytest.mark.dist
def test_every_rank_skips_when_one_rank_sees_a_non_finite_loss():
    from siglip.bench.ring import run_local_world

    bad_rank, bad_value = random.randrange(2), random.choice(NON_FINITE)
    assert run_local_world(2, _agree_in_a_world, (None, 0.0), timeout_s=120.0) == [(True, 1.5)] * 2
    results = run_local_world(2, _agree_in_a_world, (bad_rank, bad_value), timeout_s=120.0)
    assert [finite for finite, _ in results] == [False, False]

