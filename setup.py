"""Which folders install as which packages. Everything else about the distribution is in pyproject.toml.

Each top-level folder of the pipeline installs as `asymsearch.<folder>`, and every package below it (a folder
with an `__init__.py`) is found here, so a new subpackage can never be left out of a wheel by a list kept by
hand (tests/test_packaging.py builds a wheel and checks that every .py file under these folders is in it).
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# The product. `experiments/` (research scripts) and `tests/` are deliberately not installed.
FOLDERS = ("core", "cli", "training", "export", "index", "server", "protos", "clients", "bench")

packages, package_dir = [], {}
for folder in FOLDERS:
    if not (ROOT / folder / "__init__.py").is_file():
        continue
    packages.append(f"asymsearch.{folder}")
    package_dir[f"asymsearch.{folder}"] = folder
    packages += [f"asymsearch.{folder}.{sub}" for sub in find_packages(str(ROOT / folder))]

setup(packages=packages, package_dir=package_dir)
