"""`asymsearch bench serve`: the sanity check, the interleaving, the metrics reading, and one end-to-end run at toy
scale (a real server process, real client processes, idle streams). Speed is never asserted: the figures belong to
the benchmark (docs/results/bench_serve.md), only that each part ran, was measured and was reported."""
from __future__ import annotations

import dataclasses
import json

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from asymsearch.bench.serve import (LIMIT, LimitBeaten, ServeBenchConfig, check_ratio, compare, markdown, median_of,
                                    refusals, run_bench, run_interleaved)
from asymsearch.bench.server import parse_metrics, sample_sum
from asymsearch.cli.main import main
from asymsearch.core.errors import UserError
from asymsearch.index.build import build_index


def test_a_ratio_above_1_05_is_refused_not_reported():
    assert check_ratio(95.0, 100.0) == pytest.approx(0.95)
    assert check_ratio(105.0, 100.0) == pytest.approx(1.05)
    with pytest.raises(LimitBeaten, match=r"2.09x the in-process limit's q/s .*no ratio is reported"):
        check_ratio(209.0, 100.0)
    with pytest.raises(LimitBeaten, match="answered no query"):
        check_ratio(10.0, 0.0)
    medians = {LIMIT: {"qps": 100.0, "cpu_ms_per_query": 4.0, "errors": {}},
               "server c=1": {"qps": 60.0, "cpu_ms_per_query": 5.0, "errors": {}},
               "server c=16": {"qps": 120.0, "cpu_ms_per_query": 4.2, "errors": {}}}
    rows = compare(medians)
    assert rows["server c=1"] == {"cpu_ratio": pytest.approx(1.25), "qps_ratio": pytest.approx(0.6)}
    assert rows["server c=16"]["qps_ratio"] is None and "1.20x" in rows["server c=16"]["refused"]
    assert rows["server c=16"]["cpu_ratio"] == pytest.approx(1.05)  # CPU per query is still reported


def test_rounds_alternate_the_candidates_and_medians_are_over_rounds():
    order: list[str] = []

    def candidate(name, qps):
        def run():
            order.append(name)
            return {"qps": qps.pop(0), "cpu_ms_per_query": 2.0, "errors": {"UNAVAILABLE": 1} if name == "b" else {}}
        return run
    runs = run_interleaved({"limit": candidate("limit", [10.0, 30.0, 20.0]), "b": candidate("b", [1.0, 2.0, 9.0]),
                            "c": candidate("c", [5.0, 5.0, 5.0])}, rounds=3, log=lambda m: None)
    assert order == ["limit", "b", "c", "b", "c", "limit", "c", "limit", "b"]
    assert [r["place"] for r in runs["limit"]] == [0, 2, 1] and [r["round"] for r in runs["b"]] == [0, 1, 2]
    assert median_of(runs["limit"])["qps"] == 20.0 and median_of(runs["b"])["qps"] == 2.0
    assert median_of(runs["b"])["errors"] == {"UNAVAILABLE": 3}


def test_server_figures_are_read_from_the_prometheus_text():
    registry = CollectorRegistry()
    requests = Counter("asymsearch_requests", "RPCs", ["method", "code"], registry=registry)
    requests.labels("/asymsearch.v1.Search/SearchImage", "OK").inc(7)
    requests.labels("/asymsearch.v1.Search/SearchImage", "RESOURCE_EXHAUSTED").inc(2)
    requests.labels("/asymsearch.v1.Search/SearchVector", "OK").inc(5)
    Gauge("asymsearch_open_streams", "open", registry=registry).set(3)
    samples = parse_metrics(generate_latest(registry).decode())
    assert sample_sum(samples, "asymsearch_requests_total", method="SearchImage") == 9
    assert sample_sum(samples, "asymsearch_requests_total", method="SearchVector") == 5
    assert sample_sum(samples, "asymsearch_open_streams") == 3
    assert sample_sum(samples, "process_cpu_seconds_total") is None


def test_bench_serve_end_to_end_at_toy_scale(tmp_path, image_folder, tiny_models):
    index = tmp_path / "index"
    build_index(tiny_models["teacher"], image_folder, index, classes="second-half", progress=False)
    cfg = ServeBenchConfig(images=image_folder, workdir=tmp_path / "work", out_json=tmp_path / "r.json",
                           student=tiny_models["student"], index=index, concurrency=(1, 3), rounds=2, seconds=0.4,
                           lead_s=0.3, client_processes=1, query_images=8, limit_batch=2, idle_streams=24,
                           large_images=3, large_side=700)
    report = run_bench(cfg, log=lambda m: None)
    assert json.loads((tmp_path / "r.json").read_text())["kinds"]["image"]["medians"] == \
        report["kinds"]["image"]["medians"]
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "r.md").read_text()
    for kind in ("image", "vector"):
        data = report["kinds"][kind]
        assert set(data["runs"]) == {LIMIT, "server c=1", "server c=3"}
        # every candidate ran in every round, each round in a rotated order
        assert [[r["round"] for r in runs] for runs in data["runs"].values()] == [[0, 1]] * 3
        assert [r["place"] for r in data["runs"][LIMIT]] == [0, 2]
        for name, runs in data["runs"].items():
            for r in runs:
                assert r["queries" if name == LIMIT else "server_requests"] > 0 and r["cpu_ms_per_query"] > 0
                assert not r.get("errors")
        assert f"## {kind} queries" in page
        # the thread CPU of each stage, from the server's /metrics and counted the same way in the limit: an image
        # query goes through decode, embed and search, a vector query through search alone
        want = {"decode", "embed", "search"} if kind == "image" else {"search"}
        for name, runs in data["runs"].items():
            for r in runs:
                stages = r["stage_cpu_ms_per_query"]
                assert set(stages) == want and all(v > 0 for v in stages.values()), (kind, name, stages)
    assert page.count("Where the CPU goes") == 2
    assert report["index"]["count"] == 40  # the second half of the 8 classes of 10
    assert report["provenance"]["commit"] and report["provenance"]["machine"]["cores"] >= 1
    idle = report["idle_streams"]
    assert idle["opened"] + sum(idle["refused"].values()) == 24
    assert idle["health"]["ok"] + sum(idle["health"]["errors"].values()) == 20
    assert report["server"]["exit_code"] == 0  # SIGTERM drained and exited cleanly
    assert "## Idle streams" in page and "## Targets (issue 21)" in page
    large = report["large_images"]
    assert large["count"] == 3 and sum(large["outcomes"].values()) == 3 and large["normal_queries"] >= 1
    assert large["rss_peak_mb"] >= large["rss_before_mb"] and "## Large images" in page
    # a refusal is written into the page and makes the command fail, never a ratio above 1.05
    report["kinds"]["image"]["medians"]["server c=3"]["qps"] = 10 * report["kinds"]["image"]["medians"][LIMIT]["qps"]
    report["kinds"]["image"]["vs_limit"] = compare(report["kinds"]["image"]["medians"])
    assert refusals(report) and "**Refused:**" in markdown(report)


def test_bench_serve_command_refuses_bad_input(tmp_path, image_folder, tiny_models, capsys):
    assert main(["bench", "serve", "--images", str(image_folder), "--index", str(tmp_path),
                 "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "r.json")]) == 2
    assert "with --index, give the --student" in capsys.readouterr().err
    assert main(["bench", "serve", "--images", str(image_folder), "--student", str(tiny_models["student"]),
                 "--rounds", "0", "--out", str(tmp_path / "r.json")]) == 2
    assert not (tmp_path / "r.json").exists()


def test_the_limit_does_the_servers_work_against_brute_force(tmp_path, image_folder, tiny_models):
    """A limit that skipped a step would be fast and wrong: its hits must be those of the student's embedding
    searched exhaustively in the teacher's embeddings of the database (numpy, outside faiss)."""
    import numpy as np

    from asymsearch.bench.limit import InProcessLimit
    from asymsearch.core.data import list_image_folder, select_classes
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.core.preprocess import decode_image

    index = tmp_path / "index"
    build_index(tiny_models["teacher"], image_folder, index, classes="second-half", progress=False)
    database = list_image_folder(image_folder, select_classes(image_folder, "second-half"))
    queries = [it.path for it in list_image_folder(image_folder, select_classes(image_folder, "first-half"))][:6]
    db = OnnxEmbedder(tiny_models["teacher"]).embed_images([decode_image(it.path) for it in database])
    q = OnnxEmbedder(tiny_models["student"]).embed_images([decode_image(p) for p in queries])
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    expected = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :5]  # build ids are listing positions
    for embed_batch in (1, 4):
        with InProcessLimit(index, tiny_models["student"], threads=1, batch=6, embed_batch=embed_batch,
                            k=5) as limit:
            got = limit.image_batch([open(p, "rb").read() for p in queries])
            assert np.array_equal(got[:, 0], expected[:, 0]) and np.mean(got == expected) > 0.9
            run = limit.run("image", queries, 0.2)
            assert run["queries"] % 6 == 0 and run["queries"] > 0 and run["cpu_ms_per_query"] > 0


def test_a_second_server_is_interleaved_in_the_same_rounds(tmp_path, image_folder, tiny_models):
    """`--compare-serve-args`: server B runs its own rounds beside A's and the limit's, with its own arguments, and
    its figures come from its own /metrics (a round sent to A would leave B's request counter at zero)."""
    index = tmp_path / "index"
    build_index(tiny_models["teacher"], image_folder, index, classes="second-half", progress=False)
    cfg = ServeBenchConfig(images=image_folder, workdir=tmp_path / "work", out_json=tmp_path / "r.json",
                           student=tiny_models["student"], index=index, concurrency=(2,), kinds=("vector",), rounds=2,
                           seconds=0.4, lead_s=0.3, client_processes=1, query_images=8, limit_batch=2,
                           idle_streams=0, large_images=0, compare_serve_args=("--embed-workers", "1"))
    report = run_bench(cfg, log=lambda m: None)
    runs = report["kinds"]["vector"]["runs"]
    assert set(runs) == {LIMIT, "server c=2", "B c=2"}
    assert [r["round"] for r in runs["B c=2"]] == [0, 1]
    assert all(r["server_requests"] > 0 and not r.get("errors") for r in runs["B c=2"])
    assert "--embed-workers" in report["server_b"]["command"]
    assert "--embed-workers" not in report["server"]["command"]
    assert report["server_b"]["exit_code"] == 0
    assert "B c=2" in report["kinds"]["vector"]["vs_limit"] and "Server B" in (tmp_path / "r.md").read_text()
    bad = dataclasses.replace(cfg, compare_pythonpath=str(tmp_path))
    with pytest.raises(UserError, match="holds no asymsearch/ package folder"):
        run_bench(bad, log=lambda m: None)


def test_the_untrained_student_made_here_serves_past_the_quality_gate():
    # the index made here keeps a probe set, and the untrained Lite0 made here fails the gate (0.02x the teacher's
    # Recall@1): without --min-ratio 0 `serve` refuses to start and the benchmark measures nothing
    from pathlib import Path

    from asymsearch.bench.artifacts import Artifacts
    from asymsearch.bench.serve import _gate_args
    made = Artifacts(student=Path("s.onnx"), index=Path("i"), query_paths=[],
                     source="made here: zero-shot efficientnet_lite2 teacher, untrained efficientnet_lite0 student")
    given = dataclasses.replace(made, source="given")
    assert _gate_args(made, ("--embed-max-batch", "1")) == ("--min-ratio", "0", "--embed-max-batch", "1")
    assert _gate_args(made, ("--min-ratio", "0.5")) == ("--min-ratio", "0.5")  # the user's own ratio stands
    assert _gate_args(given, ()) == ()  # a given student is gated as `serve` gates it
