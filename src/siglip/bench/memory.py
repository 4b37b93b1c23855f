"""Resident-set measurements for the CPU benchmarks (Linux): what a call adds to the process's peak memory.

PyTorch's allocator statistics exist only on CUDA, and tracemalloc does not see torch's allocations, so on the CPU
the benchmarks read the kernel's own accounting in /proc/self/status: VmHWM, the peak resident set, which
/proc/self/clear_refs resets to the current resident set (VmRSS). Freed memory that glibc keeps in its heap still
counts as resident, so it is handed back (malloc_trim) before each reset.
"""

from __future__ import annotations

import ctypes
from pathlib import Path


def reset_peak_rss() -> int:
    """Return freed heap memory to the system, reset the peak resident set to the current one; return its bytes."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")          # 5: reset VmHWM to VmRSS (Linux >= 4.0)
    except OSError as error:
        raise RuntimeError(f"cannot reset the peak resident set through /proc/self/clear_refs: {error}") from error
    return status_bytes("VmRSS")


def peak_rss() -> int:
    """The process's peak resident set since the last `reset_peak_rss`, in bytes."""
    return status_bytes("VmHWM")


def status_bytes(key: str) -> int:
    """A memory field of /proc/self/status ("VmRSS", "VmHWM", "VmSize", ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}: peak memory on the CPU needs Linux")


def pin_malloc(mmap_threshold: int) -> None:
    """Pin glibc's mmap threshold so freed large tensors leave the resident set at once (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, mmap_threshold)     # M_MMAP_THRESHOLD; setting it also stops its drift
    except (OSError, AttributeError):
        pass
