"""A fused C kernel for the element-wise part of one sigmoid-loss tile on the CPU.

After a tile of cosine similarities s_ij = <x_i, y_j> is formed by a matrix product, the loss needs, per entry:
the affine map to a logit, the label's sign flip, softplus (the loss), sigmoid (the gradient) and two sums. In
eager PyTorch each of these is a pass over the tile; here they are one pass, with softplus and sigmoid sharing a
single exponential:

    w = -z (positives) or z (negatives),  z = t s + b
    e = exp(-|w|)                                     in (0, 1]
    softplus(w) = max(w, 0) + log1p(e)                exact for any w, no overflow
    sigmoid(w)  = (1 if w >= 0 else e) / (1 + e)
    log1p(e)    = 2 atanh(e / (2 + e))                a short odd series in u = e / (2 + e) <= 1/3,
                                                      accurate to float32 rounding even for tiny e

The source is plain C with OpenMP and no PyTorch headers, so it compiles in about 0.3 s with the system compiler
(no ninja, no pybind11, unlike torch.utils.cpp_extension); it is loaded with ctypes and cached on disk
(``SIGLIP_KERNEL_CACHE``, by default ``~/.cache/siglip/kernels``) under a hash of its source, flags and CPU. Loaded
after torch, it shares torch's libgomp (same soname), so its threads and MKL's are one pool. If no compiler works,
`load()` raises `KernelUnavailable` and the dispatch in `siglip.kernels` falls back to the eager kernel.

The fused tile works in place and takes 2048 x 2048 tiles (16 MB): each tile is four parallel regions (three products
and the kernel), and fewer, larger tiles lose less at each region's barrier when the cores are shared
(docs/benchmarks.md, "Tile shape").
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from siglip.kernels.block import Block, BlockResult
from siglip.kernels.tile_loop import run_tiles

TILE_ROWS = 2048
TILE_COLS = 2048
SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

// exp(x) for x <= 0 (Cephes' single-precision polynomial, about 1 ulp). Below -87 it returns 0 rather than a
// denormal: no denormal slow paths, and the error stays below 1.7e-38 absolute (float32's smallest normal number).
static inline float exp_nonpositive(float x) {
    float a = x < -87.0f ? -87.0f : x;
    float k = floorf(a * 1.44269504088896341f + 0.5f);          // a = k ln2 + r, |r| <= ln2 / 2
    float r = a - k * 0.693359375f;                             // ln2 split in two for an exact first step
    r = r - k * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;                    // 2^k, k >= -126 after the clamp
    float two_k;
    memcpy(&two_k, &bits, sizeof two_k);
    return x < -87.0f ? 0.0f : p * two_k;
}

// One entry: s is the similarity, sign is +1 for a negative pair and -1 for a positive one. Writes the gradient
// d loss / d logit back into s and adds to the two sums.
static inline void entry(float *s, float sign, float scale, float bias, float *loss, float *grad) {
    float w = sign * (scale * *s + bias);                       // the loss of this pair is softplus(w)
    float e = exp_nonpositive(-fabsf(w));
    float u = e / (2.0f + e);
    float u2 = u * u;
    float series = 1.0f / 15.0f;                                // atanh(u) / u = sum_k u^(2k) / (2k + 1)
    series = series * u2 + 1.0f / 13.0f;
    series = series * u2 + 1.0f / 11.0f;
    series = series * u2 + 1.0f / 9.0f;
    series = series * u2 + 1.0f / 7.0f;
    series = series * u2 + 1.0f / 5.0f;
    series = series * u2 + 1.0f / 3.0f;
    series = series * u2 + 1.0f;
    float softplus = (w > 0.0f ? w : 0.0f) + 2.0f * u * series;
    float sigmoid = (w >= 0.0f ? 1.0f : e) / (1.0f + e);
    float g = sign * sigmoid;                                   // d/dz softplus(sign z) = sign sigmoid(sign z)
    *loss += softplus;
    *grad += g;
    *s = g;
}

// Columns per float partial sum: 8 lanes x 64 additions keeps the float error near 64 ulp before it moves to double.
#define SPAN 512

static void negatives(float *row, int64_t begin, int64_t end, float scale, float bias, double *sums) {
    for (int64_t j0 = begin; j0 < end; j0 += SPAN) {
        int64_t j1 = j0 + SPAN < end ? j0 + SPAN : end;
        float loss = 0.0f, grad = 0.0f;
        #pragma omp simd reduction(+:loss, grad)
        for (int64_t j = j0; j < j1; ++j) entry(&row[j], 1.0f, scale, bias, &loss, &grad);
        sums[0] += loss; sums[1] += grad;
    }
}

static void by_ids(float *row, int64_t cols, int32_t row_id, const int32_t *col_ids, float scale, float bias,
                   double *sums) {
    for (int64_t j0 = 0; j0 < cols; j0 += SPAN) {
        int64_t j1 = j0 + SPAN < cols ? j0 + SPAN : cols;
        float loss = 0.0f, grad = 0.0f;
        #pragma omp simd reduction(+:loss, grad)
        for (int64_t j = j0; j < j1; ++j) {
            float sign = col_ids[j] == row_id ? -1.0f : 1.0f;
            entry(&row[j], sign, scale, bias, &loss, &grad);
        }
        sums[0] += loss; sums[1] += grad;
    }
}

// scores: (rows, cols) row-major with leading dimension ld, overwritten by the gradient d loss / d logit.
// mode 0: every pair is a negative; 1: row r's positive is column r + first_diag_col (when inside the tile);
// 2: positives where row_ids[r] == col_ids[j]. out: the loss sum and the gradient sum (d loss / d bias).
void siglip_sigmoid_tile(float *scores, int64_t rows, int64_t cols, int64_t ld, float scale, float bias,
                         int32_t mode, int64_t first_diag_col, const int32_t *row_ids, const int32_t *col_ids,
                         int32_t threads, double *out) {
    double loss = 0.0, grad = 0.0;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(+:loss, grad)
    for (int64_t r = 0; r < rows; ++r) {
        float *row = scores + r * ld;
        double sums[2] = {0.0, 0.0};
        if (mode == 2) {
            by_ids(row, cols, row_ids[r], col_ids, scale, bias, sums);
        } else {
            int64_t diag = mode == 1 ? r + first_diag_col : -1;
            if (diag >= 0 && diag < cols) {
                negatives(row, 0, diag, scale, bias, sums);
                float l = 0.0f, g = 0.0f;
                entry(&row[diag], -1.0f, scale, bias, &l, &g);
                sums[0] += l; sums[1] += g;
                negatives(row, diag + 1, cols, scale, bias, sums);
            } else {
                negatives(row, 0, cols, scale, bias, sums);
            }
        }
        loss += sums[0]; grad += sums[1];
    }
    out[0] = loss; out[1] = grad;
}
"""

FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC"]
MODE_NONE, MODE_DIAGONAL, MODE_IDS = 0, 1, 2


class KernelUnavailable(RuntimeError):
    """The C kernel could not be compiled or loaded here (no compiler, or it failed); the message says why."""


_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None
build_seconds: float | None = None
"""Seconds the last compilation in this process took (None when the library came from the disk cache)."""


def cache_dir() -> Path:
    """Where compiled kernels are kept: $SIGLIP_KERNEL_CACHE, else $XDG_CACHE_HOME/siglip/kernels or ~/.cache/..."""
    if os.environ.get("SIGLIP_KERNEL_CACHE"):
        return Path(os.environ["SIGLIP_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "siglip" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_fingerprint() -> str:
    """-march=native builds for this CPU: the cache key includes its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path() -> Path:
    """The path the compiled kernel has (or will have) in the cache."""
    key = hashlib.sha256("\0".join([SOURCE, " ".join(FLAGS), _cpu_fingerprint()]).encode()).hexdigest()[:16]
    return cache_dir() / f"sigmoid_tile_{key}.so"


def is_loaded() -> bool:
    """True once the library is loaded in this process."""
    return _library is not None


def failure() -> str | None:
    """Why the last build or load failed in this process, or None."""
    return _failure


def is_cached() -> bool:
    """True when a compiled library is loaded or waiting in the disk cache (no compile step needed)."""
    return _library is not None or library_path().exists()


def _build(path: Path) -> None:
    global build_seconds
    compiler = _compiler()
    if compiler is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc) to build the fused CPU kernel")
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        source = Path(work) / "sigmoid_tile.c"
        source.write_text(SOURCE)
        built = Path(work) / path.name
        result = subprocess.run(
            [compiler, *FLAGS, str(source), "-o", str(built), "-lm"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise KernelUnavailable(f"{compiler} failed to build the fused CPU kernel: {result.stderr.strip()[:2000]}")
        os.replace(built, path)          # atomic: a concurrent build of the same source writes the same bytes
    build_seconds = time.perf_counter() - start


def load() -> ctypes.CDLL:
    """The compiled kernel, building it on first use; raises `KernelUnavailable` (remembered) when that fails."""
    global _library, _failure
    if _library is not None:
        return _library
    with _lock:
        if _library is not None:
            return _library
        if _failure is not None:
            raise KernelUnavailable(_failure)
        try:
            path = library_path()
            if not path.exists():
                _build(path)
            library = ctypes.CDLL(str(path))
        except (OSError, KernelUnavailable) as error:
            _failure = str(error)
            raise KernelUnavailable(_failure) from error
        function = library.siglip_sigmoid_tile
        function.restype = None
        function.argtypes = [
            ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_float,
            ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p,
        ]
        _library = library
        return library


def sigmoid_block(block: Block, *, chunk: int | None = None, column_chunk: int | None = None) -> BlockResult:
    """Loss and gradients of one block (see `siglip.kernels.block.BlockKernel`): the shared tile loop with the fused
    tile, float32 arithmetic (16-bit features are widened first)."""
    if block.uses_ids:
        # The kernel compares int32 ids: renumber both sides through one table so equal ids stay equal.
        rows = block.image_ids.numel()
        _, compact = torch.unique(torch.cat([block.image_ids.reshape(-1), block.text_ids.reshape(-1)]),
                                  return_inverse=True)
        compact = compact.to(torch.int32)
        block = dataclasses.replace(block, image_ids=compact[:rows], text_ids=compact[rows:])
    return run_tiles(block, sigmoid_tile, chunk=chunk or TILE_ROWS, column_chunk=column_chunk or TILE_COLS)


def sigmoid_tile(
    scores: torch.Tensor,
    logit_scale: float,
    logit_bias: float,
    *,
    first_diagonal_column: int | None = None,
    row_ids: torch.Tensor | None = None,
    column_ids: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Turn a tile of similarities into the gradient of its loss, in place, in one pass.

    Args:
        scores: (r, c) float32, contiguous, on the CPU: s_ij = <x_i, y_j>. Overwritten with g_ij = d loss / d logit_ij.
        logit_scale, logit_bias: t and b; the logit is t s_ij + b.
        first_diagonal_column: row i's positive is column i + first_diagonal_column where that is inside the tile;
            None (and no ids) means every pair is a negative.
        row_ids, column_ids: (r,) and (c,) int32 ids (contiguous, CPU); a pair is positive where they are equal.

    Returns:
        (sum_ij loss_ij, sum_ij g_ij), accumulated in float64: the tile's loss and its d loss / d b.
    """
    if scores.dtype != torch.float32 or scores.device.type != "cpu" or not scores.is_contiguous():
        raise ValueError(f"scores must be a contiguous float32 CPU tensor, got {scores.dtype} on {scores.device}")
    library = load()
    rows, cols = scores.shape
    out = (ctypes.c_double * 2)()
    if row_ids is not None:
        mode, first, row_ptr, col_ptr = MODE_IDS, 0, row_ids.data_ptr(), column_ids.data_ptr()
    elif first_diagonal_column is not None:
        mode, first, row_ptr, col_ptr = MODE_DIAGONAL, int(first_diagonal_column), None, None
    else:
        mode, first, row_ptr, col_ptr = MODE_NONE, 0, None, None
    library.siglip_sigmoid_tile(
        scores.data_ptr(), rows, cols, cols, float(logit_scale), float(logit_bias),
        mode, first, row_ptr, col_ptr, torch.get_num_threads(), out,
    )
    return out[0], out[1]
