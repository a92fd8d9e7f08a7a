"""The public path of :mod:`fiberpo_theory.tools.cli`, so ``python -m fiberpo_theory.cli`` keeps working."""

import sys

from .tools.cli import *  # noqa: F401,F403
from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
