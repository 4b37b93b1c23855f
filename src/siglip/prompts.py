"""Class names and prompt templates, as data: the built-in worlds' vocabularies and the default prompt list.

A template holds "{}" where the class name goes. Zero-shot classification embeds every template filled with a
class name and averages them per class (CLIP's prompt ensembling). The built-in worlds' templates are phrased like
their captions, so a prompt reads like something the text tower was trained on.
"""

from __future__ import annotations

from pathlib import Path

from siglip.errors import UserError

# The shapes world (src/siglip/data/shapes.py draws these).
SHAPE_NAMES = ["circle", "square", "triangle", "cross", "star", "ring"]
COLOR_NAMES = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "white"]
SIZE_NAMES = ["small", "large"]
COUNT_NAMES = ["one object", "two objects", "three objects"]

SHAPES_TEMPLATES: dict[str, list[str]] = {
    # A colour is asked about across every shape (and a shape across every colour), so each class's averaged
    # prompt marginalises the other attribute instead of betting on one pairing.
    "color": [f"a {{}} {shape}" for shape in SHAPE_NAMES],
    "shape": [f"a {color} {{}}" for color in COLOR_NAMES],
    "count": ["a picture of {}", "an image of {}", "{}"],
}

# scikit-learn's handwritten digits.
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGITS_TEMPLATES = [
    "a handwritten {}",
    "the digit {}",
    "a picture of the number {}",
    "a {} written by hand",
    "a scanned handwritten digit {}",
    "the number {} in handwriting",
]

DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a {}.",
]
"""Templates for sources that bring none (WebDataset, CSV/TSV/JSONL) when no --templates file is given."""


def read_classes(path: str) -> list[str]:
    """Class names from a text file, one a line in label order (blank lines and surrounding spaces dropped)."""
    names = _read_lines(path, "classes file")
    if len(set(names)) != len(names):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        raise UserError(f"classes file {path} repeats class names {duplicates}; give each class once, in label order")
    return names


def read_templates(path: str) -> list[str]:
    """Prompt templates from a text file, one a line, each holding "{}" where the class name goes."""
    templates = _read_lines(path, "templates file")
    for number, template in enumerate(templates, 1):
        if template.count("{}") != 1:
            raise UserError(f"templates file {path}: template {number} {template!r} must hold '{{}}' exactly once, "
                            "where the class name goes")
    return templates


def fill(templates: list[str], class_name: str) -> list[str]:
    """Every template with the class name in place of "{}"."""
    return [template.replace("{}", class_name) for template in templates]


def _read_lines(path: str, what: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist; give an existing file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{what} {path} cannot be read as UTF-8 text ({error}); give a UTF-8 text file") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"{what} {path} is empty; give one entry a line")
    return lines
