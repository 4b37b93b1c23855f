"""The tile loop of `siglip.tiled` against the full-matrix reference, on blocks shaped as the ring uses them."""

from __future__ import annotations

import pytest
import torch

from reference import label_matrix, unit_rows
from siglip.kernels.block import accumulation_dtype
from siglip.kernels.eager import TILE_COLS, TILE_ROWS, torch_tile
from siglip.tiled import TiledSigmoidLoss, sigmoid_block


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


def assert_block_close(result, want, want_grads, sizes, rtol):
    """Each sum within rtol of its largest entry, or, for d/dt and d/db (which may cancel), of its terms' size."""
    got = [result.loss, result.grad_image, result.grad_text, result.grad_scale, result.grad_bias]
    for name, g, w, size in zip(["loss", "x", "y", "t", "b"], got, [want] + want_grads, sizes, strict=True):
        err = (g.double() - w).abs().max().item()
        allowed = rtol * max(w.abs().max().item(), size, 1e-30)
        assert err <= allowed, f"{name}: error {err:.3e} allowed {allowed:.3e}"


@pytest.mark.parametrize("offset", [0, 5, -4, 40, -40, None])
@pytest.mark.parametrize("rows,cols,chunk,column_chunk", [(13, 29, 4, 7), (29, 13, 6, 5), (20, 20, None, None)])
def test_block_with_diagonal_offset_matches_reference(offset, rows, cols, chunk, column_chunk):
    x, y = unit_rows(rows, 8), unit_rows(cols, 8)
    t, b = 7.0, -3.0
    z = label_matrix(rows, cols, offset=offset) if offset is not None else -torch.ones(rows, cols, dtype=torch.float64)
    result = sigmoid_block(x, y, t, b, diagonal_offset=offset, chunk=chunk, column_chunk=column_chunk, backend="torch")
    assert_block_close(result, *reference_block(x, y, t, b, z), rtol=1e-12)


@pytest.mark.parametrize("rows,cols,chunk,column_chunk", [(17, 23, 5, 6), (40, 9, 7, 4)])
def test_block_with_ids_matches_reference(rows, cols, chunk, column_chunk):
    image_ids = torch.randint(0, 6, (rows,))
    text_ids = torch.randint(0, 6, (cols,))
    x, y = unit_rows(rows, 5), unit_rows(cols, 5)
    z = label_matrix(rows, cols, image_ids=image_ids, text_ids=text_ids)
    result = sigmoid_block(x, y, 12.0, -6.0, image_ids=image_ids, text_ids=text_ids, diagonal_offset=0,
                           chunk=chunk, column_chunk=column_chunk, backend="torch")
    assert_block_close(result, *reference_block(x, y, 12.0, -6.0, z), rtol=1e-12)


def test_tile_shape_does_not_change_the_result():
    x, y = unit_rows(70, 16), unit_rows(70, 16)
    whole = sigmoid_block(x, y, 10.0, -10.0, diagonal_offset=0, chunk=70, column_chunk=70, backend="torch")
    sizes = reference_block(x, y, 10.0, -10.0, label_matrix(70))[2]
    for chunk, column_chunk in [(1, 70), (70, 1), (9, 11), (64, 3)]:
        tiled = sigmoid_block(x, y, 10.0, -10.0, diagonal_offset=0, chunk=chunk, column_chunk=column_chunk,
                              backend="torch")
        assert_block_close(tiled, whole.loss, [whole.grad_image, whole.grad_text, whole.grad_scale,
                                               whole.grad_bias], sizes, rtol=1e-12)


def test_default_tiles_span_more_than_one_tile_each_way():
    # Larger than one default tile in both directions: the loop's boundaries at their real sizes.
    rows, cols = TILE_ROWS + 37, TILE_COLS + 5
    x, y = unit_rows(rows, 3), unit_rows(cols, 3)
    z = label_matrix(rows, cols, offset=-20)
    result = sigmoid_block(x, y, 4.0, -2.0, diagonal_offset=-20, backend="torch")
    assert_block_close(result, *reference_block(x, y, 4.0, -2.0, z), rtol=1e-11)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_accumulates_16_bit_inputs_in_float32(dtype):
    x, y = unit_rows(33, 16, dtype), unit_rows(21, 16, dtype)
    result = sigmoid_block(x, y, 10.0, -10.0, diagonal_offset=3, chunk=8, column_chunk=8, backend="torch")
    assert accumulation_dtype(dtype) == torch.float32
    assert all(v.dtype == torch.float32 for v in (result.loss, result.grad_image, result.grad_text))
    z = label_matrix(33, 21, offset=3)
    assert_block_close(result, *reference_block(x.double(), y.double(), 10.0, -10.0, z), rtol=1e-5)


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
    for g, w, size in zip(grads, want, sizes[1:], strict=True):
        err = (g - 2.5 * w / 40).abs().max().item()
        assert err <= 1e-12 * 2.5 / 40 * max(w.abs().max().item(), size)


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
