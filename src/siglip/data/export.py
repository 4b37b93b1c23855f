"""`siglip data export` and `inspect`: write any source as WebDataset shards or as a table of image files, describe it.

    siglip data export --data shapes --out data/shapes --count 1000 --shard-size 200
    siglip data export --data shapes --out data/table --count 200 --table pairs.csv
    siglip data inspect --data data/shapes/train-{000000..000004}.tar

Export writes samples as `{position:09d}.jpg` (or .png), `.txt` (the caption), `.cls` (the label of one zero-shot
task, when the sample has it) and `.json` (the original key and all labels), `--shard-size` samples a shard, and
the task's class names as `classes.txt` beside the shards, where reading them back finds them. With `--table NAME`
it writes the same samples as image files and a CSV (or TSV) table listing them instead (`write_image_table`, also
the loader benchmark's CSV source).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
from collections.abc import Iterable

from siglip.data import SPLITS, open_source
from siglip.data.sample import BadSample, BadSampleLog, Sample
from siglip.errors import UserError

COLUMN_FLAGS = ("--image-column", "--caption-column", "--label-column")
"""A table's column names when they are not the usual ones (siglip.data.tabular): the same flags on every command
that reads a table."""


def add_column_arguments(parser: argparse.ArgumentParser) -> None:
    """--image-column, --caption-column, --label-column: open_source's image_column, caption_column, label_column."""
    for flag in COLUMN_FLAGS:
        what = flag[2:].split("-")[0]
        parser.add_argument(flag, metavar="NAME", help=f"a table's {what} column, when it is not named as "
                            "docs/data.md lists (default: found by name)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="write a source as WebDataset shards (jpg + txt + cls) or as a table "
                                "of image files (--table)")
    export.add_argument("--data", required=True, help="shapes, digits, WebDataset shards, or a .csv/.tsv/.jsonl file")
    export.add_argument("--out", required=True, help="folder to write the shards into (created if missing)")
    export.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    export.add_argument("--count", type=int, help="samples to write (default: one epoch; required for shapes)")
    export.add_argument("--split", choices=SPLITS, default="train", help="train: the training stream in its seeded "
                        "order; test: the held-out split (default train)")
    export.add_argument("--task", help="the zero-shot task whose label goes to .cls (default: the source's first)")
    export.add_argument("--seed", type=int, default=0, help="the source's seed (default 0)")
    export.add_argument("--image-size", type=int, help="image side for shapes and digits (default 64)")
    export.add_argument("--format", choices=("jpg", "png"), default="jpg", help="image encoding (default jpg)")
    export.add_argument("--quality", type=int, default=95, help="JPEG quality 1-95 (default 95)")
    export.add_argument("--strict", action="store_true", help="stop at the first bad sample instead of skipping it")
    export.add_argument("--table", metavar="NAME", help="write the images as files under OUT/images and a table "
                        "OUT/NAME (.csv or .tsv: filepath, caption, label) listing them, instead of shards")
    add_column_arguments(export)
    export.set_defaults(action_run=run_export)
    inspect = actions.add_parser("inspect", help="print a JSON summary of a source and its first samples")
    inspect.add_argument("--data", required=True, help="shapes, digits, WebDataset shards, or a .csv/.tsv/.jsonl file")
    inspect.add_argument("--count", type=int, default=5, help="training samples to show (default 5)")
    inspect.add_argument("--seed", type=int, default=0, help="the source's seed (default 0)")
    add_column_arguments(inspect)
    inspect.set_defaults(action_run=run_inspect)


def _open(args: argparse.Namespace, **options):
    return open_source(args.data, seed=args.seed, image_column=args.image_column, caption_column=args.caption_column,
                       label_column=args.label_column, **options)


def run(args: argparse.Namespace) -> int:
    return args.action_run(args)


def run_export(args: argparse.Namespace) -> int:
    if args.shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {args.shard_size}")
    if not 1 <= args.quality <= 95:
        raise UserError(f"--quality must lie in 1 ... 95, got {args.quality}")
    if args.table is not None and not args.table.lower().endswith((".csv", ".tsv")):
        raise UserError(f"--table must name a .csv or .tsv file, got {args.table!r}")
    source = _open(args, split=args.split, strict=args.strict, image_size=args.image_size)
    task = _label_task(source, args.task)
    samples = _samples(source, args.split, args.count)
    class_names = source.tasks[task] if task is not None else None
    if args.table is not None:
        report = write_image_table(samples, args.out, name=args.table, task=task, class_names=class_names,
                                   image_format=args.format, quality=args.quality, strict=args.strict)
    else:
        report = write_shards(samples, args.out, prefix=args.split, shard_size=args.shard_size, task=task,
                              class_names=class_names, image_format=args.format, quality=args.quality,
                              strict=args.strict)
    print(json.dumps(report))
    return 0


def write_shards(samples: Iterable[Sample | BadSample], out: str, *, prefix: str = "train", shard_size: int = 1000,
                 task: str | None = None, class_names: list[str] | None = None, image_format: str = "jpg",
                 quality: int = 95, strict: bool = False) -> dict:
    """Write samples as WebDataset shards `out/{prefix}-000000.tar`, ..., `shard_size` samples a shard.

    samples: the samples in order; a BadSample in their place is counted (or raised, when `strict`).
    task, class_names: the zero-shot task whose label goes to `.cls`, and its class names (written to
        `out/classes.txt`); None writes neither.
    Returns {"samples": written, "shards": count, "pattern": brace pattern of the shards, "task": task,
    "skipped": {kind: count}}: what `siglip data export` prints.
    """
    import webdataset

    os.makedirs(out, exist_ok=True)
    log, written = BadSampleLog(), 0
    pattern = os.path.join(out, f"{prefix}-%06d.tar")
    with webdataset.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer:
        for sample in samples:
            if isinstance(sample, BadSample):
                if strict:
                    raise sample
                log.record(sample)
                continue
            record = {"__key__": f"{written:09d}", "txt": sample.caption,
                      image_format: _encode(sample.image, image_format, quality),
                      "json": json.dumps({"key": sample.key, "labels": sample.labels})}
            if task is not None and task in sample.labels:
                record["cls"] = str(sample.labels[task])
            writer.write(record)
            written += 1
        shards = writer.shard
    if task is not None and class_names is not None:
        _write_classes(out, class_names)
    last = max(shards - 1, 0)
    return {"samples": written, "shards": shards, "pattern": os.path.join(out, f"{prefix}-{{{0:06d}..{last:06d}}}.tar"),
            "task": task, "skipped": dict(log.counts)}


def write_image_table(samples: Iterable[Sample | BadSample], out: str, *, name: str = "pairs.csv",
                      task: str | None = None, class_names: list[str] | None = None, image_format: str = "jpg",
                      quality: int = 95, strict: bool = False) -> dict:
    """Write samples as image files `out/images/{position:09d}.jpg` and a table `out/{name}` that lists them.

    The table (.csv or .tsv by `name`'s suffix) has the columns `filepath` (relative to `out`, as a table source
    reads it), `caption` and, when `task` is given, `label` (the class index); the class names go to
    `out/classes.txt`. BadSamples among `samples` are counted (or raised, when `strict`).
    Returns {"samples": written, "path": the table's path, "task": task, "skipped": {kind: count}}.
    """
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in (".csv", ".tsv"):
        raise UserError(f"name must end in .csv or .tsv, got {name!r}")
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    log, written = BadSampleLog(), 0
    path = os.path.join(out, name)
    with open(path, "w", encoding="utf-8", newline="") as handle:
        table = csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",")
        table.writerow(["filepath", "caption"] + (["label"] if task is not None else []))
        for sample in samples:
            if isinstance(sample, BadSample):
                if strict:
                    raise sample
                log.record(sample)
                continue
            relative = f"images/{written:09d}.{image_format}"
            with open(os.path.join(out, relative), "wb") as image_file:
                image_file.write(_encode(sample.image, image_format, quality))
            label = [sample.labels.get(task, "")] if task is not None else []
            table.writerow([relative, sample.caption, *label])
            written += 1
    if task is not None and class_names is not None:
        _write_classes(out, class_names)
    return {"samples": written, "path": path, "task": task, "skipped": dict(log.counts)}


def _write_classes(out: str, class_names: list[str]) -> None:
    with open(os.path.join(out, "classes.txt"), "w", encoding="utf-8") as handle:
        handle.write("".join(f"{name}\n" for name in class_names))


def run_inspect(args: argparse.Namespace) -> int:
    source = _open(args)
    shown = []
    for index in range(max(args.count, 0)):
        try:
            sample = source.train_sample(index)
        except BadSample as error:
            shown.append({"index": index, "bad": error.kind, "key": error.key})
            continue
        shown.append({"index": index, "key": sample.key, "caption": sample.caption, "labels": sample.labels,
                      "size": list(sample.image.size)})
    summary = {"name": source.name, "train_samples": source.__len__(), "tasks": source.tasks,
               "templates": source.templates, "samples": shown}
    if getattr(source, "bad_shards", None):
        summary["bad_shards"] = [{"path": path, "reason": reason} for path, reason in source.bad_shards]
    print(json.dumps(summary, indent=1))
    return 0


def _label_task(source, task: str | None) -> str | None:
    if task is None:
        return next(iter(source.tasks), None)
    if task not in source.tasks:
        raise UserError(f"--task {task!r} is not a task of {source.name}; its tasks are {list(source.tasks)}")
    return task


def _samples(source, split: str, count: int | None):
    """The samples to export, or the BadSample met in place of one."""
    if count is not None and count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    if split == "test":
        samples = source.test_samples()
        yield from samples[:count] if count is not None else samples
        return
    size = source.__len__()
    if count is None and size is None:
        raise UserError(f"{source.name} is endless; give --count N")
    for index in range(count if count is not None else size):
        try:
            yield source.train_sample(index)
        except BadSample as error:
            yield error


def _encode(image, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()
