"""`siglip bench data` (also `siglip data bench`): the loader against the training step; full batches from a loader
whatever the data holds."""

from __future__ import annotations

import json
import random

import pytest

from data.builders import tensors
from siglip.bench.data import split_sources, time_batches
from siglip.cli import main
from siglip.data import make_train_loader, open_source
from siglip.data.export import write_image_table

ROW_KEYS = {"model", "image_size", "source", "workers", "batches", "samples", "seconds", "loader_samples_per_s", "bad",
            "step_samples_per_s", "loader_to_step", "starves", "bound_samples_per_s", "end_to_end_samples_per_s"}


def test_bench_at_tiny_sizes_reports_every_source_and_worker_count(capsys):
    batch_size, steps = random.randint(3, 5), 2
    argv = ["bench", "data", "--data", "shapes,shapes-shards,shapes-csv", "--workers", "0,2", "--models", "tiny",
            "--batch-size", str(batch_size), "--steps", str(steps), "--seconds", "0.5", "--file-image-size", "16",
            "--threads", "1", "--end-to-end", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)          # exactly one JSON object on stdout
    assert {"machine", "command", "load_average", "batch_size", "steps", "train_steps", "rows"} <= result.keys()
    assert result["command"].startswith("siglip bench data --data shapes,shapes-shards,shapes-csv --workers 0,2")
    (step,) = result["train_steps"]
    assert step["model"] == "tiny" and step["image_size"] == 32 and step["samples_per_s"] > 0
    assert step["samples"] == step["batches"] * batch_size
    rows = result["rows"]
    assert [(row["source"], row["workers"]) for row in rows] == [
        (source, workers) for source in ("shapes", "shapes-shards", "shapes-csv") for workers in (0, 2)]
    for row in rows:
        assert row.keys() == ROW_KEYS
        rounds = max(row["workers"], 1)
        # Whole rounds of the workers, at least one, and every timed batch full.
        assert row["batches"] % rounds == 0 and rounds <= row["batches"] <= -(-steps // rounds) * rounds
        assert row["samples"] == row["batches"] * batch_size and row["bad"] == {}
        loader, consumer = row["loader_samples_per_s"], row["step_samples_per_s"]
        assert loader > 0 and consumer == step["samples_per_s"]
        assert row["starves"] == (loader < consumer)
        assert row["loader_to_step"] == pytest.approx(loader / consumer)
        # Without workers loading and stepping alternate, slower than either alone; with workers they overlap.
        bound = row["bound_samples_per_s"]
        assert bound < min(loader, consumer) if row["workers"] == 0 else bound == min(loader, consumer)
        assert row["end_to_end_samples_per_s"] > 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_loader_never_yields_fewer_samples_than_asked(tmp_path, num_workers):
    shapes = open_source("shapes", seed=random.randrange(10**6), image_size=16)
    samples = [shapes.train_sample(index) for index in range(random.randint(10, 16))]
    report = write_image_table(samples, str(tmp_path), task="color", class_names=shapes.tasks["color"])
    back = open_source(report["path"]).test_samples()                     # the table reads back as written
    assert [(s.caption, s.labels) for s in back] == [
        (s.caption, {"label": s.labels["color"]} if "color" in s.labels else {}) for s in samples]
    images = sorted((tmp_path / "images").iterdir())
    *missing, broken = random.sample(images, 3)
    for path in missing:
        path.unlink()
    broken.write_bytes(broken.read_bytes()[:40])                          # a truncated JPEG
    source = open_source(report["path"], seed=random.randrange(10**6))
    batch_size = random.choice([3, 4, 7])                                 # need not divide the table
    steps = -(-2 * len(source) // batch_size)                             # two epochs: every bad file is met
    loader = make_train_loader(source, transform=tensors, local_batch=batch_size, rank=0, world_size=1,
                               start_step=0, seed=random.randrange(10**6), num_workers=num_workers)
    seen = []

    def check(batch):
        seen.append(batch)
        assert len(batch.keys) == batch_size and batch.tensors["pixels"].shape[0] == batch_size

    try:
        timing = time_batches(loader, rounds_of=max(num_workers, 1), steps=steps, max_seconds=60, consume=check)
    finally:
        loader.close()
    assert timing.batches >= steps and timing.samples == timing.batches * batch_size
    assert sum(timing.bad.values()) >= 2 * 3 - sum(sum(batch.bad.values()) for batch in seen[:1])
    assert set(timing.bad) <= {"missing_file", "truncated_image", "undecodable_image"}


def test_shard_patterns_keep_their_braces():
    assert split_sources("shapes, data/{a,b}-{000..009}.tar,pairs.csv") == ["shapes", "data/{a,b}-{000..009}.tar",
                                                                             "pairs.csv"]


@pytest.mark.parametrize("flags", [["--workers", "0,-1"], ["--workers", "two"], ["--models", "tiny,huge"],
                                   ["--batch-size", "0"], ["--data", "shapes,,digits"], ["--seconds", "0"]])
def test_bad_flags_are_refused_on_one_line(flags, capsys):
    for command in (["bench", "data"], ["data", "bench"]):          # the second: the command's first name
        assert main([*command, *flags]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("siglip bench: error:") and "\n" not in error
