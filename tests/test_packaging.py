"""A built wheel holds every module of the product: a non-editable install cannot miss a subpackage.

CI tests an editable install, which reads the source tree and so cannot see a package left out of a wheel
(`asymsearch.training.experiments` once was, and `train --tune-units` died with ModuleNotFoundError after
`pip install .`). Here a real wheel is built and its file list is compared with the tree.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED = {"tests", "experiments", "build", "dist", "docs"}  # research scripts and tests stay out


def product_folders() -> tuple[str, ...]:
    """FOLDERS as setup.py lists them (read, not imported: setup.py runs setup() on import)."""
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FOLDERS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no FOLDERS")


def test_every_top_level_package_is_installed():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - NOT_INSTALLED
    assert packages <= set(product_folders()), sorted(packages - set(product_folders()))


def test_wheel_holds_every_module_and_data_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("asymsearch-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder in product_folders():
        for f in (ROOT / folder).rglob("*"):
            if "__pycache__" in f.parts or not f.is_file():
                continue
            if f.suffix == ".py" or (folder == "protos" and f.suffix in (".proto", ".pyi")) or \
                    (folder == "clients" and f.suffix == ".html"):
                expected.add(f"asymsearch/{f.relative_to(ROOT).as_posix()}")
    missing = sorted(expected - names)
    assert not missing, missing
    assert "asymsearch/training/__init__.py" in names  # the comparison itself saw the tree
    assert not [n for n in names if n.startswith(("asymsearch/tests/", "tests/", "experiments/"))]
