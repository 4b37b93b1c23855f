"""Argument parsing only: every command is a call into the module it belongs to.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`. Only the module of the command
being run is imported, so `siglip --help` and a typo answer at once, without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from siglip.errors import UserError

COMMANDS = {
    "train": ("siglip.train", "train a SigLIP (or CLIP) model"),
    "eval": ("siglip.evaluate", "zero-shot classification or retrieval of a trained model"),
    "bench": ("siglip.bench", "benchmark the losses, the ring, a training step and the data loader"),
    "reproduce": ("siglip.experiments", "run one of the paper's studies at small scale"),
    "data": ("siglip.data.export", "inspect or export a data source"),
}


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only `command`'s sub-parser is filled in (its module imported)."""
    top = argparse.ArgumentParser(prog="siglip", description="Language-image pre-training with the sigmoid loss.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(command_parser)
            command_parser.set_defaults(run=module.run)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["data", "bench"]:
        argv = ["bench", "data", *argv[2:]]      # the loader benchmark's first name, kept working
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = parser(command).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        print(f"siglip {args.command}: error: {error}", file=sys.stderr)
        return 2
