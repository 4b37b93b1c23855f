"""The worker of `siglip bench loss`: one fresh process per batch size, every implementation measured in it.

`siglip.bench.loss` starts `python -m siglip.bench.loss_worker --worker` with the batch size's configuration as JSON on
stdin; the worker prints its rows as one JSON line. The implementations, their memory guard and the timing live here.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

from siglip.bench.memory import peak_rss, reset_peak_rss

PANEL_ROWS = 4096
WARMUP_ROWS = 256
MIB = 1 << 20

# Bytes per n^2 logit that the full-matrix implementations hold at their peak, in units of the dtype's size, with a
# margin over what `siglip bench loss` measured on the CPU (naive and open_clip both peaked at 5.0 n^2 float32
# values at n = 4096, 8192 and 16384). Used only to skip a size before it exhausts the machine.
FULL_MATRIX_COPIES = {"naive": 6, "open_clip": 6}
MEMORY_HEADROOM = 0.75
"""Fraction of the currently available memory an implementation may be predicted to use before it is skipped."""


def result_row(config: dict, impl: str, ms: float | None, peak_mb: float | None, *, backend: str | None = None,
         times_ms: list[float] | None = None, skipped: str | None = None) -> dict:
    row = {"impl": impl, "batch_size": config["n"], "dim": config["dim"], "ms": ms, "peak_mem_mb": peak_mb,
           "dtype": config["dtype"], "device": config["device"]}
    if backend is not None:
        row["backend"] = backend
    if times_ms is not None:
        row["times_ms"] = times_ms
    if skipped is not None:
        row["skipped"] = skipped
    return row


def worker_main(config: dict) -> list[dict]:
    """Measure every implementation at one batch size (see `siglip.bench.loss` for the procedure)."""
    import torch

    device = torch.device(config["device"])
    dtype = getattr(torch, config["dtype"])
    n, dim, impls = config["n"], config["dim"], config["impls"]
    generator = torch.Generator().manual_seed(config["seed"])

    def features(rows: int) -> tuple:
        x, y = (torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1)
                .to(device=device, dtype=dtype) for _ in range(2))
        return x, y, torch.tensor(10.0, device=device), torch.tensor(-10.0, device=device)

    backend_of = {impl: _tiled_backend(impl) for impl in impls if impl.startswith("tiled")}
    if any(b == "cpu_fused" for b in backend_of.values()) or "tiled" in impls:
        prepare_cpu_kernel(device)
    small = features(min(n, WARMUP_ROWS))
    steps = {}
    skipped = {}
    for impl in impls:
        try:
            steps[impl] = _step(impl, backend_of.get(impl))
            steps[impl](*small)              # initialise threads, BLAS buffers and kernels outside the measurement
        except Exception as error:  # noqa: BLE001 - a peer that cannot run here (siglip-kernel without CUDA) is a row
            steps.pop(impl, None)
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            skipped[impl] = f"cannot run here: {reason}"
    inputs = features(n)
    grad_bytes = 2 * n * dim * inputs[0].element_size()
    peaks = {}
    for impl in [i for i in impls if i in steps]:
        need = _predicted_bytes(impl, n, inputs[0].element_size())
        available = _available_bytes(device)
        if need is not None and available is not None and need > MEMORY_HEADROOM * available:
            skipped[impl] = (f"cannot allocate: needs about {need / 2**30:.1f} GiB for its n x n matrices, "
                             f"{available / 2**30:.1f} GiB available")
            continue
        try:
            peaks[impl] = (measure_peak(steps[impl], inputs, device) - grad_bytes) / MIB
        except (RuntimeError, MemoryError) as error:        # torch reports a failed allocation as RuntimeError
            skipped[impl] = f"cannot allocate: {str(error).splitlines()[0][:200]}"
    times: dict[str, list[float]] = {impl: [] for impl in peaks}
    for _ in range(config["repeats"]):
        for impl in peaks:                                   # round-robin: a busy machine slows all alike
            times[impl].append(_time_once(steps[impl], inputs, device) * 1000)
    rows = []
    for impl in impls:
        backend = _resolved_backend(impl, backend_of, device, dtype, n)
        if impl in peaks:
            rows.append(result_row(config, impl, round(statistics.median(times[impl]), 2), round(peaks[impl], 2),
                             backend=backend, times_ms=[round(t, 2) for t in times[impl]]))
        else:
            rows.append(result_row(config, impl, None, None, backend=backend, skipped=skipped.get(impl, "not run")))
    return rows


def _tiled_backend(impl: str) -> str:
    return "auto" if impl == "tiled" else impl[len("tiled-"):]


def _resolved_backend(impl: str, backend_of: dict, device, dtype, n: int) -> str | None:
    if impl not in backend_of:
        return None
    from siglip import kernels

    try:
        return kernels.resolve(backend_of[impl], device, dtype, n, n)
    except ValueError:
        return backend_of[impl]


def prepare_cpu_kernel(device) -> None:
    """Build (or load) the fused CPU kernel before anything is timed; report how long a build took."""
    if device.type != "cpu":
        return
    from siglip.kernels import cpu_fused

    try:
        cpu_fused.load()
    except cpu_fused.KernelUnavailable as error:
        print(f"siglip bench loss: fused CPU kernel unavailable ({error})", file=sys.stderr)
        return
    if cpu_fused.build_seconds is not None:
        print(f"siglip bench loss: built the fused CPU kernel in {cpu_fused.build_seconds:.2f} s", file=sys.stderr)


def _step(impl: str, backend: str | None):
    """A function (x, y, t, b) -> None running one forward plus backward of `impl` on fresh leaves."""
    import torch

    from siglip.loss import sigmoid_loss

    def leaves(*tensors):
        return [t.detach().requires_grad_(True) for t in tensors]

    if impl == "naive":
        def step(x, y, t, b):
            x, y, t, b = leaves(x, y, t, b)
            n = x.shape[0]
            labels = 2 * torch.eye(n, dtype=x.dtype, device=x.device) - 1
            logits = t.to(x.dtype) * x @ y.t() + b.to(x.dtype)
            (-torch.nn.functional.logsigmoid(labels * logits).sum() / n).backward()
        return step
    if impl == "open_clip":
        criterion = open_clip_loss_module().SigLipLoss()

        def step(x, y, t, b):
            x, y, t, b = leaves(x, y, t, b)
            criterion(x, y, t.to(x.dtype), b.to(x.dtype)).backward()
        return step
    if impl == "siglip_kernel":
        from siglip_kernel import fused_siglip_loss  # the siglip-kernel package (Triton, CUDA only)

        def step(x, y, t, b):
            x, y, t, b = leaves(x, y, t, b)
            fused_siglip_loss(x, y, t.log(), b).backward()   # it takes log t, the parameter t' itself
        return step
    if impl == "gemm_floor":
        from siglip.kernels.block import accumulation_dtype

        def step(x, y, t, b):
            # The CPU kernels multiply in the accumulation dtype; on CUDA the products run in the input dtype.
            if x.device.type == "cpu":
                x, y = x.to(accumulation_dtype(x.dtype)), y.to(accumulation_dtype(y.dtype))
            n, d = x.shape
            panel = torch.empty(min(n, PANEL_ROWS) * n, dtype=x.dtype, device=x.device)
            grad_x = torch.empty(n, d, dtype=x.dtype, device=x.device)
            grad_y = torch.zeros(n, d, dtype=x.dtype, device=x.device)
            for start in range(0, n, PANEL_ROWS):
                rows = x[start:start + PANEL_ROWS]
                s = torch.mm(rows, y.t(), out=panel[: rows.shape[0] * n].view(rows.shape[0], n))   # (p, n)
                torch.mm(s, y, out=grad_x[start:start + rows.shape[0]])                            # (p, d)
                grad_y.addmm_(s.t(), rows)                                                         # (n, d)
        return step

    def step(x, y, t, b):
        x, y, t, b = leaves(x, y, t, b)
        sigmoid_loss(x, y, t, b, backend=backend).backward()
    return step


def open_clip_loss_module():
    """open_clip's loss.py, loaded alone: the package itself imports torchvision, which the CPU torch lacks."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("open_clip is not installed (pip install --no-deps open-clip-torch)")
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss_alone", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _predicted_bytes(impl: str, n: int, element_size: int) -> int | None:
    """What a full-matrix implementation will hold at its peak; None for the others (they need O(n) memory)."""
    copies = FULL_MATRIX_COPIES.get(impl)
    return None if copies is None else copies * n * n * max(element_size, 4)


def _available_bytes(device) -> int | None:
    import torch

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_peak(step, inputs, device) -> int:
    """Bytes by which one call raised the peak memory above what was in use before it."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(*inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = reset_peak_rss()
    step(*inputs)
    return peak_rss() - before


def _time_once(step, inputs, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    print(json.dumps(worker_main(json.loads(sys.stdin.read()))))
