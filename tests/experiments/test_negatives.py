"""siglip.experiments.negatives: the masked loss against a literal reference, the mask, matched steps, the prior."""

from __future__ import annotations

import math

import pytest
import torch

from reference import reference_sigmoid_loss, unit_rows
from siglip.experiments import negatives
from siglip.experiments.design import Arm, prior_logit_bias
from siglip.experiments.negatives import (
    MaskedNegatives,
    masked_sigmoid_loss,
    matched_steps,
    negative_mask,
    pair_labels,
)
from siglip.loss import sigmoid_loss


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def literal_masked_loss(x, y, t, b, keep, ids=None):
    """-(1/n) sum over kept (i, j) of log sigmoid(z_ij (t x_i.y_j + b)), one pair at a time, float64."""
    n = x.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            if keep[i, j]:
                positive = (i == j) if ids is None else bool(ids[i] == ids[j])
                z = 1.0 if positive else -1.0
                total = total - torch.nn.functional.logsigmoid(z * (t * (x[i] @ y[j]) + b))
    return total / n


@pytest.mark.parametrize("with_ids", [False, True])
def test_masked_loss_matches_literal_reference(with_ids):
    n, d = 11, 6
    x, y = unit_rows(n, d).requires_grad_(), unit_rows(n, d).requires_grad_()
    t = torch.tensor(float(torch.empty(()).uniform_(1, 20)), dtype=torch.float64, requires_grad=True)
    b = torch.tensor(float(torch.empty(()).uniform_(-10, 2)), dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 4, (n,)) if with_ids else None
    keep = torch.rand(n, n) < 0.4
    got = masked_sigmoid_loss(x, y, t, b, keep, ids)
    want = literal_masked_loss(x, y, t, b, keep, ids)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for g, w in zip(torch.autograd.grad(got, (x, y, t, b)), torch.autograd.grad(want, (x, y, t, b)), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


def test_masked_loss_keeping_everything_is_the_full_loss():
    n, d = 33, 8
    x, y = unit_rows(n, d), unit_rows(n, d)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.5, dtype=torch.float64)
    ids = torch.randint(0, 5, (n,))
    keep = torch.ones(n, n, dtype=torch.bool)
    torch.testing.assert_close(masked_sigmoid_loss(x, y, t, b, keep), reference_sigmoid_loss(x, y, t, b), rtol=1e-12,
                               atol=0)
    torch.testing.assert_close(masked_sigmoid_loss(x, y, t, b, keep, ids), sigmoid_loss(x, y, t, b, positive_ids=ids),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("choice", ["random", "easy", "hard"])
def test_negative_mask_keeps_positives_and_the_right_negatives(choice):
    n = 24
    fraction = float(torch.empty(()).uniform_(0.1, 0.9))
    ids = torch.randint(0, 6, (n,))
    positive = pair_labels(n, ids)
    logits = torch.randn(n, n, dtype=torch.float64)
    keep = negative_mask(logits, positive, fraction, choice, torch.Generator().manual_seed(fresh_seed()))
    negatives = ~positive
    assert bool(keep[positive].all()), "every positive pair must be kept"
    assert int((keep & negatives).sum()) == round(fraction * int(negatives.sum()))
    kept, dropped = logits[keep & negatives], logits[~keep & negatives]
    if choice == "hard":
        assert kept.min() >= dropped.max()
    elif choice == "easy":
        assert kept.max() <= dropped.min()
    else:
        seed = fresh_seed()
        first = negative_mask(logits, positive, fraction, choice, torch.Generator().manual_seed(seed))
        again = negative_mask(logits, positive, fraction, choice, torch.Generator().manual_seed(seed))
        other = negative_mask(logits, positive, fraction, choice, torch.Generator().manual_seed(seed + 1))
        assert torch.equal(first, again) and not torch.equal(first, other)


def test_matched_steps_sees_as_many_pairs():
    batch, steps, fraction = 64, 100, 0.25
    longer = matched_steps(steps, batch, fraction)
    kept_per_step = batch + round(fraction * batch * (batch - 1))
    assert abs(longer * kept_per_step - steps * batch * batch) <= kept_per_step


def test_masked_arm_starts_its_bias_at_the_prior_of_the_kept_ratio():
    batch = int(torch.randint(16, 512, ()))
    fraction = float(torch.empty(()).uniform_(0.05, 1.0))
    arm = Arm("masked", batch, 10, objective=MaskedNegatives(fraction, "hard"))
    # sigmoid(b) = 1 / (1 + negatives per positive) when b = -log(negatives per positive)
    negatives_per_positive = fraction * (batch - 1)
    assert math.isclose(arm.logit_bias_at_start(), -math.log(negatives_per_positive), rel_tol=1e-12)
    assert math.isclose(Arm("all", batch, 10).logit_bias_at_start(), prior_logit_bias(batch), rel_tol=1e-12)
    assert prior_logit_bias(batch) < arm.logit_bias_at_start() or fraction == 1.0


@pytest.mark.parametrize("smoke", [True, False])
def test_the_bias_claim_compares_arms_that_start_at_one_bias(smoke):
    # Each masked arm starts at its own prior, higher than all negatives' by -log(fraction): comparing those would
    # read "the bias rises" before a step is taken.
    built = negatives.study(smoke)
    starts = {arm.name: arm.logit_bias_at_start() for arm in built.arms}
    (claim,) = [c for c in built.comparisons if c.metric == "logit_bias"]
    assert len({starts[name] for name in claim.arms}) == 1, {name: starts[name] for name in claim.arms}
