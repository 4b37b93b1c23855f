"""The kernels of the sigmoid loss, behind one choice.

Each backend is a module with a `sigmoid_block(block, *, chunk, column_chunk) -> BlockResult`, the one interface of
`siglip.kernels.block`; `kernel(name)` returns it and `resolve` chooses the name.

Backends:
    "torch"     -- `siglip.kernels.eager`: the tile loop in eager PyTorch, any device, any dtype, always available.
                   The reference every other backend is tested against.
    "cpu_fused" -- `siglip.kernels.cpu_fused`: the tile's element-wise passes fused into one C/OpenMP pass,
                   float32 arithmetic (16-bit inputs are widened first), CPU only. Built with the system C compiler
                   on first use (0.3 s on the project's 2-core machine) and cached on disk.
    "triton"    -- `siglip.kernels.triton`: the whole block (products and element-wise work) in Triton kernels,
                   16-bit or float32 inputs with float32 accumulation, CUDA only (or any device under
                   TRITON_INTERPRET=1, which the tests use).
    "auto"      -- the fastest that applies, chosen by `resolve`.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import torch

from siglip.kernels.block import BlockKernel

BACKENDS = ("auto", "torch", "cpu_fused", "triton")
_MODULES = {"torch": "siglip.kernels.eager", "cpu_fused": "siglip.kernels.cpu_fused", "triton": "siglip.kernels.triton"}

AUTO_BUILD_ELEMENTS = 1 << 22
"""Logits in a block (rows x cols) above which "auto" compiles the fused CPU kernel if it is not built yet.

The build takes about 0.3 s once per machine (docs/benchmarks.md); below this size (a 2048 x 2048 block) the eager
tile costs less than that, and small calls (tests, tiny batches) never trigger a build. Once the kernel is in the
disk cache, "auto" uses it at every size."""

_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_warned = False


def triton_available() -> bool:
    """Whether the `triton` package can be imported (not whether a GPU exists)."""
    return importlib.util.find_spec("triton") is not None


def resolve(backend: str, device: torch.device, dtype: torch.dtype, rows: int, cols: int) -> str:
    """The backend that will run a block of `rows` images against `cols` texts.

    Args:
        backend: one of BACKENDS. A named backend that cannot run here raises ValueError saying why.
        device, dtype: of the features as the caller holds them (before any widening to float32).
        rows, cols: the block's size; "auto" builds the CPU kernel only for blocks of AUTO_BUILD_ELEMENTS or more.

    Returns:
        "torch", "cpu_fused" or "triton".
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "torch":
        return backend
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton); use backend='torch'")
        if dtype not in _FUSED_DTYPES:
            raise ValueError(f"backend='triton' takes float32, bfloat16 or float16 features, got {dtype}; "
                             "use backend='torch' for float64")
        return backend
    if backend == "cpu_fused":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu_fused' runs on the CPU, got features on {device}; use 'triton' or 'torch'")
        if dtype not in _FUSED_DTYPES:
            raise ValueError(f"backend='cpu_fused' computes in float32 and takes float32, bfloat16 or float16 "
                             f"features, got {dtype}; use backend='torch' for float64")
        return backend
    # auto
    if dtype not in _FUSED_DTYPES:
        return "torch"
    if device.type == "cuda":
        return "triton" if triton_available() else "torch"
    if device.type == "cpu":
        from siglip.kernels import cpu_fused

        if cpu_fused.is_loaded() or (
            cpu_fused.failure() is None and (cpu_fused.is_cached() or rows * cols >= AUTO_BUILD_ELEMENTS)
        ):
            try:
                cpu_fused.load()
                return "cpu_fused"
            except cpu_fused.KernelUnavailable as error:
                _warn_once(f"siglip: the fused CPU kernel is unavailable, using the PyTorch tile instead ({error})")
    return "torch"


def kernel(name: str) -> BlockKernel:
    """The `sigmoid_block` of a resolved backend ("torch", "cpu_fused" or "triton"), its module imported on demand."""
    return importlib.import_module(_MODULES[name]).sigmoid_block


def _warn_once(message: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=3)
