"""Measure the errors the numerical tests' tolerances are set from, over many fresh draws.

    .venv/bin/python scripts/measure_tolerances.py --minutes 30 [--out errors/]

Runs tests/test_loss.py, test_kernels.py, test_tiled.py and test_ring.py again and again, each run with a fresh seed
(SIGLIP_TEST_SEED) and SIGLIP_ERROR_LOG set, so that every comparison of `tests/reference.assert_close` appends the
error it measured (as a fraction of the result's scale) and the tolerance it was held to. Then prints, per file and
per comparison (ring sizes, implementations and kernels folded together), the number of draws, the largest error
and the tolerance: a tolerance is the largest error times a stated margin, written beside it in the test file.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

FILES = ("tests/test_loss.py", "tests/test_kernels.py", "tests/test_tiled.py", "tests/test_ring.py")
SKIP = "not memory and not open_clip and not never_reads and not receive_t"
FOLDED = re.compile(r"\b(D=\d+|two_pass|bidirectional|single_lap|all_gather|torch|cpu_fused|triton|distinct|equal|"
                    r"clusters)\b")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="stop starting new rounds after this long")
    parser.add_argument("--rounds", type=int, default=1000, help="at most this many rounds of all files")
    parser.add_argument("--out", default="errors", help="folder of the raw logs, one per test file")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.minutes
    rounds = 0
    while rounds < args.rounds and time.monotonic() < deadline:
        for file in FILES:
            seed = random.SystemRandom().randrange(2**31)
            log = str(out / (Path(file).stem + ".tsv"))
            env = {**os.environ, "SIGLIP_TEST_SEED": str(seed), "SIGLIP_ERROR_LOG": log}
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", file, "-k", SKIP],
                                  env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"{file} failed with SIGLIP_TEST_SEED={seed}:\n{done.stdout[-3000:]}", file=sys.stderr)
        rounds += 1
        print(f"round {rounds} done", file=sys.stderr, flush=True)
    for file in FILES:
        log = out / (Path(file).stem + ".tsv")
        if not log.exists():
            continue
        worst: dict[str, list] = collections.defaultdict(lambda: [0, 0.0, 0.0])
        for line in log.read_text().splitlines():
            what, ratio, tol = line.split("\t")
            key = " ".join(FOLDED.sub("", what).split())
            entry = worst[key]
            entry[0] += 1
            entry[1] = max(entry[1], float(ratio))
            entry[2] = float(tol)
        print(f"\n{file} ({rounds} rounds)\n{'comparison':<48} {'draws':>6} {'largest error':>14} {'tolerance':>10}")
        for key, (count, largest, tol) in sorted(worst.items()):
            print(f"{key:<48} {count:>6} {largest:>14.3e} {tol:>10.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
