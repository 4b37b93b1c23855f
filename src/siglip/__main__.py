"""`python -m siglip ...`, as torchrun calls it."""

import sys

from siglip.cli import main

sys.exit(main())
