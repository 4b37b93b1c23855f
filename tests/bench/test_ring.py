"""`siglip bench ring`: its rows agree with the cost model, and bad flags are refused by name."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from siglip import ring
from siglip.bench import ring as bench_ring
from siglip.errors import UserError


def test_bench_ring_prints_rows_that_agree_with_the_cost_model(capsys):
    parser = argparse.ArgumentParser()
    bench_ring.add_arguments(parser)
    n, d = 128, 512                                     # a text block of 256 KiB: above the workers' mmap threshold
    assert bench_ring.run(parser.parse_args(["--world-sizes", "2,3", "--local-batch", str(n), "--dim", str(d),
                                             "--repeats", "2", "--json"])) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(row["world_size"], row["impl"]) for row in rows] == [(w, i) for w in (2, 3) for i in bench_ring.IMPLS]
    for row in rows:
        model = ring.expected_traffic(row["impl"], row["world_size"], n, d, torch.float32)   # the names it prints
        assert row["forward_bytes_per_rank"] == model.forward_bytes, row
        assert row["backward_bytes_per_rank"] == model.backward_bytes, row
        assert (row["forward_sync_points"], row["backward_sync_points"]) == (model.forward_sync_points,
                                                                              model.backward_sync_points)
        assert row["ms"] > 0 and row["global_batch"] == n * row["world_size"]
        # The memory column sees what the all-gathers must hold: every rank's text rows (and, for CLIP's loss, image
        # rows too), D n d float32 per tower.
        gathered = {"sigmoid_all_gather": 1, "softmax_all_gather": 2}.get(row["impl"], 0)
        assert row["peak_mem_mb"] >= gathered * row["world_size"] * n * d * 4 / 2**20, row
    for world in (2, 3):
        # the four sigmoid implementations compute one loss
        losses = [row["loss"] for row in rows if row["world_size"] == world and row["impl"] != "softmax_all_gather"]
        assert max(losses) - min(losses) <= 1e-5 * abs(losses[0])


@pytest.mark.parametrize("flags,message", [
    (["--world-sizes", "1"], "at least 2"),
    (["--world-sizes", "2,x"], "comma-separated integers"),
    (["--impls", "ring"], "subset of"),
    (["--local-batch", "0"], "--local-batch must be a positive integer"),
])
def test_bench_ring_rejects_bad_flags(flags, message):
    parser = argparse.ArgumentParser()
    bench_ring.add_arguments(parser)
    with pytest.raises(UserError, match=message):
        bench_ring.run(parser.parse_args(flags))
