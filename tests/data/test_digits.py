"""scikit-learn's digits: a fixed, disjoint split; every training digit once an epoch; images true to the data."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from siglip.cli import main
from siglip.data import open_source
from siglip.errors import UserError
from siglip.prompts import DIGIT_NAMES


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_split_is_fixed_disjoint_and_complete(digits):
    first, second = (open_source("digits", seed=random.randrange(10**6)) for _ in range(2))
    test_keys = [sample.key for sample in first.test_samples()]
    assert test_keys == [sample.key for sample in second.test_samples()] and len(set(test_keys)) == 400
    train_keys = {first.train_sample(index).key for index in range(len(first))}
    assert len(first) == 1397 and len(train_keys) == 1397        # one epoch visits every training digit once
    assert not train_keys & set(test_keys)
    assert len(train_keys | set(test_keys)) == len(digits.target) == 1797
    for sample in first.test_samples():
        item = int(sample.key.split("/")[-1])
        assert sample.labels == {"digit": int(digits.target[item])} == {"digit": sample.positive_id}


def test_each_epoch_is_a_seeded_permutation():
    seed = random.randrange(10**6)
    source, twin, other = (open_source("digits", seed=s) for s in (seed, seed, seed + 1))
    n = len(source)
    epoch0 = [source.record_of(index) for index in range(n)]
    epoch1 = [source.record_of(index) for index in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1
    assert epoch1 == [twin.record_of(index) for index in range(n, 2 * n)]
    assert epoch0 != [other.record_of(index) for index in range(n)]
    index = random.randrange(10 * n)
    a, b = source.train_sample(index), twin.train_sample(index)
    assert (a.key, a.caption) == (b.key, b.caption) and a.image.tobytes() == b.image.tobytes()


def test_images_and_captions_show_the_digit(digits):
    size = random.choice([16, 32, 64])
    source = open_source("digits", image_size=size, seed=random.randrange(10**6))
    for index in random.sample(range(5000), 40):
        sample = source.train_sample(index)
        item, label = int(sample.key.split("/")[-1]), sample.labels["digit"]
        assert sample.image.mode == "RGB" and sample.image.size == (size, size)
        assert DIGIT_NAMES[label] in sample.caption and label == digits.target[item]
        # Shrunk back to 8 x 8, the picture is the original digit.
        back = np.asarray(sample.image.convert("L").resize((8, 8), Image.Resampling.BOX), dtype=float)
        assert np.corrcoef(back.ravel(), digits.images[item].ravel())[0, 1] > 0.9


def test_prompt_files_replace_the_built_in_prompts(tmp_path):
    (tmp_path / "classes.txt").write_text("\n".join(str(n) for n in range(10)) + "\n")
    (tmp_path / "templates.txt").write_text("a drawing of {}\n\nthe numeral {}\n")
    source = open_source("digits", classes_file=str(tmp_path / "classes.txt"),
                         templates_file=str(tmp_path / "templates.txt"))
    assert source.tasks == {"digit": [str(n) for n in range(10)]}
    assert source.templates == {"digit": ["a drawing of {}", "the numeral {}"]}
    assert "three" in open_source("digits").caption_corpus(0)[3 * 6 + 1]   # prompts: class 3, template 2
    (tmp_path / "nine.txt").write_text("\n".join(str(n) for n in range(9)))
    with pytest.raises(UserError, match="9 classes"):
        open_source("digits", classes_file=str(tmp_path / "nine.txt"))
    (tmp_path / "bad.txt").write_text("a drawing\n")
    with pytest.raises(UserError, match="exactly once"):
        open_source("digits", templates_file=str(tmp_path / "bad.txt"))
    with pytest.raises(UserError, match="does not exist"):
        open_source("digits", templates_file=str(tmp_path / "absent.txt"))


def test_without_scikit_learn_the_error_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)        # the import now raises ImportError
    with pytest.raises(UserError, match="pip install scikit-learn"):
        open_source("digits")
    assert main(["data", "inspect", "--data", "digits"]) == 2
    assert capsys.readouterr().err.count("\n") == 1                    # one line, no traceback
