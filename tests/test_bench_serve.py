"""`asymsearch bench serve` end to end at toy scale: a real server process, real client processes, the report.
Speed is not asserted (the figures belong to the benchmark), only that every part ran and was reported."""
from __future__ import annotations

import json

from asymsearch.index.build import build_index
from asymsearch.cli.bench_serve import BenchConfig, run_bench


def test_bench_serve_writes_json_and_png(tmp_path, image_folder, tiny_models):
    index = tmp_path / "index"
    build_index(tiny_models["teacher"], image_folder, index, progress=False)
    cfg = BenchConfig(workdir=tmp_path / "work", out_json=tmp_path / "r.json", out_png=tmp_path / "r.png",
                      index=index, student=tiny_models["student"], images=image_folder, concurrency=(1, 3),
                      seconds=0.4, soak_seconds=0.6, soak_concurrency=2, client_processes=2, query_images=8,
                      overload_concurrency=6, overload_queue=1, lead_s=0.5, workers=8,
                      limit_images=32, limit_vectors=64, limit_rounds=1)
    report = run_bench(cfg, log=lambda m: None)
    assert json.loads((tmp_path / "r.json").read_text())["levels"] == report["levels"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for kind in ("image", "vector"):
        assert report["limit"][f"{kind}_qps"] > 0
        for c in ("1", "3"):
            level = report["levels"][kind][c]
            assert level["ok"] > 0 and level["errors"] == {} and level["p50_ms"] <= level["p99_ms"]
    assert report["soak"]["ok"] > 0 and report["soak"]["rss_start_mb"] > 0
    assert report["server_exit_code"] == 0  # SIGTERM drained and exited cleanly
    over = report["overload"]
    assert over["server_alive"] and set(over["errors"]) <= {"RESOURCE_EXHAUSTED"} and over["exit_code"] == 0
    assert set(report["targets"]) == {"soak", "overload"}  # the c=16 targets need a c=16 level
