"""CSV, TSV and JSONL tables of image paths (relative to the table's own folder) and captions.

The whole table is read once when the source opens (a row is a few short strings); a sample is then read by row
number, so training index i visits row permutation_e[i mod rows] of epoch e exactly, and resume is exact.
Columns are found by their usual names (image: filepath, image, path, ...; caption: caption, title, text, ...;
label: label, class, ...), or named with the `image_column`, `caption_column`, `label_column` keywords.
A row's problems (a missing cell, text that is not UTF-8, a line that is not JSON) are kept with the row and
raised as BadSample when the row is read, so one bad row never stops the table from opening.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from siglip.data.files import LABEL_TASK, parse_label, resolve_classes, resolve_templates
from siglip.data.sample import DEFAULT_MAX_IMAGE_PIXELS, BadSample, Sample, caption_id, check_caption, decode_image
from siglip.data.source import FiniteSource
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
        line, values, problem = self.rows[record]
        key = f"{self.name}:{line}"
        if problem is not None:
            raise BadSample(problem[0], key, problem[1])
        caption = check_caption(values.get(self.caption_column), key)
        image_path = values.get(self.image_column)
        if image_path is None or not isinstance(image_path, str) or not image_path.strip():
            raise BadSample("missing_image", key, f"no image path in column {self.image_column!r}")
        if "://" in image_path:
            raise BadSample("missing_file", key, f"{image_path} is a URL; siglip reads local files only")
        location = self.folder / image_path.strip()
        try:
            data = location.read_bytes()
        except FileNotFoundError:
            raise BadSample("missing_file", key, f"image file {location} does not exist") from None
        except OSError as error:
            raise BadSample("unreadable_file", key, f"image file {location}: {error}") from None
        image = decode_image(data, f"{key} ({image_path})", max_pixels=self.max_image_pixels,
                             draft_size=self.image_size)
        labels, positive_id = {}, caption_id(caption)
        raw_label = values.get(self.label_column) if self.label_column else None
        if raw_label is not None and str(raw_label).strip():
            labels = {LABEL_TASK: parse_label(raw_label, self.class_names, key)}
            positive_id = labels[LABEL_TASK]
        return Sample(image=image, caption=caption, key=key, labels=labels, positive_id=positive_id)

    def test_samples(self) -> list[Sample]:
        """Every row, in file order (a table is one split); bad rows skipped, or raised when strict."""
        return self._read_all(range(len(self.rows)), self._read_record)

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
            raise UserError(f"{keyword}={given!r} is not a column of {path} (columns: {header})")
        return given
    lowered = {name.lower(): name for name in header}
    found = next((lowered[name] for name in usual if name in lowered), None)
    if found is None and required:
        raise UserError(f"no {what} column in {path} (columns: {header}); name it one of {list(usual)} "
                        f"or pass {keyword}= to open_source")
    return found
