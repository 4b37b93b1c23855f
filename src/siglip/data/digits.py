"""`digits`: scikit-learn's 1,797 handwritten digits (8 x 8, shipped with scikit-learn), upscaled, with captions.

The split is fixed for every seed: a permutation seeded by SPLIT_SEED puts 400 digits in the test split and the
other 1,397 in training. Captions are drawn from the digit prompt templates, so a zero-shot prompt reads exactly
like a training caption. Training index i visits record (epoch i // 1397)'s seeded permutation at i % 1397.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from siglip.data.sample import Sample
from siglip.data.source import FiniteSource
from siglip.errors import UserError
from siglip.prompts import DIGIT_NAMES, DIGITS_TEMPLATES

SPLIT_SEED = 1797
TEST_SIZE = 400


class DigitsSource(FiniteSource):
    """scikit-learn's digits: 1,397 training and 400 test images, task `digit` (classes "zero" ... "nine")."""

    def __init__(self, *, seed: int = 0, image_size: int = 64, split: str = "train"):
        try:
            # The import costs half a second: only when digits are asked for.
            from sklearn.datasets import load_digits
        except ImportError:
            raise UserError("the digits source needs scikit-learn, a dependency of siglip that is missing here: "
                            "pip install scikit-learn") from None

        if image_size < 8:
            raise UserError(f"image_size must be at least 8 for digits, got {image_size}")
        digits = load_digits()
        self.name, self.seed, self.image_size, self.split = "digits", seed, image_size, split
        self.images = digits.images.astype(np.float32)          # (1797, 8, 8), ink intensity 0 ... 16
        self.targets = digits.target.astype(np.int64)           # (1797,)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(self.targets))
        self.test_ids, self.train_ids = np.sort(order[:TEST_SIZE]), np.sort(order[TEST_SIZE:])
        self.tasks = {"digit": list(DIGIT_NAMES)}
        self.templates = {"digit": list(DIGITS_TEMPLATES)}

    def _num_records(self) -> int:
        return len(self.train_ids)

    def _read_record(self, record: int, index: int) -> Sample:
        template = random.Random(f"digits/{self.seed}/{index}").choice(DIGITS_TEMPLATES)
        return self._make(int(self.train_ids[record]), template)

    def test_samples(self) -> list[Sample]:
        return [self._make(int(item), DIGITS_TEMPLATES[number % len(DIGITS_TEMPLATES)])
                for number, item in enumerate(self.test_ids)]

    def caption_corpus(self, count: int) -> list[str]:
        return [self.train_sample(index).caption for index in range(count)] + self.prompts()

    def _make(self, item: int, template: str) -> Sample:
        label = int(self.targets[item])
        grey = Image.fromarray((self.images[item] * (255.0 / 16.0)).round().astype(np.uint8))
        image = grey.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC).convert("RGB")
        # Captions keep the built-in words even when --classes/--templates change the zero-shot prompts.
        caption = template.replace("{}", DIGIT_NAMES[label])
        return Sample(image=image, caption=caption, key=f"digits/{item:04d}", labels={"digit": label},
                      positive_id=label)
