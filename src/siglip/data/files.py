"""What the file-backed sources (WebDataset shards, tables, image folders) share: classes, templates, labels."""

from __future__ import annotations

from pathlib import Path

from siglip.data.sample import BadSample
from siglip.prompts import DEFAULT_TEMPLATES, read_classes, read_templates

LABEL_TASK = "label"
"""The one zero-shot task of a file source, as the contract names it."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
"""File suffixes read as images where a source finds images by name (an image folder)."""


def resolve_classes(classes_file: str | None, data_dir: Path, raw_labels: list[str]) -> list[str] | None:
    """Class names in label order: the --classes file, else classes.txt beside the data, else from the labels seen.

    Without a file, integer labels name their classes "0" ... "max"; text labels are their own class names,
    sorted. None when there is neither a file nor any label.
    """
    if classes_file is not None:
        return read_classes(classes_file)
    beside = data_dir / "classes.txt"
    if beside.is_file():
        return read_classes(str(beside))
    values = [str(value).strip() for value in raw_labels if value is not None and str(value).strip()]
    if not values:
        return None
    count = max((int(value) for value in values if _is_int(value)), default=-1) + 1
    words = sorted({value for value in values if not _is_int(value)})
    return [str(number) for number in range(count)] + words


def resolve_templates(templates_file: str | None) -> list[str]:
    """The --templates file, else the project's default prompt list."""
    return read_templates(templates_file) if templates_file is not None else list(DEFAULT_TEMPLATES)


def parse_label(value: int | str, class_names: list[str] | None, key: str) -> int:
    """A class index from an integer (or its text) or a class name; BadSample("bad_label") otherwise."""
    if class_names is None:
        raise BadSample("bad_label", key, f"label {value!r} but no class names; give --classes FILE")
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadSample("bad_label", key, f"label must be an integer or a class name, got {value!r}")
    text = str(value).strip()
    if _is_int(text):
        index = int(text)
        if not 0 <= index < len(class_names):
            raise BadSample("bad_label", key, f"label {index} is outside 0 ... {len(class_names) - 1}")
        return index
    if text in class_names:
        return class_names.index(text)
    raise BadSample("bad_label", key, f"label {text!r} is neither an integer nor one of the {len(class_names)} "
                    "class names")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except (TypeError, ValueError):
        return False
    return True
