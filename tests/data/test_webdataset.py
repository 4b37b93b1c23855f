"""WebDataset shards: export then read back, brace patterns, unreadable shards reported and skipped."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from data.builders import encode, random_image, write_tar
from siglip.cli import main
from siglip.data import BadSample, open_source
from siglip.errors import UserError


def test_export_then_read_back(tmp_path, capsys):
    count, shard_size, seed = random.randint(20, 40), random.randint(5, 9), random.randrange(10**6)
    out = tmp_path / "digits"
    assert main(["data", "export", "--data", "digits", "--out", str(out), "--shard-size", str(shard_size),
                 "--count", str(count), "--seed", str(seed), "--image-size", "32"]) == 0
    report = json.loads(capsys.readouterr().out)
    shards = -(-count // shard_size)
    assert report["samples"] == count and report["shards"] == shards and report["task"] == "digit"
    assert sorted(path.name for path in out.glob("*.tar")) == [f"train-{n:06d}.tar" for n in range(shards)]

    original = open_source("digits", seed=seed, image_size=32)
    written = [original.train_sample(index) for index in range(count)]
    source = open_source(report["pattern"], seed=random.randrange(10**6))
    assert len(source) == count and source.tasks == {"label": original.tasks["digit"]}   # classes.txt beside
    back = source.test_samples()                                  # every sample, in shard order
    assert [s.caption for s in back] == [s.caption for s in written]
    assert [s.labels["label"] for s in back] == [s.labels["digit"] for s in written]
    assert [s.positive_id for s in back] == [s.positive_id for s in written]
    for got, want in zip(back, written, strict=True):
        difference = np.abs(np.asarray(got.image, dtype=float) - np.asarray(want.image, dtype=float))
        assert got.image.size == (32, 32) and difference.mean() < 4           # JPEG at quality 95
    # The training order is a permutation of all samples, across every shard.
    assert sorted(source.train_sample(index).key for index in range(count)) == sorted(s.key for s in back)


def test_png_export_of_a_held_out_split_is_lossless(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "export", "--data", "shapes", "--split", "test", "--out", str(out), "--shard-size", "7",
                 "--count", "12", "--format", "png", "--task", "shape"]) == 0
    report = json.loads(capsys.readouterr().out)
    back = open_source(report["pattern"]).test_samples()
    want = open_source("shapes").test_samples()[:12]
    assert [s.image.tobytes() for s in back] == [s.image.tobytes() for s in want]
    assert [s.labels for s in back] == [{"label": s.labels["shape"]} for s in want]
    assert (out / "classes.txt").read_text().split() == open_source("shapes").tasks["shape"]


def test_export_refuses_bad_requests(tmp_path, capsys):
    assert main(["data", "export", "--data", "shapes", "--out", str(tmp_path)]) == 2
    assert "endless" in capsys.readouterr().err
    assert main(["data", "export", "--data", "digits", "--out", str(tmp_path), "--task", "colour"]) == 2
    assert "--task" in capsys.readouterr().err
    assert main(["data", "export", "--data", "digits", "--out", str(tmp_path), "--shard-size", "0"]) == 2


def test_unreadable_shards_are_reported_and_skipped(tmp_path, caplog):
    good = []
    for shard in range(2):
        members = []
        for number in range(random.randint(2, 5)):
            members += [(f"s{shard}/{number}.jpg", encode(random_image(), "JPEG")), (f"s{shard}/{number}.txt",
                                                                                       f"caption {number}".encode())]
            good.append(f"s{shard}/{number}")
        write_tar(tmp_path / f"part-{shard}.tar", members)
    noise = np.random.default_rng(random.randrange(2**32)).integers(0, 256, 2048, dtype=np.uint8)
    (tmp_path / "part-2.tar").write_bytes(bytes(noise))
    (tmp_path / "part-3.tar").write_bytes(b"")
    (tmp_path / "part-4.tar").write_bytes(gzip.compress((tmp_path / "part-0.tar").read_bytes()))
    pattern = str(tmp_path / "part-{0..5}.tar")                  # part-5.tar does not exist
    source = open_source(pattern)
    assert sorted(s.key.split(":")[-1] for s in source.test_samples()) == sorted(good)
    assert [path[-10:] for path, _ in source.bad_shards] == [f"part-{n}.tar" for n in (2, 3, 4, 5)]
    assert "gzip-compressed" in source.bad_shards[2][1]
    assert sum("skipping shard" in record.getMessage() for record in caplog.records) == 4
    assert source.tasks == {} and source.templates["label"]
    with pytest.raises(BadSample) as caught:
        open_source(pattern, strict=True)
    assert caught.value.kind == "bad_shard" and caught.value.key.endswith("part-2.tar")
    with pytest.raises(UserError, match="no samples"):
        open_source(str(tmp_path / "part-{2..5}.tar"))
    assert len(open_source(str(tmp_path), seed=3)) == len(good)            # a folder of shards


def test_export_as_a_table_reads_back_the_same_samples(tmp_path, capsys):
    count = random.randint(5, 15)
    assert main(["data", "export", "--data", "shapes", "--split", "test", "--out", str(tmp_path / "t"), "--count",
                 str(count), "--format", "png", "--task", "color", "--table", "pairs.tsv"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == count and report["path"].endswith("pairs.tsv") and not report["skipped"]
    back = open_source(report["path"]).test_samples()
    want = open_source("shapes").test_samples()[:count]
    assert [s.image.tobytes() for s in back] == [s.image.tobytes() for s in want]
    assert [s.caption for s in back] == [s.caption for s in want]
    assert [s.labels for s in back] == [{"label": s.labels["color"]} for s in want if "color" in s.labels]
    assert main(["data", "export", "--data", "shapes", "--out", str(tmp_path), "--count", "3", "--table", "x.txt"]) == 2
    assert "--table" in capsys.readouterr().err


def test_a_table_with_other_column_names_is_read_through_the_column_flags(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(encode(random_image(), "PNG"))
    (tmp_path / "odd.csv").write_text("picture,words,kind\na.png,a random picture,7\n", encoding="utf-8")
    assert main(["data", "inspect", "--data", str(tmp_path / "odd.csv")]) == 2
    assert "no image column" in capsys.readouterr().err
    assert main(["data", "inspect", "--data", str(tmp_path / "odd.csv"), "--image-column", "picture",
                 "--caption-column", "words", "--label-column", "kind", "--count", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [(s["caption"], s["labels"]) for s in summary["samples"]] == [("a random picture", {"label": 7})]
