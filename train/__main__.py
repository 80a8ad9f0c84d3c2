"""``python -m fewstep.train`` (also under ``torchrun``): the same as ``fewstep train``."""

import sys

from .cli import main

sys.exit(main(prog="python -m fewstep.train"))
