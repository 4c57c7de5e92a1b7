"""`asymsearch bench index --filter-bench`: filtered queries on a real index folder of `n` synthetic vectors.

The target (issue 24): a filtered query matching 1% of 1M items returns exactly k results, equal to brute force
over the matching subset, on faiss (Flat, IVF, HNSW). The index folder is written as `index build` writes one
(index.faiss in IDMap2, meta.sqlite with a label and two user metadata columns, manifest.json) and opened with
`SearchIndex.open`, so the filter goes the product's way: parsed by `core/filters.py`, the matching ids from
SQLite, the search through faiss's ID selector. The reference is independent of that path: the matching rows
computed from the generator's own formula and scored with numpy over exactly those rows.

Metadata of item i: label `class_{i % 100:03d}`, shop `s{(i // 7) % 100:02d}`, price `str(i % 100)` (text, as a
CSV would give it). Filters: a label (1%, a plain column), a shop (1%, a JSON metadata column), and a large one
(`price < 50 and shop != "s07"`, ~49.5%) that takes the approximate path with the selector. For contrast, the
unfiltered top-k with the same index, post-filtered, shows how many results post-filtering leaves.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import faiss
import numpy as np

from asymsearch.bench.index import synthetic_vectors
from asymsearch.core.manifest import IndexManifest
from asymsearch.core.provenance import provenance
from asymsearch.index import store as store_module
from asymsearch.index.faiss_index import add_blocks, new_index, sample_rows, train_index
from asymsearch.index.metadata import write_metadata
from asymsearch.index.store import SearchIndex

K = 10
FILTERS: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = [
    ('label = "class_042"', lambda i: i % 100 == 42),
    ('shop = "s07"', lambda i: (i // 7) % 100 == 7),
    ('price < 50 and shop != "s07"', lambda i: (i % 100 < 50) & ((i // 7) % 100 != 7)),
]


def default_factories(n: int) -> list[tuple[str, dict[str, float]]]:
    nlist = 1024 if n >= 500_000 else 256
    return [("Flat", {}), (f"IVF{nlist},Flat", {"nprobe": 16}), ("HNSW16", {"efSearch": 64})]


def write_folder(folder: Path, x: np.ndarray, factory: str, params: dict[str, float], *, log: Callable) -> float:
    """An index folder as `index build` writes it; returns the seconds faiss took to train and add."""
    folder.mkdir(parents=True)
    n, dim = x.shape
    start = time.perf_counter()
    index = train_index(new_index(dim, factory), x[sample_rows(n, 100_000)], factory)
    add_blocks(index, ((np.arange(s, min(s + 100_000, n), dtype=np.int64), x[s:s + 100_000])
                       for s in range(0, n, 100_000)), factory)
    seconds = time.perf_counter() - start
    faiss.write_index(index, str(folder / store_module.INDEX_FILE))
    del index
    IndexManifest(teacher_id="bench", dim=dim, metric="inner_product", factory=factory, count=n, teacher_model={},
                  build={"synthetic": True}, search_params=params).save(folder / store_module.MANIFEST_FILE)
    log(f"  {factory}: built in {seconds:.1f} s")
    return seconds


def write_meta(path: Path, n: int) -> None:
    write_metadata(path, ((i, f"/synthetic/{i}.jpg", f"class_{i % 100:03d}",
                           {"shop": f"s{(i // 7) % 100:02d}", "price": str(i % 100)}) for i in range(n)))


def brute_force(x: np.ndarray, rows: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top k of `rows` for each query, by exact inner product (numpy), 50 queries at a time."""
    sub = x[rows]
    scores, ids = [], []
    for start in range(0, len(q), 50):
        s = q[start:start + 50] @ sub.T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable"), 1)
        scores.append(np.take_along_axis(s, top, 1))
        ids.append(rows[top])
    return np.concatenate(scores), np.concatenate(ids)


def bench_filters(n: int = 1_000_000, dim: int = 32, queries: int = 100, factories: list | None = None,
                  work: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    x = synthetic_vectors(n, dim, seed=0)
    q = synthetic_vectors(queries, dim, seed=99)
    ids = np.arange(n, dtype=np.int64)
    subsets = [(text, np.flatnonzero(rule(ids))) for text, rule in FILTERS]
    reference = {text: brute_force(x, rows, q, K) for text, rows in subsets}
    root = Path(tempfile.mkdtemp(prefix="bench-filter-", dir=work))
    rows_out: list[dict[str, Any]] = []
    try:
        meta = root / "meta.sqlite"
        start = time.perf_counter()
        write_meta(meta, n)
        log(f"metadata of {n} items written in {time.perf_counter() - start:.1f} s")
        for factory, params in factories or default_factories(n):
            folder = root / factory.replace(",", "_")
            build_s = write_folder(folder, x, factory, params, log=log)
            shutil.copyfile(meta, folder / store_module.META_FILE)
            with SearchIndex.open(folder, gpu=False) as index:
                for text, rows in subsets:
                    f = index.parse_filter(text)
                    t0 = time.perf_counter()
                    matched = index.matching_ids(f)  # SQLite, uncached
                    sql_ms = (time.perf_counter() - t0) * 1e3
                    lat, got_i, got_s = [], [], []
                    for j in range(queries):
                        t1 = time.perf_counter()
                        s, i = index.search(q[j:j + 1], K, filter=f)  # cached ids: the search itself
                        lat.append((time.perf_counter() - t1) * 1e3)
                        got_i.append(i[0])
                        got_s.append(s[0])
                    got_i, got_s = np.stack(got_i), np.stack(got_s)
                    want_s, want_i = reference[text]
                    exact_rows = int(sum(np.array_equal(a, b) for a, b in zip(got_i, want_i)))
                    recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got_i, want_i)]))
                    _, plain = index.search(q, K)  # unfiltered top-k, then post-filtered: what it would leave
                    allowed = np.zeros(n, bool)
                    allowed[rows] = True
                    post = float(np.mean([allowed[r[r >= 0]].sum() for r in plain]))
                    row = {"factory": factory, "search_params": params, "filter": text, "n": n, "dim": dim,
                           "matching": int(len(rows)), "matching_fraction": len(rows) / n,
                           "sqlite_ids_equal_reference": bool(np.array_equal(matched, rows)),
                           "sqlite_ms_uncached": round(sql_ms, 1),
                           "path": ("selector (exhaustive)" if index.manifest.factory == "Flat" else
                                    "exact subset" if len(rows) <= store_module.SUBSET_EXACT_MAX else
                                    "ANN + selector, short queries rerun exactly"),
                           "queries": queries, "k": K,
                           "all_k_results": bool((got_i >= 0).all() and got_i.shape == (queries, K)),
                           "queries_equal_brute_force": exact_rows,
                           "recall_at_10_vs_brute_force": round(recall, 4),
                           "max_score_diff": float(np.abs(got_s - want_s).max()),
                           "latency_ms_median": round(statistics.median(lat), 2),
                           "latency_ms_p90": round(float(np.percentile(lat, 90)), 2),
                           "post_filter_results_mean": round(post, 2), "build_s": round(build_s, 1)}
                    rows_out.append(row)
                    log(f"  {factory} {text!r}: {row['matching']} match, all k: {row['all_k_results']}, equal to "
                        f"brute force {exact_rows}/{queries}, recall {recall:.4f}, {row['latency_ms_median']} ms "
                        f"(SQLite {sql_ms:.0f} ms uncached), post-filter would leave {post:.2f}")
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows_out


def write_filter_results(path_md: Path, command: str, rows: list[dict[str, Any]]) -> None:
    path_md.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "filters": rows,
               "machine": {"cpu_count": os.cpu_count(), "faiss": faiss.__version__,
                           "faiss_threads": faiss.omp_get_max_threads()},
               "subset_exact_max": store_module.SUBSET_EXACT_MAX, "provenance": provenance()}
    path_md.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# bench index: filtered queries", "", f"Command: `{command}`", "",
             "Synthetic clustered unit vectors (`bench/index.py` `synthetic_vectors`), held-out queries from the "
             "same distribution; no model, no training/evaluation split is involved. The index folder is written "
             "as `index build` writes one and searched through `SearchIndex.search(filter=...)`; the reference is "
             "numpy brute force over the rows the generator's formula selects (not over what SQLite returned). "
             f"k = {K}. Latency: one query at a time, the matching ids already cached (the uncached SQLite "
             f"query is its own column); {os.cpu_count()} shared CPU cores, faiss {faiss.__version__} with "
             f"{faiss.omp_get_max_threads()} OpenMP thread(s): absolute times are noisy.", "",
             "| factory | filter | matching | SQLite ids = formula | path | all k results | = brute force | "
             "recall@10 | median ms | p90 ms | SQLite ms (uncached) | post-filter would leave |",
             "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['factory']} {r['search_params'] or ''} | `{r['filter']}` | {r['matching']} "
                     f"({100 * r['matching_fraction']:.1f}%) | {'yes' if r['sqlite_ids_equal_reference'] else 'NO'} | {r['path']} | {'yes' if r['all_k_results'] else 'NO'} "
                     f"| {r['queries_equal_brute_force']}/{r['queries']} | {r['recall_at_10_vs_brute_force']:.4f} | "
                     f"{r['latency_ms_median']} | {r['latency_ms_p90']} | {r['sqlite_ms_uncached']} | "
                     f"{r['post_filter_results_mean']} |")
    lines += ["", "\"= brute force\": queries whose k ids equal, in order, the brute-force top k over the matching "
              "items. \"post-filter would leave\": the mean number of the unfiltered top-k that match the filter "
              "(what filtering after the search returns). The exact-subset rule and the ANN path are described in "
              "`asymsearch/index/store.py` and docs/index.md (filters).", ""]
    path_md.write_text("\n".join(lines))


# --------------------------------------------------------------------------- the same filters on Milvus (issue 24)

MILVUS_DEFAULT = "milvus-lite:///tmp/asymsearch-bench-filter/filter.db"
MILVUS_FACTORIES = [("Flat", {}), ("IVF1024,Flat", {"nprobe": 16})]
MIN_QUERIES = 5


def _reindex(index: Any, factory: str, params: dict[str, float]) -> Any:
    """The same collection under another vector index (release, drop the index, create the new one, load) and its
    manifest rewritten with that factory: no second insert of the rows. Returns the reopened `MilvusIndex`."""
    import dataclasses

    from asymsearch.index import milvus
    client, loc, collection = index._client, index.location, index.version
    kind, build, _ = milvus.milvus_index(factory, params)
    client.release_collection(collection)
    client.drop_index(collection, "vector")
    client.create_index(collection, milvus._index_params(client, kind, build))
    client.load_collection(collection)
    m = index.manifest
    milvus.write_manifest(client, loc, collection, dataclasses.replace(
        m, factory=factory, search_params=dict(params),
        build={**m.build, "milvus": {"collection": collection, "index_type": kind, "params": build}}))
    return milvus.MilvusIndex.open(loc)


def bench_filters_milvus(n: int = 1_000_000, dim: int = 32, queries: int = 100, factories: list | None = None,
                         location: str = MILVUS_DEFAULT, log: Callable[[str], None] = print,
                         seconds_per_filter: float = 120.0) -> list[dict[str, Any]]:
    """The faiss bench's items, metadata, queries and filters in a Milvus collection (`milvus.publish_blocks`, the
    rows `index build` writes: id, vector, path, label, the metadata columns), each filter parsed by
    `core.filters.parse_filter` against the collection's fields and searched through `MilvusIndex.search` (the
    Milvus expression `Filter.to_milvus()` builds); the reference is the same numpy brute force over the rows the
    generator's formula selects. The collection is indexed with each of `factories` in turn (one insert) and
    dropped at the end. Each (index, filter) runs `queries` single queries, or as many as `seconds_per_filter`
    allows (at least `MIN_QUERIES`); the row records how many ran."""
    from asymsearch.core.filters import parse_filter
    from asymsearch.index import milvus
    x = synthetic_vectors(n, dim, seed=0)
    q = synthetic_vectors(queries, dim, seed=99)
    ids = np.arange(n, dtype=np.int64)
    subsets = [(text, np.flatnonzero(rule(ids))) for text, rule in FILTERS]
    reference = {text: brute_force(x, rows, q, K) for text, rows in subsets}
    base = milvus.parse_location(location)
    loc = milvus.parse_location(f"milvus-lite://{base.uri}/filterbench" if base.lite else
                                f"milvus://{base.uri.removeprefix('http://')}/filterbench")
    factories = factories or MILVUS_FACTORIES
    first, first_params = factories[0]
    manifest = IndexManifest(teacher_id="bench", dim=dim, metric="inner_product", factory=first, count=0,
                             teacher_model={}, build={"synthetic": True, "metadata_columns": ["price", "shop"]},
                             search_params=dict(first_params))

    def blocks():
        for lo in range(0, n, 10_000):
            hi = min(n, lo + 10_000)
            yield (ids[lo:hi], x[lo:hi], [(f"/synthetic/{i}.jpg", f"class_{i % 100:03d}",
                                           {"shop": f"s{(i // 7) % 100:02d}", "price": str(i % 100)})
                                          for i in range(lo, hi)])
            if hi % 100_000 == 0:
                log(f"  inserted {hi} rows ({time.perf_counter() - start:.0f} s)")
    start = time.perf_counter()
    _, collection = milvus.publish_blocks(loc, manifest, blocks(), keep=1)
    insert_s = time.perf_counter() - start
    log(f"Milvus: {n} rows inserted, flushed, indexed ({first}) and loaded in {insert_s:.0f} s")
    index = milvus.MilvusIndex.open(loc)
    rows_out: list[dict[str, Any]] = []
    try:
        for j, (factory, params) in enumerate(factories):
            if j:
                t0 = time.perf_counter()
                index = _reindex(index, factory, params)
                log(f"  reindexed as {factory} in {time.perf_counter() - t0:.0f} s")
            for text, rows in subsets:
                f = parse_filter(text, index.filter_fields)
                lat, got_i, got_s = [], [], []
                began = time.perf_counter()
                for jq in range(queries):
                    if jq >= MIN_QUERIES and time.perf_counter() - began > seconds_per_filter:
                        break  # a slow filter (a JSON field scanned per query) is measured on fewer queries
                    t1 = time.perf_counter()
                    s, i = index.search(q[jq:jq + 1], K, filter=f)
                    lat.append((time.perf_counter() - t1) * 1e3)
                    got_i.append(i[0])
                    got_s.append(s[0])
                got_i, got_s = np.stack(got_i), np.stack(got_s)
                ran = len(got_i)
                want_s, want_i = reference[text][0][:ran], reference[text][1][:ran]
                exact_rows = int(sum(np.array_equal(a, b) for a, b in zip(got_i, want_i)))
                recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got_i, want_i)]))
                _, plain = index.search(q, K)
                allowed = np.zeros(n, bool)
                allowed[rows] = True
                post = float(np.mean([allowed[r[r >= 0]].sum() for r in plain]))
                row = {"backend": "milvus-lite" if loc.lite else "milvus", "factory": factory,
                       "milvus_index": index.manifest.build["milvus"], "search_params": params, "filter": text,
                       "milvus_expression": f.to_milvus(), "n": n, "dim": dim, "matching": int(len(rows)),
                       "matching_fraction": len(rows) / n, "queries": ran, "k": K,
                       "all_k_results": bool((got_i >= 0).all() and got_i.shape == (ran, K)),
                       "queries_equal_brute_force": exact_rows, "recall_at_10_vs_brute_force": round(recall, 4),
                       "max_score_diff": float(np.abs(np.where(got_i >= 0, got_s, 0) -
                                                      np.where(got_i >= 0, want_s, 0)).max()),
                       "latency_ms_median": round(statistics.median(lat), 2),
                       "latency_ms_p90": round(float(np.percentile(lat, 90)), 2),
                       "latency_ms_first": round(lat[0], 2),
                       "post_filter_results_mean": round(post, 2), "insert_index_load_s": round(insert_s, 1)}
                rows_out.append(row)
                log(f"  Milvus {factory} {text!r}: {row['matching']} match, all k: {row['all_k_results']}, equal "
                    f"to brute force {exact_rows}/{ran}, recall {recall:.4f}, {row['latency_ms_median']} ms, "
                    f"post-filter would leave {post:.2f}")
    finally:
        client = index._client
        try:
            client.drop_alias(loc.name)
            client.drop_collection(collection)
        except Exception:  # noqa: BLE001 - best effort: the bench's own scratch collection
            log(f"could not drop {collection} at {loc.address}")
    return rows_out


def write_milvus_filter_results(path_md: Path, command: str, rows: list[dict[str, Any]], about: str = "") -> None:
    path_md.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "about": about, "filters": rows,
               "machine": {"cpu_count": os.cpu_count(), "faiss": faiss.__version__}, "provenance": provenance()}
    path_md.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    about = about or (
        "The items, metadata, queries and filters of `bench index --filter-bench` (synthetic clustered unit vectors, "
        "`bench/index.py` `synthetic_vectors`; no model, no training/evaluation split involved) in one Milvus "
        "collection written as `index build` writes one (`milvus.publish_blocks`: id, vector, path, label, the "
        "metadata columns as dynamic fields), each filter parsed by `core.filters.parse_filter` and searched one "
        "query at a time through `MilvusIndex.search` (the expression `Filter.to_milvus()` builds; for IVF / HNSW "
        "the exact-subset rule of `index/milvus.py`). Reference: numpy brute force over the rows the generator's "
        "formula selects. \"= brute force\": queries whose k ids equal, in order, the brute-force top k. \"first "
        "ms\": the first query of a filter (it counts the matches and, on HNSW, reads the kept rows' vectors; later "
        "queries reuse both). A filter whose queries are slow ran as many as its time allowed (at least 5; "
        "`queries` in the JSON). `post-filter would leave`: the mean number of the unfiltered top k that match.")
    lines = ["# bench index: filtered queries on Milvus Lite", "", f"Command: `{command}`", "", about, "",
             "| index | filter | matching | all k results | = brute force | recall@10 | first ms | median ms | "
             "p90 ms | post-filter would leave |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['milvus_index']['index_type']} {r['search_params'] or ''} | `{r['filter']}` | "
                     f"{r['matching']} ({100 * r['matching_fraction']:.1f}%) | "
                     f"{'yes' if r['all_k_results'] else 'NO'} | {r['queries_equal_brute_force']}/{r['queries']} | "
                     f"{r['recall_at_10_vs_brute_force']:.4f} | {r['latency_ms_first']} | {r['latency_ms_median']} | "
                     f"{r['latency_ms_p90']} | "
                     f"{r['post_filter_results_mean']} |")
    path_md.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """python -m asymsearch.bench.index_filter --milvus LOCATION [--size N] [--queries Q] --out MD"""
    import argparse
    import shlex
    import sys
    p = argparse.ArgumentParser(description="the filtered-query bench on Milvus (Milvus Lite by default)")
    p.add_argument("--milvus", default=MILVUS_DEFAULT, help="Milvus location (default: %(default)s)")
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--factories", default="Flat;IVF1024,Flat:nprobe=16",
                   help="FACTORY[:param=value] separated by ';' (default: %(default)s)")
    p.add_argument("--seconds-per-filter", type=float, default=120.0,
                   help="stop a filter's queries after this long, at least 5 run (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("docs/results/bench_index_filter_milvus.md"))
    args = p.parse_args(argv)
    factories = []
    for part in filter(None, args.factories.split(";")):
        name, _, rest = part.partition(":")
        factories.append((name, {k: float(v) for k, v in (kv.split("=") for kv in rest.split(",") if kv)}))
    command = "python -m asymsearch.bench.index_filter " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    rows = bench_filters_milvus(args.size, args.dim, args.queries, factories, args.milvus,
                                log=lambda m: print(m, file=sys.stderr, flush=True),
                                seconds_per_filter=args.seconds_per_filter)
    write_milvus_filter_results(args.out, command, rows)
    print(args.out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
