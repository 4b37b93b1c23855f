"""The losses against the float64 reference of the paper's formulas: values, gradients, errors."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from reference import (
    loss_and_grads,
    reference_sigmoid_loss,
    reference_softmax_loss,
    scalar_gradient_scales,
    unit_rows,
)
from siglip.loss import SigmoidLoss, sigmoid_loss, softmax_loss


def assert_sigmoid_grads_close(got_grads, want_grads, rtol, x, y, t, b, positive_ids=None):
    """x and y gradients against their largest entry; t and b gradients against the size of the terms they sum.

    A single product t * <x, y> in float32 already carries t * 1e-7 of rounding, so entries far below the largest
    cannot be held to rtol of themselves; t's and b's gradients are sums of n^2 signed terms that may cancel.
    """
    scale_t, scale_b = scalar_gradient_scales(x, y, t, b, positive_ids)
    for name, g, w in zip("xy", got_grads[:2], want_grads[:2], strict=True):
        assert_close(g, w, rtol, atol=1e-300, what=f"grad {name}")
    assert_close(got_grads[2], want_grads[2], rtol, atol=rtol * scale_t, what="grad t")
    assert_close(got_grads[3], want_grads[3], rtol, atol=rtol * scale_b, what="grad b")


def assert_close(got, want, rtol, atol=0.0, what=""):
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item()
    assert err <= atol + rtol * max(scale, 1e-30), f"{what}: max error {err:.3e} against scale {scale:.3e}"


CASES = [
    # n, d, chunk (None = automatic; others do not divide n)
    (1, 3, None),
    (2, 1, 1),
    (7, 64, 3),
    (7, 768, None),
    (1000, 64, 96),
    (1000, 3, None),
]


@pytest.mark.parametrize("n,d,chunk", CASES)
@pytest.mark.parametrize("t,b", [(1.0, -10.0), (10.0, 0.0), (1e3, 50.0), (10.0, -10.0)])
def test_sigmoid_float64_matches_reference(n, d, chunk, t, b):
    x, y = unit_rows(n, d), unit_rows(n, d)
    t, b = torch.tensor(t, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    got, got_grads = loss_and_grads(sigmoid_loss, x, y, t, b, chunk=chunk)
    want, want_grads = loss_and_grads(reference_sigmoid_loss, x, y, t, b)
    assert_close(got, want, 1e-12, what="loss")
    assert_sigmoid_grads_close(got_grads, want_grads, 1e-10, x, y, t, b)


@pytest.mark.parametrize("n,d,chunk", CASES)
@pytest.mark.parametrize("t,b", [(1.0, -10.0), (10.0, 0.0), (1e3, 50.0)])
def test_sigmoid_float32_matches_reference(n, d, chunk, t, b):
    x, y = unit_rows(n, d, torch.float32), unit_rows(n, d, torch.float32)
    t32, b32 = torch.tensor(t), torch.tensor(b)
    got, got_grads = loss_and_grads(sigmoid_loss, x, y, t32, b32, chunk=chunk)
    want, want_grads = loss_and_grads(reference_sigmoid_loss, x.double(), y.double(), t32.double(), b32.double())
    assert got.dtype == torch.float32
    assert_close(got, want, 1e-5, what="loss")
    assert all(g.dtype == torch.float32 for g in got_grads)
    assert_sigmoid_grads_close(got_grads, want_grads, 1e-5, x, y, t32, b32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,chunk", [(7, 64, 3), (300, 768, 64), (1000, 3, None)])
def test_sigmoid_16bit_matches_reference(dtype, n, d, chunk):
    x, y = unit_rows(n, d, dtype), unit_rows(n, d, dtype)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    got, got_grads = loss_and_grads(sigmoid_loss, x, y, t, b, chunk=chunk)
    # The reference sees the same rounded inputs: what is measured is the loss's own arithmetic.
    want, want_grads = loss_and_grads(reference_sigmoid_loss, x.double(), y.double(), t.double(), b.double())
    assert got.dtype == torch.float32, "16-bit inputs accumulate and return in float32"
    assert_close(got, want, 2e-2, what="loss")
    assert_sigmoid_grads_close(got_grads, want_grads, 2e-2, x, y, t, b)
    assert got_grads[0].dtype == dtype and got_grads[1].dtype == dtype


@pytest.mark.parametrize("t,b", [(1e4, -1e3), (1e4, 1e3), (1e4, 0.0), (1.0, 1e3), (1.0, -1e3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigmoid_extreme_logits_stay_finite_and_exact(t, b, dtype):
    n, d = 33, 16
    x, y = unit_rows(n, d, dtype), unit_rows(n, d, dtype)
    t_, b_ = torch.tensor(t), torch.tensor(b)
    got, got_grads = loss_and_grads(sigmoid_loss, x, y, t_, b_, chunk=5)
    want, want_grads = loss_and_grads(reference_sigmoid_loss, x.double(), y.double(), t_.double(), b_.double())
    assert torch.isfinite(got) and all(torch.isfinite(g).all() for g in got_grads)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close(got, want, tol, what="loss")
    for name, g, w in zip("xytb", got_grads, want_grads, strict=True):
        # float32 holds t * <x, y> to t * 6e-8 absolute; at t = 1e4 that rounding decides pairs near the boundary.
        assert_close(g, w, tol, atol=1e-6 * t, what=f"grad {name}")


@pytest.mark.parametrize("n,d", [(1, 3), (2, 1), (7, 64), (300, 768)])
@pytest.mark.parametrize("t", [1.0, 10.0, 1e3])
def test_softmax_matches_reference(n, d, t):
    x, y = unit_rows(n, d), unit_rows(n, d)
    t64 = torch.tensor(t, dtype=torch.float64)
    got, got_grads = loss_and_grads(softmax_loss, x, y, t64)
    want, want_grads = loss_and_grads(reference_softmax_loss, x, y, t64)
    assert_close(got, want, 1e-12, atol=1e-300, what="loss")
    for name, g, w in zip("xyt", got_grads, want_grads, strict=True):
        assert_close(g, w, 1e-10, atol=1e-300, what=f"grad {name}")
    x32, y32, t32 = x.float(), y.float(), t64.float()
    got, got_grads = loss_and_grads(softmax_loss, x32, y32, t32)
    want, want_grads = loss_and_grads(reference_softmax_loss, x32.double(), y32.double(), t32.double())
    assert_close(got, want, 1e-5, atol=1e-6, what="float32 loss")
    for name, g, w in zip("xyt", got_grads, want_grads, strict=True):
        assert_close(g, w, 1e-5, atol=1e-7, what=f"float32 grad {name}")


def test_softmax_16bit():
    x, y = unit_rows(64, 32, torch.bfloat16), unit_rows(64, 32, torch.bfloat16)
    t = torch.tensor(10.0)
    got, got_grads = loss_and_grads(softmax_loss, x, y, t)
    want, want_grads = loss_and_grads(reference_softmax_loss, x.double(), y.double(), t.double())
    assert_close(got, want, 2e-2, what="loss")
    for name, g, w in zip("xyt", got_grads, want_grads, strict=True):
        assert_close(g, w, 2e-2, what=f"grad {name}")


def random_ids(n: int, pattern: str, generator: torch.Generator) -> torch.Tensor:
    if pattern == "distinct":
        return torch.randperm(n, generator=generator) * 7 - 3
    if pattern == "equal":
        return torch.full((n,), 5)
    return torch.randint(0, max(1, n // 3), (n,), generator=generator)


@pytest.mark.parametrize("pattern", ["distinct", "equal", "clusters"])
@pytest.mark.parametrize("n,chunk", [(1, None), (9, 4), (200, 33)])
def test_positive_ids_match_label_matrix_reference(pattern, n, chunk):
    g = torch.Generator().manual_seed(torch.seed() % (2**31))
    ids = random_ids(n, pattern, g)
    x, y = unit_rows(n, 16), unit_rows(n, 16)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    got, got_grads = loss_and_grads(sigmoid_loss, x, y, t, b, positive_ids=ids, chunk=chunk)
    want, want_grads = loss_and_grads(reference_sigmoid_loss, x, y, t, b, positive_ids=ids)
    assert_close(got, want, 1e-12, what="sigmoid loss")
    assert_sigmoid_grads_close(got_grads, want_grads, 1e-10, x, y, t, b, positive_ids=ids)
    got, got_grads = loss_and_grads(softmax_loss, x, y, t, positive_ids=ids)
    want, want_grads = loss_and_grads(reference_softmax_loss, x, y, t, positive_ids=ids)
    assert_close(got, want, 1e-12, atol=1e-300, what="softmax loss")
    for name, gr, w in zip("xyt", got_grads, want_grads, strict=True):
        assert_close(gr, w, 1e-10, atol=1e-300, what=f"softmax grad {name}")


def test_distinct_ids_equal_identity_labels():
    n = 50
    x, y = unit_rows(n, 8), unit_rows(n, 8)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    ids = torch.randperm(n)
    assert_close(sigmoid_loss(x, y, t, b, positive_ids=ids), sigmoid_loss(x, y, t, b), 1e-13)


def test_one_element_scale_and_bias_get_gradients_of_their_shape():
    x, y = unit_rows(5, 4, torch.float32), unit_rows(5, 4, torch.float32)
    t = torch.tensor([10.0], requires_grad=True)
    b = torch.tensor([-10.0], requires_grad=True)
    sigmoid_loss(x, y, t, b).backward()
    assert t.grad.shape == (1,) and b.grad.shape == (1,)


def test_gradient_is_scaled_by_the_incoming_gradient():
    x, y = unit_rows(20, 6), unit_rows(20, 6)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    _, once = loss_and_grads(lambda *a: sigmoid_loss(*a), x, y, t, b)
    _, thrice = loss_and_grads(lambda *a: 3.0 * sigmoid_loss(*a) ** 1, x, y, t, b)
    for g1, g3 in zip(once, thrice, strict=True):
        assert_close(g3, 3.0 * g1, 1e-13)


def test_sigmoid_module_initialisation_and_gradient_to_log_scale():
    crit = SigmoidLoss()
    assert math.isclose(crit.logit_scale.item(), 10.0, rel_tol=1e-6)
    assert crit.logit_bias.item() == -10.0 and isinstance(crit.logit_bias, torch.nn.Parameter)
    x, y = unit_rows(16, 8, torch.float64), unit_rows(16, 8, torch.float64)
    crit = crit.double()
    loss = crit(x, y)
    loss.backward()
    t = crit.logit_scale.detach().clone().requires_grad_(True)
    reference_sigmoid_loss(x, y, t, torch.tensor(-10.0, dtype=torch.float64)).backward()
    # d loss / d t' = t * d loss / d t
    assert_close(crit.log_logit_scale.grad, t.detach() * t.grad, 1e-10)


def test_bad_inputs_name_the_argument():
    x, y = unit_rows(4, 3, torch.float32), unit_rows(4, 3, torch.float32)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    cases = [
        ((x[:3], y, t, b), "image_features and text_features must have the same shape"),
        ((x, y[:, :2], t, b), "same shape"),
        ((x[0], y, t, b), "image_features must have shape"),
        ((x, y.double(), t, b), "share a dtype"),
        ((x.int(), y.int(), t, b), "image_features must be float32"),
        ((x, y, torch.tensor([1.0, 2.0]), b), "logit_scale must be a 0-d or 1-element tensor"),
        ((x, y, torch.tensor(float("inf")), b), "logit_scale must be finite"),
        ((x, y, t, torch.tensor(float("nan"))), "logit_bias must be finite"),
        ((x, y, 10.0, b), "logit_scale must be a 0-d or 1-element tensor"),
        ((x[:0], y[:0], t, b), "at least one row"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            sigmoid_loss(*args)
    with pytest.raises(ValueError, match="positive_ids must have shape"):
        sigmoid_loss(x, y, t, b, positive_ids=torch.arange(3))
    with pytest.raises(ValueError, match="positive_ids must be an integer tensor"):
        softmax_loss(x, y, t, positive_ids=torch.zeros(4))
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        softmax_loss(x, y, torch.tensor(float("nan")))
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        sigmoid_loss(x, y, t, b, chunk=0)


def _open_clip_loss_module():
    """open_clip's loss.py, loaded alone: the package itself imports torchvision, which the CPU torch lacks."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.submodule_search_locations is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss_alone", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_sigmoid_matches_open_clip():
    module = _open_clip_loss_module()
    if module is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open-clip-torch to compare against it)")
    n, d = 257, 64
    x, y = unit_rows(n, d, torch.float32), unit_rows(n, d, torch.float32)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    theirs = module.SigLipLoss()(x, y, t, b)
    ours = sigmoid_loss(x, y, t, b)
    assert_close(ours, theirs, 1e-5)
