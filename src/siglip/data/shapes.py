"""`shapes`: a procedural, seeded, endless world of coloured shapes with captions that describe them.

Each image holds one to three objects, each with a shape, a colour, a size and a place in a 2 x 2 grid, drawn
with PIL at twice the size and box-filtered down (anti-aliased edges keep shapes apart at 32 x 32). Captions are
generated from the objects: "two small red circles left of a large blue square". Ten of the 48 colour-shape pairs
never appear in training (in any object of any image); the held-out split shows exactly those pairs, so zero-shot
colour and shape accuracy there measures composition, not recall.

Sample `index` is a pure function of (seed, index): no state, no epoch, any index at any time.

Opened with `with_regions=True`, every sample also carries its objects' `Region`s (box, referring phrase, labels, pixel
coverage), computed from the geometry the drawing used, for the SigLIP 2 recipe's box tokens and dense labels.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from siglip.data.sample import Region, Sample, caption_id
from siglip.data.source import Source
from siglip.errors import UserError
from siglip.prompts import COLOR_NAMES, COUNT_NAMES, SHAPE_NAMES, SHAPES_TEMPLATES, SIZE_NAMES

COLOR_RGB = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 225, 40),
    "green": (40, 180, 60),
    "cyan": (40, 205, 215),
    "blue": (45, 80, 235),
    "purple": (150, 60, 205),
    "white": (240, 240, 240),
}
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "star": "stars",
          "ring": "rings"}
HELD_OUT_PAIRS = (
    # Each colour loses at most two shapes and each shape at most two colours, so every word is still taught.
    ("red", "circle"), ("orange", "square"), ("yellow", "triangle"), ("green", "cross"), ("cyan", "star"),
    ("blue", "ring"), ("purple", "circle"), ("white", "square"), ("red", "cross"), ("blue", "triangle"),
)
PLACES = ["top left", "top right", "bottom left", "bottom right"]   # cell c of the 2 x 2 grid: row c // 2, col c % 2
RADIUS = {"small": 0.24, "large": 0.38}                              # object radius as a fraction of a cell's side
SUPERSAMPLE = 2
TEST_SEED = 20231115                                                  # the held-out split is the same for every seed
TEST_HELD_OUT_PER_PAIR = 30                                           # 10 pairs x 30 = 300 colour/shape test images
TEST_PER_COUNT = 100                                                  # 3 counts x 100 = 300 count test images

SINGLE_FRAMES = ["{x}", "{x} in the {where}", "a picture of {x}", "there is {x} in the {where}",
                 "{x} on a dark background"]
MULTI_FRAMES = ["{x}", "a picture of {x}", "{x} on a dark background"]


@dataclass(frozen=True)
class Thing:
    """One object of a shapes image."""

    color: str
    shape: str
    size: str
    cell: int
    """Place in the 2 x 2 grid: 0 top left, 1 top right, 2 bottom left, 3 bottom right."""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(things: list[Thing], rng: random.Random) -> tuple[str, str]:
    """(caption, core): the caption of an image's objects, and its content without framing words.

    The core names every object's colour and shape (and its size, in about 60% of captions); objects it would
    describe alike are grouped ("two red circles"). Two groups on either side of each other are related ("left
    of", "above", ...) in about 70% of captions, otherwise joined with "and".
    """
    with_size = rng.random() < 0.6
    groups: dict[tuple[str, ...], list[Thing]] = {}
    for thing in sorted(things, key=lambda t: t.cell):           # reading order: stable group order
        groups.setdefault((thing.size, thing.color, thing.shape) if with_size else (thing.color, thing.shape),
                          []).append(thing)
    phrases = []
    for attributes, members in groups.items():
        count = len(members)
        noun = attributes[-1] if count == 1 else PLURAL[attributes[-1]]
        words = [*attributes[:-1], noun]
        lead = _article(words[0]) if count == 1 else ["two", "three"][count - 2]
        phrases.append(" ".join([lead, *words]))
    members = list(groups.values())
    if len(phrases) == 2 and rng.random() < 0.7 and (relations := _relations(members[0], members[1])):
        core = f"{phrases[0]} {rng.choice(relations)} {phrases[1]}"
    elif len(phrases) == 3:
        core = f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    else:
        core = " and ".join(phrases)
    if len(things) == 1:
        caption = rng.choice(SINGLE_FRAMES).format(x=core, where=PLACES[things[0].cell])
    else:
        caption = rng.choice(MULTI_FRAMES).format(x=core)
    if rng.random() < 0.25:
        # Some captions say how many objects there are, in the words of the count task's prompts.
        caption = f"a picture of {COUNT_NAMES[len(things) - 1]}: {core}"
    return caption, core


def _relations(first: list[Thing], second: list[Thing]) -> list[str]:
    """Spatial words true of every object of `first` against every object of `second`."""
    rows = lambda group: {t.cell // 2 for t in group}  # noqa: E731
    cols = lambda group: {t.cell % 2 for t in group}  # noqa: E731
    relations = []
    if max(cols(first)) < min(cols(second)):
        relations.append("left of")
    if min(cols(first)) > max(cols(second)):
        relations.append("right of")
    if max(rows(first)) < min(rows(second)):
        relations.append("above")
    if min(rows(first)) > max(rows(second)):
        relations.append("below")
    return relations


@dataclass(frozen=True)
class Placed:
    """An object as drawn: centre and radius in pixels of the supersampled canvas, and its jittered colour."""

    thing: Thing
    cx: float
    cy: float
    radius: float
    color: tuple[int, int, int]


def render(things: list[Thing], rng: random.Random, image_size: int) -> Image.Image:
    """An image_size x image_size RGB image of the objects on a dark grey background."""
    grey, placed = place(things, rng, image_size)
    return draw_placed(grey, placed, image_size)


def place(things: list[Thing], rng: random.Random, image_size: int) -> tuple[int, list[Placed]]:
    """The background grey and where each object goes: all of `render`'s random draws, in its order."""
    cell = image_size * SUPERSAMPLE / 2
    grey = rng.randrange(0, 48)
    placed = []
    for thing in things:
        radius = RADIUS[thing.size] * cell
        slack = cell / 2 - radius * 1.15                         # room to move without leaving the cell
        cx = (thing.cell % 2 + 0.5) * cell + rng.uniform(-slack, slack)
        cy = (thing.cell // 2 + 0.5) * cell + rng.uniform(-slack, slack)
        # A little colour jitter, so a colour is a region of RGB space rather than one memorised value.
        color = tuple(min(255, max(0, channel + rng.randint(-18, 18))) for channel in COLOR_RGB[thing.color])
        placed.append(Placed(thing, cx, cy, radius, color))
    return grey, placed


def draw_placed(grey: int, placed: list[Placed], image_size: int) -> Image.Image:
    """The image of placed objects: drawn at SUPERSAMPLE times the size, then box-filtered down."""
    side = image_size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    for item in placed:
        _draw_shape(draw, item.thing.shape, item.cx, item.cy, item.radius, item.color)
    return image.reduce(SUPERSAMPLE)


def regions(placed: list[Placed], image_size: int) -> list[Region]:
    """Each placed object's `Region`, from the same rasteriser that drew it (no random draws).

    Each object is drawn alone, white on black, at the supersampled size and box-filtered down like the image, so
    its coverage is nonzero on exactly the pixels its colour reaches (objects sit in distinct cells and never
    overlap). The phrase names colour and shape, adds the size only when another object shares colour and shape,
    and the place only when another shares all three.
    """
    side = image_size * SUPERSAMPLE
    found = []
    for item in placed:
        mask = Image.new("L", (side, side), 0)
        _draw_shape(ImageDraw.Draw(mask), item.thing.shape, item.cx, item.cy, item.radius, 255)
        coverage = np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0     # (H, W) in [0, 1]
        rows, cols = np.nonzero(coverage)
        box = (float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1))
        thing, others = item.thing, [other.thing for other in placed if other is not item]
        words = [thing.color, thing.shape]
        if any((o.color, o.shape) == (thing.color, thing.shape) for o in others):
            words.insert(0, thing.size)
        phrase = "the " + " ".join(words)
        if any((o.size, o.color, o.shape) == (thing.size, thing.color, thing.shape) for o in others):
            phrase += f" in the {PLACES[thing.cell]}"
        labels = {"color": COLOR_NAMES.index(thing.color), "shape": SHAPE_NAMES.index(thing.shape)}
        found.append(Region(box=box, phrase=phrase, labels=labels, coverage=coverage))
    return found


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color: tuple | int) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        h = r * 0.86                                             # about the circle's area: size, not shape, is area
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=color)
    elif shape == "triangle":
        draw.polygon(_star_points(cx, cy + 0.2 * r, 1.2 * r, None, 3), fill=color)
    elif shape == "cross":
        w = r * 0.36
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=color)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=color)
    elif shape == "star":
        draw.polygon(_star_points(cx, cy + 0.08 * r, 1.2 * r, 0.5 * r, 5), fill=color)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=color, width=max(1, round(0.42 * r)))
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPE_NAMES}")


def _star_points(cx: float, cy: float, outer: float, inner: float | None, points: int) -> list[tuple[float, float]]:
    """Vertices of a star with `points` tips at radius `outer` and notches at radius `inner`, a tip straight up;
    with inner None, of the regular polygon through the tips (a triangle for 3)."""
    step = math.pi / points if inner is not None else 2 * math.pi / points
    radii = [outer, inner] if inner is not None else [outer]
    return [(cx + radii[k % len(radii)] * math.cos(-math.pi / 2 + k * step),
             cy + radii[k % len(radii)] * math.sin(-math.pi / 2 + k * step)) for k in range(len(radii) * points)]


class ShapesSource(Source):
    """The shapes world: endless training stream, 600 held-out images, tasks `color`, `shape`, `count`."""

    def __init__(self, *, seed: int = 0, image_size: int = 64, split: str = "train",
                 with_regions: bool = False):
        if image_size < 16:
            raise UserError(f"image_size must be at least 16 for shapes, got {image_size}; objects would vanish")
        self.name, self.seed, self.image_size, self.split = "shapes", seed, image_size, split
        self.with_regions = with_regions       # Sample.regions; off by default, as they cost a drawing per object
        self.tasks = {"color": list(COLOR_NAMES), "shape": list(SHAPE_NAMES), "count": list(COUNT_NAMES)}
        self.templates = {task: list(templates) for task, templates in SHAPES_TEMPLATES.items()}
        held_out = set(HELD_OUT_PAIRS)
        self.train_pairs = [(c, s) for c in COLOR_NAMES for s in SHAPE_NAMES if (c, s) not in held_out]
        self.all_pairs = [(c, s) for c in COLOR_NAMES for s in SHAPE_NAMES]

    def __len__(self) -> None:
        return None

    def train_sample(self, index: int) -> Sample:
        things, rng = self._scene(index)
        return self._make(things, rng, f"shapes/train/{index}")

    def scene(self, index: int) -> list[Thing]:
        """The objects of training sample `index`: what its image shows and its caption says."""
        return self._scene(index)[0]

    def _scene(self, index: int) -> tuple[list[Thing], random.Random]:
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        rng = random.Random(f"shapes/{self.seed}/{index}")
        count = rng.choices((1, 2, 3), weights=(0.4, 0.3, 0.3))[0]
        return _draw_things(rng, count, self.train_pairs), rng

    def test_samples(self) -> list[Sample]:
        """600 fixed images, the same for every seed.

        The first 300 hold one object each, of a held-out colour-shape pair (labels `color` and `shape`); the next
        300 hold one, two or three objects of any pair, 100 of each count (label `count` only, so the count task
        is balanced and the colour and shape tasks see held-out pairs only).
        """
        rng = random.Random(f"shapes/test/{TEST_SEED}")
        samples = []
        for number in range(TEST_HELD_OUT_PER_PAIR * len(HELD_OUT_PAIRS)):
            color, shape = HELD_OUT_PAIRS[number % len(HELD_OUT_PAIRS)]
            thing = Thing(color, shape, SIZE_NAMES[(number // len(HELD_OUT_PAIRS)) % 2], rng.randrange(4))
            sample = self._make([thing], rng, f"shapes/test/{len(samples):04d}")
            sample.labels = {"color": COLOR_NAMES.index(color), "shape": SHAPE_NAMES.index(shape)}
            samples.append(sample)
        for number in range(TEST_PER_COUNT * 3):
            count = number % 3 + 1
            sample = self._make(_draw_things(rng, count, self.all_pairs), rng, f"shapes/test/{len(samples):04d}")
            sample.labels = {"count": count - 1}
            samples.append(sample)
        return samples

    def caption_corpus(self, count: int) -> list[str]:
        # A caption is drawn from the scene's generator before any pixel is: no image needs drawing for it.
        return [describe(*self._scene(index))[0] for index in range(count)] + self.prompts()

    def _make(self, things: list[Thing], rng: random.Random, key: str) -> Sample:
        caption, core = describe(things, rng)
        grey, placed = place(things, rng, self.image_size)
        image = draw_placed(grey, placed, self.image_size)
        labels = {"count": len(things) - 1}
        if len(things) == 1:
            labels.update(color=COLOR_NAMES.index(things[0].color), shape=SHAPE_NAMES.index(things[0].shape))
        # Captions that state the same content (whatever their framing words) are positives of each other.
        return Sample(image=image, caption=caption, key=key, labels=labels, positive_id=caption_id(core),
                      regions=regions(placed, self.image_size) if self.with_regions else None)


def _draw_things(rng: random.Random, count: int, pairs: list[tuple[str, str]]) -> list[Thing]:
    """`count` objects in distinct cells; a second object copies the first's looks in 30% of images."""
    cells = rng.sample(range(4), count)
    things = []
    for cell in cells:
        if things and rng.random() < 0.3:
            first = things[0]
            things.append(Thing(first.color, first.shape, first.size, cell))
        else:
            color, shape = rng.choice(pairs)
            things.append(Thing(color, shape, rng.choice(SIZE_NAMES), cell))
    return things
