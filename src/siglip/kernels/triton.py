"""The tiled sigmoid loss as Triton kernels: products and element-wise work fused, no B x B matrix anywhere.

One kernel does the work of one side. A program owns BLOCK_M rows of `a` and sweeps every column block of `b`:

    s   = a_blk b_blk^T                    (BLOCK_M, BLOCK_N), input dtype in, float32 accumulation
    w   = +-(t s + b)                      the label's sign: + for a negative pair, - for a positive one
    e   = exp(-|w|)
    loss += max(w, 0) + log1p(e)           softplus(w), exact for any logit
    g   = +-sigmoid(w)                     d loss / d logit, sigmoid(w) = (1 if w >= 0 else e) / (1 + e)
    grad_a_blk += g b_blk                  (BLOCK_M, d) in float32, each program only touches its own rows

and per row it keeps sum_j loss, sum_j g (d loss / d b) and sum_j g s (d loss / d t). Running it on (x, y) gives the
loss and the image gradient; on (y, x), with the labels transposed, the text gradient. That is four products per
tile instead of three (the similarities are formed twice), the price of needing no atomics: the result is
deterministic and every gradient row has one writer. log1p(e) uses the same series as the CPU kernel
(2 atanh(u), u = e / (2 + e) <= 1/3), which needs only exp, division and multiply-adds.

Inputs may be float32 (products in IEEE float32, not TF32), bfloat16 or float16 (products on the tensor cores in the
input dtype, g rounded to it for the gradient product, float32 accumulation). With TRITON_INTERPRET=1 set before this
module is imported the kernels run on CPU tensors through Triton's interpreter, which is how the tests check them
(bfloat16 products excepted: see INTERPRETED).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from siglip.kernels.block import Block, BlockResult

LABELS_NONE, LABELS_DIAGONAL, LABELS_IDS = 0, 1, 2


@triton.jit
def _sigmoid_rows_kernel(
    a_ptr, b_ptr, grad_ptr, row_loss_ptr, row_grad_ptr, row_grad_s_ptr, a_ids_ptr, b_ids_ptr,
    n_rows, n_cols, dim, stride_a, stride_b, stride_grad,
    scale_ptr, bias_ptr, diagonal_offset,
    LABELS: tl.constexpr, IEEE_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    scale = tl.load(scale_ptr)                                        # t and b read on the device: no host sync
    bias = tl.load(bias_ptr)
    if LABELS == 2:
        a_ids = tl.load(a_ids_ptr + rows, mask=row_ok, other=0)
    loss_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    grad_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    grad_s_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for col0 in range(0, n_cols, BLOCK_N):
        cols = col0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < dim
            a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptr + cols[:, None] * stride_b + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE_FP32:
                s += tl.dot(a, tl.trans(b), input_precision="ieee")
            elif UPCAST_DOT:
                s += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
            else:
                s += tl.dot(a, tl.trans(b))
        valid = row_ok[:, None] & col_ok[None, :]
        if LABELS == 2:
            b_ids = tl.load(b_ids_ptr + cols, mask=col_ok, other=0)
            positive = a_ids[:, None] == b_ids[None, :]
        elif LABELS == 1:
            positive = cols[None, :] == rows[:, None] + diagonal_offset
        else:
            positive = rows[:, None] < 0                              # no positives in this block
        sign = tl.where(positive, -1.0, 1.0)
        w = sign * (scale * s + bias)                                 # the pair's loss is softplus(w)
        e = tl.exp(-tl.abs(w))
        u = e / (2.0 + e)
        u2 = u * u
        series = 1.0 / 15.0                                           # atanh(u) / u = sum_k u^(2k) / (2k + 1)
        series = series * u2 + 1.0 / 13.0
        series = series * u2 + 1.0 / 11.0
        series = series * u2 + 1.0 / 9.0
        series = series * u2 + 1.0 / 7.0
        series = series * u2 + 1.0 / 5.0
        series = series * u2 + 1.0 / 3.0
        series = series * u2 + 1.0
        softplus = tl.maximum(w, 0.0) + 2.0 * u * series
        g = sign * tl.where(w >= 0.0, 1.0, e) / (1.0 + e)          # d/dz softplus(sign z) = sign sigmoid(sign z)
        g = tl.where(valid, g, 0.0)
        loss_sum += tl.sum(tl.where(valid, softplus, 0.0), axis=1)
        grad_sum += tl.sum(g, axis=1)
        grad_s_sum += tl.sum(g * s, axis=1)
        # grad_a[rows] += g b_blk, d columns at a time; the rows belong to this program alone.
        for k0 in range(0, dim, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < dim
            b = tl.load(b_ptr + cols[:, None] * stride_b + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE_FP32:
                part = tl.dot(g, b, input_precision="ieee")
            elif UPCAST_DOT:
                part = tl.dot(g.to(b.dtype).to(tl.float32), b.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(g.to(b.dtype), b)
            out = grad_ptr + rows[:, None] * stride_grad + ks[None, :]
            out_ok = row_ok[:, None] & k_ok[None, :]
            tl.store(out, tl.load(out, mask=out_ok, other=0.0) + part, mask=out_ok)
    tl.store(row_loss_ptr + rows, loss_sum, mask=row_ok)
    tl.store(row_grad_ptr + rows, grad_sum, mask=row_ok)
    tl.store(row_grad_s_ptr + rows, grad_s_sum, mask=row_ok)


# Triton's interpreter multiplies bfloat16 operands of tl.dot as raw bit patterns (triton-lang/triton#11584, "not
# supported yet"). Interpreted, bfloat16 operands are widened exactly to float32 before the product; compiled for a
# GPU the product runs in bfloat16 on the tensor cores. Everything else is the same code on both paths.
INTERPRETED = type(_sigmoid_rows_kernel).__name__ == "InterpretedFunction"


def _one_side(a, b, scale, bias, labels, offset, a_ids, b_ids, block_m, block_n, block_k):
    """Run the row kernel of `a` against `b`: per-row sums (3, rows) and the unscaled gradient sum_j g_ij b_j."""
    rows, dim = a.shape
    grad = torch.zeros(rows, dim, dtype=torch.float32, device=a.device)
    scale, bias = (torch.as_tensor(v, device=a.device).detach().reshape(1).to(torch.float32) for v in (scale, bias))
    sums = torch.empty(3, rows, dtype=torch.float32, device=a.device)
    ids_a = a_ids if a_ids is not None else sums          # any tensor: the pointer is never read without ids
    ids_b = b_ids if b_ids is not None else sums
    grid = (triton.cdiv(rows, block_m),)
    _sigmoid_rows_kernel[grid](
        a, b, grad, sums[0], sums[1], sums[2], ids_a, ids_b,
        rows, b.shape[0], dim, a.stride(0), b.stride(0), grad.stride(0),
        scale, bias, int(offset),
        LABELS=labels, IEEE_FP32=a.dtype == torch.float32, UPCAST_DOT=INTERPRETED and a.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return sums, grad


def sigmoid_block(block: Block, *, chunk: int | None = None, column_chunk: int | None = None,
                  block_m: int = 64, block_n: int = 64, block_k: int = 32) -> BlockResult:
    """Loss and gradients of one block (see `siglip.kernels.block.BlockKernel`), by the Triton kernels.

    The features are float32, bfloat16 or float16, on a CUDA device (or any device under the interpreter).
    chunk and column_chunk are ignored: the kernels tile by block_m x block_n (rows x columns) and block_k (the
    product's depth), powers of two, at least 16 (the products' minimum). Returns a `BlockResult` of float32 sums.
    """
    images, texts = block.image_features.contiguous(), block.text_features.contiguous()
    if images.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton kernel takes float32, bfloat16 or float16 features, got {images.dtype}")
    # t and b stay where they are (0-d tensors on the GPU are loaded by the kernels): reading them with float()
    # would make the host wait for the device on every call.
    logit_scale, logit_bias = (torch.as_tensor(v, device=images.device).detach().reshape(()).to(torch.float32)
                               for v in (block.logit_scale, block.logit_bias))
    image_ids = text_ids = None
    if block.uses_ids:
        labels, offset = LABELS_IDS, 0
        image_ids, text_ids = block.image_ids.to(torch.int64).contiguous(), block.text_ids.to(torch.int64).contiguous()
    elif block.diagonal_offset is not None:
        labels, offset = LABELS_DIAGONAL, int(block.diagonal_offset)
    else:
        labels, offset = LABELS_NONE, 0
    blocks = (block_m, block_n, block_k)
    image_sums, grad_image = _one_side(images, texts, logit_scale, logit_bias, labels, offset, image_ids, text_ids,
                                       *blocks)
    # The text side: the same loss read column-wise, so the labels transpose (i, i + k) -> (j, j - k).
    _, grad_text = _one_side(texts, images, logit_scale, logit_bias, labels, -offset, text_ids, image_ids, *blocks)
    totals = image_sums.sum(dim=1)
    return BlockResult(
        loss=totals[0],
        grad_image=grad_image.mul_(logit_scale),
        grad_text=grad_text.mul_(logit_scale),
        grad_scale=totals[2],
        grad_bias=totals[1],
    )
