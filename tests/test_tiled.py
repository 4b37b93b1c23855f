"""The tile loop of `siglip.tiled` against the full-matrix reference, on blocks shaped as the ring uses them."""

from __future__ import annotations

import pytest
import torch

from reference import assert_close, label_matrix, unit_rows
from siglip.kernels.block import accumulation_dtype
from siglip.kernels.eager import TILE_COLS, TILE_ROWS, torch_tile
from siglip.tiled import TiledSigmoidLoss, sigmoid_block

# Tolerances, as a fraction of each result's scale (`reference.error_ratio`): the largest error measured over fresh
# draws of these tests (`.venv/bin/python scripts/measure_tolerances.py --minutes 35`: 6 rounds) times about 10.
# Every call here names the "torch" tile loop; tests/test_kernels.py holds the other kernels to the same reference.
FLOAT64_TOLERANCE = 1e-14                        # measured up to 7.1e-16
FLOAT32_TOLERANCE = 3e-6                         # measured up to 2.7e-7
"""16-bit inputs are widened to float32 before the tile loop (and the sums stay float32), so they are held to
float32's tolerance."""


def reference_block(x, y, t, b, z):
    """sum_ij softplus(-z_ij (t <x_i, y_j> + b)), its gradients (x, y, t, b) in float64 with autograd, and the
    sizes of the terms whose sums d/dt and d/db are: sum_ij |g_ij s_ij| and sum_ij |g_ij|."""
    leaves = [v.detach().double().clone().requires_grad_(True) for v in (x, y, torch.tensor(t), torch.tensor(b))]
    xs, ys, ts, bs = leaves
    s = xs @ ys.t()
    loss = torch.nn.functional.softplus(-z * (ts * s + bs)).sum()
    loss.backward()
    g = (-z * torch.sigmoid(-z * (ts * s + bs))).detach()
    sizes = [0.0, 0.0, 0.0, (g * s.detach()).abs().sum().item(), g.abs().sum().item()]
    return loss.detach(), [leaf.grad for leaf in leaves], sizes


def assert_block_close(result, want, want_grads, sizes, tol, what="block"):
    """Each sum within tol of its largest entry, or, for d/dt and d/db (which may cancel), of its terms' size."""
    got = [result.loss, result.grad_image, result.grad_text, result.grad_scale, result.grad_bias]
    for name, g, w, size in zip(["loss", "x", "y", "t", "b"], got, [want] + want_grads, sizes, strict=True):
        assert_close(g, w, tol, scale=size, what=f"{what} {name}")


@pytest.mark.parametrize("offset", [0, 5, -4, 40, -40, None])
@pytest.mark.parametrize("rows,cols,chunk,column_chunk", [(13, 29, 4, 7), (29, 13, 6, 5), (20, 20, None, None)])
def test_block_with_diagonal_offset_matches_reference(offset, rows, cols, chunk, column_chunk):
    x, y = unit_rows(rows, 8), unit_rows(cols, 8)
    t, b = 7.0, -3.0
    z = label_matrix(rows, cols, offset=offset) if offset is not None else -torch.ones(rows, cols, dtype=torch.float64)
    result = sigmoid_block(x, y, t, b, diagonal_offset=offset, chunk=chunk, column_chunk=column_chunk, backend="torch")
    assert_block_close(result, *reference_block(x, y, t, b, z), FLOAT64_TOLERANCE, what="tiled float64 offset")


@pytest.mark.parametrize("rows,cols,chunk,column_chunk", [(17, 23, 5, 6), (40, 9, 7, 4)])
def test_block_with_ids_matches_reference(rows, cols, chunk, column_chunk):
    image_ids = torch.randint(0, 6, (rows,))
    text_ids = torch.randint(0, 6, (cols,))
    x, y = unit_rows(rows, 5), unit_rows(cols, 5)
    z = label_matrix(rows, cols, image_ids=image_ids, text_ids=text_ids)
    result = sigmoid_block(x, y, 12.0, -6.0, image_ids=image_ids, text_ids=text_ids, diagonal_offset=0,
                           chunk=chunk, column_chunk=column_chunk, backend="torch")
    assert_block_close(result, *reference_block(x, y, 12.0, -6.0, z), FLOAT64_TOLERANCE, what="tiled float64 ids")


def test_tile_shape_does_not_change_the_result():
    x, y = unit_rows(70, 16), unit_rows(70, 16)
    whole = sigmoid_block(x, y, 10.0, -10.0, diagonal_offset=0, chunk=70, column_chunk=70, backend="torch")
    sizes = reference_block(x, y, 10.0, -10.0, label_matrix(70))[2]
    for chunk, column_chunk in [(1, 70), (70, 1), (9, 11), (64, 3)]:
        tiled = sigmoid_block(x, y, 10.0, -10.0, diagonal_offset=0, chunk=chunk, column_chunk=column_chunk,
                              backend="torch")
        assert_block_close(tiled, whole.loss, [whole.grad_image, whole.grad_text, whole.grad_scale,
                                               whole.grad_bias], sizes, FLOAT64_TOLERANCE, what="tiled float64 shape")


def test_default_tiles_span_more_than_one_tile_each_way():
    # Larger than one default tile in both directions: the loop's boundaries at their real sizes.
    rows, cols = TILE_ROWS + 37, TILE_COLS + 5
    x, y = unit_rows(rows, 3), unit_rows(cols, 3)
    z = label_matrix(rows, cols, offset=-20)
    result = sigmoid_block(x, y, 4.0, -2.0, diagonal_offset=-20, backend="torch")
    assert_block_close(result, *reference_block(x, y, 4.0, -2.0, z), FLOAT64_TOLERANCE, what="tiled float64 default")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_accumulates_16_bit_inputs_in_float32(dtype):
    x, y = unit_rows(33, 16, dtype), unit_rows(21, 16, dtype)
    result = sigmoid_block(x, y, 10.0, -10.0, diagonal_offset=3, chunk=8, column_chunk=8, backend="torch")
    assert accumulation_dtype(dtype) == torch.float32
    assert all(v.dtype == torch.float32 for v in (result.loss, result.grad_image, result.grad_text))
    z = label_matrix(33, 21, offset=3)
    assert_block_close(result, *reference_block(x.double(), y.double(), 10.0, -10.0, z), FLOAT32_TOLERANCE,
                       what=f"tiled widened {str(dtype).split('.')[-1]}")


def test_torch_tile_turns_scores_into_the_logit_gradient():
    scores = torch.randn(6, 9, dtype=torch.float64)
    t, b, first = 3.0, -1.0, 2
    z = label_matrix(6, 9, offset=first)
    logits = t * scores + b
    want_loss = torch.nn.functional.softplus(-z * logits).sum()
    want_grad = -z * torch.sigmoid(-z * logits)                    # d/dlogit softplus(-z logit)
    loss, grad_sum = torch_tile(scores, t, b, first_diagonal_column=first)
    torch.testing.assert_close(scores, want_grad, rtol=1e-14, atol=0)
    torch.testing.assert_close(loss, want_loss, rtol=1e-14, atol=0)
    torch.testing.assert_close(grad_sum, want_grad.sum(), rtol=1e-12, atol=1e-15)


def test_autograd_function_scales_by_the_incoming_gradient_and_frees_nothing_twice():
    x = unit_rows(40, 6).requires_grad_(True)
    y = unit_rows(40, 6).requires_grad_(True)
    t = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
    (2.5 * TiledSigmoidLoss.apply(x, y, t, b, None, 7, "torch")).backward()
    grads = [v.grad.clone() for v in (x, y, t, b)]
    for v in (x, y, t, b):
        v.grad = None
    z = label_matrix(40, 40)
    _, want, sizes = reference_block(x, y, 10.0, -5.0, z)
    for name, g, w, size in zip("xytb", grads, want, sizes[1:], strict=True):
        assert_close(g, 2.5 * w / 40, FLOAT64_TOLERANCE, scale=2.5 * size / 40, what=f"tiled float64 scaled {name}")


def test_retained_graph_keeps_its_gradients_when_grad_is_changed_in_place():
    # backward hands its saved gradients to autograd; with retain_graph=True they must stay untouched for the next
    # backward even if the caller scales .grad in place (as gradient clipping does).
    x = unit_rows(30, 5, torch.float32).requires_grad_(True)
    y = unit_rows(30, 5, torch.float32).requires_grad_(True)
    t, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    loss = TiledSigmoidLoss.apply(x, y, t, b, None, None, "torch")
    loss.backward(retain_graph=True)
    first = [v.grad.clone() for v in (x, y, t, b)]
    for v in (x, y, t, b):
        v.grad.mul_(100.0)
        v.grad = None
    loss.backward()
    for v, g in zip((x, y, t, b), first, strict=True):
        assert torch.equal(v.grad, g)


# ---------------------------------------------------------------------------------------------------------------
# Memory: the n x n matrix never exists, measured by the kernel (VmHWM of a fresh process), not by siglip

MEMORY_SIZES, MEMORY_D, MEMORY_CHUNK = (512, 2048), 32, 256
MEMORY_PROBE = f"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from reference import peak_rss_growth, pin_mmap_threshold, unit_rows
from siglip.loss import sigmoid_loss

pin_mmap_threshold()
def step(n, backend):
    x, y = (unit_rows(n, {MEMORY_D}, torch.float32).requires_grad_() for _ in range(2))
    t, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    if backend == "full matrix":              # Algorithm 1 on the n x n float32 matrix, with autograd
        labels = 2 * torch.eye(n) - 1
        return lambda: (-torch.nn.functional.logsigmoid(labels * (t * x @ y.t() + b)).sum() / n).backward()
    return lambda: sigmoid_loss(x, y, t, b, chunk={MEMORY_CHUNK}, backend=backend).backward()
peaks = {{}}
for backend in sys.argv[2:]:
    step(256, backend)()                          # thread pools, BLAS buffers, the compiled kernel: before
    peaks[backend] = [peak_rss_growth(step(n, backend)) for n in {MEMORY_SIZES}]
print(json.dumps(peaks))
"""


def test_peak_memory_does_not_grow_with_n_squared():
    import json
    import subprocess
    import sys
    from pathlib import Path

    from reference import CPU_BACKENDS, require_backend

    backends = [require_backend(name) for name in CPU_BACKENDS]
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(Path(__file__).parent), *backends, "full matrix"],
                          capture_output=True, text=True, timeout=900, check=True)     # about 6 s of CPU
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = MEMORY_SIZES
    mib = 2**20
    # The probe sees an n x n matrix: the full-matrix loss (several n x n float32 matrices kept by autograd) must
    # grow by at least one n x n float32 matrix.
    full = peaks.pop("full matrix")
    assert full[1] - full[0] >= 4 * (large**2 - small**2), f"full matrix: {[p / mib for p in full]} MiB"
    for backend, measured in peaks.items():
        # Within three tiles (chunk rows x at most 2048 columns of float32: the tile, and the temporaries the eager
        # tile makes) plus what is O(n d): the two feature gradients and, in the tile loop, copies of the features
        # (8 n d floats allowed), plus 1 MiB of small buffers: 9 MiB at n = 2048, where one n x n float32 matrix is
        # 16 MiB. Measured on this project's machine: torch 1.5 and 3.0 MiB, cpu_fused 0.6 and 2.9 MiB at n = 512
        # and 2048 (the full matrix: 3.1 and 48.8 MiB).
        for n, peak in zip(MEMORY_SIZES, measured, strict=True):
            allowed = 3 * MEMORY_CHUNK * min(n, 2048) * 4 + 8 * n * MEMORY_D * 4 + mib
            assert peak <= allowed, (f"{backend} at n = {n}: peak {peak / mib:.2f} MiB above the inputs, "
                                     f"allowed {allowed / mib:.2f} MiB")
