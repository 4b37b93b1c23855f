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
    assert bench_ring.run(parser.parse_args(["--world-sizes", "2,3", "--local-batch", "8", "--dim", "4",
                                             "--repeats", "2", "--json"])) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(row["world_size"], row["impl"]) for row in rows] == [(w, i) for w in (2, 3) for i in bench_ring.IMPLS]
    for row in rows:
        name = {"sigmoid_all_gather": "all_gather", "softmax_all_gather": "softmax"}.get(row["impl"], row["impl"])
        model = ring.expected_traffic(name, row["world_size"], 8, 4, torch.float32)
        assert row["forward_bytes_per_rank"] == model.forward_bytes, row
        assert row["backward_bytes_per_rank"] == model.backward_bytes, row
        assert (row["forward_sync_points"], row["backward_sync_points"]) == (model.forward_sync_points,
                                                                              model.backward_sync_points)
        assert row["ms"] > 0 and row["peak_mem_mb"] >= 0 and row["global_batch"] == 8 * row["world_size"]
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
