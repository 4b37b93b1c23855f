"""`siglip bench data`: can the training loader feed the training step? Both timed at the same batch.

Two rates, measured apart in one process, each in samples per second:

- the loader's: `make_train_loader` reading, decoding, transforming and collating batches as `siglip train` builds
  them (the same `PairTransform`, the processor trained and reloaded the same way, the source opened at the
  model's image size), with 0, 1, 2, ... DataLoader workers and nothing consuming the batches;
- the step's: forward, backward, gradient clipping and the AdamW update of `siglip train` (its `forward_backward`,
  sigmoid loss, TrainConfig's defaults) on one fixed batch of that size, with no loading at all.

A loader slower than the step starves it: training then runs at most at the loader's rate. With 0 workers loading
is not overlapped at all: each step waits for its batch to be read in the same process, so training runs at
1 / (1/loader + 1/step). With workers the two overlap, but on a small machine they share its cores, so the
measured `--end-to-end` rate (the step fed by that loader) is the figure that settles it.

Sources: any SOURCE of `siglip train`, plus two made on the fly in a temporary folder from `shapes` by the export
code: `shapes-shards` (WebDataset shards of JPEGs) and `shapes-csv` (a CSV table of JPEG files), the same samples
both ways, `--file-image-size` pixels a side.

Timing: each measurement first takes one batch untimed (worker start-up, first reads, lazy initialisation), then
times `--steps` batches, rounded up to a whole number of rounds of the workers: with W workers the batches come in
rounds of W finishing together, so a timed window that starts just after one round and ends with another counts
each worker's work once. A measurement stops early, at the end of a round, once it has run `--seconds`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from siglip.errors import UserError

MADE_SOURCES = ("shapes-shards", "shapes-csv")
"""Bench-only SOURCE names: `shapes` exported to WebDataset shards, or to JPEG files listed in a CSV table."""
DEFAULT_SOURCES = "shapes," + ",".join(MADE_SOURCES)
TOKENIZER_CAPTIONS = 2000
"""Captions the bench's tokenizers learn from (a run uses TrainConfig.tokenizer_captions; the loader's speed hangs
on the captions' token count, which a BPE of this size already settles)."""
MAX_MADE_SAMPLES = 4096
"""At most this many samples are exported for the made sources; longer measurements read them again."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `siglip bench data`."""
    parser.add_argument("--data", default=DEFAULT_SOURCES,
                        help="comma-separated sources: shapes, digits, WebDataset shards, a .csv/.tsv/.jsonl table, "
                             "or shapes-shards / shapes-csv (made from shapes in a temporary folder) "
                             f"(default {DEFAULT_SOURCES})")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts (default 0,1,2)")
    parser.add_argument("--models", default="tiny,small",
                        help="comma-separated model presets whose step (and image size) to measure "
                             "(default tiny,small)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch, loader and step alike "
                        "(default 64)")
    parser.add_argument("--steps", type=int, default=8, help="timed batches per measurement, after one untimed "
                        "(default 8; rounded up to whole rounds of the workers)")
    parser.add_argument("--seconds", type=float, default=8.0, help="end a measurement early, at the end of a round "
                        "of the workers, once it has run this long (default 8)")
    parser.add_argument("--file-image-size", type=int, default=64, help="image side in pixels of the made "
                        "shapes-shards and shapes-csv files (default 64, what `siglip data export` writes)")
    parser.add_argument("--end-to-end", action="store_true", help="also time the step fed by each loader (the "
                        "real rate, with loader and step sharing the cores); slow for large models")
    parser.add_argument("--threads", type=int, help="torch threads of this process, the step's (default: torch's "
                        "own choice, as `siglip train` runs; workers always use 1)")
    parser.add_argument("--seed", type=int, default=0, help="the sources' seed (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


@dataclass
class Timing:
    """What one measurement saw: whole batches in the timed window and the seconds the window lasted."""

    batches: int
    samples: int
    """Samples in the timed batches, counted from the batches themselves (not assumed from the batch size)."""
    seconds: float
    bad: dict[str, int] = field(default_factory=dict)
    """Bad samples met (and refilled) in the timed batches, by kind."""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else math.inf


def time_batches(batches: Iterator[Any], *, rounds_of: int, steps: int, max_seconds: float,
                 consume: Callable[[Any], None] | None = None) -> Timing:
    """Time `steps` batches of `batches` (rounded up to a multiple of `rounds_of`) after one untimed batch.

    batches: an iterator of `siglip.data.Batch`.
    rounds_of: the DataLoader's worker count (1 for none): the window ends only after whole rounds.
    consume: called on every batch, the untimed first one too (a training step); None times the loader alone.
    """
    first = next(batches)                           # worker start-up and first reads stay out of the window
    if consume is not None:
        consume(first)
    target = -(-steps // rounds_of) * rounds_of
    count, samples, bad = 0, 0, Counter()
    start = time.perf_counter()
    while count < target:
        batch = next(batches)
        samples += len(batch.keys)
        bad.update(batch.bad)
        if consume is not None:
            consume(batch)
        count += 1
        if count % rounds_of == 0 and time.perf_counter() - start >= max_seconds:
            break
    return Timing(batches=count, samples=samples, seconds=time.perf_counter() - start, bad=dict(bad))


class TrainStep:
    """One update of `siglip train` with its defaults: forward_backward (sigmoid loss), clipping, AdamW, schedule."""

    def __init__(self, preset: str, *, vocab_size: int, image_size: int, seed: int = 0):
        import torch

        from siglip.model import build_model
        from siglip.optim import build_optimizer
        from siglip.train.config import TrainConfig
        from siglip.train.step import ContrastiveTowers, forward_backward

        config = TrainConfig()
        torch.manual_seed(seed)
        self.model = build_model(preset, vocab_size=vocab_size, max_text_length=config.max_text_length,
                                 image_size=image_size, init_logit_scale=config.init_logit_scale,
                                 init_logit_bias=config.init_logit_bias).train()
        self.towers = ContrastiveTowers(self.model)
        self.optimizer, self.scheduler = build_optimizer(
            self.model, lr=config.lr, weight_decay=config.weight_decay, beta1=config.beta1, beta2=config.beta2,
            logit_lr_multiplier=config.logit_lr_multiplier, warmup_steps=config.warmup_steps,
            total_steps=config.steps, min_lr_ratio=config.min_lr_ratio)
        self.trainable = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        self.grad_clip, self.use_positive_ids = config.grad_clip, config.positives == "ids"
        self.forward_backward, self.clip = forward_backward, torch.nn.utils.clip_grad_norm_

    def __call__(self, batch: Any) -> None:
        """One update on a `siglip.data.Batch` holding "pixel_values" (n, 3, S, S) and "input_ids" (n, L)."""
        positive_ids = batch.positive_ids if self.use_positive_ids else None
        self.forward_backward(self.towers, batch.tensors["pixel_values"], batch.tensors["input_ids"], positive_ids,
                         loss="sigmoid")
        if self.grad_clip > 0:
            self.clip(self.trainable, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def pair_transform(tokenizer: Any, image_size: int, folder: str) -> Any:
    """The per-sample transform of `siglip train`: a processor built, saved and reloaded as training does it."""
    from transformers import AutoProcessor

    from siglip.tokenizer import build_processor
    from siglip.train.step import PairTransform

    build_processor(tokenizer, image_size=image_size).save_pretrained(folder)
    return PairTransform(AutoProcessor.from_pretrained(folder))


def make_shapes_files(folder: str, *, count: int, image_size: int, seed: int) -> dict[str, str]:
    """Export `count` training samples of `shapes` twice, as shards and as a CSV of JPEGs; {name: SOURCE}."""
    from siglip.data import open_source
    from siglip.data.export import write_image_table, write_shards

    source = open_source("shapes", seed=seed, image_size=image_size)
    samples = [source.train_sample(index) for index in range(count)]
    task = next(iter(source.tasks))
    shards = write_shards(samples, os.path.join(folder, "shards"), shard_size=max(1, count // 4), task=task,
                          class_names=source.tasks[task])
    table = write_image_table(samples, os.path.join(folder, "table"), task=task, class_names=source.tasks[task])
    return {"shapes-shards": shards["pattern"], "shapes-csv": table["path"]}


def split_sources(text: str) -> list[str]:
    """Comma-separated SOURCEs; commas inside braces belong to a shard pattern ("data/{a,b}.tar")."""
    parts, current, depth = [], "", 0
    for character in text:
        depth += {"{": 1, "}": -1}.get(character, 0)
        if character == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += character
    parts.append(current.strip())
    if not all(parts):
        raise UserError(f"--data {text!r} holds an empty source name; give comma-separated sources such as "
                        f"{DEFAULT_SOURCES}")
    return parts


def parse_workers(text: str) -> list[int]:
    try:
        workers = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--workers must be comma-separated integers such as 0,1,2, got {text!r}") from None
    if any(count < 0 for count in workers):
        raise UserError(f"--workers must be >= 0, got {text!r}")
    return workers


def run(args: argparse.Namespace) -> int:
    """`siglip bench data`: measure, then print a table or (--json) one JSON object."""
    result = bench(args)
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def bench(args: argparse.Namespace) -> dict:
    """The measurements `siglip bench data` reports, as a dict (the --json object).

    Keys: machine, command, load_average ({"start", "end"}: 1, 5 and 15-minute averages), batch_size, steps,
    train_steps ([{model, image_size, batch_size, batches, samples, seconds, samples_per_s}]), rows ([{model,
    image_size, source, workers, batches, samples, seconds, loader_samples_per_s, bad, step_samples_per_s,
    loader_to_step, starves, bound_samples_per_s, end_to_end_samples_per_s (None without --end-to-end)}]).
    """
    sources, workers = split_sources(args.data), parse_workers(args.workers)
    models = [name.strip() for name in args.models.split(",")]
    for name, value, least in (("--batch-size", args.batch_size, 1), ("--steps", args.steps, 1),
                               ("--file-image-size", args.file_image_size, 16)):
        if value < least:
            raise UserError(f"{name} must be at least {least}, got {value}")
    if not args.seconds > 0:
        raise UserError(f"--seconds must be positive, got {args.seconds}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")

    import torch

    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _measure(args, sources, workers, models)
    finally:
        torch.set_num_threads(threads)      # a caller in the same process (a test) keeps its own setting


def _measure(args: argparse.Namespace, sources: list[str], workers: list[int], models: list[str]) -> dict:
    from siglip.bench.record import machine_description
    from siglip.data import open_source
    from siglip.model import PRESETS
    from siglip.tokenizer import train_tokenizer
    from siglip.train.config import TrainConfig

    unknown = [name for name in models if name not in PRESETS]
    if unknown:
        raise UserError(f"--models {args.models!r} names unknown presets {unknown}; choose from {', '.join(PRESETS)}")
    config = TrainConfig()
    load_start = os.getloadavg()
    train_steps, rows = [], []
    with tempfile.TemporaryDirectory(prefix="siglip-data-bench-") as folder:
        specs = {name: name for name in sources}
        if any(name in MADE_SOURCES for name in sources):
            made = make_shapes_files(folder, count=min(args.batch_size * (args.steps + 1), MAX_MADE_SAMPLES),
                                     image_size=args.file_image_size, seed=args.seed)
            specs.update({name: made[name] for name in sources if name in made})
        # One tokenizer per source, trained on its captions as `siglip train` does; the image size does not enter.
        tokenizers = {name: train_tokenizer(open_source(spec, seed=args.seed).caption_corpus(TOKENIZER_CAPTIONS),
                                            vocab_size=config.vocab_size, max_length=config.max_text_length,
                                            seed=args.seed)
                      for name, spec in specs.items()}
        for model in models:
            step_entry, model_rows = _measure_model(args, model, PRESETS[model].image_size, specs, tokenizers,
                                                    workers, folder)
            train_steps.append(step_entry)
            rows += model_rows
    return {"machine": machine_description("cpu"), "command": command_line(args),
            "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
            "batch_size": args.batch_size, "steps": args.steps, "file_image_size": args.file_image_size,
            "train_steps": train_steps, "rows": rows}


def _measure_model(args: argparse.Namespace, model: str, image_size: int, specs: dict[str, str],
                   tokenizers: dict[str, Any], workers: list[int], folder: str) -> tuple[dict, list[dict]]:
    """The step of `model` on a batch of the first source, then every source's loader at every worker count."""
    from siglip.data import make_train_loader, open_source

    def loader(source, transform, num_workers):
        return make_train_loader(source, transform=transform, local_batch=args.batch_size, rank=0, world_size=1,
                                 start_step=0, seed=args.seed, num_workers=num_workers)

    def timed(batches, num_workers, consume=None) -> Timing:
        return time_batches(batches, rounds_of=max(num_workers, 1), steps=args.steps, max_seconds=args.seconds,
                            consume=consume)

    opened = {}
    for number, (name, spec) in enumerate(specs.items()):
        # Opened at the model's image size, as training opens it (shapes draws at it; JPEGs decode no smaller).
        source = open_source(spec, seed=args.seed, image_size=image_size)
        processor_dir = os.path.join(folder, f"processor-{number}")
        opened[name] = (source, pair_transform(tokenizers[name], image_size, processor_dir))
    first = next(iter(specs))
    step = TrainStep(model, vocab_size=len(tokenizers[first]), image_size=image_size, seed=args.seed)
    with contextlib.closing(loader(*opened[first], 0)) as batches:
        fixed = next(batches)
    timing = timed(itertools.repeat(fixed), 0, consume=step)
    step_rate = timing.samples_per_s
    step_entry = {"model": model, "image_size": image_size, "batch_size": args.batch_size, "batches": timing.batches,
                  "samples": timing.samples, "seconds": timing.seconds, "samples_per_s": step_rate}
    rows = []
    for name, (source, transform) in opened.items():
        for num_workers in workers:
            with contextlib.closing(loader(source, transform, num_workers)) as batches:
                timing = timed(batches, num_workers)
            rate = timing.samples_per_s
            row = {"model": model, "image_size": image_size, "source": name, "workers": num_workers,
                   "batches": timing.batches, "samples": timing.samples, "seconds": timing.seconds,
                   "loader_samples_per_s": rate, "bad": timing.bad, "step_samples_per_s": step_rate,
                   "loader_to_step": rate / step_rate, "starves": rate < step_rate,
                   "bound_samples_per_s": training_bound(rate, step_rate, num_workers),
                   "end_to_end_samples_per_s": None}
            if args.end_to_end:
                with contextlib.closing(loader(source, transform, num_workers)) as batches:
                    row["end_to_end_samples_per_s"] = timed(batches, num_workers, consume=step).samples_per_s
            rows.append(row)
    return step_entry, rows


def training_bound(loader_rate: float, step_rate: float, num_workers: int) -> float:
    """The most samples/s training can reach with this loader and this step, each measured alone.

    Without workers every step waits while its batch is read in the same process, so the times per sample add:
    1 / (1/loader + 1/step). With workers reading ahead the two overlap, and the slower one sets the pace:
    min(loader, step), reached only if the machine has cores for both (`--end-to-end` measures what it gets).
    """
    if num_workers == 0:
        return 1.0 / (1.0 / loader_rate + 1.0 / step_rate)
    return min(loader_rate, step_rate)


def command_line(args: argparse.Namespace) -> str:
    """The `siglip bench data` command that reproduces this run, every setting spelled out."""
    parts = ["siglip bench data", f"--data {args.data}", f"--workers {args.workers}", f"--models {args.models}",
             f"--batch-size {args.batch_size}", f"--steps {args.steps}", f"--seconds {args.seconds:g}",
             f"--file-image-size {args.file_image_size}"]
    parts += ["--end-to-end"] if args.end_to_end else []
    parts += [f"--threads {args.threads}"] if args.threads is not None else []
    parts += [f"--seed {args.seed}"] if args.seed else []
    return " ".join(parts)


def format_report(result: dict) -> str:
    """The bench's result as Markdown: the step's rate per model, then one table line per model, source, workers."""
    load = ", ".join(f"{value:.1f}" for value in result["load_average"]["start"])
    lines = [f"`{result['command']}`", "", f"{result['machine']}; load average at the start {load} (1, 5, 15 min)",
             "", "| model | image | step samples/s | ms/step |", "|---|---|---|---|"]
    for step in result["train_steps"]:
        ms = 1000 * step["seconds"] / max(step["batches"], 1)
        lines.append(f"| {step['model']} | {step['image_size']} px | {step['samples_per_s']:.1f} | {ms:.0f} |")
    end_to_end = any(row["end_to_end_samples_per_s"] is not None for row in result["rows"])
    lines += ["", "| model | source | workers | loader samples/s | step samples/s | loader / step | loader | "
              "bound samples/s |" + (" end to end samples/s |" if end_to_end else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|" if end_to_end else "")]
    for row in result["rows"]:
        verdict = "starves the step" if row["starves"] else "keeps up"
        line = (f"| {row['model']} | {row['source']} | {row['workers']} | {row['loader_samples_per_s']:.0f} | "
                f"{row['step_samples_per_s']:.1f} | {row['loader_to_step']:.2f} | {verdict} | "
                f"{row['bound_samples_per_s']:.1f} |")
        if end_to_end:
            line += f" {row['end_to_end_samples_per_s']:.1f} |"
        lines.append(line)
    return "\n".join(lines)
