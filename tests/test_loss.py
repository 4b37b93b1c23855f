"""The losses against the float64 reference of the paper's formulas: values, gradients, errors."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from reference import (
    CPU_BACKENDS,
    assert_close,
    loss_and_grads,
    reference_sigmoid_loss,
    reference_softmax_loss,
    require_backend,
    scalar_gradient_scales,
    tolerance,
    unit_rows,
)
from siglip.loss import SigmoidLoss, sigmoid_loss, softmax_loss

# Tolerances, as a fraction of each result's scale (`reference.error_ratio`: max |got - want| over the largest entry
# of the reference, or over the size of the terms the t and b gradients sum), as (loss, x and y gradients, t and b
# gradients). Each is the largest error measured over fresh draws of every test below that uses it, on both CPU
# kernels (`.venv/bin/python scripts/measure_tolerances.py --minutes 35`: 6 rounds, reruns of the tests with
# SIGLIP_ERROR_LOG set), times about 10 (float sums change order with the BLAS and the thread count), except the
# 16-bit feature gradients: those are rounded to their dtype on the way out, at most 2^-8 of the largest entry for
# bfloat16 and 2^-11 for float16, and are held to about twice that. Largest errors measured, in the same order (at
# t = 1e3, where `assert_sigmoid_close` scales the tolerances by t / 10, divided by 100):
TOLERANCES = {
    torch.float64: (1e-14, 1e-13, 3e-14),         # 7.9e-16, 7.3e-15, 2.7e-15
    torch.float32: (7e-6, 3e-5, 8e-6),            # 6.8e-7, 2.3e-6, 7.3e-7
    torch.bfloat16: (2e-6, 1e-2, 6e-6),           # 1.2e-7, 3.6e-3, 5.2e-7
    torch.float16: (2e-6, 1e-3, 6e-6),            # 1.1e-7, 3.9e-4, 5.3e-7
}
EXTREME_TOLERANCES = {
    # t up to 1e4, |b| up to 1e3: the gradients held against t (float32 rounds t <x, y> to about t * 6e-8, and at
    # t = 1e4 that rounding decides the pairs near the boundary), the loss against itself
    torch.float32: (2e-6, 2e-5, 1e-6),            # 1.4e-7, 1.6e-6, 3.6e-8
    torch.bfloat16: (2e-6, 4e-3, 1e-6),           # 7.1e-8, 4.0e-4, 1.9e-8
}
SOFTMAX_TOLERANCES = {
    torch.float64: (1e-14, 1e-13, 2e-14),         # 3.1e-16, 5.9e-15, 1.4e-15
    torch.float32: (1e-6, 5e-5, 3e-5),            # 1.0e-7, 6.0e-6, 2.3e-6 (t up to 1e3: not rescaled here)
    torch.bfloat16: (5e-7, 1e-2, 1e-6),           # 4.6e-8, 2.5e-3, 7.2e-8
}


def assert_sigmoid_close(got, got_grads, want, want_grads, dtype, x, y, t, b, positive_ids=None, what=""):
    """Loss and x, y gradients against their largest entry; t and b gradients against the size of the terms they sum.

    A single product t * <x, y> in float32 already carries t * 1e-7 of rounding, so entries far below the largest
    cannot be held to a tolerance of themselves; t's and b's gradients are sums of n^2 signed terms that may cancel.
    """
    label = f"{what} {str(dtype).split('.')[-1]}"
    scale_t, scale_b = scalar_gradient_scales(x, y, t, b, positive_ids)
    # A logit t <x, y> + b carries t times the rounding of <x, y>, and a pair's loss and gradient move with it
    # relative to themselves (sigmoid'(w) / sigmoid(w) <= 1): the tolerances hold up to t = 10 and grow with t above
    # (at t = 1e3 a single pair near its boundary has measured 2.7e-5 on the t gradient in float32, 3.7e-14 in float64).
    conditioning = max(1.0, float(t) / 10.0)
    assert_close(got, want, tolerance(TOLERANCES[dtype], "loss") * conditioning, what=f"{label} loss")
    for name, g, w, scale in zip("xytb", got_grads, want_grads, (0.0, 0.0, scale_t, scale_b), strict=True):
        assert_close(g, w, tolerance(TOLERANCES[dtype], name) * conditioning, scale=scale, what=f"{label} grad {name}")


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request) -> str:
    """Each kernel that computes float32 and 16-bit losses on the CPU (float64 runs on "torch" alone)."""
    return require_backend(request.param)


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
    got, got_grads = loss_and_grads(sigmoid_loss, x, y, t, b, chunk=chunk, backend="torch")   # float64: torch only
    want, want_grads = loss_and_grads(reference_sigmoid_loss, x, y, t, b)
    assert got.dtype == torch.float64 and all(g.dtype == torch.float64 for g in got_grads)
    assert_sigmoid_close(got, got_grads, want, want_grads, torch.float64, x, y, t, b, what="sigmoid")


@pytest.mark.parametrize("n,d,chunk", CASES)
@pytest.mark.parametrize("t,b", [(1.0, -10.0), (10.0, 0.0), (1e3, 50.0)])
def test_sigmoid_float32_matches_reference(cpu_backend, n, d, chunk, t, b):
    x, y = unit_rows(n, d, torch.float32), unit_rows(n, d, torch.float32)
    t32, b32 = torch.tensor(t), torch.tensor(b)
    got, got_grads = loss_and_grads(sigmoid_loss, x, y, t32, b32, chunk=chunk, backend=cpu_backend)
    want, want_grads = loss_and_grads(reference_sigmoid_loss, x.double(), y.double(), t32.double(), b32.double())
    assert got.dtype == torch.float32 and all(g.dtype == torch.float32 for g in got_grads)
    assert_sigmoid_close(got, got_grads, want, want_grads, torch.float32, x, y, t32, b32, what="sigmoid")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,chunk", [(7, 64, 3), (300, 768, 64), (1000, 3, None)])
def test_sigmoid_16bit_matches_reference(cpu_backend, dtype, n, d, chunk):
    x, y = unit_rows(n, d, dtype), unit_rows(n, d, dtype)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    got, got_grads = loss_and_grads(sigmoid_loss, x, y, t, b, chunk=chunk, backend=cpu_backend)
    # The reference sees the same rounded inputs: what is measured is the loss's own arithmetic.
    want, want_grads = loss_and_grads(reference_sigmoid_loss, x.double(), y.double(), t.double(), b.double())
    assert got.dtype == torch.float32, "16-bit inputs accumulate and return in float32"
    assert [g.dtype for g in got_grads] == [dtype, dtype, torch.float32, torch.float32]
    assert_sigmoid_close(got, got_grads, want, want_grads, dtype, x, y, t, b, what="sigmoid")


@pytest.mark.parametrize("t,b", [(1e4, -1e3), (1e4, 1e3), (1e4, 0.0), (1.0, 1e3), (1.0, -1e3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sigmoid_extreme_logits_stay_finite_and_exact(cpu_backend, t, b, dtype):
    n, d = 33, 16
    x, y = unit_rows(n, d, dtype), unit_rows(n, d, dtype)
    t_, b_ = torch.tensor(t), torch.tensor(b)
    got, got_grads = loss_and_grads(sigmoid_loss, x, y, t_, b_, chunk=5, backend=cpu_backend)
    want, want_grads = loss_and_grads(reference_sigmoid_loss, x.double(), y.double(), t_.double(), b_.double())
    label = f"extreme {str(dtype).split('.')[-1]}"
    assert_close(got, want, tolerance(EXTREME_TOLERANCES[dtype], "loss"), what=f"{label} loss")
    for name, g, w in zip("xytb", got_grads, want_grads, strict=True):
        assert_close(g, w, tolerance(EXTREME_TOLERANCES[dtype], name), scale=t, what=f"{label} grad {name}")


@pytest.mark.parametrize("n,d", [(1, 3), (2, 1), (7, 64), (300, 768)])
@pytest.mark.parametrize("t", [1.0, 10.0, 1e3])
def test_softmax_matches_reference(n, d, t):
    x, y = unit_rows(n, d), unit_rows(n, d)
    t64 = torch.tensor(t, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        xs, ys, ts = x.to(dtype), y.to(dtype), t64.to(dtype)
        got, got_grads = loss_and_grads(softmax_loss, xs, ys, ts)
        want, want_grads = loss_and_grads(reference_softmax_loss, xs.double(), ys.double(), ts.double())
        tols, label = SOFTMAX_TOLERANCES[dtype], f"softmax {str(dtype).split('.')[-1]}"
        # Each is a difference that can cancel far below its terms (n = 2, d = 1, t = 10 with aligned signs: the loss
        # is log(1 + e^-20) = 2e-9, which float32 rounds to 0), so rounding is measured against the terms: the loss
        # is logsumexp(row) minus the positive's logit, both near t; x's and y's gradients are t / n times sums of
        # (p - target) y with |p - target| <= 1; t's is (1 / n) times sums of (p - target) s, at most 1 a row.
        assert_close(got, want, tolerance(tols, "loss"), scale=t, what=f"{label} loss")
        for name, g, w in zip("xyt", got_grads, want_grads, strict=True):
            assert_close(g, w, tolerance(tols, name), scale=t / n if name in "xy" else 1.0,
                         what=f"{label} grad {name}")


def test_softmax_16bit():
    x, y = unit_rows(64, 32, torch.bfloat16), unit_rows(64, 32, torch.bfloat16)
    t = torch.tensor(10.0)
    got, got_grads = loss_and_grads(softmax_loss, x, y, t)
    want, want_grads = loss_and_grads(reference_softmax_loss, x.double(), y.double(), t.double())
    tols = SOFTMAX_TOLERANCES[torch.bfloat16]
    assert_close(got, want, tolerance(tols, "loss"), what="softmax bfloat16 loss")
    for name, g, w in zip("xyt", got_grads, want_grads, strict=True):
        assert_close(g, w, tolerance(tols, name), what=f"softmax bfloat16 grad {name}")


def random_ids(n: int, pattern: str, generator: torch.Generator) -> torch.Tensor:
    if pattern == "distinct":
        return torch.randperm(n, generator=generator) * 7 - 3
    if pattern == "equal":
        return torch.full((n,), 5)
    return torch.randint(0, max(1, n // 3), (n,), generator=generator)


@pytest.mark.parametrize("pattern", ["distinct", "equal", "clusters"])
@pytest.mark.parametrize("n,chunk", [(1, None), (9, 4), (200, 33)])
def test_positive_ids_match_label_matrix_reference(pattern, n, chunk):
    ids = random_ids(n, pattern, torch.default_generator)          # seeded, like every draw, by tests/conftest.py
    x, y = unit_rows(n, 16), unit_rows(n, 16)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)
    got, got_grads = loss_and_grads(sigmoid_loss, x, y, t, b, positive_ids=ids, chunk=chunk, backend="torch")
    want, want_grads = loss_and_grads(reference_sigmoid_loss, x, y, t, b, positive_ids=ids)
    assert_sigmoid_close(got, got_grads, want, want_grads, torch.float64, x, y, t, b, positive_ids=ids, what="ids")
    got, got_grads = loss_and_grads(softmax_loss, x, y, t, positive_ids=ids)
    want, want_grads = loss_and_grads(reference_softmax_loss, x, y, t, positive_ids=ids)
    tols = SOFTMAX_TOLERANCES[torch.float64]
    assert_close(got, want, tolerance(tols, "loss"), what="softmax ids float64 loss")
    for name, gr, w in zip("xyt", got_grads, want_grads, strict=True):
        assert_close(gr, w, tolerance(tols, name), what=f"softmax ids float64 grad {name}")


def test_distinct_ids_equal_identity_labels(cpu_backend):
    n = 50
    x, y = unit_rows(n, 8, torch.float32), unit_rows(n, 8, torch.float32)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    ids = torch.randperm(n)
    by_ids = sigmoid_loss(x, y, t, b, positive_ids=ids, backend=cpu_backend)
    assert_close(by_ids, sigmoid_loss(x, y, t, b, backend=cpu_backend), tolerance(TOLERANCES[torch.float32], "loss"),
                 what="distinct ids float32 loss")


def test_one_element_scale_and_bias_get_gradients_of_their_shape(cpu_backend):
    x, y = unit_rows(5, 4, torch.float32), unit_rows(5, 4, torch.float32)
    t = torch.tensor([10.0], requires_grad=True)
    b = torch.tensor([-10.0], requires_grad=True)
    sigmoid_loss(x, y, t, b, backend=cpu_backend).backward()
    assert t.grad.shape == (1,) and b.grad.shape == (1,)
    want = loss_and_grads(reference_sigmoid_loss, x.double(), y.double(), t.double(), b.double())[1]
    assert_close(t.grad, want[2], tolerance(TOLERANCES[torch.float32], "t"), scale=1.0, what="one-element t")
    assert_close(b.grad, want[3], tolerance(TOLERANCES[torch.float32], "b"), scale=1.0, what="one-element b")


def test_gradient_is_scaled_by_the_incoming_gradient():
    x, y = unit_rows(20, 6), unit_rows(20, 6)
    t, b = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    _, once = loss_and_grads(lambda *a: sigmoid_loss(*a, backend="torch"), x, y, t, b)
    _, thrice = loss_and_grads(lambda *a: 3.0 * sigmoid_loss(*a, backend="torch") ** 1, x, y, t, b)
    for g1, g3 in zip(once, thrice, strict=True):
        assert torch.equal(g3, 3.0 * g1)         # backward multiplies the stored gradient once: fl(3 g) both ways


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
    # d loss / d t' = t * d loss / d t (float64 features: "auto" runs the torch kernel on every machine)
    assert_close(crit.log_logit_scale.grad, t.detach() * t.grad, tolerance(TOLERANCES[torch.float64], "t"),
                 what="module t'")


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


def test_sigmoid_matches_open_clip(cpu_backend):
    module = _open_clip_loss_module()
    if module is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open-clip-torch to compare against it)")
    n, d = 257, 64
    x, y = unit_rows(n, d, torch.float32), unit_rows(n, d, torch.float32)
    t, b = torch.tensor(10.0), torch.tensor(-10.0)
    theirs = module.SigLipLoss()(x, y, t, b)
    ours = sigmoid_loss(x, y, t, b, backend=cpu_backend)
    assert_close(ours, theirs, tolerance(TOLERANCES[torch.float32], "loss"), what="open_clip float32 loss")


# ---------------------------------------------------------------------------------------------------------------
# No host-device synchronisation on a device path


def test_the_loss_never_reads_a_value_back_from_its_device():
    # On the meta device a tensor has a shape and no data: any float(), .item() or .tolist() on the way raises. The
    # eager kernel runs there as it would on CUDA, so this walks every line of the device path, forward and
    # backward, and proves none of them makes the host wait for the device (t and b are read on the device).
    x, y = (torch.empty(300, 16, device="meta").requires_grad_() for _ in range(2))
    t, b = (torch.empty((), device="meta").requires_grad_() for _ in range(2))
    for ids in (None, torch.empty(300, dtype=torch.int64, device="meta")):
        loss = sigmoid_loss(x, y, t, b, positive_ids=ids, chunk=128, backend="auto")
        loss.backward()
        assert loss.device.type == "meta" and x.grad.shape == x.shape and t.grad.shape == ()
    softmax_loss(x, y, t).backward()


def test_kernels_receive_t_and_b_as_tensors_on_the_features_device(monkeypatch, cpu_backend):
    from siglip import kernels

    seen, choose = [], kernels.kernel

    def spy(name):
        run = choose(name)

        def recorded(block, **kwargs):
            seen.append((name, block.logit_scale, block.logit_bias))
            return run(block, **kwargs)
        return recorded

    monkeypatch.setattr(kernels, "kernel", spy)
    x, y = unit_rows(9, 4, torch.float32), unit_rows(9, 4, torch.float32)
    sigmoid_loss(x, y, torch.tensor(10.0), torch.tensor(-3.0), backend=cpu_backend)
    ((name, scale, bias),) = seen
    assert name == cpu_backend
    assert all(isinstance(v, torch.Tensor) and v.device == x.device and v.shape == () for v in (scale, bias))
    assert (scale.item(), bias.item()) == (10.0, -3.0)


def test_the_module_passes_its_backend_to_the_kernel(monkeypatch, cpu_backend):
    from siglip import kernels

    chosen, choose = [], kernels.kernel
    monkeypatch.setattr(kernels, "kernel", lambda name: chosen.append(name) or choose(name))
    x, y = unit_rows(12, 4, torch.float32), unit_rows(12, 4, torch.float32)
    SigmoidLoss(backend=cpu_backend)(x, y).backward()
    assert chosen == [cpu_backend]
    with pytest.raises(ValueError, match="backend must be one of"):
        SigmoidLoss(backend="fastest")
