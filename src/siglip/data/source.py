"""The source interface every data world implements, and the epoch order shared by the finite ones.

A source maps a training index (0, 1, 2, ... without end) to a sample, deterministically for its seed: the
loader turns global step k into indices [k*B, (k+1)*B), which is what makes a resumed run see exactly the
samples a run without interruption would have seen.

Evaluation reads the held-out split one sample at a time (`iter_test_samples`), or for retrieval one distinct
image at a time with all its captions (`iter_retrieval_images`), so that a large split is never decoded whole.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from siglip.data.sample import BadSample, BadSampleLog, Sample
from siglip.prompts import fill


@dataclass
class RetrievalImage:
    """One distinct image of a retrieval set with every caption it has (COCO and Flickr30k have five)."""

    key: str
    """The image's name in logs: its path, or its sample's key."""
    image: Image.Image
    captions: list[str]
    """At least one caption; each is a text query whose answer is this image."""


class Source:
    """A data source: an endless or finite training stream, a fixed held-out split, zero-shot tasks."""

    name: str
    """"shapes", "digits", or the path or pattern the source was opened from."""
    tasks: dict[str, list[str]]
    """Zero-shot task -> class names in label order ({} when the source has no labels)."""
    templates: dict[str, list[str]]
    """Zero-shot task -> prompt templates, each with "{}" where the class name goes."""
    split: str = "train"
    """The split asked for at opening; informational (every source offers both train_sample and test_samples)."""

    def __len__(self) -> int | None:
        """Training samples in one epoch; None for an endless procedural source.

        Python's len() refuses None, so call `source.__len__()` (or read `source.size`) where a source may be endless.
        """
        raise NotImplementedError

    @property
    def size(self) -> int | None:
        """The same as `__len__()`, usable on endless sources too."""
        return self.__len__()

    def __bool__(self) -> bool:
        return True  # without this, `if source:` would call __len__, which an endless source answers with None

    def train_sample(self, index: int) -> Sample:
        """The training sample at position `index` of the seeded stream (index >= 0, may exceed one epoch)."""
        raise NotImplementedError

    def test_samples(self) -> list[Sample]:
        """The fixed held-out split, in a fixed order."""
        raise NotImplementedError

    def iter_test_samples(self, skipped: Counter[str] | None = None) -> Iterator[Sample]:
        """The held-out split one sample at a time, in `test_samples()` order; bad samples skipped (counted by kind
        into `skipped`) or raised when the source is strict. Sources read from files decode one at a time."""
        yield from self.test_samples()

    def iter_retrieval_images(self, skipped: Counter[str] | None = None) -> Iterator[RetrievalImage]:
        """Each distinct held-out image once, with all its captions. Here every sample is its own image with its
        one caption; a table source groups the rows that share an image path."""
        for sample in self.iter_test_samples(skipped):
            yield RetrievalImage(key=sample.key, image=sample.image, captions=[sample.caption])

    def caption_corpus(self, count: int) -> list[str]:
        """Text to train a tokenizer on: `count` training captions, then every zero-shot prompt of the source."""
        raise NotImplementedError

    def prompts(self) -> list[str]:
        """Every template of every task filled with every class name of that task."""
        return [text for task, names in self.tasks.items() for name in names
                for text in fill(self.templates.get(task, []), name)]


class FiniteSource(Source):
    """A source with a fixed list of training records: epoch e visits them in a permutation seeded by (seed, e).

    Subclasses set `seed` and `strict` and implement `_num_records`, `_read_record` and `test_samples` (a file
    source streams its held-out split with `_iter_all`).
    """

    seed: int = 0
    strict: bool = False
    _permutation: tuple[int, np.ndarray] | None = None

    def _num_records(self) -> int:
        raise NotImplementedError

    def _read_record(self, record: int, index: int) -> Sample:
        """The sample of training record `record` (its place in the file), read as training index `index`."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self._num_records()

    def record_of(self, index: int) -> int:
        """The training record that training index `index` visits."""
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        count = self._num_records()
        epoch, position = divmod(index, count)
        if self._permutation is None or self._permutation[0] != epoch:
            # One epoch's order is kept; consecutive indices (what the loader asks for) share it.
            order = np.random.default_rng([self.seed, epoch]).permutation(count)
            self._permutation = (epoch, order)
        return int(self._permutation[1][position])

    def train_sample(self, index: int) -> Sample:
        return self._read_record(self.record_of(index), index)

    def _iter_all(self, records: Iterable[int], read, skipped: Counter[str] | None = None) -> Iterator:
        """read(record) for each record, one at a time; a bad one is skipped (logged, counted by kind into
        `skipped`) unless the source is strict."""
        log = BadSampleLog()
        for record in records:
            try:
                sample = read(record)
            except BadSample as error:
                if self.strict:
                    raise
                log.record(error)
                if skipped is not None:
                    skipped[error.kind] += 1
                continue
            yield sample

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_permutation"] = None  # recomputed on demand; no need to ship it to DataLoader workers
        return state
