"""Session-wide settings for the test suite.

Every test draws its random inputs fresh: before each test, Python's `random`, NumPy's global generator and torch's
default generator are seeded from one new seed, which is printed (pytest shows it with a failure). To replay a
failure, run the test again with `SIGLIP_TEST_SEED=<seed>`.
"""

import os
import random

import numpy as np
import pytest
import torch

# Triton reads TRITON_INTERPRET when its language module is first patched; whichever test (or library) imports triton
# first would otherwise fix the mode for the whole session. Without a GPU only the interpreter can run the kernels.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _fresh_seed() -> int:
    replay = os.environ.get("SIGLIP_TEST_SEED")
    return int(replay) if replay else int.from_bytes(os.urandom(4), "little") % (2**31)


@pytest.fixture(autouse=True)
def test_seed(request: pytest.FixtureRequest) -> int:
    """The seed of this test's random draws; printed so that a failure can be replayed with SIGLIP_TEST_SEED."""
    seed = _fresh_seed()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    print(f"test seed: SIGLIP_TEST_SEED={seed}")
    request.node.user_properties.append(("seed", seed))
    return seed


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    # A failure's report names its seed even where the test's own output was not captured (a subprocess, -s).
    if call.when == "call" and call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "seed":
                item.add_report_section("call", "seed", f"replay with SIGLIP_TEST_SEED={value}")
