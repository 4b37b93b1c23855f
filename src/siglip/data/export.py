"""`siglip data export` and `siglip data inspect`: write any source as WebDataset shards, or describe it.

    siglip data export --data shapes --out data/shapes --shard-size 1000 --count 5000
    siglip data inspect --data data/shapes/train-{000000..000004}.tar

Export writes samples as `{position:09d}.jpg` (or .png), `.txt` (the caption), `.cls` (the label of one zero-shot
task, when the sample has it) and `.json` (the original key and all labels), `--shard-size` samples a shard, and
the task's class names as `classes.txt` beside the shards, where reading them back finds them.
"""

from __future__ import annotations

import argparse
import io
import json
import os

from siglip.data import SPLITS, open_source
from siglip.data.sample import BadSample, BadSampleLog
from siglip.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = actions.add_parser("export", help="write a source as WebDataset shards (jpg + txt + cls)")
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
    export.set_defaults(action_run=run_export)
    inspect = actions.add_parser("inspect", help="print a JSON summary of a source and its first samples")
    inspect.add_argument("--data", required=True, help="shapes, digits, WebDataset shards, or a .csv/.tsv/.jsonl file")
    inspect.add_argument("--count", type=int, default=5, help="training samples to show (default 5)")
    inspect.add_argument("--seed", type=int, default=0, help="the source's seed (default 0)")
    inspect.set_defaults(action_run=run_inspect)


def run(args: argparse.Namespace) -> int:
    return args.action_run(args)


def run_export(args: argparse.Namespace) -> int:
    import webdataset

    if args.shard_size < 1:
        raise UserError(f"--shard-size must be at least 1, got {args.shard_size}")
    if not 1 <= args.quality <= 95:
        raise UserError(f"--quality must lie in 1 ... 95, got {args.quality}")
    source = open_source(args.data, split=args.split, seed=args.seed, strict=args.strict, image_size=args.image_size)
    task = _label_task(source, args.task)
    samples = _samples(source, args.split, args.count)
    os.makedirs(args.out, exist_ok=True)
    log, written = BadSampleLog(), 0
    pattern = os.path.join(args.out, f"{args.split}-%06d.tar")
    with webdataset.ShardWriter(pattern, maxcount=args.shard_size, verbose=0) as writer:
        for sample in samples:
            if isinstance(sample, BadSample):
                if args.strict:
                    raise sample
                log.record(sample)
                continue
            record = {"__key__": f"{written:09d}", "txt": sample.caption,
                      args.format: _encode(sample.image, args.format, args.quality),
                      "json": json.dumps({"key": sample.key, "labels": sample.labels})}
            if task is not None and task in sample.labels:
                record["cls"] = str(sample.labels[task])
            writer.write(record)
            written += 1
        shards = writer.shard
    if task is not None:
        with open(os.path.join(args.out, "classes.txt"), "w", encoding="utf-8") as handle:
            handle.write("".join(f"{name}\n" for name in source.tasks[task]))
    last = max(shards - 1, 0)
    print(json.dumps({"samples": written, "shards": shards, "pattern": os.path.join(
        args.out, f"{args.split}-{{{0:06d}..{last:06d}}}.tar"), "task": task, "skipped": dict(log.counts)}))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    source = open_source(args.data, seed=args.seed)
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
