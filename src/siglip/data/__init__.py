"""Data sources for language-image training: built-in worlds, WebDataset shards, CSV/TSV/JSONL tables, image folders.

    source = open_source("shapes", seed=0)      # or "digits", "data/train-{000..009}.tar", "pairs.csv", "val/"
    batches = make_train_loader(source, transform=..., local_batch=128, rank=0, world_size=1, start_step=0,
                                seed=0, num_workers=2)
    batch = next(batches)                                   # Batch: tensors, positive_ids, bad, step, keys
"""

from __future__ import annotations

import os

from siglip.data.loader import Batch, make_train_loader
from siglip.data.sample import DEFAULT_MAX_IMAGE_PIXELS, BadSample, Sample
from siglip.data.source import RetrievalImage, Source
from siglip.errors import UserError

__all__ = ["Batch", "BadSample", "RetrievalImage", "Sample", "Source", "make_train_loader", "open_source"]

SPLITS = ("train", "test")


def open_source(spec: str, *, split: str = "train", seed: int = 0, strict: bool = False,
                classes_file: str | None = None, templates_file: str | None = None, image_size: int | None = None,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, image_column: str | None = None,
                caption_column: str | None = None, label_column: str | None = None,
                with_regions: bool = False) -> Source:
    """Open a data source by name or path.

    spec: "shapes", "digits", a WebDataset shard path, brace pattern or folder of .tar files, a .csv/.tsv/.jsonl
        table (image paths relative to the table's folder), or an image folder (one sub-folder of images per class).
    split: "train" or "test" (recorded on the source; every source offers both train_sample and test_samples).
    seed: seeds the training order (and for shapes, the drawings themselves). The held-out splits do not depend on it.
    strict: raise on the first bad sample or unreadable shard met while opening or in test_samples().
    classes_file, templates_file: class names (one a line, label order; for an image folder, sorted folder order)
        and prompt templates (one a line, with "{}"); for shapes and digits they replace the built-in prompts
        (classes only for a one-task source).
    image_size: side in pixels of the built-in worlds' images (default 64); for files, the smallest size a JPEG
        is decoded at (a speed-up: the processor resizes anyway).
    max_image_pixels: images with more pixels are refused as decompression bombs (BadSample "too_many_pixels").
    image_column, caption_column, label_column: a table's column names when they are not the usual ones.
    with_regions: shapes samples carry their objects' regions (Sample.regions), for the SigLIP 2 recipe and the
        dense evaluation; other sources know none and ignore it.
    """
    if split not in SPLITS:
        raise UserError(f"split must be one of {SPLITS}, got {split!r}")
    if spec in ("shapes", "digits"):
        if spec == "shapes":
            from siglip.data.shapes import ShapesSource

            source: Source = ShapesSource(seed=seed, image_size=image_size or 64, split=split,
                                          with_regions=with_regions)
        else:
            from siglip.data.digits import DigitsSource

            source = DigitsSource(seed=seed, image_size=image_size or 64, split=split)
        _override_prompts(source, classes_file, templates_file)
        return source
    lowered = spec.lower()
    if lowered.endswith((".csv", ".tsv", ".jsonl")):
        from siglip.data.tabular import TabularSource

        return TabularSource(spec, seed=seed, strict=strict, split=split, classes_file=classes_file,
                             templates_file=templates_file, image_size=image_size, max_image_pixels=max_image_pixels,
                             image_column=image_column, caption_column=caption_column, label_column=label_column)
    from siglip.data.image_folder import ImageFolderSource, is_image_folder

    if is_image_folder(spec):
        return ImageFolderSource(spec, seed=seed, strict=strict, split=split, classes_file=classes_file,
                                 templates_file=templates_file, image_size=image_size,
                                 max_image_pixels=max_image_pixels)
    if ".tar" in lowered or os.path.isdir(spec):
        from siglip.data.webdataset import WebDatasetSource

        return WebDatasetSource(spec, seed=seed, strict=strict, split=split, classes_file=classes_file,
                                templates_file=templates_file, image_size=image_size,
                                max_image_pixels=max_image_pixels)
    raise UserError(f"unknown data source {spec!r}; give 'shapes', 'digits', WebDataset shards "
                    "('data/train-{000..009}.tar' or a folder of .tar files), a .csv/.tsv/.jsonl file, or an image "
                    "folder (one sub-folder of images per class)")


def _override_prompts(source: Source, classes_file: str | None, templates_file: str | None) -> None:
    from siglip.prompts import read_classes, read_templates

    if templates_file is not None:
        templates = read_templates(templates_file)
        source.templates = {task: list(templates) for task in source.tasks}
    if classes_file is not None:
        if len(source.tasks) != 1:
            raise UserError(f"--classes applies to a source with one task; {source.name} has tasks "
                            f"{list(source.tasks)}, each with its own built-in classes")
        (task, names), = source.tasks.items()
        given = read_classes(classes_file)
        if len(given) != len(names):
            raise UserError(f"classes file {classes_file} names {len(given)} classes; {source.name}'s task {task!r} "
                            f"has {len(names)} ({', '.join(names)})")
        source.tasks = {task: given}
