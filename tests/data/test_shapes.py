"""The shapes world: deterministic, held-out pairs never trained on, captions and pixels that say the same."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from siglip.data import open_source
from siglip.data.shapes import COLOR_RGB, HELD_OUT_PAIRS, PLACES, PLURAL, RADIUS, ShapesSource
from siglip.errors import UserError
from siglip.prompts import COLOR_NAMES, SHAPE_NAMES

PHRASE = re.compile(r"\b(a|an|two|three) (?:(small|large) )?(" + "|".join(COLOR_NAMES) + r") ("
                    + "|".join(sorted(list(SHAPE_NAMES) + list(PLURAL.values()), key=len, reverse=True)) + r")\b")
SINGULAR = {plural: shape for shape, plural in PLURAL.items()}


def object_mask(image: np.ndarray, color: str) -> np.ndarray:
    """Pixels within 60 of the colour (the drawing jitters each channel by at most 18)."""
    return np.abs(image.astype(int) - np.array(COLOR_RGB[color])).max(axis=-1) < 60


def test_same_seed_and_index_give_the_same_sample():
    seed, indices = random.randrange(10**6), random.sample(range(10**9), 20)
    first, again, other = ShapesSource(seed=seed), open_source("shapes", seed=seed), ShapesSource(seed=seed + 1)
    differ = 0
    for index in indices:
        a, b, c = first.train_sample(index), again.train_sample(index), other.train_sample(index)
        assert (a.caption, a.key, a.labels, a.positive_id) == (b.caption, b.key, b.labels, b.positive_id)
        assert a.image.tobytes() == b.image.tobytes() and a.image.mode == "RGB" and a.image.size == (64, 64)
        differ += a.image.tobytes() != c.image.tobytes()
    assert differ >= 18
    assert first.__len__() is None and bool(first) and first.size is None


def test_training_never_shows_a_held_out_pair_and_shows_every_other():
    source, start = ShapesSource(seed=random.randrange(10**6)), random.randrange(10**9)
    seen = Counter((thing.color, thing.shape) for index in range(start, start + 4000)
                   for thing in source.scene(index))
    assert not set(seen) & set(HELD_OUT_PAIRS)
    assert len(seen) == len(COLOR_NAMES) * len(SHAPE_NAMES) - len(HELD_OUT_PAIRS)
    assert min(seen.values()) > 0.3 * max(seen.values())        # every training pair is shown often


def test_held_out_split_is_fixed_and_shows_the_held_out_pairs():
    samples = ShapesSource(seed=random.randrange(10**6)).test_samples()
    again = ShapesSource(seed=0, image_size=64).test_samples()
    assert [(s.key, s.caption, s.labels) for s in samples] == [(s.key, s.caption, s.labels) for s in again]
    assert len({s.key for s in samples}) == len(samples) == 600
    paired = [s for s in samples if "color" in s.labels]
    assert len(paired) == 300 and all("shape" in s.labels and "count" not in s.labels for s in paired)
    pairs = Counter((COLOR_NAMES[s.labels["color"]], SHAPE_NAMES[s.labels["shape"]]) for s in paired)
    assert set(pairs) == set(HELD_OUT_PAIRS) and set(pairs.values()) == {30}
    for sample in paired:                                        # the label's colour is really drawn
        color = COLOR_NAMES[sample.labels["color"]]
        assert object_mask(np.asarray(sample.image), color).sum() > 40, sample.key
        assert f"{color} {SHAPE_NAMES[sample.labels['shape']]}" in sample.caption
    counts = Counter(s.labels["count"] for s in samples if "count" in s.labels)
    assert counts == {0: 100, 1: 100, 2: 100}


def test_captions_match_the_drawn_objects():
    source = ShapesSource(seed=random.randrange(10**6), image_size=random.choice([32, 64]))
    for index in random.sample(range(10**9), 300):
        things, sample = source.scene(index), source.train_sample(index)
        phrases = PHRASE.findall(sample.caption)
        sizes_named = {size for _, size, _, _ in phrases}
        assert len(sizes_named) == 1 or "" not in sizes_named, sample.caption   # all groups sized, or none
        with_size = "" not in sizes_named
        said = Counter()
        for lead, size, color, shape in phrases:
            count = {"a": 1, "an": 1, "two": 2, "three": 3}[lead]
            assert (count == 1) == (shape in SHAPE_NAMES), sample.caption   # "a circle", "two circles"
            said[(size if with_size else "", color, SINGULAR.get(shape, shape))] += count
        drawn = Counter((thing.size if with_size else "", thing.color, thing.shape) for thing in things)
        assert said == drawn, (sample.caption, things)
        assert sample.labels["count"] == len(things) - 1
        for word, test in [("left of", lambda a, b: a % 2 < b % 2), ("right of", lambda a, b: a % 2 > b % 2),
                           ("above", lambda a, b: a // 2 < b // 2), ("below", lambda a, b: a // 2 > b // 2)]:
            if f" {word} " in sample.caption:
                first, second = (cells_of(things, phrase) for phrase in phrases)
                assert all(test(a, b) for a in first for b in second), sample.caption
        if len(things) == 1 and " in the " in sample.caption:
            assert sample.caption.endswith(f"in the {PLACES[things[0].cell]}")
        # Pixels: each object's colour lies in its cell; cells without objects hold only the dark background.
        image, half = np.asarray(sample.image), source.image_size // 2
        for cell in range(4):
            block = image[cell // 2 * half:(cell // 2 + 1) * half, cell % 2 * half:(cell % 2 + 1) * half]
            colors = [thing.color for thing in things if thing.cell == cell]
            if colors:
                assert object_mask(block, colors[0]).sum() >= 0.25 * (RADIUS["small"] * half) ** 2, sample.key
            else:
                assert block.max() < 48, sample.key


def cells_of(things, phrase) -> list[int]:
    """The cells of the objects a caption phrase (lead, size or "", colour, shape or plural) describes."""
    _, size, color, shape = phrase
    return [thing.cell for thing in things
            if (thing.color, thing.shape) == (color, SINGULAR.get(shape, shape)) and size in ("", thing.size)]


# Measured on 64 x 64 images (12,000 draws): the fill of the object's bounding box, the ring's empty centre, and
# the triangle's weight in the lower half of its box (bottom/top mass 2.75-3.3; every other shape 0.84-1.7)
# tell the six shapes apart.
FILL = {"square": (0.95, 1.01), "circle": (0.70, 0.90), "cross": (0.53, 0.67), "triangle": (0.47, 0.60),
        "ring": (0.36, 0.54), "star": (0.32, 0.47)}


def test_shapes_keep_distinct_silhouettes_and_sizes():
    source, areas = ShapesSource(seed=random.randrange(10**6)), {}
    for index in random.sample(range(10**9), 600):
        things = source.scene(index)
        if len(things) != 1:
            continue
        thing = things[0]
        mask = object_mask(np.asarray(source.train_sample(index).image), thing.color)
        rows, cols = np.nonzero(mask)
        box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        low, high = FILL[thing.shape]
        assert low <= box.mean() <= high, (thing, box.mean())
        assert mask[int(round(rows.mean())), int(round(cols.mean()))] == (thing.shape != "ring"), thing
        half = len(box) // 2
        bottom_heavy = box[len(box) - half:].sum() / box[:half].sum()
        assert (bottom_heavy > 2.2) == (thing.shape == "triangle"), (thing, bottom_heavy)
        areas.setdefault((thing.shape, thing.size), []).append(mask.sum())
    for shape in SHAPE_NAMES:
        ratio = np.mean(areas[(shape, "large")]) / np.mean(areas[(shape, "small")])
        assert 1.8 < ratio < 3.5, (shape, ratio)


def test_prompts_and_corpus_cover_every_task_word():
    source = open_source("shapes", image_size=32)
    assert source.train_sample(0).image.size == (32, 32)
    assert set(source.tasks) == {"color", "shape", "count"}
    assert all("{}" in template for templates in source.templates.values() for template in templates)
    corpus = source.caption_corpus(50)
    words = set(" ".join(corpus).replace(":", " ").split())
    assert set(COLOR_NAMES) | set(SHAPE_NAMES) | {"one", "two", "three", "objects", "object"} <= words
    assert corpus[:50] == [source.train_sample(index).caption for index in range(50)]
    with pytest.raises(UserError, match="image_size"):
        open_source("shapes", image_size=8)
    with pytest.raises(UserError, match="one task"):
        open_source("shapes", classes_file=__file__)
