"""The import paths from before the library had layers still give the very same objects."""

import importlib
import subprocess
import sys
import types

import pytest

MOVED = [
    ("fiberpo_theory.objectives", "fiberpo_theory.core.objectives"),
    ("fiberpo_theory.losses", "fiberpo_theory.core.losses"),
    ("fiberpo_theory.fgh", "fiberpo_theory.hierarchy.fgh"),
    ("fiberpo_theory.cli", "fiberpo_theory.tools.cli"),
]
PACKAGES = [
    ("fiberpo_theory.hierarchy", "fiberpo_theory.hierarchy.structure"),
    ("fiberpo_theory.symbolic", "fiberpo_theory.symbolic.derivation"),
]


def _public(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:  # the names the module defines itself, not those it imports
        names = [n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)
                 and getattr(v, "__module__", module.__name__) == module.__name__]
    return list(names)


@pytest.mark.parametrize("old, new", MOVED + PACKAGES)
def test_old_path_gives_the_same_objects(old, new):
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    names = _public(new_module)
    assert len(names) >= 2
    missing = [n for n in names if getattr(old_module, n, None) is not getattr(new_module, n)]
    assert not missing, f"{old} lacks or differs on {missing}"


def test_hierarchy_package_keeps_the_app_e7_masses():
    from fiberpo_theory import hierarchy
    from fiberpo_theory.hierarchy import fgh

    assert hierarchy.trajectory_mass is fgh.trajectory_mass
    assert hierarchy.mass_kernels is fgh.mass_kernels
    assert set(hierarchy.__all__) <= set(dir(hierarchy))


def test_top_level_names_are_the_core_objects():
    import fiberpo_theory
    from fiberpo_theory.core import losses, objectives
    from fiberpo_theory.hierarchy import fgh

    for name in fiberpo_theory.__all__:
        source = fgh if name == "fiberpo_hierarchy_gated_ratio" else losses if name == "POLICY_LOSSES" else objectives
        assert getattr(fiberpo_theory, name) is getattr(source, name), name


def test_python_dash_m_cli_still_runs():
    done = subprocess.run([sys.executable, "-m", "fiberpo_theory.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "verify" in done.stdout and "figures" in done.stdout
