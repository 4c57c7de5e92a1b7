"""`asymsearch bench index --milvus LOCATION`: Milvus against faiss on the same synthetic vectors, in the same run.

For each size: the clustered vectors and held-out queries of `asymsearch.bench.index` (same generator and seeds as
its faiss section), exact top-10 from a plain `faiss.IndexFlatIP` (the reference, outside both backends), then
  - agreement: FLAT and IVF_FLAT with full probing (nprobe = nlist) on both backends, top-10 ids compared query by
    query (|Milvus ∩ faiss| / 10, averaged; and the fraction of queries whose ten ids are identical in order);
  - the ANN index of each backend side by side (IVF nprobe sweep, HNSW efSearch): median single-query latency
    through the product's search path (`SearchIndex.search` for faiss, `MilvusIndex.search` for Milvus, which
    includes the gRPC round trip to the Milvus server — in-process for Milvus Lite) and recall@10 against exact.
Insert and index build times of the Milvus collections are recorded too. Every collection this writes is dropped
at the end.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from asymsearch.bench.index import K, check_writable, recall, synthetic_vectors
from asymsearch.core.manifest import IndexManifest
from asymsearch.core.provenance import provenance
from asymsearch.index import milvus
from asymsearch.index.faiss_index import add_blocks, apply_search_params, new_index, sample_rows, train_index
from asymsearch.index.store import search_faiss

DEFAULT_LOCATION = "milvus-lite:///tmp/asymsearch-bench-milvus/bench.db"
LATENCY_QUERIES = 100


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean |a_i ∩ b_i| / K, fraction of rows equal in order) over the rows of two (Q, K) id arrays."""
    overlap = float(np.mean([len(set(x[x >= 0]) & set(y[y >= 0])) / K for x, y in zip(a, b)]))
    return overlap, float(np.mean([np.array_equal(x, y) for x, y in zip(a, b)]))


def single_ms(search: Callable[[np.ndarray], Any], queries: np.ndarray) -> float:
    search(queries[:1])  # warm
    times = []
    for q in queries[:LATENCY_QUERIES]:
        start = time.perf_counter()
        search(q[None])
        times.append((time.perf_counter() - start) * 1e3)
    return round(statistics.median(times), 4)


def _faiss(data: np.ndarray, factory: str) -> faiss.Index:
    index = new_index(data.shape[1], factory)
    index = train_index(index, data[sample_rows(len(data))], factory)
    add_blocks(index, [(np.arange(len(data), dtype=np.int64), data)], factory)
    return index


def _milvus(location: str, name: str, data: np.ndarray, factory: str) -> tuple[milvus.MilvusIndex, float]:
    """A collection of `data` (ids 0..n-1) behind alias `name`, opened; and the seconds insert + index took."""
    base = milvus.parse_location(location)
    loc = milvus.parse_location(f"milvus-lite://{base.uri}/{name}" if base.lite else
                                f"milvus://{base.uri.removeprefix('http://')}/{name}")
    manifest = IndexManifest(teacher_id="synthetic-bench", dim=int(data.shape[1]), metric="inner_product",
                             factory=factory, count=0, teacher_model={}, build={"bench": True}, search_params={})
    blocks = ((np.arange(lo, min(lo + 4096, len(data)), dtype=np.int64), data[lo:lo + 4096],
               [("", "", None)] * len(data[lo:lo + 4096])) for lo in range(0, len(data), 4096))
    start = time.perf_counter()
    milvus.publish_blocks(loc, manifest, blocks)
    seconds = time.perf_counter() - start
    return milvus.MilvusIndex.open(loc), seconds


def _drop(index: milvus.MilvusIndex) -> None:
    client, loc = index._client, index.location
    try:
        client.drop_alias(loc.name)
    except Exception:  # noqa: BLE001 - best effort: the bench's own scratch collections
        pass
    for name in milvus.version_collections(client, loc):
        client.drop_collection(name)


def bench_milvus(sizes: Sequence[int], *, location: str = DEFAULT_LOCATION, dim: int = 512, queries: int = 1000,
                 nlist: int = 256, nprobes: Sequence[int] = (8, 32), hnsw_m: int = 32,
                 ef_searches: Sequence[int] = (64, 128), hnsw: bool = True, log=print) -> list[dict]:
    """One result dict per size (see the module docstring)."""
    out = []
    for n in sizes:
        log(f"[milvus] generating {n} x {dim} synthetic vectors (the faiss section's generator and seeds)")
        data = synthetic_vectors(n, dim, seed=1)
        q = synthetic_vectors(queries, dim, seed=2)
        exact = faiss.IndexFlatIP(dim)
        exact.add(data)
        truth = exact.search(q, K)[1]
        del exact
        row: dict[str, Any] = {"n": n, "dim": dim, "queries": queries, "nlist": nlist, "location": location,
                               "agreement": [], "ann": []}
        for factory, params, milvus_params in (("Flat", {}, {}),
                                               (f"IVF{nlist},Flat", {"nprobe": nlist}, {"nprobe": nlist})):
            log(f"[milvus] n={n} {factory}: building faiss and Milvus")
            f_index = _faiss(data, factory)
            apply_search_params(f_index, params)
            m_index, m_seconds = _milvus(location, f"bench_{factory.split(',')[0].lower()}_{n}", data, factory)
            m_index._search = dict(milvus_params)
            ids_f = search_faiss(f_index, q, K)[1]
            ids_m = m_index.search(q, K)[1]
            overlap, identical = agreement(ids_m, ids_f)
            entry = {"factory": factory, "search_params": params, "top10_overlap": round(overlap, 4),
                     "top10_identical_rows": round(identical, 4),
                     "recall@10_faiss": round(recall(ids_f, truth), 4),
                     "recall@10_milvus": round(recall(ids_m, truth), 4),
                     "milvus_insert_and_index_s": round(m_seconds, 2),
                     "single_query_ms_faiss": single_ms(lambda x: search_faiss(f_index, x, K), q),
                     "single_query_ms_milvus": single_ms(lambda x: m_index.search(x, K), q)}
            row["agreement"].append(entry)
            log(f"[milvus] n={n} {factory} {params or ''}: top-10 overlap {entry['top10_overlap']}, identical rows "
                f"{entry['top10_identical_rows']}; ms/query faiss {entry['single_query_ms_faiss']} milvus "
                f"{entry['single_query_ms_milvus']}; Milvus insert+index {entry['milvus_insert_and_index_s']} s")
            if factory.startswith("IVF"):
                for nprobe in nprobes:
                    apply_search_params(f_index, {"nprobe": nprobe})
                    m_index._search = {"nprobe": nprobe}
                    row["ann"].append(_ann_row(factory, {"nprobe": nprobe}, f_index, m_index, q, truth, log, n))
            _drop(m_index)
            del f_index
            gc.collect()
        if hnsw:
            factory = f"HNSW{hnsw_m}"
            log(f"[milvus] n={n} {factory}: building faiss and Milvus")
            start = time.perf_counter()
            f_index = _faiss(data, factory)
            f_seconds = time.perf_counter() - start
            m_index, m_seconds = _milvus(location, f"bench_hnsw_{n}", data, factory)
            for ef in ef_searches:
                apply_search_params(f_index, {"efSearch": ef})
                m_index._search = {"ef": ef}
                r = _ann_row(factory, {"efSearch": ef}, f_index, m_index, q, truth, log, n)
                r.update(faiss_build_s=round(f_seconds, 2), milvus_insert_and_index_s=round(m_seconds, 2))
                row["ann"].append(r)
            _drop(m_index)
            del f_index
            gc.collect()
        out.append(row)
    return out


def _ann_row(factory, params, f_index, m_index, q, truth, log, n) -> dict:
    ids_f = search_faiss(f_index, q, K)[1]
    ids_m = m_index.search(q, K)[1]
    r = {"factory": factory, "search_params": params,
         "recall@10_faiss": round(recall(ids_f, truth), 4), "recall@10_milvus": round(recall(ids_m, truth), 4),
         "single_query_ms_faiss": single_ms(lambda x: search_faiss(f_index, x, K), q),
         "single_query_ms_milvus": single_ms(lambda x: m_index.search(x, K), q)}
    log(f"[milvus] n={n} {factory} {params}: recall@10 faiss {r['recall@10_faiss']} milvus {r['recall@10_milvus']}; "
        f"ms/query faiss {r['single_query_ms_faiss']} milvus {r['single_query_ms_milvus']}")
    return r


def write_milvus_results(path_md: Path, command: str, rows: list[dict]) -> None:
    """docs/results/bench_index_milvus.md and .json."""
    import milvus_lite
    import pymilvus
    path_md.parent.mkdir(parents=True, exist_ok=True)
    check_writable(path_md.with_suffix(".json"), key="milvus")
    machine = {"cpu_count": os.cpu_count(), "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
               "pymilvus": pymilvus.__version__, "milvus_lite": milvus_lite.__version__}
    path_md.with_suffix(".json").write_text(json.dumps({"command": command, "milvus": rows, "machine": machine,
                                                        "provenance": provenance()}, indent=2) + "\n")
    lines = ["# bench index: Milvus Lite against faiss", "", f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} CPU cores shared with other jobs, faiss {faiss.__version__} "
             f"({faiss.omp_get_max_threads()} OpenMP threads), pymilvus {pymilvus.__version__}, Milvus Lite "
             f"{milvus_lite.__version__} (in this process, reached over gRPC on 127.0.0.1). What ran: Milvus Lite only; "
             f"no Milvus cluster was run here. Synthetic clustered vectors (the generator of `bench index`'s faiss "
             f"section, same seeds), queries not in the database; no image data, so no class split applies. "
             f"Latency: median of {LATENCY_QUERIES} single-query searches through each backend's search path "
             f"(Milvus includes the gRPC round trip); recall@10 against exact inner-product search.", ""]
    for row in rows:
        lines += [f"## n = {row['n']:,}, dim {row['dim']}, {row['queries']} queries", "",
                  "### Same top-10 ids with exact search and with full probing", "",
                  "| index | params | top-10 overlap | identical rows | recall@10 faiss | recall@10 Milvus | "
                  "ms/query faiss | ms/query Milvus | Milvus insert + index s |", "|---|---|---|---|---|---|---|---|---|"]
        for e in row["agreement"]:
            p = ",".join(f"{k}={v}" for k, v in e["search_params"].items()) or "-"
            lines.append(f"| {e['factory']} | {p} | {e['top10_overlap']} | {e['top10_identical_rows']} | "
                         f"{e['recall@10_faiss']} | {e['recall@10_milvus']} | {e['single_query_ms_faiss']} | "
                         f"{e['single_query_ms_milvus']} | {e['milvus_insert_and_index_s']} |")
        lines += ["", "### Each backend's ANN index, side by side", "",
                  "| index | params | recall@10 faiss | recall@10 Milvus | ms/query faiss | ms/query Milvus |",
                  "|---|---|---|---|---|---|"]
        for e in row["ann"]:
            p = ",".join(f"{k}={v}" for k, v in e["search_params"].items())
            lines.append(f"| {e['factory']} | {p} | {e['recall@10_faiss']} | {e['recall@10_milvus']} | "
                         f"{e['single_query_ms_faiss']} | {e['single_query_ms_milvus']} |")
        lines.append("")
    path_md.write_text("\n".join(lines))
