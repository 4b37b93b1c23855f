"""`siglip bench`: the loss benchmark's output, its memory guard, its documents, and the route to the ring bench."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest

from siglip.bench import loss as bench
from siglip.bench import loss_worker
from siglip.cli import main

ROW_KEYS = {"impl", "batch_size", "dim", "ms", "peak_mem_mb"}


def test_bench_loss_json_has_a_row_per_implementation_and_size(capsys, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nprose before\n\n{bench.DOC_BEGIN}\nold table\n{bench.DOC_END}\n\nprose after\n")
    plot = tmp_path / "loss.png"
    n = 512
    status = main(["bench", "loss", "--batch-sizes", str(n), "--dim", "8", "--repeats", "2", "--json",
                   "--markdown", str(doc), "--plot", str(plot)])
    assert status == 0
    result = json.loads(capsys.readouterr().out)                       # exactly one JSON object on stdout
    rows = result["rows"]
    impls = ["naive", "open_clip", "tiled", "tiled-torch", "gemm_floor"]          # tiled: the fused kernel
    if importlib.util.find_spec("open_clip") is None:
        impls.remove("open_clip")
    assert [r["impl"] for r in rows] == impls and {r["batch_size"] for r in rows} == {n}
    for row in rows:
        assert ROW_KEYS <= row.keys() and row["dim"] == 8
        assert row["ms"] > 0 and len(row["times_ms"]) == 2, row
        assert row["ms"] == pytest.approx(sum(row["times_ms"]) / 2, abs=0.02)      # the median of two calls
    # The memory column sees what an implementation must hold: the full-matrix loss at least one n x n float32
    # matrix (1 MiB here; the worker's allocations of that size are mmapped, so they show in the resident set).
    naive = next(r for r in rows if r["impl"] == "naive")
    assert naive["peak_mem_mb"] >= n * n * 4 / 2**20, naive
    floors = [r for r in rows if r["impl"] == "gemm_floor"]
    assert all(r["x_floor"] == 1.0 for r in floors)
    assert [r["backend"] for r in rows if r["impl"].startswith("tiled")] == ["cpu_fused", "torch"]
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nprose before") and text.rstrip().endswith("prose after")
    assert "old table" not in text and f"| {n} |" in text and "loss.png" in text and result["command"] in text
    assert plot.stat().st_size > 1000


def test_full_matrix_implementations_are_skipped_when_they_cannot_fit(monkeypatch):
    monkeypatch.setattr(loss_worker, "_available_bytes", lambda device: 10 * 2**20)     # pretend 10 MiB are free
    config = {"n": 1024, "dim": 4, "dtype": "float32", "device": "cpu", "repeats": 1, "seed": 0,
              "impls": ["naive", "tiled-torch"]}
    rows = {r["impl"]: r for r in loss_worker.worker_main(config)}
    assert rows["naive"]["ms"] is None and "cannot allocate" in rows["naive"]["skipped"]
    assert "GiB" in rows["naive"]["skipped"]
    assert rows["tiled-torch"]["ms"] > 0 and rows["tiled-torch"]["backend"] == "torch"
    assert "skipped: cannot allocate" in bench.format_table(list(rows.values()))


def test_peak_memory_sees_an_allocation_inside_the_call():
    import torch

    size = 48 * 2**20

    def step():
        block = torch.ones(size // 4)                                  # 48 MiB, touched
        assert block.sum() > 0

    measured = loss_worker.measure_peak(lambda: step(), (), torch.device("cpu")) / 2**20
    assert 44 < measured < 60, measured


@pytest.mark.parametrize("argv,message", [
    (["--batch-sizes", "64,x"], "--batch-sizes takes positive integers"),
    (["--batch-sizes", "0"], "--batch-sizes takes positive integers"),
    (["--dim", "0"], "--dim must be a positive integer"),
    (["--impls", "fastest"], "unknown implementation 'fastest'"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
    (["--repeats", "0"], "--repeats must be a positive integer"),
])
def test_bad_flags_exit_2_naming_the_flag(capsys, argv, message):
    assert main(["bench", "loss", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bench_ring_is_routed_to_siglip_bench_ring(monkeypatch):
    seen = {}
    fake = types.ModuleType("siglip.bench.ring")

    def add_arguments(parser):
        parser.add_argument("--world-sizes")
        parser.add_argument("--json", action="store_true")

    def run(args):
        seen["args"] = args
        return 0

    fake.add_arguments, fake.run, fake.__doc__ = add_arguments, run, "a fake ring bench"
    monkeypatch.setitem(sys.modules, "siglip.bench.ring", fake)
    assert main(["bench", "ring", "--world-sizes", "2,4", "--json"]) == 0
    assert seen["args"].world_sizes == "2,4" and seen["args"].json is True


def test_impls_expand_tiled_to_every_backend_here_once():
    assert bench.expand_impls("tiled", "cpu", auto_choice="cpu_fused") == ["tiled", "tiled-torch"]
    assert bench.expand_impls("tiled", "cpu", auto_choice="torch") == ["tiled", "tiled-cpu_fused"]
    assert bench.expand_impls("gemm_floor,tiled-torch,tiled-torch", "cpu") == ["gemm_floor", "tiled-torch"]
    names = bench.expand_impls("naive:4096,tiled,tiled-torch:2048", "cpu", auto_choice="cpu_fused")
    assert names == ["naive", "tiled", "tiled-torch"]
    assert bench.size_caps("naive:4096,tiled,tiled-torch:2048", names) == {"naive": 4096, "tiled-torch": 2048}
    with pytest.raises(bench.UserError, match="size cap"):
        bench.size_caps("naive:lots", ["naive"])


def test_an_implementation_above_its_size_cap_gets_a_skipped_row(capsys):
    assert main(["bench", "loss", "--batch-sizes", "32,64", "--dim", "4", "--repeats", "1", "--json",
                 "--impls", "gemm_floor:32"]) == 0                   # no worker at all for n = 64
    rows = {(r["impl"], r["batch_size"]): r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows[("gemm_floor", 32)]["ms"] > 0
    assert rows[("gemm_floor", 64)]["ms"] is None and "size cap" in rows[("gemm_floor", 64)]["skipped"]
