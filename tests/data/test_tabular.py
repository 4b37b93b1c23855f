"""CSV, TSV and JSONL tables: image paths relative to the table, columns found by name, labels by number or name."""

from __future__ import annotations

import json
import random

import pytest

from data.builders import encode, random_image
from siglip.data import open_source
from siglip.errors import UserError


def make_images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    images = [random_image(random.randint(8, 20)) for _ in range(count)]
    for number, image in enumerate(images):
        (folder / f"{number}.png").write_bytes(encode(image, "PNG"))
    return images


@pytest.mark.parametrize("suffix,columns", [(".csv", ("filepath", "caption", "label")),
                                            (".tsv", ("image", "title", "class")),
                                            (".jsonl", ("path", "text", "label"))])
def test_tables_with_relative_paths(tmp_path, suffix, columns):
    count = random.randint(5, 12)
    images = make_images(tmp_path / "pictures", count)
    names = ["cat", "dog", "fish"]
    labels = [random.choice(names) for _ in range(count)]
    captions = [f"picture number {n}, of a {label}" for n, label in enumerate(labels)]
    table = tmp_path / "tables" / f"pairs{suffix}"
    table.parent.mkdir()
    image_column, caption_column, label_column = columns
    rows = [{image_column: f"../pictures/{n}.png", caption_column: captions[n], label_column: labels[n]}
            for n in range(count)]
    if suffix == ".jsonl":
        table.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        separator = "\t" if suffix == ".tsv" else ","
        lines = [separator.join(columns)] + [separator.join(f'"{row[c]}"' for c in columns) for row in rows]
        table.write_text("\n".join(lines) + "\n")
    source = open_source(str(table), seed=random.randrange(10**6))
    assert len(source) == count and source.tasks == {"label": sorted(set(labels))}   # names, no classes file
    samples = source.test_samples()
    assert [s.caption for s in samples] == captions
    assert [source.tasks["label"][s.labels["label"]] for s in samples] == labels
    assert [s.positive_id for s in samples] == [s.labels["label"] for s in samples]
    assert all(s.image.tobytes() == image.tobytes() for s, image in zip(samples, images, strict=True))
    assert sorted(source.train_sample(i).key for i in range(count)) == sorted(s.key for s in samples)
    assert source.caption_corpus(3)[:3] == captions[:3]


def test_integer_labels_classes_file_and_explicit_columns(tmp_path):
    count = random.randint(4, 9)
    make_images(tmp_path / "img", count)
    labels = [random.randrange(4) for _ in range(count)]
    lines = ["picture;words;y"] + [f"img/{n}.png;caption {n};{labels[n]}" for n in range(count)]
    (tmp_path / "odd.csv").write_text("\n".join(lines).replace(";", ",") + "\n")
    with pytest.raises(UserError, match="no image column.*picture"):
        open_source(str(tmp_path / "odd.csv"))
    source = open_source(str(tmp_path / "odd.csv"), image_column="picture", caption_column="words", label_column="y")
    assert source.tasks == {"label": [str(n) for n in range(max(labels) + 1)]}
    assert [s.labels["label"] for s in source.test_samples()] == labels
    (tmp_path / "classes.txt").write_text("north\neast\nsouth\nwest\n")                # found beside the table
    source = open_source(str(tmp_path / "odd.csv"), image_column="picture", caption_column="words", label_column="y")
    assert source.tasks == {"label": ["north", "east", "south", "west"]}
    without = open_source(str(tmp_path / "odd.csv"), image_column="picture", caption_column="words")
    assert without.tasks == {} and all(s.labels == {} for s in without.test_samples())
    captions = [s.caption for s in without.test_samples()]
    assert len({s.positive_id for s in without.test_samples()}) == len(set(captions))   # caption hashes
    with pytest.raises(UserError, match="image_column='nope'"):
        open_source(str(tmp_path / "odd.csv"), image_column="nope")


def test_unusable_tables_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        open_source(str(tmp_path / "absent.csv"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(UserError, match="empty"):
        open_source(str(tmp_path / "empty.csv"))
    (tmp_path / "header.tsv").write_text("image\tcaption\n")
    with pytest.raises(UserError, match="no data rows"):
        open_source(str(tmp_path / "header.tsv"))
    with pytest.raises(UserError, match="unknown data source"):
        open_source(str(tmp_path / "pairs.parquet"))
    with pytest.raises(UserError, match="split"):
        open_source("digits", split="validation")


def test_rows_that_share_an_image_are_one_image_with_all_its_captions(tmp_path):
    from collections import Counter

    images = make_images(tmp_path / "img", 4)
    captions = {0: ["first of 0", "second of 0"], 1: ["only caption of 1"], 2: ["a", "b", "c", "d", "e"]}
    rows = ["filepath,caption"]
    for number, texts in captions.items():
        rows += [f"{'./' if k % 2 else ''}img/{number}.png,{text}" for k, text in enumerate(texts)]   # ./ or not
    rows += ["img/3.png,", "img/1.png,  ", "img/9.png,an image that is not there"]
    random.shuffle(rows[1:])                                # the rows of one image need not be adjacent
    table = tmp_path / "captions.csv"
    table.write_text("\n".join(rows) + "\n")
    source = open_source(str(table))
    skipped = Counter()
    found = {item.key.removeprefix("./"): item for item in source.iter_retrieval_images(skipped)}
    assert set(found) == {"img/0.png", "img/1.png", "img/2.png"}
    for number, texts in captions.items():
        item = found[f"img/{number}.png"]
        assert sorted(item.captions) == sorted(texts)
        assert item.image.tobytes() == images[number].tobytes()
    # Image 3's only row has no caption, one of image 1's rows is blank, image 9 is missing: counted, not raised.
    assert skipped == Counter({"empty_caption": 2, "image_without_caption": 1, "missing_file": 1})
    assert len(source) == len(rows) - 1                     # training still visits every row
    strict = open_source(str(table), strict=True)
    with pytest.raises(UserError, match="empty_caption|image_without_caption|missing_file"):
        list(strict.iter_retrieval_images())
