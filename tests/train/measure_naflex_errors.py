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

from train.measure_step_errors import print_largest_errors  # noqa: E402
from train.test_checkpoint_kinds import micro_batch_case, ring_cases  # noqa: E402


def main() -> int:
    cases = {"micro-batches": lambda seed: [micro_batch_case(seed)], "ring": ring_cases}
    print_largest_errors(cases, int(sys.argv[1]), int(sys.argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
