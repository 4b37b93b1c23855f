"""The paper's studies at small scale, behind `siglip reproduce STUDY [--smoke] [--out DIR]`.

Each study is a module with `study(smoke) -> Study` (see `siglip.experiments.design`); this module maps names to
modules, parses flags, runs the study (`runner`), and writes its report (`summary`, `report`). Study modules are
imported lazily, so `siglip reproduce --help` answers without loading torch or transformers.
"""

from __future__ import annotations

import argparse
import importlib
import time

from siglip.errors import UserError

STUDIES = {
    "batch-size": ("siglip.experiments.batch_size", "sigmoid vs softmax at a small and a large batch, from scratch"),
    "init": ("siglip.experiments.init", "the t' and b initialisation: at the prior, at 0, and the paper's -10"),
    "negatives": ("siglip.experiments.negatives", "masking negatives (random, easiest, hardest) on a locked tower"),
    "noise": ("siglip.experiments.noise", "corrupted training pairs: does the sigmoid loss degrade less?"),
    "beta2": ("siglip.experiments.beta2", "Adam beta2 0.999 vs 0.95 at a learning rate where 0.999 spikes"),
    "siglit": ("siglip.experiments.siglit", "sigmoid vs softmax against the same locked pretrained image tower"),
    "positives": ("siglip.experiments.positives", "duplicates in a batch: diagonal labels vs id labels (issue #10)"),
    "siglip2": ("siglip.experiments.siglip2", "SigLIP 2's recipe: SigLIP vs + decoder vs + self-distillation and "
                "masked prediction, through siglip train"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `siglip reproduce`."""
    listing = "; ".join(f"{name}: {text}" for name, (_, text) in STUDIES.items())
    parser.add_argument("study", metavar="STUDY", help=f"which study to run ({listing})")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny run of the same code path (2 seeds, a few steps): checks the code, not the paper")
    parser.add_argument("--out", default=None, help="report directory (default: reports/STUDY)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of paired seeds (0..N-1) instead of the study's (at least 2 for an interval)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker process (default 1: fastest on a busy shared CPU)")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that run seeds side by side (default: one per seed up to the core count; "
                             "1 for --smoke)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the pretrained image tower is cached (default: $SIGLIP_CACHE_DIR or "
                             "~/.cache/siglip)")


def run(args: argparse.Namespace) -> int:
    """Run one study and write DIR/report.md, DIR/results.json and its plots."""
    from siglip.experiments.report import write_report
    from siglip.experiments.runner import compare, default_workers, load_average, run_trials
    from siglip.experiments.summary import build_report

    module = load_study(args.study)
    study = module.study(args.smoke)
    for flag, value in (("--threads", args.threads), ("--workers", args.workers), ("--seeds", args.seeds)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.seeds is not None:
        study.seeds = tuple(range(args.seeds))
    workers = args.workers or default_workers(study)
    out = args.out or f"reports/{args.study}"
    command = " ".join(["siglip reproduce", args.study] + (["--smoke"] if args.smoke else [])
                       + ([f"--seeds {args.seeds}"] if args.seeds is not None else [])
                       + ([f"--threads {args.threads}"] if args.threads != 1 else [])
                       + ([f"--workers {args.workers}"] if args.workers is not None else [])
                       + ([f"--out {args.out}"] if args.out else []))
    started, load_at_start = time.perf_counter(), load_average()
    # A study whose trials are `siglip train` runs (siglip2) brings its own run_trials, with the same signature.
    trials = getattr(module, "run_trials", run_trials)
    results, notes = trials(study, workers=workers, threads=args.threads, cache_dir=args.cache_dir)
    outcomes = [compare(comparison, results) for comparison in study.comparisons]
    setup = shared_setup(study, command, threads=args.threads, workers=workers) + study.setup + notes
    report = build_report(study, results, outcomes, command=command, setup=setup)
    trial_loads = [trial.load_average for trials in results.values() for trial in trials]
    report.seconds = time.perf_counter() - started
    report.cpu_seconds = cpu_seconds()
    report.load = (load_at_start, sum(trial_loads) / len(trial_loads), load_average())
    report.results.update(seconds=round(report.seconds, 1), cpu_seconds=round(report.cpu_seconds, 1),
                          load_average=dict(zip(("start", "mean", "end"), report.load, strict=True)))
    path = write_report(report, out)
    for outcome in outcomes:
        print(f"{outcome.verdict:>15}: {outcome.comparison.claim}")
    print(f"wrote {path} ({report.seconds:.0f} s)")
    return 0


def cpu_seconds() -> float:
    """User plus system CPU time of this process and of its finished worker processes, in seconds."""
    import resource

    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(part.ru_utime + part.ru_stime for part in usage)


def shared_setup(study, command: str, *, threads: int, workers: int) -> list[str]:
    """The setup lines every report shares."""
    scale = study.scale
    return [
        f"Command: `{command}`",
        f"Data: `{scale.data}` ({scale.pool_size} training samples rendered per seed and cycled in seeded epochs; up "
        f"to {scale.test_size} held-out samples scored)",
        f"Model: preset `{scale.preset}`; tokenizer of {scale.vocab_size} tokens trained per seed; captions of up to "
        f"{scale.max_text_length} tokens",
        "Optimiser: AdamW (beta1 0.9), weight decay on matrices only, linear warm-up over 10% of the steps then "
        "cosine decay to zero, no gradient clipping; each arm's learning rate, beta2, batch and steps in the arms "
        "table",
        f"Seeds: {', '.join(map(str, study.seeds))}, paired: a seed fixes the initial weights, the data drawn and "
        "the batch order, the same for every arm; " + f"{workers} worker process(es) of {threads} torch thread(s)",
        "Metrics: zero-shot accuracy on the held-out split (prompt-ensembled class embeddings); R@1: retrieval among "
        "the held-out captions, identical captions counting as one another's match; chance: what a model that "
        "learned nothing scores (1/K per task; for R@1 the mean share of matching captions)",
    ]


def load_study(name: str):
    """The module of study `name`; an unknown name is a UserError listing the studies."""
    if name not in STUDIES:
        raise UserError(f"unknown study {name!r}; choose one of: {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name][0])

