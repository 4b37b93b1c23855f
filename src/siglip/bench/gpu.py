"""`siglip bench gpu`: everything that needs a CUDA GPU, checked in one command of under eight minutes.

Run from the repository root on a machine with a CUDA GPU (`scripts/gpu_check.sh` installs what it needs, then runs
this). Three steps, each a subprocess with its own time limit, so that one that fails or runs over leaves the others'
results standing:

1. tests: the GPU tests, every test whose name says gpu or cuda (`pytest -k "gpu or cuda" tests`); they skip
   without a GPU, so on a GPU machine a skip is reported as a failure to look at;
2. loss: `siglip bench loss --device cuda --dtype bfloat16 --dim 768`, one batch size at a time from n = 8192: the
   eager full-matrix reference (naive) while it fits, ours (tiled: the Triton kernel) and siglip-kernel's fused loss
   where that package is installed. The sizes double past 65,536 while time is left, so the last size ours ran at
   is the largest n that fits (a size that does not fit is a row that says so, not a crash);
3. train: `siglip train --device cuda` on shapes with the small preset for 100 steps (CUDA training runs the
   towers under bfloat16 autocast).

It writes OUT/gpu_check.json (everything, with the machine and each command) and OUT/gpu_check.md (the tables).
`--device cpu` runs the same path at toy sizes, which the test suite does so that it cannot rot; `--dry-run`
writes the plan without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from siglip.errors import UserError

STEPS = ("tests", "loss", "train")
GPU_SIZES = "8192,16384,32768,65536,131072,262144"
BUDGET_S = {"tests": 100, "loss": 240, "train": 120}
"""Seconds each step may take on the GPU: 460 s in all, under the eight minutes the check is sized for."""
CPU_TOY = {"sizes": "256", "dim": 16, "preset": "tiny", "train_steps": 2, "train_batch": 16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `siglip bench gpu`."""
    parser.add_argument("--out", default="runs/gpu-check", help="where gpu_check.json and gpu_check.md go")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default); cpu runs the same steps at toy sizes")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--dry-run", action="store_true", help="write the plan (the commands) without running them")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the markdown")


def run(args: argparse.Namespace) -> int:
    """Run the chosen steps; write the report; exit 0 when every step that ran passed."""
    steps = [step.strip() for step in args.steps.split(",") if step.strip()]
    if not steps or any(step not in STEPS for step in steps):
        raise UserError(f"--steps must be a comma-separated subset of {','.join(STEPS)}, got {args.steps!r}")
    if args.device == "cuda" and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise UserError("siglip bench gpu: torch sees no CUDA device here; run it on a GPU machine, or pass "
                            "--device cpu (toy sizes) or --dry-run")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = [RUNNERS[step](args, out) for step in steps]
    report = {"machine": _machine(args.device), "device": args.device, "dry_run": args.dry_run,
              "seconds": round(time.perf_counter() - started, 1), "steps": results}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = format_markdown(report)
    (out / "gpu_check.md").write_text(markdown)
    print(json.dumps(report) if args.json else markdown)
    return 0 if all(result["status"] in ("passed", "planned") for result in results) else 1


def _tests(args: argparse.Namespace, out: Path) -> dict:
    # tests/bench/test_gpu.py is this command's own CPU path: not a GPU test, and a minute of the budget.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "gpu or cuda",
               "--ignore=tests/bench/test_gpu.py", "tests"]
    result = _run(command, BUDGET_S["tests"], args.dry_run)
    if args.dry_run or result["status"] == "timed out":
        return {"step": "tests", **result}
    summary = _pytest_summary(result.pop("output"))
    result.update(summary)
    # On a GPU machine every selected test must run: a skip means it did not find the GPU or its package.
    ok = result["exit_code"] == 0 and summary.get("failed", 0) == 0 and (
        args.device != "cuda" or summary.get("skipped", 0) == 0)
    return {"step": "tests", **result, "status": "passed" if ok else "failed"}


def _loss(args: argparse.Namespace, out: Path) -> dict:
    toy = args.device == "cpu"
    sizes = [int(n) for n in (CPU_TOY["sizes"] if toy else GPU_SIZES).split(",")]
    dim = CPU_TOY["dim"] if toy else 768
    deadline = time.monotonic() + BUDGET_S["loss"]
    rows, commands, status = [], [], "planned" if args.dry_run else "passed"
    for n in sizes:
        command = [sys.executable, "-m", "siglip", "bench", "loss", "--batch-sizes", str(n), "--dim", str(dim),
                   "--dtype", "bfloat16", "--repeats", "3", "--device", args.device,
                   "--impls", "naive,tiled,siglip_kernel", "--json"]
        commands.append(" ".join(command[2:]))
        if args.dry_run:
            continue
        left = deadline - time.monotonic()
        if left < 10:
            rows.append({"batch_size": n, "skipped": "out of the step's time budget"})
            continue
        done = _run(command, left, False)
        if done["status"] != "passed":
            rows.append({"batch_size": n, "skipped": f"{done['status']} (exit code {done.get('exit_code')})"})
            status = "failed"
            continue
        rows += json.loads(done["output"].strip().splitlines()[-1])["rows"]
    ran = [row["batch_size"] for row in rows if row.get("impl") == "tiled" and row.get("ms") is not None]
    return {"step": "loss", "status": status, "commands": commands, "rows": rows,
            "largest_n_tiled": max(ran) if ran else None}


def _train(args: argparse.Namespace, out: Path) -> dict:
    toy = args.device == "cpu"
    run_dir = out / "train"
    command = [sys.executable, "-m", "siglip", "train", "--device", args.device, "--data", "shapes",
               "--model", CPU_TOY["preset"] if toy else "small",
               "--steps", str(CPU_TOY["train_steps"] if toy else 100),
               "--batch-size", str(CPU_TOY["train_batch"] if toy else 256),
               "--warmup-steps", "0" if toy else "10",
               "--out", str(run_dir), "--overwrite", "--no-evaluation", "--no-plots", "--no-progress"]
    result = _run(command, BUDGET_S["train"], args.dry_run)
    result.pop("output", None)
    metrics = run_dir / "metrics.jsonl"
    if not args.dry_run and metrics.exists():
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if lines:
            last = lines[-1]
            result.update(last_step=last.get("step"), final_loss=last.get("loss"),
                          samples_per_s=last.get("samples_per_s"),
                          finite=all(_finite(line.get("loss")) for line in lines))
            if not result["finite"]:
                result["status"] = "failed"
    return {"step": "train", **result}


RUNNERS = {"tests": _tests, "loss": _loss, "train": _train}


def _run(command: list[str], timeout_s: float, dry_run: bool) -> dict:
    """Run one step's command (or only name it); status passed, failed or timed out; its output kept for parsing."""
    shown = " ".join(command[2:]) if command[:2] == [sys.executable, "-m"] else " ".join(command)
    if dry_run:
        return {"command": shown, "status": "planned"}
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return {"command": shown, "status": "timed out", "seconds": round(time.perf_counter() - start, 1)}
    tail = (done.stdout + done.stderr)[-2000:]
    return {"command": shown, "status": "passed" if done.returncode == 0 else "failed", "exit_code": done.returncode,
            "seconds": round(time.perf_counter() - start, 1), "output": done.stdout, "log_tail": tail}


def _pytest_summary(output: str) -> dict:
    """{"passed": N, "failed": N, "skipped": N, ...} from pytest's closing line."""
    found = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", output.strip().splitlines()[-1]
                       if output.strip() else "")
    return {("error" if word.startswith("error") else word): int(count) for count, word in found}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and value == value and abs(value) != float("inf")


def _machine(device: str) -> str:
    from siglip.bench.record import machine_description

    return machine_description(device)


def format_markdown(report: dict) -> str:
    """The report as markdown: one line per step, then the loss rows."""
    lines = [f"# GPU check{' (dry run)' if report['dry_run'] else ''}", "",
             f"Machine: {report['machine']}; device {report['device']}; {report['seconds']} s in all.", "",
             "| step | status | seconds | result | command |", "|---|---|---:|---|---|"]
    for step in report["steps"]:
        if step["step"] == "tests":
            result = ", ".join(f"{step[k]} {k}" for k in ("passed", "failed", "skipped", "error") if k in step)
        elif step["step"] == "loss":
            result = f"largest n ours ran at: {step.get('largest_n_tiled')}"
        else:
            result = (f"step {step.get('last_step')}, loss {step.get('final_loss')}, "
                      f"{step.get('samples_per_s')} samples/s" if "last_step" in step else "")
        command = step.get("command") or "; ".join(step.get("commands", []))
        lines.append(f"| {step['step']} | {step['status']} | {step.get('seconds', '')} | {result} | `{command}` |")
    loss = next((step for step in report["steps"] if step["step"] == "loss"), None)
    if loss and loss["rows"]:
        lines += ["", "| n | impl | backend | ms | peak MiB | note |", "|---:|---|---|---:|---:|---|"]
        for row in loss["rows"]:
            ms, peak = row.get("ms"), row.get("peak_mem_mb")
            lines.append(f"| {row['batch_size']} | {row.get('impl', '')} | {row.get('backend') or ''} | "
                         f"{'' if ms is None else f'{ms:.1f}'} | {'' if peak is None else f'{peak:.1f}'} | "
                         f"{row.get('skipped', '')} |")
    return "\n".join(lines) + "\n"
