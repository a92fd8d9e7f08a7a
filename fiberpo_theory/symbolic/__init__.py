"""The symbolic layer: derivations as data (``derivation``) and their one LaTeX printer (``latex``).

The names of ``derivation`` are importable from this package, as
``from fiberpo_theory import symbolic as S``; ``S.g_agg`` and the other gates'
SymPy counterparts live there.
"""

from .derivation import *  # noqa: F401,F403
from .derivation import __all__  # noqa: F401
