"""Measure the errors that tests/train/test_step.py's tolerances are set from, over many fresh draws.

    .venv/bin/python tests/train/measure_step_errors.py FIRST LAST      # seeds FIRST ... LAST - 1

Runs every comparison of test_step.py (micro-batches against the full batch, cached image features against the
tower's, micro-batches with dropout against the function they compute) once per seed and prints, per comparison and
per error (each as a fraction of the scale test_step.py names), the largest over the seeds. A tolerance there is
the largest error here times a stated margin. Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))       # tests/, as pytest has it

from train.test_step import cached_case, dropout_case, gradient_errors, micro_batch_case  # noqa: E402

CASES = {
    "micro sigmoid": lambda: micro_batch_case("sigmoid", False),
    "micro softmax": lambda: micro_batch_case("softmax", False),
    "micro sigmoid, locked image": lambda: micro_batch_case("sigmoid", True),
    "cache": lambda: cached_case(None),
    "cache, micro-batch 4": lambda: cached_case(4),
    "dropout": lambda: dropout_case(False),
    "dropout, locked image": lambda: dropout_case(True),
}


def print_largest_errors(cases: dict, first: int, last: int) -> None:
    """For each named comparison (seed -> its cases), the largest of each error over seeds FIRST ... LAST - 1."""
    worst: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for seed in range(first, last):
        for name, draw in cases.items():
            torch.manual_seed(seed)
            for case in draw(seed):
                for error, value in gradient_errors(case).items():
                    worst[name][error] = max(worst[name][error], value)
    print(f"largest errors over seeds {first} ... {last - 1}")
    for name, errors in worst.items():
        print(f"{name:30s}" + "  ".join(f"{error} {value:.2g}" for error, value in sorted(errors.items())))


def main() -> int:
    print_largest_errors({name: lambda seed, case=case: [case()] for name, case in CASES.items()},
                         int(sys.argv[1]), int(sys.argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
