"""The Ray Data engine on a local Ray instance against the single-machine build; the local path without Ray."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from asymsearch.index.build import build_index, work_dir
from asymsearch.index.store import SearchIndex


def test_single_machine_path_never_imports_ray(tmp_path, tiny_models, image_folder):
    code = ("import sys\n"
            "from asymsearch.cli.main import main\n"
            f"assert main(['index', 'build', '--teacher', {str(tiny_models['teacher'])!r}, '--images', "
            f"{str(image_folder)!r}, '--out', {str(tmp_path / 'index')!r}]) == 0\n"
            "assert 'ray' not in sys.modules, 'the local build imported ray'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_ray_build_equals_the_local_build(tmp_path, tiny_models, image_folder):
    ray = pytest.importorskip("ray", reason="Ray is the `distributed` extra: pip install 'ray[data]'")
    ray.init(num_cpus=2, object_store_memory=80 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        # 80 images in shards of 24: four shards, spread over the actors
        local = tmp_path / "local"
        build_index(tiny_models["teacher"], image_folder, local, batch_size=8, shard_size=24, progress=False)
        out = tmp_path / "ray"
        build_index(tiny_models["teacher"], image_folder, out, batch_size=8, shard_size=24, engine="ray",
                    progress=False)
        assert not work_dir(out).exists()
        with SearchIndex.open(local) as a, SearchIndex.open(out) as b:
            assert b.count == 80 and b.manifest.build["engine"] == "ray"
            assert a.lookup_records(a.ids()) == b.lookup_records(b.ids())
            queries = np.random.default_rng(0).normal(size=(10, 16)).astype(np.float32)
            sa, ia = a.search(queries, 80)
            sb, ib = b.search(queries, 80)
        np.testing.assert_allclose(sa, sb, atol=1e-5)
        np.testing.assert_array_equal(ia[:, :5], ib[:, :5])
    finally:
        ray.shutdown()
