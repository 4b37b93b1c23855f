"""The paper's studies at small scale, behind `siglip reproduce STUDY [--smoke] [--out DIR]`.

Each study is a module with `default_config(smoke) -> Config` and `run(config) -> Report`; this module only maps
names to modules, parses flags and writes the report (see `siglip.experiments.report`). Study modules are imported
lazily, so `siglip reproduce --help` answers without loading torch or transformers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import time

from siglip.errors import UserError

STUDIES = {
    "batch-size": ("siglip.experiments.batch_size", "sigmoid vs softmax across batch sizes at equal examples seen"),
    "init": ("siglip.experiments.init", "the t' and b initialisation: early loss and final accuracy"),
    "negatives": ("siglip.experiments.negatives", "masking negatives: random, easiest, hardest"),
    "noise": ("siglip.experiments.noise", "corrupted training pairs: sigmoid vs softmax"),
    "beta2": ("siglip.experiments.beta2", "Adam beta2 0.999 vs 0.95: loss spikes and accuracy"),
    "siglit": ("siglip.experiments.siglit", "a text tower against a frozen pretrained image tower vs from scratch"),
    "positives": ("siglip.experiments.positives", "duplicates in a batch: diagonal labels vs id labels (issue #10)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `siglip reproduce`."""
    listing = "; ".join(f"{name}: {text}" for name, (_, text) in STUDIES.items())
    parser.add_argument("study", metavar="STUDY", help=f"which study to run ({listing})")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run of the same code path (1 seed, a few steps): checks the code, not the paper")
    parser.add_argument("--out", default=None, help="report directory (default: reports/STUDY)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds (0..N-1) instead of the study's default")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads while the study runs (default 1: fastest on a busy shared CPU)")


def run(args: argparse.Namespace) -> int:
    """Run one study and write DIR/report.md and its plots."""
    from siglip.experiments.report import write_report

    module = load_study(args.study)
    config = module.default_config(args.smoke)
    changes = {"out": args.out or f"reports/{args.study}"}
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserError(f"--seeds must be at least 1, got {args.seeds}; pass e.g. --seeds 3")
        changes["seeds"] = tuple(range(args.seeds))
    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        changes["threads"] = args.threads
    command = ["siglip reproduce", args.study] + (["--smoke"] if args.smoke else [])
    command += [f"--seeds {args.seeds}"] if args.seeds is not None else []
    command += [f"--threads {args.threads}"] if args.threads is not None else []
    command += [f"--out {args.out}"] if args.out else []
    changes["command"] = " ".join(command)
    config = dataclasses.replace(config, **changes)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    try:
        report = module.run(config)
    finally:
        torch.set_num_threads(threads)
    report.seconds = time.perf_counter() - started
    path = write_report(report, config.out)
    print(f"wrote {path} ({report.seconds:.0f} s)")
    return 0


def load_study(name: str):
    """The module of study `name`; an unknown name is a UserError listing the studies."""
    if name not in STUDIES:
        raise UserError(f"unknown study {name!r}; choose one of: {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name][0])
