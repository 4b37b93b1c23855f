"""siglip.data.shapes.regions: each object's box, coverage and phrase agree with the pixels the drawing made.

(These test siglip/data/shapes.py; they live here, beside the recipe that reads regions, while tests/data/ is
another engineer's.)
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from siglip.data.shapes import COLOR_RGB, PLACES, ShapesSource, Thing, draw_placed, place, regions
from siglip.prompts import COLOR_NAMES, SHAPE_NAMES, SIZE_NAMES


def random_things(rng: random.Random) -> list[Thing]:
    cells = rng.sample(range(4), rng.randint(1, 3))
    return [Thing(rng.choice(COLOR_NAMES), rng.choice(SHAPE_NAMES), rng.choice(SIZE_NAMES), cell) for cell in cells]


def box_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    rows, cols = np.nonzero(mask)
    return (cols.min(), rows.min(), cols.max() + 1.0, rows.max() + 1.0)


@pytest.mark.parametrize("image_size", [32, 64])
def test_coverage_is_what_the_pixels_show(image_size):
    # A pixel covered by a fraction f of an object of colour c on grey g reads f * c + (1 - f) * g, rounded to
    # 8 bits: on the channel where c and g differ most (by at least 100), f can be read back to within 0.5 / 100,
    # and the mask's own 8 bits add 0.5 / 255. Tolerance 0.01: about that sum plus a margin.
    for _ in range(40):
        seed = random.randrange(10**9)
        things = random_things(random.Random(seed))
        grey, placed = place(things, random.Random(seed), image_size)
        image = np.asarray(draw_placed(grey, placed, image_size)).astype(float)
        found = regions(placed, image_size)
        assert len(found) == len(things)
        anywhere = np.zeros((image_size, image_size), dtype=bool)
        for item, region in zip(placed, found, strict=True):
            channel = int(np.argmax(np.abs(np.array(item.color) - grey)))
            contrast = item.color[channel] - grey
            assert abs(contrast) >= 100
            read_back = (image[..., channel] - grey) / contrast
            inside = region.coverage > 0
            assert np.abs(read_back[inside] - region.coverage[inside]).max() < 0.01
            assert region.coverage.shape == (image_size, image_size) and region.coverage.max() == 1.0
            assert region.box == box_of(inside)
            assert not (anywhere & inside).any()                     # objects never overlap
            anywhere |= inside
        # every pixel no object touches is exactly the background
        assert (image[~anywhere] == grey).all()


def test_samples_carry_regions_whose_boxes_hold_every_drawn_pixel():
    seed, size = random.randrange(10**6), random.choice([32, 64])
    plain, with_regions = ShapesSource(seed=seed, image_size=size), ShapesSource(seed=seed, image_size=size,
                                                                                  with_regions=True)
    indices = random.sample(range(10**9), 40)
    samples = [(with_regions.train_sample(i), plain.train_sample(i), with_regions.scene(i)) for i in indices]
    tests = with_regions.test_samples()
    samples += [(sample, None, None) for sample in random.sample(tests, 40)]
    for sample, without, things in samples:
        if without is not None:
            assert without.regions is None and without.image.tobytes() == sample.image.tobytes()
            assert without.caption == sample.caption
        pixels = np.asarray(sample.image)
        covered = [region.coverage > 0 for region in sample.regions]
        anywhere = np.logical_or.reduce(covered)
        background = pixels[~anywhere]
        assert (background == background[0]).all() and len(set(background[0])) == 1     # one grey
        # a pixel differs from the background exactly where an object reaches
        assert ((pixels != background[0]).any(axis=-1) == anywhere).all()
        for region, mask in zip(sample.regions, covered, strict=True):
            x0, y0, x1, y1 = map(int, region.box)
            assert mask[y0:y1, x0:x1].sum() == mask.sum()            # the box holds all of the object's pixels
            assert mask[y0, x0:x1].any() and mask[y1 - 1, x0:x1].any() and mask[y0:y1, x0].any() \
                and mask[y0:y1, x1 - 1].any()                        # and is tight on every side
            solid = pixels[region.coverage == 1.0].astype(int)      # fully covered pixels show the object's colour
            expected = np.array(COLOR_RGB[COLOR_NAMES[region.labels["color"]]])
            assert len(solid) and np.abs(solid - expected).max() <= 18
        if things is not None:
            assert [(COLOR_NAMES[r.labels["color"]], SHAPE_NAMES[r.labels["shape"]]) for r in sample.regions] == \
                [(thing.color, thing.shape) for thing in things]
        phrases = [region.phrase for region in sample.regions]
        assert len(set(phrases)) == len(phrases)
        for region in sample.regions:
            words = f"{COLOR_NAMES[region.labels['color']]} {SHAPE_NAMES[region.labels['shape']]}"
            assert words in region.phrase


def test_phrases_add_size_and_place_only_to_tell_objects_apart():
    things = [Thing("red", "circle", "small", 0), Thing("red", "circle", "small", 3),
              Thing("red", "circle", "large", 1)]
    grey, placed = place(things, random.Random(random.randrange(10**6)), 64)
    assert [region.phrase for region in regions(placed, 64)] == [
        f"the small red circle in the {PLACES[0]}", f"the small red circle in the {PLACES[3]}", "the large red circle"]
    stars = [Thing("blue", "star", "large", 2), Thing("red", "star", "large", 1)]
    grey, placed = place(stars, random.Random(random.randrange(2**32)), 64)
    assert [region.phrase for region in regions(placed, 64)] == ["the blue star", "the red star"]
