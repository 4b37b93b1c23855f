"""Ground truth for the losses: the paper's formulas written literally, on the full matrix, in float64."""

from __future__ import annotations

import os

import torch


def label_matrix(n: int, m: int | None = None, image_ids=None, text_ids=None, offset: int = 0) -> torch.Tensor:
    """z: +1 for positive pairs, -1 otherwise; identity labels (shifted by offset) unless ids are given."""
    m = n if m is None else m
    if image_ids is not None:
        return torch.where(image_ids[:, None] == text_ids[None, :], 1.0, -1.0).double()
    z = -torch.ones(n, m, dtype=torch.float64)
    for i in range(n):
        if 0 <= i + offset < m:
            z[i, i + offset] = 1.0
    return z


def reference_sigmoid_loss(x, y, t, b, positive_ids=None) -> torch.Tensor:
    """Algorithm 1 of the paper: -sum(log_sigmoid(z * (t x y^T + b))) / n, in float64 with autograd."""
    n = x.shape[0]
    logits = t.double().reshape(()) * x.double() @ y.double().t() + b.double().reshape(())
    z = label_matrix(n, image_ids=positive_ids, text_ids=positive_ids)
    return -torch.nn.functional.logsigmoid(z * logits).sum() / n


def scalar_gradient_scales(x, y, t, b, positive_ids=None) -> tuple[float, float]:
    """The size of the sums behind d loss / d t and d loss / d b: (1/n) sum_ij |g_ij s_ij| and (1/n) sum_ij |g_ij|.

    Both gradients are sums of n^2 terms of either sign that can cancel to far below any one term; rounding error
    is relative to these magnitudes, not to the (possibly tiny) result.
    """
    n = x.shape[0]
    s = x.double() @ y.double().t()
    z = label_matrix(n, image_ids=positive_ids, text_ids=positive_ids)
    logits = t.double().reshape(()) * s + b.double().reshape(())
    g = -z * torch.sigmoid(-z * logits)
    return (g * s).abs().sum().item() / n, g.abs().sum().item() / n


def reference_softmax_loss(x, y, t, positive_ids=None) -> torch.Tensor:
    """CLIP: the mean of the two cross-entropies, targets spread uniformly over each row's positives."""
    n = x.shape[0]
    logits = t.double().reshape(()) * x.double() @ y.double().t()
    if positive_ids is None:
        target = torch.eye(n, dtype=torch.float64)
    else:
        target = (positive_ids[:, None] == positive_ids[None, :]).double()
    image_to_text = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(target.t() / target.t().sum(1, keepdim=True) * logits.t().log_softmax(1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def unit_rows(n: int, d: int, dtype=torch.float64, generator=None) -> torch.Tensor:
    """n random rows of unit L2 norm."""
    x = torch.randn(n, d, dtype=torch.float64, generator=generator)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def loss_and_grads(fn, x, y, t, b=None, **kwargs):
    """Value and gradients (x, y, t[, b]) of fn(x, y, t[, b]) on fresh leaf copies."""
    leaves = [v.detach().clone().requires_grad_(True) for v in (x, y, t) + ((b,) if b is not None else ())]
    value = fn(*leaves, **kwargs)
    value.backward()
    return value.detach(), [leaf.grad for leaf in leaves]


def error_ratio(got: torch.Tensor, want: torch.Tensor, scale: float = 0.0) -> float:
    """max |got - want| over max(max |want|, scale): the tolerance a comparison needs.

    `scale` is the size of the terms a result sums when they may cancel far below it (the t and b gradients), so
    that rounding is measured against what was rounded, not against a small or zero result. Results below 1e-30
    count as zero: float32's exponential flushes to 0 below about 1e-38, so nothing smaller is a float32 result.
    """
    got, want = torch.as_tensor(got).detach().double().cpu(), torch.as_tensor(want).detach().double().cpu()
    size = max(want.abs().max().item() if want.numel() else 0.0, float(scale), 1e-30)
    return (got - want).abs().max().item() / size


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, *, scale: float = 0.0, what: str = "") -> None:
    """got within tol of want, relative to max(max |want|, scale) (see `error_ratio`); non-finite values fail.

    With SIGLIP_ERROR_LOG set to a file, every comparison also appends "what<TAB>ratio<TAB>tol" to it: that is how
    scripts/measure_tolerances.py measures the errors the tolerances of the tests are set from.
    """
    ratio = error_ratio(got, want, scale)
    log = os.environ.get("SIGLIP_ERROR_LOG")
    if log:
        with open(log, "a") as file:
            file.write(f"{what}\t{ratio:.6e}\t{tol:.3e}\n")
    assert torch.isfinite(torch.as_tensor(got)).all(), f"{what}: non-finite result"
    assert ratio <= tol, f"{what}: error {ratio:.3e} of the scale, allowed {tol:.3e}"


CPU_BACKENDS = ("torch", "cpu_fused")
"""The kernels that run on the CPU; every loss test names the one it runs (tests/test_kernels.py runs "triton" too,
through Triton's interpreter, and tests what "auto" picks)."""


def require_backend(backend: str) -> str:
    """`backend`, or a pytest skip saying why it cannot run on this machine (no C compiler, no triton)."""
    import pytest

    from siglip import kernels
    from siglip.kernels import cpu_fused

    if backend == "cpu_fused":
        try:
            cpu_fused.load()
        except cpu_fused.KernelUnavailable as error:
            pytest.skip(f"the fused CPU kernel cannot be built here: {error}")
    if backend == "triton" and not kernels.triton_available():
        pytest.skip("triton is not installed (pip install triton, or the project's dev extra)")
    return backend


def peak_rss_growth(step) -> int:
    """Bytes by which `step()` raised this process's peak resident set (Linux).

    Read from the kernel's own accounting, not from anything siglip counts: freed heap memory is handed back
    (malloc_trim), VmHWM is reset to VmRSS through /proc/self/clear_refs, `step` runs, and VmHWM minus the VmRSS
    before it is the answer. Pin glibc's mmap threshold first (`pin_mmap_threshold`) so that tensors freed inside
    `step` leave the resident set at once and the peak follows the live tensors.
    """
    import ctypes
    from pathlib import Path

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {key}")

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")           # 5: reset VmHWM to VmRSS (Linux >= 4.0)
    before = status("VmRSS")
    step()
    return status("VmHWM") - before


def pin_mmap_threshold(size: int = 128 * 1024) -> None:
    """Serve every allocation of `size` bytes or more with its own mmap, returned to the system when freed."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, size)               # M_MMAP_THRESHOLD; setting it also stops its drift


def peak_allocated_bytes(step) -> int:
    """Peak bytes of tensors alive at once during `step()`, beyond those alive before it, from the allocation and
    free events that PyTorch's allocator reports to its profiler (CPU or CUDA).

    Unlike the resident set this does not depend on when another thread first writes a buffer (a receive buffer
    counts from its allocation), so it is the same on every run; it counts torch tensors only.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = sorted((e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def tolerance(tolerances: tuple[float, float, float], quantity: str) -> float:
    """One of (loss, x and y gradients, t and b gradients) for `quantity`: "loss", "x", "y", "t" or "b".

    They differ by orders of magnitude: the loss and the t and b gradients are float32 sums (1e-7 of their scale),
    while 16-bit feature gradients are rounded to their dtype on the way out (bfloat16: 2^-8 of each entry).
    """
    return tolerances[0 if quantity == "loss" else 1 if quantity in ("x", "y") else 2]
