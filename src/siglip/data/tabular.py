"""CSV, TSV and JSONL tables of image paths (relative to the table's own folder) and captions.

The whole table is read once when the source opens (a row is a few short strings); a sample is then read by row
number, so training index i visits row permutation_e[i mod rows] of epoch e exactly, and resume is exact.
Columns are found by their usual names (image: filepath, image, path, ...; caption: caption, title, text, ...;
label: label, class, ...), or named with the `image_column`, `caption_column`, `label_column` keywords.
A row's problems (a missing cell, text that is not UTF-8, a line that is not JSON) are kept with the row and
raised as BadSample when the row is read, so one bad row never stops the table from opening.

Several captions per image (COCO and Flickr30k have five): rows that name the same image file are one image
with several captions. Training visits every row; retrieval (`iter_retrieval_images`) reads each distinct image
once with all its captions, every caption a text query.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from siglip.data.files import LABEL_TASK, parse_label, resolve_classes, resolve_templates
from siglip.data.sample import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadSample,
    BadSampleLog,
    Sample,
    caption_id,
    check_caption,
    decode_image,
)
from siglip.data.source import FiniteSource, RetrievalImage
from siglip.errors import UserError

IMAGE_COLUMNS = ("filepath", "image", "path", "image_path", "img", "file", "filename")
CAPTION_COLUMNS = ("caption", "title", "text", "description")
LABEL_COLUMNS = ("label", "class", "cls", "target")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")


class TabularSource(FiniteSource):
    """Rows of a .csv, .tsv or .jsonl file: an image path, a caption, an optional label (integer or class name)."""

    def __init__(self, path: str, *, seed: int = 0, strict: bool = False, split: str = "train",
                 classes_file: str | None = None, templates_file: str | None = None, image_size: int | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, image_column: str | None = None,
                 caption_column: str | None = None, label_column: str | None = None):
        self.name, self.seed, self.strict, self.split = path, seed, strict, split
        self.image_size, self.max_image_pixels = image_size, max_image_pixels
        self.folder = Path(path).parent
        suffix = Path(path).suffix.lower()
        if not Path(path).is_file():
            raise UserError(f"data file {path} does not exist; give an existing .csv, .tsv or .jsonl file")
        if suffix == ".jsonl":
            objects = _read_jsonl(path)
            header = list(dict.fromkeys(k for _, obj, _ in objects[:1000] if isinstance(obj, dict) for k in obj))
        elif suffix in (".csv", ".tsv"):
            header, objects = _read_delimited(path, "\t" if suffix == ".tsv" else ",")
        else:
            raise UserError(f"data file {path} has suffix {suffix!r}; expected one of {TABLE_SUFFIXES}")
        self.image_column = _pick_column(header, image_column, IMAGE_COLUMNS, "image", "image_column", path)
        self.caption_column = _pick_column(header, caption_column, CAPTION_COLUMNS, "caption", "caption_column", path)
        self.label_column = _pick_column(header, label_column, LABEL_COLUMNS, "label", "label_column", path,
                                         required=False)
        self.rows = objects
        """(line number, {column: value} or None, problem (kind, detail) or None) of every data row."""
        if not self.rows:
            raise UserError(f"data file {path} has no data rows; give a table with a header and at least one row")
        self.class_names, self.tasks = None, {}
        if self.label_column is not None:
            raw_labels = [obj.get(self.label_column) for _, obj, _ in self.rows if obj]
            self.class_names = resolve_classes(classes_file, self.folder, raw_labels)
            self.tasks = {LABEL_TASK: self.class_names} if self.class_names else {}
        self.templates = {LABEL_TASK: resolve_templates(templates_file)}

    def _num_records(self) -> int:
        return len(self.rows)

    def _read_record(self, record: int, index: int | None = None) -> Sample:
        key = self._key(record)
        caption = self._caption(record)
        image = self._image(record)
        values = self.rows[record][1]
        labels, positive_id = {}, caption_id(caption)
        raw_label = values.get(self.label_column) if self.label_column else None
        if raw_label is not None and str(raw_label).strip():
            labels = {LABEL_TASK: parse_label(raw_label, self.class_names, key)}
            positive_id = labels[LABEL_TASK]
        return Sample(image=image, caption=caption, key=key, labels=labels, positive_id=positive_id)

    def _key(self, record: int) -> str:
        return f"{self.name}:{self.rows[record][0]}"

    def _caption(self, record: int) -> str:
        """The row's caption; BadSample for a row that could not be parsed or whose caption is missing or empty."""
        _, values, problem = self.rows[record]
        if problem is not None:
            raise BadSample(problem[0], self._key(record), problem[1])
        return check_caption(values.get(self.caption_column), self._key(record))

    def _image_path(self, record: int) -> str:
        """The image path of a parsed row, as written; BadSample when it is missing or a URL."""
        key, image_path = self._key(record), self.rows[record][1].get(self.image_column)
        if image_path is None or not isinstance(image_path, str) or not image_path.strip():
            raise BadSample("missing_image", key, f"no image path in column {self.image_column!r}")
        if "://" in image_path:
            raise BadSample("missing_file", key, f"{image_path} is a URL; siglip reads local files only")
        return image_path.strip()

    def _image(self, record: int) -> Image.Image:
        key, image_path = self._key(record), self._image_path(record)
        location = self.folder / image_path
        try:
            data = location.read_bytes()
        except FileNotFoundError:
            raise BadSample("missing_file", key, f"image file {location} does not exist") from None
        except OSError as error:
            raise BadSample("unreadable_file", key, f"image file {location}: {error}") from None
        return decode_image(data, f"{key} ({image_path})", max_pixels=self.max_image_pixels,
                            draft_size=self.image_size)

    def test_samples(self) -> list[Sample]:
        """Every row, in file order (a table is one split); bad rows skipped, or raised when strict."""
        return list(self.iter_test_samples())

    def iter_test_samples(self, skipped: Counter[str] | None = None) -> Iterator[Sample]:
        yield from self._iter_all(range(len(self.rows)), self._read_record, skipped)

    def iter_retrieval_images(self, skipped: Counter[str] | None = None) -> Iterator[RetrievalImage]:
        """Each distinct image once, in the order of its first row, with the captions of all its rows.

        Rows name the same image when their paths lead to the same file ("a.jpg" and "./a.jpg"). A row whose
        caption is bad is skipped and counted by its kind; an image none of whose rows has a caption is skipped
        and counted as "image_without_caption"; an image that cannot be read is skipped with its captions and
        counted once by its kind. Under strict the first of these is raised.
        """
        skipped = Counter() if skipped is None else skipped
        log = BadSampleLog()
        for records in self._rows_by_image(skipped, log).values():
            captions = []
            for record in records:
                try:
                    captions.append(self._caption(record))
                except BadSample as error:
                    self._skip(error, skipped, log)
            try:
                if not captions:
                    raise BadSample("image_without_caption", self._key(records[0]),
                                    f"none of the {len(records)} rows of image {self._image_path(records[0])} has "
                                    "a caption")
                image = self._image(records[0])
            except BadSample as error:
                self._skip(error, skipped, log)
                continue
            yield RetrievalImage(key=self._image_path(records[0]), image=image, captions=captions)

    def _rows_by_image(self, skipped: Counter[str], log: BadSampleLog) -> dict[str, list[int]]:
        """Normalised image path -> the records that name it, in file order; rows without a usable path skipped."""
        groups: dict[str, list[int]] = {}
        for record, (_, _, problem) in enumerate(self.rows):
            try:
                if problem is not None:
                    self._caption(record)                              # raises the row's problem
                path = os.path.normpath(self.folder / self._image_path(record))
            except BadSample as error:
                self._skip(error, skipped, log)
                continue
            groups.setdefault(path, []).append(record)
        return groups

    def _skip(self, error: BadSample, skipped: Counter[str], log: BadSampleLog) -> None:
        if self.strict:
            raise error
        log.record(error)
        skipped[error.kind] += 1

    def caption_corpus(self, count: int) -> list[str]:
        captions = []
        for line, values, problem in self.rows:
            if len(captions) >= count:
                break
            if problem is None:
                try:
                    captions.append(check_caption(values.get(self.caption_column), f"{self.name}:{line}"))
                except BadSample:
                    continue
        return captions + self.prompts()


def _read_delimited(path: str, delimiter: str) -> tuple[list[str], list[tuple[int, dict | None, tuple | None]]]:
    # surrogateescape keeps undecodable bytes as lone surrogates: the row stays, and is refused when it is read.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise UserError(f"data file {path} is empty; give a table with a header row")
        header = [name.strip() for name in header]
        rows = []
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue                                # blank line
            problem = None
            if len(cells) > len(header):
                problem = ("malformed_record", f"{len(cells)} cells under a header of {len(header)}")
            rows.append((reader.line_num, dict(zip(header, cells, strict=False)), problem))
    return header, rows


def _read_jsonl(path: str) -> list[tuple[int, dict | None, tuple | None]]:
    rows = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                rows.append((line_number, None, ("not_utf8", f"line is not UTF-8 ({error.reason})")))
                continue
            except json.JSONDecodeError as error:
                rows.append((line_number, None, ("malformed_record", f"line is not JSON ({error.msg})")))
                continue
            if not isinstance(obj, dict):
                rows.append((line_number, None, ("malformed_record", "line is not a JSON object")))
                continue
            rows.append((line_number, obj, None))
    return rows


def _pick_column(header: list[str], given: str | None, usual: tuple[str, ...], what: str, keyword: str, path: str,
                 required: bool = True) -> str | None:
    if given is not None:
        if given not in header:
            raise UserError(f"{keyword}={given!r} (--{what}-column) is not a column of {path} (columns: {header})")
        return given
    lowered = {name.lower(): name for name in header}
    found = next((lowered[name] for name in usual if name in lowered), None)
    if found is None and required:
        raise UserError(f"no {what} column in {path} (columns: {header}); name it one of {list(usual)} "
                        f"or pass --{what}-column NAME (open_source's {keyword}=)")
    return found
