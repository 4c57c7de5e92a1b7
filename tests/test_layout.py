"""The house rules that keep the layers apart: one namespace, imports downhill, no torch on the serving side."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("training", "export", "index", "server", "clients")


def imported_modules(folder: Path) -> set[str]:
    names = set()
    for f in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
    return names


def test_core_imports_no_stage_and_nothing_imports_the_cli():
    core = imported_modules(ROOT / "core")
    assert not [m for m in core if m.split(".")[1:2] and m.split(".")[1] in STAGES + ("cli",)
                and m.startswith("asymsearch.")], core
    for folder in STAGES + ("core",):
        assert not [m for m in imported_modules(ROOT / folder)
                    if m == "asymsearch.cli" or m.startswith("asymsearch.cli.")], folder


@pytest.mark.parametrize("folder", ["core", "index", "server", "clients", "protos"])
def test_serving_side_never_imports_torch_statically(folder):
    assert not [m for m in imported_modules(ROOT / folder) if m.split(".")[0] in ("torch", "torchvision")]


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_serving_side_runs_without_loading_torch(tmp_path):
    code = ("import sys\n"
            "import asymsearch.index.build, asymsearch.index.store, asymsearch.index.evaluate\n"
            "import asymsearch.server.service, asymsearch.clients.client\n"
            "from asymsearch.cli.main import build_parser; build_parser()\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n")
    r = run_python(code, tmp_path)
    assert r.returncode == 0, r.stderr


def test_one_namespace_and_no_generic_top_level_modules(tmp_path):
    code = ("import importlib.util as u\n"
            "bad = [n for n in ('training', 'export', 'index', 'server', 'clients', 'protos', 'core', 'cli') "
            "if u.find_spec(n) is not None]\n"
            "assert not bad, bad\n"
            "import asymsearch.training, asymsearch.server, asymsearch.protos.v1.search_pb2\n")
    r = run_python(code, tmp_path)
    assert r.returncode == 0, r.stderr


PRODUCT = ("core", "training", "export", "index", "server", "clients", "protos")


@pytest.mark.parametrize("folder", PRODUCT)
def test_product_never_imports_research_or_benchmarks(folder):
    """Research (`experiments/`, run from the repository) and speed measurement (`asymsearch.bench`) sit beside
    the product: only the command line (the top floor) may reach `bench`, and nothing installed reaches
    `experiments`."""
    bad = [m for m in imported_modules(ROOT / folder)
           if m.split(".")[0] == "experiments" or m == "asymsearch.bench" or m.startswith("asymsearch.bench.")
           or ".experiments" in m]
    assert not bad, (folder, bad)


def test_benchmarks_and_the_cli_never_import_research():
    for folder in ("bench", "cli"):
        if (ROOT / folder).is_dir():
            bad = [m for m in imported_modules(ROOT / folder) if m.split(".")[0] == "experiments"
                   or ".experiments" in m]
            assert not bad, (folder, bad)
