"""`siglip bench`: the measuring code, apart from what it measures. Nothing else in the package imports it.

    siglip bench loss   the single-device loss against open_clip, the eager reference and the matrix-product floor
    siglip bench ring   the distributed losses side by side in gloo processes on this machine
    siglip bench train  peak memory and time of one training step, with and without --micro-batch
    siglip bench data   can the training loader feed the training step?
    siglip bench gpu    everything that needs a CUDA GPU (tests, the loss at large n, training), one report

Each benchmark is a module here with `add_arguments(parser)` and `run(args) -> int`. Their modules import torch only
when they run, so `siglip bench --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "loss": ("siglip.bench.loss", "time and memory of the single-device sigmoid loss implementations"),
    "ring": ("siglip.bench.ring", "the distributed losses side by side in gloo processes on this machine"),
    "train": ("siglip.bench.train", "peak memory and step time of one training step, with and without --micro-batch"),
    "data": ("siglip.bench.data", "time the training loader of each source against the training step"),
    "gpu": ("siglip.bench.gpu", "the GPU check: GPU tests, the loss at large n in bfloat16, 100 training steps"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands of `siglip bench`, one per module of BENCHES."""
    benches = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        module = importlib.import_module(module_name)
        sub = benches.add_parser(name, help=help_text, description=module.__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    """Run the chosen benchmark; returns the exit status."""
    return args.bench_run(args)
