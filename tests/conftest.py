"""Session-wide settings for the test suite."""

import os

# Triton reads TRITON_INTERPRET when its language module is first patched; whichever test (or library) imports triton
# first would otherwise fix the mode for the whole session. Without a GPU only the interpreter can run the kernels.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) != "" and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
