"""Skip marks for the tests of the compiled token loops (:mod:`fiberpo_theory.core.native`).

``needs_cc``: the test builds the library itself (it clears ``FIBERPO_THEORY_NATIVE``).
``needs_loops``: the test compares the loops with the torch ops or asserts that they ran; with the loops
off (no compiler, or ``FIBERPO_THEORY_NATIVE=0``) it would compare the torch path with itself, so it skips.
``tests/test_native.py`` asserts that the library loads wherever a compiler is, so a broken build fails there
instead of skipping these.
"""

import shutil

import pytest

from fiberpo_theory.core import native

HAS_CC = any(shutil.which(name) for name in ("cc", "gcc", "clang"))
LOOPS_ON = native.library() is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the torch-op path is the only one here")
needs_loops = pytest.mark.skipif(not LOOPS_ON, reason=f"the compiled loops are {native.status()}")
