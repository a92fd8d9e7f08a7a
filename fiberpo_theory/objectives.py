"""The public path of :mod:`fiberpo_theory.core.objectives`: its names, re-exported (the module lives in the core layer)."""

from .core.objectives import *  # noqa: F401,F403
from .core.objectives import __all__  # noqa: F401
