"""Measure the errors of tests/train/test_checkpoint_kinds.py's NaFlex gradient comparisons over many fresh draws.

    .venv/bin/python tests/train/measure_naflex_errors.py FIRST LAST      # seeds FIRST ... LAST - 1

Prints, for micro-batches against the full batch and for each rank of a two-rank ring against one process, the
largest of each error over the seeds, each as a fraction of the scale tests/train/test_step.py names for it. Not
collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))       # tests/, as pytest has it

from train.test_checkpoint_kinds import micro_batch_case, ring_cases  # noqa: E402
from train.test_step import gradient_errors  # noqa: E402


def main() -> int:
    first, last = int(sys.argv[1]), int(sys.argv[2])
    worst: dict[str, dict[str, float]] = {"micro-batches": {}, "ring": {}}
    for seed in range(first, last):
        for name, cases in (("micro-batches", [micro_batch_case(seed)]), ("ring", ring_cases(seed))):
            for case in cases:
                for error, value in gradient_errors(case).items():
                    worst[name][error] = max(worst[name].get(error, 0.0), value)
    print(f"largest errors over seeds {first} ... {last - 1}")
    for name, errors in worst.items():
        print(f"{name:15s}" + "  ".join(f"{error} {value:.2g}" for error, value in sorted(errors.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
