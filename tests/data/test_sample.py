"""siglip.data.sample: every kind of bad sample, built on the fly (tests/data/builders.py), decoded or refused by
kind, skipped and counted, raised under strict with its key."""

from __future__ import annotations

import json
import logging
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data.builders import (
    bad_image_bytes,
    bad_shard,
    convertible_image_bytes,
    encode,
    png_claiming,
    random_image,
    tensors,
)
from siglip.data import BadSample, make_train_loader, open_source
from siglip.data.sample import caption_id, check_caption, decode_image


@pytest.mark.parametrize("kind", ["empty_image", "truncated_image", "undecodable_image", "too_many_pixels"])
def test_unusable_images_are_refused_by_kind(kind):
    with pytest.raises(BadSample) as caught:
        decode_image(bad_image_bytes()[kind], "some/key")
    assert caught.value.kind == kind and caught.value.key == "some/key" and "some/key" in str(caught.value)


def test_header_of_a_huge_bomb_is_refused_and_the_limit_is_a_parameter():
    with pytest.raises(BadSample, match="too_many_pixels"):
        decode_image(png_claiming(100_000, 100_000), "bomb")      # PIL's own DecompressionBombError, caught
    small = encode(random_image(30), "PNG")
    assert decode_image(small, "ok", max_pixels=900).size == (30, 30)
    with pytest.raises(BadSample, match="too_many_pixels"):
        decode_image(small, "too big", max_pixels=899)


def test_convertible_modes_become_rgb_with_their_content():
    for name, data in convertible_image_bytes().items():
        assert decode_image(data, name).mode == "RGB", name
    # 16-bit grey is scaled to 8 bits (PIL's own conversion would clip nearly every pixel to 255).
    values = np.random.default_rng(random.randrange(2**32)).integers(0, 65536, (8, 8)).astype(np.uint16)
    got = np.asarray(decode_image(encode(Image.fromarray(values), "PNG"), "grey16"))
    assert np.abs(got[..., 0].astype(float) - values / 257.0).max() <= 0.5 + 1e-9
    # Transparent pixels of a palette image come out white; opaque ones keep their colour.
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, 200, 30, 40] + [0] * 762)
    palette.putpixel((1, 1), 1)
    got = np.asarray(decode_image(encode(palette, "PNG", transparency=0), "palette"))
    assert (got[0, 0] == 255).all() and tuple(got[1, 1]) == (200, 30, 40)


def test_caption_checks():
    assert check_caption(b"  two red circles \n", "k") == "two red circles"
    for text, kind in [(None, "missing_caption"), ("", "empty_caption"), (" \t", "empty_caption"),
                       (b"caf\xe9", "not_utf8"), ("caf\udce9", "not_utf8"), (3, "malformed_record")]:
        with pytest.raises(BadSample) as caught:
            check_caption(text, "k")
        assert caught.value.kind == kind, text
    assert caption_id("Two red circles.") == caption_id("two  red circles") != caption_id("two red squares")
    assert 0 <= caption_id(str(np.random.default_rng(random.randrange(2**32)).random())) < 2**63


def test_every_bad_kind_in_a_shard_is_skipped_counted_and_logged(tmp_path, caplog):
    expected, good_keys = bad_shard(tmp_path / "shard.tar")
    source = open_source(str(tmp_path / "shard.tar"), seed=random.randrange(1000))
    kinds = {}
    for record in range(len(source)):
        key = source.records[record][1]
        try:
            source._read_record(record)
        except BadSample as error:
            kinds[key] = error.kind
            assert key in error.key
    assert kinds == expected
    assert {sample.key.split(":")[-1] for sample in source.test_samples()} == good_keys

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="siglip.data"):
        batch = next(make_train_loader(source, transform=tensors, local_batch=len(source), rank=0, world_size=1,
                                       start_step=0, seed=0, num_workers=0))
    # One epoch in one batch: every good sample is there, every bad one was met, each slot refilled.
    assert len(batch.keys) == len(source) and {key.split(":")[-1] for key in batch.keys} == good_keys
    assert set(batch.bad) == set(Counter(expected.values()))
    assert all(batch.bad[kind] >= count for kind, count in Counter(expected.values()).items())
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert sum("skipping" in record.getMessage() for record in caplog.records) <= 10     # rate-limited
    assert any(f"shard.tar:{key}" in logged for key in expected)
    assert "--strict" not in logged       # a run that skips is not told to run without --strict to skip


@pytest.mark.parametrize("num_workers", [0, 2])
def test_strict_raises_the_first_bad_sample_with_its_key(tmp_path, num_workers):
    expected, _ = bad_shard(tmp_path / "shard.tar", good=2)
    source = open_source(str(tmp_path / "shard.tar"))
    first_bad = next(i for i in range(len(source)) if source.records[source.record_of(i)][1] in expected)
    batches = make_train_loader(source, transform=tensors, local_batch=len(source), rank=0, world_size=1,
                                start_step=0, seed=0, num_workers=num_workers, strict=True)
    with pytest.raises(BadSample) as caught:
        next(batches)
    key = source.records[source.record_of(first_bad)][1]
    assert caught.value.key.endswith(f":{key}") and caught.value.kind == expected[key]
    assert str(caught.value).endswith("; fix or remove it, or run without --strict to skip it")
    with pytest.raises(BadSample):
        open_source(str(tmp_path / "shard.tar"), strict=True).test_samples()


def test_every_bad_kind_in_tables_is_refused_by_kind(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "good.png").write_bytes(encode(random_image(), "PNG"))
    for kind, data in bad_image_bytes().items():
        (images / f"{kind}.jpg").write_bytes(data)
    rows = [("images/good.png", "a good image", "good")] + \
           [(f"images/{kind}.jpg", "a caption", kind) for kind in bad_image_bytes()] + \
           [("images/absent.png", "a caption", "missing_file"), ("", "a caption", "missing_image"),
            ("images/good.png", "", "empty_caption"), ("images/good.png", "   ", "empty_caption")]
    lines = ["filepath,caption"] + [f"{path},{caption}" for path, caption, _ in rows]
    raw = "\n".join(lines).encode() + b"\nimages/good.png,caf\xe9\nimages/good.png\n"
    (tmp_path / "pairs.csv").write_bytes(raw)
    expected = [kind for _, _, kind in rows] + ["not_utf8", "missing_caption"]
    source = open_source(str(tmp_path / "pairs.csv"))
    assert _kinds(source) == expected

    objects = [json.dumps({"image": path, "text": caption}).encode() for path, caption, _ in rows]
    objects += [b'{"image": "images/good.png", "text": "caf\xe9"}', b'{"image": "images/good.png"',
                b'["images/good.png", "a list"]', b'{"image": "images/good.png", "text": 7}']
    (tmp_path / "pairs.jsonl").write_bytes(b"\n".join(objects) + b"\n")
    source = open_source(str(tmp_path / "pairs.jsonl"))
    assert _kinds(source) == [kind for _, _, kind in rows] + ["not_utf8"] + ["malformed_record"] * 3
    assert [sample.caption for sample in source.test_samples()] == ["a good image"]
    with pytest.raises(BadSample, match="pairs.jsonl:2"):
        open_source(str(tmp_path / "pairs.jsonl"), strict=True).test_samples()


def _kinds(source) -> list[str]:
    kinds = []
    for record in range(len(source)):
        try:
            source._read_record(record)
            kinds.append("good")
        except BadSample as error:
            kinds.append(error.kind)
    return kinds
