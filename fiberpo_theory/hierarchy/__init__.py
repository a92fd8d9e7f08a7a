"""Fibration hierarchies and the FGH operator on them.

``structure`` compiles a hierarchy (Def. 6.1) and owns its maps, kernels and
per-stratum sums over ranks; ``fgh`` is the operator (Eq. 26-29) and FiberPO
as one of its instances, with the App. E.7 masses that instance uses.  The
names of ``structure`` and the masses are importable from this package.
"""

from . import structure
from .fgh import mass_kernels, trajectory_mass
from .structure import *  # noqa: F401,F403  (the names in structure.__all__)
from .structure import TOTAL  # noqa: F401

__all__ = [*structure.__all__, "trajectory_mass", "mass_kernels"]
