"""`siglip bench`: the losses' speed and memory, side by side in one run.

`siglip bench loss` times one forward plus backward of each implementation of the single-device sigmoid loss:

- ``naive``: Algorithm 1 on the full n x n matrix with autograd (labels 2I - 1, logsigmoid, sum);
- ``open_clip``: open_clip's ``SigLipLoss`` (its ``loss.py`` loaded alone: the package imports torchvision);
- ``tiled``: ours, ``sigmoid_loss`` with ``backend="auto"``; its row names the backend that auto chose;
- ``tiled-<backend>``: ours with each other backend that runs here (``tiled-torch`` on the CPU, and so on);
- ``gemm_floor``: the three matrix products of the loss and nothing else (s = x y^T, then s y and s^T x), in panels
  of PANEL_ROWS rows so that it runs at every n. Its time is what any exact implementation must at least spend;
- ``siglip_kernel`` (only when named in --impls): the fused Triton loss of the siglip-kernel package (CUDA only;
  a row that says why where it cannot run).

Every batch size runs in a fresh worker process. The worker first calls each implementation at a small size (thread
pools, the BLAS and the compiled kernel are then initialised), then, per implementation, measures the peak memory of
one call, then times `--repeats` calls per implementation in round-robin order, so that a machine shared with other
work slows every implementation alike. ``ms`` is the median of those calls.

``peak_mem_mb`` (MiB) on the CPU is the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after glibc's free memory is handed back with malloc_trim) over one call, less the bytes of
the gradients of the two feature matrices: the memory an implementation needs beyond its inputs and their gradients.
On CUDA it is the growth of torch.cuda.max_memory_allocated, less the same gradient bytes. An implementation whose
n x n matrices would not fit in the available memory is skipped at that size, and its row says so.

"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from siglip.bench.loss_worker import MIB, prepare_cpu_kernel, result_row
from siglip.bench.record import publish, write_marked_section
from siglip.errors import UserError

IMPLS = ("naive", "open_clip", "tiled", "gemm_floor")
OPTIONAL_IMPLS = ("siglip_kernel",)
"""Measured when --impls names them: peers that need a GPU or a package the project does not depend on."""
DTYPES = ("float32", "bfloat16", "float16", "float64")

DOC_BEGIN = "<!-- siglip bench loss: begin (written by `siglip bench loss --markdown`; do not edit by hand) -->"
DOC_END = "<!-- siglip bench loss: end -->"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `siglip bench loss`."""
    parser.add_argument("--batch-sizes", default="1024,2048,4096,8192",
                      help="comma-separated batch sizes n (default 1024,2048,4096,8192)")
    parser.add_argument("--dim", type=int, default=256, help="embedding width d (default 256)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="feature dtype (default float32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per implementation and size (default 3)")
    parser.add_argument("--impls", default=",".join(IMPLS),
                      help="comma-separated subset of naive, open_clip, tiled, gemm_floor (and siglip_kernel, the "
                           "siglip-kernel package's fused loss, CUDA only); 'tiled' expands to every backend that runs "
                           "here; 'tiled-<backend>' names one; IMPL:N runs IMPL only up to n = N "
                           "(default: naive, open_clip, tiled, gemm_floor at every size)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features (default 0)")
    parser.add_argument("--json", action="store_true", help='print one JSON object {"rows": [...]} instead of a table')
    parser.add_argument("--markdown", metavar="FILE",
                      help=f"write the tables into FILE (between the markers {DOC_BEGIN!r} and {DOC_END!r} if FILE "
                           "has them, otherwise the whole file)")
    parser.add_argument("--plot", metavar="FILE.png", help="write a log-log plot of time and memory against n")


def run(args: argparse.Namespace) -> int:
    """`siglip bench loss`: one worker per batch size; print a table or one JSON object; write docs if asked."""
    sizes = parse_batch_sizes(args.batch_sizes)
    for name in ("dim", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: torch sees no CUDA device here; run on a GPU machine or use --device cpu")
    impls = expand_impls(args.impls, args.device)
    caps = size_caps(args.impls, impls)
    rows: list[dict] = []
    started = time.perf_counter()
    load = [os.getloadavg()[0]]
    for n in sizes:
        config = {"n": n, "dim": args.dim, "dtype": args.dtype, "device": args.device, "repeats": args.repeats,
                  "impls": [impl for impl in impls if n <= caps.get(impl, n)], "seed": args.seed}
        measured = {row["impl"]: row for row in _run_worker(config)} if config["impls"] else {}
        size_rows = [measured.get(impl) or result_row(config, impl, None, None,
                                                skipped=f"above its size cap ({impl} up to n = {caps[impl]})")
                     for impl in impls]
        add_floor_ratios(size_rows)
        rows.extend(size_rows)
        load.append(os.getloadavg()[0])
        print(f"siglip bench loss: n = {n} done after {time.perf_counter() - started:.0f} s", file=sys.stderr)
    result = publish(rows, device=args.device, command=command_line(args), load=load, started=started,
                     as_json=args.json, table=format_table(rows))
    if args.markdown:
        write_markdown(result, Path(args.markdown), plot=args.plot)
    if args.plot:
        plot_rows(rows, Path(args.plot))
    return 0


def parse_batch_sizes(text: str) -> list[int]:
    """'1024,2048' -> [1024, 2048]; a UserError naming the bad entry otherwise."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise UserError(f"--batch-sizes takes positive integers separated by commas, got {part!r} in {text!r}")
        sizes.append(int(part))
    return sizes


def expand_impls(text: str, device: str, auto_choice: str | None = None) -> list[str]:
    """The implementation names of `--impls`; 'tiled' (the auto choice) brings every other backend that runs here.

    auto_choice: the backend "auto" picks for large blocks here (None: ask `siglip.kernels`, building the CPU kernel
    if needed); it is measured once, as 'tiled', not again as 'tiled-<backend>'.
    """
    from siglip import kernels

    backends = ["torch"]
    if device == "cpu":
        backends.append("cpu_fused")
    elif kernels.triton_available():
        backends.append("triton")
    names: list[str] = []
    for part in (p.strip().split(":", 1)[0] for p in text.split(",") if p.strip()):
        if part == "tiled":
            if auto_choice is None:
                auto_choice = _auto_backend(device)
            names += ["tiled"] + [f"tiled-{b}" for b in backends if b != auto_choice]
        elif part in IMPLS + OPTIONAL_IMPLS or (part.startswith("tiled-")
                                                and part[len("tiled-"):] in kernels.BACKENDS[1:]):
            names.append(part)
        else:
            raise UserError(f"--impls: unknown implementation {part!r}; choose from "
                            f"{', '.join(IMPLS + OPTIONAL_IMPLS)} "
                            f"or tiled-<backend> with a backend of {', '.join(kernels.BACKENDS[1:])}")
    if not names:
        raise UserError(f"--impls names no implementation, got {text!r}")
    return list(dict.fromkeys(names))


def size_caps(text: str, names: list[str]) -> dict[str, int]:
    """The largest n of each implementation given as IMPL:N in `--impls` ('tiled:N' caps every tiled-* too)."""
    caps: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if ":" in p):
        impl, _, limit = part.partition(":")
        if not limit.isdigit() or int(limit) < 1:
            raise UserError(f"--impls: the size cap in {part!r} must be a positive integer (IMPL:N)")
        for name in names:
            if name == impl or (impl == "tiled" and name.startswith("tiled-") and name not in caps):
                caps[name] = int(limit)
    return caps


def _auto_backend(device: str) -> str:
    """What backend="auto" runs for a large float32 block on `device` (builds the CPU kernel first if it can)."""
    import torch

    from siglip import kernels

    prepare_cpu_kernel(torch.device(device))
    return kernels.resolve("auto", torch.device(device), torch.float32, 1 << 16, 1 << 16)


def add_floor_ratios(rows: list[dict]) -> None:
    """Give every timed row of one batch size its time over gemm_floor's ("x_floor"), where the floor was timed."""
    floor = next((r["ms"] for r in rows if r["impl"] == "gemm_floor" and r["ms"] is not None), None)
    for row in rows:
        row["x_floor"] = None if floor is None or row["ms"] is None else round(row["ms"] / floor, 3)


def command_line(args: argparse.Namespace) -> str:
    """The `siglip bench loss` command that reproduces this run, every setting spelled out."""
    parts = ["siglip bench loss", f"--batch-sizes {args.batch_sizes.replace(' ', '')}", f"--dim {args.dim}",
             f"--dtype {args.dtype}", f"--repeats {args.repeats}", f"--impls {args.impls.replace(' ', '')}"]
    if args.device != "cpu":
        parts.append(f"--device {args.device}")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    parts += [f"--markdown {args.markdown}"] if args.markdown else []
    parts += [f"--plot {args.plot}"] if args.plot else []
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Output: table, markdown, plot


def format_table(rows: list[dict]) -> str:
    """A plain-text table, one line per row."""
    header = f"{'impl':<16} {'backend':<10} {'n':>7} {'d':>5} {'ms':>11} {'x floor':>8} {'peak MiB':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["ms"] is None:
            lines.append(f"{r['impl']:<16} {r.get('backend') or '':<10} {r['batch_size']:>7} {r['dim']:>5}   "
                         f"skipped: {r['skipped']}")
            continue
        ratio = "" if r.get("x_floor") is None else f"{r['x_floor']:.2f}"
        lines.append(f"{r['impl']:<16} {r.get('backend') or '':<10} {r['batch_size']:>7} {r['dim']:>5} "
                     f"{r['ms']:>11.1f} {ratio:>8} {r['peak_mem_mb']:>10.1f}")
    return "\n".join(lines)


def markdown_tables(result: dict) -> str:
    """Time and memory tables (n down, implementations across) and the ratios the issue asks about."""
    rows = result["rows"]
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    sizes = sorted({r["batch_size"] for r in rows})
    cell = {(r["impl"], r["batch_size"]): r for r in rows}
    backend = {r["impl"]: r.get("backend") for r in rows if r.get("backend")}
    names = [f"{i} ({backend[i]})" if i == "tiled" and i in backend else i for i in impls]

    def table(key: str, digits: int) -> list[str]:
        out = ["| n | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(impls)]
        for n in sizes:
            values = []
            for impl in impls:
                r = cell.get((impl, n))
                values.append("" if r is None else "skipped" if r[key] is None else f"{r[key]:.{digits}f}")
            out.append(f"| {n} | " + " | ".join(values) + " |")
        return out

    dims = sorted({r["dim"] for r in rows})
    dtypes = sorted({r["dtype"] for r in rows})
    lines = [f"Machine: {result['machine']}. d = {', '.join(map(str, dims))}, {', '.join(dtypes)}."]
    if result.get("load_average"):
        low, high = result["load_average"]
        lines[0] += (f" One-minute load average between {low:.1f} and {high:.1f} during the run "
                     f"({os.cpu_count()} = every core busy); the run took {result.get('seconds', 0)} s.")
    if result.get("command"):
        lines += ["", f"Command: `{result['command']}`"]
    lines += ["", "Forward plus backward, milliseconds (median):", ""] + table("ms", 1)
    lines += ["", "Peak memory above the inputs and their gradients, MiB:", ""] + table("peak_mem_mb", 1)
    lines += ["", "Time over gemm_floor's, same run:", ""] + table("x_floor", 2)
    lines += target_lines(rows)
    skipped = [r for r in rows if r["ms"] is None]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {r['impl']} at n = {r['batch_size']}: {r['skipped']}" for r in skipped]
    return "\n".join(lines) + "\n"


def target_lines(rows: list[dict]) -> list[str]:
    """Issue #7's targets, read off this run: at n = 16384 against the floor and open_clip, and whether 65536 ran."""
    cell = {(r["impl"], r["batch_size"]): r for r in rows}
    lines = []
    tiled, floor, peer = cell.get(("tiled", 16384)), cell.get(("gemm_floor", 16384)), cell.get(("open_clip", 16384))
    if tiled and tiled["ms"] is not None:
        lines += ["", f"Targets at n = 16384 (`tiled`, backend {tiled.get('backend')}):"]
        if floor and floor["ms"] is not None:
            ratio = tiled["ms"] / floor["ms"]
            lines.append(f"- time over gemm_floor: {ratio:.2f} (target at most 1.25: "
                         f"{'met' if ratio <= 1.25 else 'not met'})")
        if peer and peer["ms"] is not None:
            speedup = peer["ms"] / tiled["ms"]
            lines.append(f"- speed-up over open_clip: {speedup:.1f}x (target at least 3x: "
                         f"{'met' if speedup >= 3 else 'not met'})")
        peak = tiled["peak_mem_mb"]
        lines.append(f"- peak memory above inputs and gradients: {peak:.1f} MiB (target at most 64 MB: "
                     f"{'met' if peak * MIB <= 64e6 else 'not met'})")
    big = cell.get(("tiled", 65536))
    if big:
        lines.append("- n = 65536: " + (f"ran, {big['ms'] / 1000:.1f} s" if big["ms"] is not None
                                         else f"did not run ({big['skipped']})"))
    return lines


def write_markdown(result: dict, path: Path, plot: str | None = None) -> None:
    """Write the tables into `path`, between DOC_BEGIN and DOC_END when the file already has both markers."""
    body = markdown_tables(result)
    if plot:
        body += f"\n![time and memory against n]({os.path.relpath(plot, path.parent)})\n"
    write_marked_section(path, DOC_BEGIN, DOC_END, body, title="Loss benchmark")


def plot_rows(rows: list[dict], path: Path) -> None:
    """Two log-log panels: time and peak memory against n, one line per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in dict.fromkeys(r["impl"] for r in rows):
        mine = sorted((r for r in rows if r["impl"] == impl and r["ms"] is not None), key=lambda r: r["batch_size"])
        if not mine:
            continue
        label = impl + (f" ({mine[0]['backend']})" if impl == "tiled" and mine[0].get("backend") else "")
        style = {"linestyle": "--", "color": "black"} if impl == "gemm_floor" else {}
        sizes = [r["batch_size"] for r in mine]
        time_axis.plot(sizes, [r["ms"] / 1000 for r in mine], marker="o", label=label, **style)
        memory = [(r["batch_size"], max(r["peak_mem_mb"], 0.1)) for r in mine]
        memory_axis.plot([m[0] for m in memory], [m[1] for m in memory], marker="o", label=label, **style)
    for axis, title, unit in ((time_axis, "forward + backward", "seconds"),
                              (memory_axis, "peak memory above inputs and gradients", "MiB")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("batch size n")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _run_worker(config: dict) -> list[dict]:
    """Run one batch size in a fresh process; its last stdout line is the JSON list of rows."""
    command = [sys.executable, "-m", "siglip.bench.loss_worker", "--worker"]
    done = subprocess.run(command, input=json.dumps(config), stdout=subprocess.PIPE, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        reason = f"worker exited with status {done.returncode}" + (" (killed: out of memory?)"
                                                                   if done.returncode in (-9, 137) else "")
        return [result_row(config, impl, None, None, skipped=reason) for impl in config["impls"]]
    return json.loads(lines[-1])
