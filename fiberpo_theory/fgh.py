"""The public path of :mod:`fiberpo_theory.hierarchy.fgh`: its names, re-exported (the module lives in the hierarchy layer)."""

from .hierarchy.fgh import *  # noqa: F401,F403
from .hierarchy.fgh import __all__  # noqa: F401
