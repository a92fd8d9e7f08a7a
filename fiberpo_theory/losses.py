"""The public path of :mod:`fiberpo_theory.core.losses`: its names, re-exported (the module lives in the core layer)."""

from .core.losses import *  # noqa: F401,F403
