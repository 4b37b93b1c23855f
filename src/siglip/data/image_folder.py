"""An image folder: one sub-folder per class, the images of a class inside it (as ImageNet's validation set, or
torchvision's ImageFolder, lays them out).

    DIR/cat/0001.jpg                class "cat" (label 0: classes in sorted folder order)
    DIR/dog/0001.png, dog/x/2.jpg   class "dog" (label 1; images in nested folders count for their class)

The class names are the folder names, or the lines of a `--classes` file given in sorted folder order (so
"n01440764" can read "tench"). For zero-shot evaluation every image is a test sample. For training, an image's
caption is its class name written into the first prompt template ("a photo of a dog."), and images of one class
are positives of each other. A class folder without images is refused when the source opens; an image that cannot
be read is skipped and counted, or raised under strict.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from siglip.data.files import IMAGE_SUFFIXES, LABEL_TASK, resolve_templates
from siglip.data.sample import DEFAULT_MAX_IMAGE_PIXELS, BadSample, Sample, decode_image
from siglip.data.source import FiniteSource
from siglip.errors import UserError
from siglip.prompts import read_classes


def is_image_folder(path: str) -> bool:
    """Whether `path` is a directory to read as an image folder: one that holds no WebDataset (.tar) shards."""
    folder = Path(path)
    return folder.is_dir() and not any(entry.is_file() and ".tar" in entry.name.lower() for entry in folder.iterdir())


class ImageFolderSource(FiniteSource):
    """The images of DIR/<class>/..., labelled by class folder: the zero-shot task "label"."""

    def __init__(self, path: str, *, seed: int = 0, strict: bool = False, split: str = "train",
                 classes_file: str | None = None, templates_file: str | None = None, image_size: int | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        self.name, self.seed, self.strict, self.split = path, seed, strict, split
        self.image_size, self.max_image_pixels = image_size, max_image_pixels
        folder = Path(path)
        class_folders = sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))
        if not class_folders:
            raise UserError(f"{path} holds no class sub-folders (and no .tar shards); an image folder has one "
                            "sub-folder of images per class, e.g. DIR/cat/1.jpg, DIR/dog/2.jpg")
        self.records: list[tuple[Path, int]] = []
        """(image file, class index) of every image, class by class, files in sorted path order."""
        for label, class_folder in enumerate(class_folders):
            images = sorted(file for file in class_folder.rglob("*")
                            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file()
                            and not any(part.startswith(".") for part in file.relative_to(class_folder).parts))
            if not images:
                raise UserError(f"class folder {class_folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add "
                                "its images or remove the folder (every sub-folder is a class)")
            self.records += [(file, label) for file in images]
        names = [entry.name for entry in class_folders]
        if classes_file is not None:
            given = read_classes(classes_file)
            if len(given) != len(names):
                shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                raise UserError(f"classes file {classes_file} names {len(given)} classes but {path} has "
                                f"{len(names)} class folders ({shown}); give one name a line, in sorted folder order")
            names = given
        self.tasks = {LABEL_TASK: names}
        self.templates = {LABEL_TASK: resolve_templates(templates_file)}

    def _num_records(self) -> int:
        return len(self.records)

    def _read_record(self, record: int, index: int | None = None) -> Sample:
        file, label = self.records[record]
        key = str(file)
        try:
            data = file.read_bytes()
        except OSError as error:
            raise BadSample("unreadable_file", key, str(error)) from None
        image = decode_image(data, key, max_pixels=self.max_image_pixels, draft_size=self.image_size)
        caption = self.templates[LABEL_TASK][0].replace("{}", self.tasks[LABEL_TASK][label])
        return Sample(image=image, caption=caption, key=key, labels={LABEL_TASK: label}, positive_id=label)

    def test_samples(self) -> list[Sample]:
        """Every image, class by class (an image folder is one split); unreadable ones skipped, or raised if strict."""
        return list(self.iter_test_samples())

    def iter_test_samples(self, skipped: Counter[str] | None = None) -> Iterator[Sample]:
        yield from self._iter_all(range(len(self.records)), self._read_record, skipped)

    def caption_corpus(self, count: int) -> list[str]:
        """The captions training uses (a template with a class name) and every prompt: the prompts themselves."""
        return self.prompts()
