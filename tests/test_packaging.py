"""The installed distribution: only ``fiberpo_theory`` at the top of site-packages, with its checks and proofs inside."""

import email
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(out)],
        check=True, capture_output=True, text=True,
    )
    (path,) = out.glob("fiberpo_theory-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_wheel_has_one_top_level_package(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"fiberpo_theory"}


def test_checks_and_proofs_install_inside_the_package(wheel):
    for folder in ("checks", "proofs"):
        modules = {p.name for p in (ROOT / folder).glob("*.py")}
        shipped = {Path(n).name for n in wheel.namelist() if n.startswith(f"fiberpo_theory/{folder}/")}
        assert modules and modules <= shipped, folder


def test_every_subpackage_ships_with_all_its_modules(wheel):
    # The packages list in pyproject.toml is explicit: a layer missing from it would silently not install.
    shipped = set(wheel.namelist())
    packages = sorted(p.parent for p in (ROOT / "fiberpo_theory").rglob("__init__.py"))
    assert {p.name for p in packages} >= {"core", "hierarchy", "theory", "symbolic", "tools", "integrations", "examples"}
    for package in packages:
        for module in package.glob("*.py"):
            assert module.relative_to(ROOT).as_posix() in shipped, module


def test_console_script_points_at_the_tools_layer(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "fiberpo-theory = fiberpo_theory.tools.cli:main" in wheel.read(entry_points).decode()


def test_metadata_has_classifiers_and_urls(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    message = email.message_from_string(wheel.read(meta).decode())
    assert any(c.startswith("Programming Language :: Python :: 3") for c in message.get_all("Classifier", []))
    urls = message.get_all("Project-URL", [])
    assert any(u.lower().startswith("repository") for u in urls) and any("arxiv.org" in u for u in urls)


def test_checks_import_under_the_package_name_only():
    from fiberpo_theory.theory import claims

    assert claims.import_checks() == {}
    assert not any(name == "checks" or name.startswith("checks.") for name in sys.modules)
    assert not any(name == "proofs" or name.startswith("proofs.") for name in sys.modules)


def test_the_kernel_source_ships_beside_its_loader(wheel):
    # without it the package still runs, on the torch-op path only, so its absence would go unnoticed
    assert "fiberpo_theory/core/_kernels.c" in wheel.namelist()
