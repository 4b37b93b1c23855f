"""Image folders: one sub-folder per class, class names from the folders or a --classes file, bad files counted."""

from __future__ import annotations

from collections import Counter

import pytest

from data.builders import encode, random_image, write_tar
from siglip.data import open_source
from siglip.errors import UserError


def make_folder(root, counts: dict[str, int]):
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for number in range(count):
            (root / name / f"{number}.png").write_bytes(encode(random_image(12), "PNG"))
    return root


def test_classes_are_the_sorted_folders_and_every_image_a_labelled_sample(tmp_path):
    root = make_folder(tmp_path / "val", {"dog": 2, "cat": 3, "eel": 1})
    (root / "dog" / "nested").mkdir()
    (root / "dog" / "nested" / "deep.jpg").write_bytes(encode(random_image(10), "JPEG"))   # counts for "dog"
    (root / "cat" / "notes.txt").write_text("not an image")                              # ignored by its suffix
    (root / ".cache").mkdir()                                                            # hidden: not a class
    source = open_source(str(root))
    assert type(source).__name__ == "ImageFolderSource"
    assert source.tasks == {"label": ["cat", "dog", "eel"]} and len(source) == 7
    samples = source.test_samples()
    assert [sample.labels["label"] for sample in samples] == [0, 0, 0, 1, 1, 1, 2]
    assert all(sample.positive_id == sample.labels["label"] for sample in samples)
    assert samples[0].caption == "a photo of a cat." and samples[0].image.mode == "RGB"  # the first template
    assert sorted(source.train_sample(i).key for i in range(7)) == sorted(sample.key for sample in samples)
    assert "a photo of a eel." in source.caption_corpus(10)
    (tmp_path / "names.txt").write_text("tabby\nbeagle\nmoray\n")
    renamed = open_source(str(root), classes_file=str(tmp_path / "names.txt"))
    assert renamed.tasks == {"label": ["tabby", "beagle", "moray"]}
    (tmp_path / "two.txt").write_text("tabby\nbeagle\n")
    with pytest.raises(UserError, match="names 2 classes but .* has 3 class folders .*sorted folder order"):
        open_source(str(root), classes_file=str(tmp_path / "two.txt"))


def test_an_unreadable_image_is_counted_and_folders_without_images_are_refused(tmp_path):
    root = make_folder(tmp_path / "val", {"a": 2, "b": 2})
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    skipped = Counter()
    assert len(list(open_source(str(root)).iter_test_samples(skipped))) == 4
    assert skipped == Counter({"undecodable_image": 1})
    with pytest.raises(UserError, match="broken.png"):
        list(open_source(str(root), strict=True).iter_test_samples())
    (root / "c").mkdir()
    with pytest.raises(UserError, match=r"class folder .*c holds no images"):
        open_source(str(root))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(encode(random_image(8), "PNG"))
    with pytest.raises(UserError, match="holds no class sub-folders"):
        open_source(str(tmp_path / "flat"))


def test_a_folder_of_shards_is_still_read_as_webdataset(tmp_path):
    (tmp_path / "shards").mkdir()
    write_tar(tmp_path / "shards" / "train-000.tar", [("k.png", encode(random_image(), "PNG")), ("k.txt", b"a cat")])
    assert type(open_source(str(tmp_path / "shards"))).__name__ == "WebDatasetSource"
