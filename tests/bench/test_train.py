"""`siglip bench train`: both rows of a tiny run, the table in a document, and out-of-memory reported, not raised."""

from __future__ import annotations

import json

import pytest

from siglip.bench import train as bench_train
from siglip.cli import main
from siglip.errors import UserError

TINY = ["bench", "train", "--preset", "tiny", "--batch-size", "16", "--image-size", "32", "--vocab-size", "128",
        "--text-length", "8"]


def test_full_batch_and_micro_batch_rows_with_positive_numbers(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")            # the workers inherit it: steady times on a busy machine
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\nprose before\n\n{bench_train.DOC_BEGIN}\nold table\n{bench_train.DOC_END}\n\n"
                   "prose after\n")
    status = main([*TINY, "--micro-batch", "4", "--steps", "2", "--json", "--markdown", str(doc)])
    assert status == 0
    result = json.loads(capsys.readouterr().out)           # exactly one JSON object on stdout
    rows = result["rows"]
    assert [(r["batch_size"], r["micro_batch"]) for r in rows] == [(16, None), (16, 4)]
    for row in rows:
        assert "skipped" not in row, row
        assert row["ms"] > 0 and row["first_ms"] > 0 and row["samples_per_s"] > 0, row
        # The peak counts everything built after the baseline: at least float32 parameters, their gradients and
        # AdamW's two moments, 16 bytes a parameter.
        assert row["parameters"] > 0 and row["peak_mem_mb"] * 2**20 >= 16 * row["parameters"], row
        assert len(row["times_ms"]) == 2
    assert rows[0]["parameters"] == rows[1]["parameters"]
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nprose before") and text.rstrip().endswith("prose after")
    assert "old table" not in text and "| tiny | 16 | 4 | 32 |" in text and result["command"] in text


def test_a_configuration_out_of_memory_is_a_row_not_a_crash(capsys):
    status = main([*TINY, "--micro-batch", "none", "--steps", "1", "--memory-limit", "0.01", "--json"])
    assert status == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["micro_batch"] is None and row["ms"] is None
    assert row["skipped"].startswith("out of memory"), row


def test_bad_flags_are_refused_by_name():
    with pytest.raises(UserError, match="--micro-batch must be comma-separated positive integers, got 'x'"):
        bench_train.parse_micro_batches("x")
    assert bench_train.parse_micro_batches("256,512") == [256, 512] and bench_train.parse_micro_batches("none") == []
    with pytest.raises(SystemExit):
        main(["bench", "train", "--preset", "tiny", "--device", "tpu"])
    assert main([*TINY, "--image-size", "36"]) == 2       # not a multiple of the patch size: a one-line error


def test_a_naflex_preset_gets_packed_patches_at_its_full_budget():
    import torch

    from siglip.model import PRESETS, unpack_patches

    patch = PRESETS["naflex-tiny"].patch_size
    side = 32 // patch
    packed = bench_train._random_pixels("naflex-tiny", 3, 32, torch.Generator().manual_seed(0))
    pixel_values, mask, shapes = unpack_patches(packed)
    assert pixel_values.shape == (3, side * side, 3 * patch * patch)
    assert mask.all() and shapes.tolist() == [[side, side]] * 3
    assert bench_train._random_pixels("tiny", 3, 32, torch.Generator().manual_seed(0)).shape == (3, 3, 32, 32)
