"""`index build --auto` tuned on student queries: recorded recalls against brute force, a shifted query distribution
that database-as-query tuning gets wrong, the serving thread count, and bad query inputs (one line, exit 2)."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from asymsearch.cli.main import build_parser, main
from asymsearch.core.data import list_image_folder, list_images_flat
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import decode_image
from asymsearch.core.synthetic import make_synthetic_dataset
from asymsearch.index import auto
from asymsearch.index.auto import Budget, Queries, choose_index
from asymsearch.index.build import build_index
from asymsearch.index.config import SERVING_SEARCH_THREADS
from asymsearch.index.store import SearchIndex


def embed_one_by_one(model, items) -> np.ndarray:
    embedder = OnnxEmbedder(model)
    return np.concatenate([embedder.embed_images([decode_image(item.path)]) for item in items])


def brute_force(database: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k by an explicit sort of every inner product (no faiss)."""
    return np.argsort(-(queries @ database.T), axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))


@pytest.fixture(scope="module")
def query_folder(tmp_path_factory):
    """Held-out query images: other classes and pictures than the database's."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("queries"), num_classes=3, per_class=8, size=48, seed=7)


def test_recorded_student_recall_is_the_saved_index_recall_against_brute_force(tmp_path, tiny_models, image_folder,
                                                                              query_folder):
    out = tmp_path / "index"
    # memory for IVF2,SQ8 only (80 x 16 floats); a low recall target so the cheap nprobe=1 wins, below 1.0
    m = build_index(tiny_models["teacher"], image_folder, out, progress=False, auto=Budget(6500, 1000.0, 0.5),
                    auto_queries=query_folder, student=tiny_models["student"])
    a = m.build["auto"]
    assert a["tuned_on"] == "student queries" and "warning" not in a
    assert a["student_queries"]["count"] == 24 and a["student_queries"]["sample"] == "all, in order"
    assert m.factory == a["chosen"] and m.search_params == a["search_params"]
    database = embed_one_by_one(tiny_models["teacher"], list_image_folder(image_folder))
    queries = embed_one_by_one(tiny_models["student"], list_images_flat(query_folder))
    with SearchIndex.open(out) as index:
        _, ids = index.search(queries, 10)
    recomputed = recall(ids, brute_force(database, queries))
    assert abs(recomputed - a["recall@10_student_queries"]) < 1e-3
    assert a["recall@10"] == a["recall@10_student_queries"] < 1.0  # the student's recall decided
    assert 0.0 < a["recall@10_database_queries"] <= 1.0


def clustered_with_shifted_queries(n=4000, dim=32, clusters=100, seed=0):
    """Tight clusters as the database; queries halfway between two cluster centres (another distribution: the
    database's own vectors sit inside one cluster, these queries' neighbours straddle two)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(clusters, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, clusters, n)] + 0.08 * rng.normal(size=(n, dim)).astype(np.float32)
    a, b = rng.integers(0, clusters, (2, 200))
    q = c[a] + c[b] + 0.05 * rng.normal(size=(200, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), \
        (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def test_tuning_on_shifted_queries_meets_the_target_where_database_tuning_does_not():
    database, shifted = clustered_with_shifted_queries()
    budget = Budget(max_memory=400_000, target_ms=1000.0, target_recall=0.9)  # IVF102,SQ8 is the only fit
    on_database = choose_index(database, budget, progress=False)
    on_queries = choose_index(database, budget, queries=Queries(shifted, "shifted"), progress=False)
    assert on_database.report["tuned_on"] == "database vectors" and "warning" in on_database.report
    truth = brute_force(database, shifted)
    by_database = recall(on_database.index.search(shifted, 10)[1], truth)
    by_queries = recall(on_queries.index.search(shifted, 10)[1], truth)
    assert on_database.report["targets_met"] and by_database < 0.9  # "met" on database vectors, missed on queries
    assert by_queries >= 0.9 and on_queries.report["targets_met"]
    assert abs(by_queries - on_queries.report["recall@10_student_queries"]) < 1e-3
    assert on_queries.search_params["nprobe"] > on_database.search_params["nprobe"]


def option_default(command: str, dest: str):
    """The default `asymsearch COMMAND --help` shows for `dest` (read from the parser, not parsed)."""
    import argparse
    import re
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    action = next(a for a in sub._actions if a.dest == dest)
    return int(re.search(r"default: (\d+)", action.help).group(1)) if action.default is argparse.SUPPRESS \
        else action.default


def test_candidates_are_timed_with_the_serving_thread_count(monkeypatch):
    from asymsearch.server.batching import BatchingConfig
    assert SERVING_SEARCH_THREADS == BatchingConfig().search_threads == option_default("serve", "search_threads")
    seen = []
    real = auto.single_query_ms
    monkeypatch.setattr(auto, "single_query_ms", lambda *a: seen.append(faiss.omp_get_max_threads()) or real(*a))
    database, shifted = clustered_with_shifted_queries(n=1000)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)  # not the serving count: the tuning must set its own
    try:
        c = choose_index(database, Budget(10**9, 1000.0, 0.9), queries=Queries(shifted, "q"), progress=False)
        assert faiss.omp_get_max_threads() == 3  # restored
    finally:
        faiss.omp_set_num_threads(before)
    assert seen and set(seen) == {SERVING_SEARCH_THREADS} and c.report["search_threads"] == SERVING_SEARCH_THREADS


def build_args(tiny_models, image_folder, out, *extra):
    return ["index", "build", "--teacher", str(tiny_models["teacher"]), "--images", str(image_folder),
            "--out", str(out), "--auto", "--max-memory", "6500", "--target-ms", "1000", *extra]


def test_bad_query_inputs_are_one_line_and_exit_2_then_a_good_build_works(tmp_path, tiny_models, image_folder,
                                                                         query_folder, capsys):
    wrong_dim = tmp_path / "q8.npy"
    np.save(wrong_dim, np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["--auto-query-vectors", str(wrong_dim)], "dimension 8, the database 16"),
             (["--auto-queries", str(empty), "--student", str(tiny_models["student"])], "no images found"),
             (["--auto-queries", str(query_folder), "--student", str(tiny_models["foreign_student"])], "teacher-b"),
             (["--auto-queries", str(query_folder)], "needs --student")]
    for extra, message in cases:
        assert main(build_args(tiny_models, image_folder, tmp_path / "idx", *extra)) == 2, extra
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and message in err[0], (extra, err)
        assert not (tmp_path / "idx").exists()
    args = build_args(tiny_models, image_folder, tmp_path / "idx", "--auto-queries", str(query_folder))
    args.remove("--auto")
    assert main(args) == 2 and "only apply with --auto" in capsys.readouterr().err
    # a good request after the bad ones: student query vectors as a file
    good = tmp_path / "q.npy"
    np.save(good, embed_one_by_one(tiny_models["student"], list_images_flat(query_folder)))
    assert main(build_args(tiny_models, image_folder, tmp_path / "idx", "--auto-query-vectors", str(good))) == 0
    out = capsys.readouterr()
    assert "on student queries" in out.out and "warning" not in out.err
    a = json.loads((tmp_path / "idx" / "manifest.json").read_text())["build"]["auto"]
    assert a["tuned_on"] == "student queries" and a["student_queries"]["source"] == f"vectors {good}"
    # without student queries: tuned on database vectors, and the command says so
    assert main(build_args(tiny_models, image_folder, tmp_path / "idx2")) == 0
    out = capsys.readouterr()
    assert "on database vectors" in out.out and "warning: tuned with database vectors" in out.err


def test_bench_database_keeps_the_real_vectors_and_matches_their_neighbour_cosine(tmp_path):
    from asymsearch.bench.index import resembling_vectors
    real, _ = clustered_with_shifted_queries(n=300, dim=16, clusters=20)
    data, about = resembling_vectors(real, 3000, seed=1)
    assert data.shape == (3000, 16) and np.array_equal(data[:300], real)
    np.testing.assert_allclose(np.linalg.norm(data, axis=1), 1.0, atol=1e-5)
    # a synthetic vector's cosine to its nearest real one (its seed, or closer): near the calibrated median
    nearest = (data[300:] @ real.T).max(axis=1)
    assert abs(np.median(nearest) - about["median_nn_cosine_real"]) < 0.05, (np.median(nearest), about)
    assert about["real"] == 300 and about["synthetic"] == 2700
    from asymsearch.bench.index import write_resembling  # the same database, written block by block
    from asymsearch.index.auto import VectorSource
    assert write_resembling(tmp_path / "db.npy", real, 3000, seed=1) == about
    assert np.array_equal(np.concatenate([b for _, b in VectorSource.of_npy(tmp_path / "db.npy").blocks()]), data)


def test_bench_index_auto_writes_its_results_and_reruns_over_them(tmp_path, capsys):
    real, shifted = clustered_with_shifted_queries(n=300, dim=16, clusters=20)
    for name, array in (("real", real), ("tune", shifted[:50]), ("eval", shifted[50:])):
        np.save(tmp_path / f"{name}.npy", array)
    args = ["bench", "index", "--sizes", "3000", "--auto-database", str(tmp_path / "real.npy"),
            "--auto-queries", str(tmp_path / "tune.npy"), "--auto-eval-queries", str(tmp_path / "eval.npy"),
            "--auto-min-speedup", "0.01", "--out", str(tmp_path / "auto.md")]  # latency never decides here
    for _ in range(2):  # the second run replaces the first one's results
        assert main(args) == 0
    row = json.loads((tmp_path / "auto.json").read_text())["auto"][0]
    assert row["n"] == 3000 and row["search_threads"] == SERVING_SEARCH_THREADS
    assert 0 < row["memory"]["peak_rss_bytes"] and row["memory"]["database_bytes"] == 3000 * 16 * 4
    chosen = [t for t in row["eval_sweep"] if t["chosen"]]
    assert len(chosen) == 1 and chosen[0]["recall@10_eval_student"] == row["recall@10_eval_student"]
    (tmp_path / "other.json").write_text("{}")
    assert main(args[:-1] + [str(tmp_path / "other.md")]) == 2  # never over a JSON that is not its result
    capsys.readouterr()


def test_a_streamed_database_is_read_block_by_block_and_gives_the_array_results(tmp_path):
    """`VectorSource.of_npy`: blocks of at most `block_rows` rows, the exact neighbours equal to an explicit sort
    (a last block smaller than k included), and `choose_index` over the file equal to `choose_index` over the
    array, the Flat reference over the budget (exact neighbours streamed) and within it."""
    from asymsearch.index.auto import VectorSource, build_candidate, streamed_neighbours
    database, shifted = clustered_with_shifted_queries(n=2001, dim=32)
    path = tmp_path / "db.npy"
    np.save(path, database)
    source = VectorSource.of_npy(path, block_rows=250)
    sizes = [len(block) for _, block in source.blocks()]
    assert sizes == [250] * 8 + [1] and source.n == 2001 and source.dim == 32
    positions = np.array([0, 7, 249, 250, 1999, 2000])
    assert np.array_equal(source.gather(positions), database[positions])
    assert np.array_equal(streamed_neighbours(source, shifted, 10), brute_force(database, shifted))
    flat = build_candidate(source, "Flat")  # storage reserved, added block by block
    assert flat.ntotal == 2001 and np.array_equal(flat.search(shifted, 10)[1], brute_force(database, shifted))
    for budget in (Budget(max_memory=250_000, target_ms=1000.0, target_recall=0.9),  # IVF44,SQ8 only: streamed
                   Budget(max_memory=10**9, target_ms=1000.0, target_recall=1.01)):  # Flat fits; nothing reaches
        a = choose_index(database, budget, queries=Queries(shifted, "q"), progress=False)
        b = choose_index(source, budget, queries=Queries(shifted, "q"), progress=False)
        assert a.factory == b.factory and a.search_params == b.search_params
        rows = lambda c: [(e["factory"], [(s["search_params"], s["recall@10_student_queries"],  # noqa: E731
                                           s["recall@10_database_queries"]) for s in e.get("settings", [])])
                          for e in c.report["candidates"]]
        # equal, but for HNSW: its graph depends on how the vectors arrive (one add, or block by block)
        plain = lambda c: [r for r in rows(c) if not r[0].startswith("HNSW")]  # noqa: E731
        assert plain(a) == plain(b)
        for (fa, sa), (fb, sb) in zip(rows(a), rows(b)):
            assert fa == fb and all(abs(x[1] - y[1]) <= 0.02 for x, y in zip(sa, sb)), (sa, sb)
        assert b.index.ntotal == 2001
    assert a.report["exact_timing"].startswith("measured") and "Flat" == a.factory  # recall 1 is the best here
    over = choose_index(source, Budget(250_000, 1000.0, 0.9), queries=Queries(shifted, "q"), progress=False)
    assert over.report["exact_timing"].startswith("estimated") and over.report["candidates"][0]["skipped"]
    with open(tmp_path / "short.npy", "wb") as f:  # a header promising more rows than the file holds
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (3000, 32)})
        f.write(database.tobytes())
    with pytest.raises(auto.UserError, match="ends early"):
        list(VectorSource.of_npy(tmp_path / "short.npy").blocks())


def test_streaming_never_copies_the_whole_database_in_numpy(tmp_path):
    """The exact neighbours and a candidate built from a file take numpy memory for one block at a time, not for
    the database (tracemalloc sees numpy's allocations; faiss's own storage is not numpy's)."""
    import tracemalloc

    from asymsearch.index.auto import VectorSource, build_candidate, streamed_neighbours
    rng = np.random.default_rng(0)
    database = rng.normal(size=(20_000, 64)).astype(np.float32)  # 5.1 MB
    np.save(tmp_path / "db.npy", database)
    source = VectorSource.of_npy(tmp_path / "db.npy", block_rows=1000)  # 0.26 MB blocks
    queries = rng.normal(size=(20, 64)).astype(np.float32)
    del database
    tracemalloc.start()
    try:
        streamed_neighbours(source, queries, 10)
        for factory in ("Flat", "HNSW16"):
            build_candidate(source, factory)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.25 * 20_000 * 64 * 4, peak
