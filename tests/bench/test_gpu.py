"""`siglip bench gpu`: the GPU check's plan, and its CPU path at toy sizes (so that it cannot rot without a GPU)."""

from __future__ import annotations

import json

import torch

from siglip.bench.gpu import GPU_SIZES, STEPS
from siglip.cli import main


def test_dry_run_plans_every_step_at_the_gpu_sizes(tmp_path, capsys):
    assert main(["bench", "gpu", "--dry-run", "--out", str(tmp_path), "--json"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert json.loads(capsys.readouterr().out) == report                    # the same report on stdout
    assert [step["step"] for step in report["steps"]] == list(STEPS)
    assert {step["status"] for step in report["steps"]} == {"planned"}
    tests, loss, train = report["steps"]
    assert "-k gpu or cuda" in tests["command"] and tests["command"].endswith(" tests")
    assert [c.split("--batch-sizes ")[1].split()[0] for c in loss["commands"]] == GPU_SIZES.split(",")
    assert all("--dtype bfloat16" in c and "--dim 768" in c and "--device cuda" in c
               and "--impls naive,tiled,siglip_kernel" in c for c in loss["commands"])
    assert all(flag in train["command"] for flag in ("--device cuda", "--model small", "--steps 100"))
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert markdown.startswith("# GPU check (dry run)") and "| loss | planned |" in markdown


def test_cpu_path_runs_the_loss_and_training_steps_at_toy_sizes(tmp_path, capsys):
    status = main(["bench", "gpu", "--device", "cpu", "--steps", "loss,train", "--out", str(tmp_path), "--json"])
    report = json.loads(capsys.readouterr().out)
    loss, train = report["steps"]
    assert status == 0, report
    rows = {row["impl"]: row for row in loss["rows"]}
    assert rows["naive"]["ms"] > 0 and rows["tiled"]["ms"] > 0 and rows["tiled"]["batch_size"] == 256
    # siglip-kernel needs CUDA: its row says why it did not run instead of failing the check
    assert rows["siglip_kernel"]["ms"] is None and rows["siglip_kernel"]["skipped"]
    assert loss["largest_n_tiled"] == 256
    assert train["status"] == "passed" and train["last_step"] == 2 and train["finite"]
    assert "| train | passed |" in (tmp_path / "gpu_check.md").read_text()


def test_without_cuda_the_gpu_run_is_refused_on_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        return
    assert main(["bench", "gpu", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "no CUDA device" in error and "\n" not in error
    assert main(["bench", "gpu", "--steps", "loss,fly", "--dry-run", "--out", str(tmp_path)]) == 2
