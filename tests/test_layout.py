"""The library's layers: each imports only the layers below it, the module map documents every module, and the
import paths from before the layers existed still give the very same objects."""

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fiberpo_theory"
# Which layers each layer may import (itself included); tools may import everything.
MAY_IMPORT = {
    "core": {"core"},
    "hierarchy": {"core", "hierarchy"},
    "symbolic": {"symbolic"},
    "theory": {"core", "hierarchy", "theory"},
    "integrations": {"core", "integrations"},
    "examples": {"core"},
}
# The one edge upwards: claims.import_checks() falls back to the shipped check package when given none.
UPWARD = {("theory", "claims.py"): {"checks"}}

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


def _library_imports(path: Path) -> set[str]:
    """The top-level layers (``core``, ``hierarchy``, ...) a module imports, lazy imports included."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    layers = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1]) + (node.module.split(".") if node.module else [])
            else:
                base = node.module.split(".")
            targets = [base + [alias.name] for alias in node.names] if len(base) == 1 else [base]
        elif isinstance(node, ast.Import):
            targets = [alias.name.split(".") for alias in node.names]
        else:
            continue
        layers |= {t[1] for t in targets if t[0] == "fiberpo_theory" and len(t) > 1}
    return layers


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_layer_imports_only_the_layers_below(layer):
    modules = sorted((PACKAGE / layer).rglob("*.py"))
    assert modules
    wrong = {m.name: sorted(_library_imports(m) - MAY_IMPORT[layer] - UPWARD.get((layer, m.name), set())) for m in modules}
    assert not {m: w for m, w in wrong.items() if w}, wrong


def test_the_import_scan_sees_relative_and_lazy_imports():
    # Guards the test above against passing vacuously.
    assert _library_imports(PACKAGE / "hierarchy" / "fgh.py") >= {"core", "hierarchy"}
    assert "hierarchy" in _library_imports(PACKAGE / "theory" / "strategies.py")  # imported inside a function


def test_architecture_page_lists_every_module():
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    modules = [m.relative_to(PACKAGE).as_posix() for m in PACKAGE.rglob("*.py") if m.name != "__init__.py"]
    missing = [m for m in modules if f"`{m}`" not in page]
    assert not missing, missing
