"""Training under torchrun (siglip.train.loop with gloo): two ranks in micro-batches match one process on the global
batch, a killed rank restarts from the newest checkpoint, and SigLiT's cache agrees across ranks."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from train.runs import (
    DIST_FLAGS,
    MICRO,
    QUICK_FLAGS,
    child_environment,
    final_weights,
    read_metrics,
    siglip_command,
    torchrun,
    write_table,
)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """An uninterrupted 2-process gloo run in micro-batches, and the seed it used."""
    out, seed = tmp_path_factory.mktemp("two_process"), str(random.randrange(1000))
    result = subprocess.run(torchrun("train", *DIST_FLAGS, *MICRO, "--seed", seed, "--out", str(out)),
                            env=child_environment(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, seed


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_in_micro_batches_match_one_process_on_the_global_batch(tmp_path, two_process_run):
    two, seed = two_process_run
    one = tmp_path / "one"
    subprocess.run(siglip_command("train", *DIST_FLAGS, "--seed", seed, "--out", str(one)), env=child_environment(),
                   check=True, capture_output=True, timeout=300)
    for got, want in zip(read_metrics(two), read_metrics(one), strict=True):
        assert got["step"] == want["step"] and got["samples_seen"] == want["samples_seen"] == 16 * got["step"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    want, got = final_weights(one), final_weights(two)
    for name in want:
        error = (got[name] - want[name]).abs().max().item()
        # Sums over the batch run in another order on two ranks, so gradients differ by rounding; Adam divides
        # each gradient by its own running size, which can lift a rounding difference to a sizeable fraction of
        # a step for an entry whose gradient is tiny. Allow a twentieth of one step (lr = 2e-3) after 8 steps.
        # Key biases get a zero gradient up to rounding (softmax attention ignores them), which Adam scales up to
        # whole steps of noise: they are left out.
        if not name.endswith("k_proj.bias"):
            assert error <= 0.05 * 2e-3, f"{name}: {error:.2e}"


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _worker_of_rank(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank, found through /proc (Linux)."""
    for pid in _children(launcher):
        try:
            environment = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environment:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
def test_torchrun_restarts_a_killed_rank_from_the_newest_checkpoint(tmp_path, two_process_run):
    want_dir, seed = two_process_run
    out, kill_after = tmp_path / "restarted", random.randint(3, 6)
    log = open(tmp_path / "torchrun.log", "w+")
    launcher = subprocess.Popen(torchrun("train", *DIST_FLAGS, *MICRO, "--seed", seed, "--out", str(out), "--resume",
                                         restarts=2), env=child_environment(), stdout=log, stderr=subprocess.STDOUT)
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and launcher.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after:
            killed = _worker_of_rank(launcher.pid, 1)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.01)
    assert killed is not None, "no worker to kill: the run ended first"
    try:
        status = launcher.wait(timeout=400)
    except subprocess.TimeoutExpired:
        for pid in [*_children(launcher.pid), launcher.pid]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        log.seek(0)
        pytest.fail(f"torchrun did not finish within 400 s of the kill; its log ends:\n{log.read()[-3000:]}")
    log.seek(0)
    output = log.read()
    assert status == 0, f"torchrun exited with {status}; its log ends:\n{output[-6000:]}"
    assert "resumed from" in output, output[-3000:]
    # Each step appears once in the log, and the run ends where an uninterrupted one does.
    assert [row["step"] for row in read_metrics(out)] == list(range(1, 9))
    want, got = final_weights(want_dir), final_weights(out)
    for name in want:
        assert torch.equal(want[name], got[name]), name


@pytest.mark.slow
@pytest.mark.dist
def test_two_processes_with_the_cache_match_one_process_without(tmp_path):
    table = write_table(tmp_path, rows=12, missing=set())
    # Each rank caches the images of its own slices (4 per step, 3 + 1 per micro-batch); 6 steps of 8 go round
    # the 12 rows four times.
    flags = [*QUICK_FLAGS, "--no-evaluation", "--data", str(table), "--batch-size", "8", "--steps", "6", "--lr",
             "2e-3", "--lock-image", "--num-workers", "0", "--seed", str(random.randrange(1000))]
    two, one = tmp_path / "two", tmp_path / "one"
    result = subprocess.run(torchrun("train", *flags, "--micro-batch", "3", "--cache-image-features", "--out",
                                     str(two)), env=child_environment(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    subprocess.run(siglip_command("train", *flags, "--out", str(one)), env=child_environment(), check=True,
                   capture_output=True, timeout=300)
    for got, want in zip(read_metrics(two), read_metrics(one), strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    want, got = final_weights(one), final_weights(two)
    for name in want:
        if not name.endswith("k_proj.bias"):       # rounding noise amplified by Adam (see the test above)
            assert (got[name] - want[name]).abs().max().item() <= 0.05 * 2e-3, name


@pytest.mark.slow
@pytest.mark.dist
def test_a_checkpoint_of_two_processes_resumes_on_one(tmp_path, two_process_run):
    import shutil

    two, seed = two_process_run
    out = tmp_path / "one"
    shutil.copytree(two, out)
    shutil.rmtree(out / "checkpoints" / "step_00000008")
    shutil.rmtree(out / "final")
    result = subprocess.run(siglip_command("train", *DIST_FLAGS, "--seed", seed, "--out", str(out), "--resume"),
                            env=child_environment(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout and "written by 2 processes, this run has 1" in result.stdout
    # The run continues at step 7 on the same data (the global batch order does not depend on the world size) and
    # ends where the two processes did, up to rounding (the tolerance of the one-against-two test above).
    assert [row["step"] for row in read_metrics(out)] == list(range(1, 9))
    for got, want in zip(read_metrics(out)[6:], read_metrics(two)[6:], strict=True):
        assert got["samples_seen"] == want["samples_seen"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    want, got = final_weights(two), final_weights(out)
    for name in want:
        if not name.endswith("k_proj.bias"):
            assert (got[name] - want[name]).abs().max().item() <= 0.05 * 2e-3, name


@pytest.mark.slow
@pytest.mark.dist
def test_under_torchrun_a_diverged_run_stops_on_every_rank(tmp_path):
    out = tmp_path / "diverged"
    # Diverges from every seed (lr 50 did not: see test_loop.py's test of a diverging run).
    flags = [*QUICK_FLAGS, "--data", "shapes", "--batch-size", "32", "--steps", "40", "--lr", "1e30",
             "--grad-clip", "0", "--warmup-steps", "1", "--num-workers", "0", "--no-evaluation", *MICRO,
             "--seed", str(random.randrange(1000))]
    # The ranks agree on each skip with one all-reduce, so they stop at the same step: a rank that went on would
    # wait in the next collective until the timeout below.
    result = subprocess.run(torchrun("train", *flags, "--out", str(out)), env=child_environment(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "exitcode  : 3" in result.stderr, result.stderr[-3000:]
    rows = read_metrics(out)
    assert [row["step"] for row in rows if row.get("update_skipped")][-5:] == list(range(rows[-1]["step"] - 4,
                                                                                         rows[-1]["step"] + 1))
    assert f"siglip train: stopped at step {rows[-1]['step']}: the last 5 updates" in result.stderr
