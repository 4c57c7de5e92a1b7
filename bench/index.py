"""`asymsearch bench index`: how fast the index stage is, measured side by side in one run.

1. Teacher embedding: raw onnxruntime throughput on pre-decoded, preprocessed tensors, against the full build
   pipeline (decoding workers + batched inference + shard writes) on the same images, interleaved repetitions,
   medians, and their ratio (the target: >= 0.8, decoding never the bottleneck).
2. faiss on synthetic 512-d vectors at each size: build time, index bytes, single-query latency (median), batched
   QPS and recall@10 of each index type and search setting against exact `Flat` on held-out queries.

The synthetic vectors are clustered, as learned embeddings are: 1,000 Gaussian clusters (unit-variance clusters
around standard-normal centres, so neighbouring clusters overlap) in a 64-d latent space, mapped to `dim` by a
fixed random matrix, plus isotropic noise, L2-normalised. With tighter clusters IVF reaches recall 1.0 at
nprobe=8, which would flatter every approximate index; at this spread an IVF256 index over 50k vectors needs
nprobe=32 for recall@10 0.92, closer to what published embedding benchmarks show. Queries are drawn from the same
distribution and are not in the database. Figures are for this generator; recall on real embeddings differs.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import faiss
import numpy as np

from asymsearch.core.data import ImageItem
from asymsearch.core.errors import UserError
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.provenance import provenance
from asymsearch.core.timing import interleaved
from asymsearch.index.faiss_index import add_blocks, apply_search_params, new_index, sample_rows, train_index
from asymsearch.index.store import search_faiss

K = 10
BATCH = 16  # issue 21: a batched Flat search of 16 should cost >= 4x less per query than 16 single ones


def synthetic_vectors(n: int, dim: int, seed: int, clusters: int = 1000, latent: int = 64) -> np.ndarray:
    """Clustered unit vectors (see the module docstring); the same `seed` gives the same cluster geometry."""
    geometry = np.random.default_rng(1234)
    centres = geometry.normal(size=(clusters, latent)).astype(np.float32)
    lift = geometry.normal(size=(latent, dim)).astype(np.float32) / math.sqrt(latent)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        z = centres[rng.integers(0, clusters, m)] + rng.normal(size=(m, latent)).astype(np.float32)
        x = z @ lift + 0.15 * rng.normal(size=(m, dim)).astype(np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def default_factories(n: int) -> list[tuple[str, list[dict[str, float]]]]:
    """(factory, search settings to measure) for `n` vectors."""
    nlist = 2 ** round(math.log2(4 * math.sqrt(n))) if n >= 100_000 else 256
    nlist = min(nlist, 4096)
    probes = [{"nprobe": p} for p in (8, 16, 32, 64, 128) if p <= nlist]
    return [("Flat", [{}]),
            ("HNSW32", [{"efSearch": e} for e in (32, 64, 128, 256)]),
            (f"IVF{nlist},Flat", probes),
            (f"IVF{nlist},SQ8", probes),
            (f"IVF{nlist},PQ64", probes),
            (f"OPQ64,IVF{nlist},PQ64", probes)]


def single_query_ms(index: faiss.Index, queries: np.ndarray, reps: int = 200) -> float:
    index.search(queries[:1], K)
    times = []
    for q in queries[:reps]:
        start = time.perf_counter()
        index.search(q[None], K)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def batch_vs_single(index: faiss.Index, queries: np.ndarray, batch: int = BATCH, rounds: int = 5) -> dict[str, float]:
    """Process CPU ms per query of one search of `batch` queries against `batch` one-query searches of the same
    queries, interleaved (`core.timing.interleaved`), medians over `rounds`; results checked identical. Both
    go through `index.store.search_faiss`, as the server's searches do (BLAS for batches, the scan for one query)."""
    qs = np.ascontiguousarray(queries[:batch])
    singles = np.concatenate([search_faiss(index, x[None], K)[1] for x in qs])
    if not np.array_equal(singles, search_faiss(index, qs, K)[1]):
        raise AssertionError(f"a batched search of {batch} returned other ids than {batch} single searches")
    t = interleaved({"single": lambda: [search_faiss(index, x[None], K) for x in qs],
                     "batch": lambda: search_faiss(index, qs, K)}, rounds=rounds, warmup=1)
    single = statistics.median(t["single"].cpu) * 1e3 / len(qs)
    batched = statistics.median(t["batch"].cpu) * 1e3 / len(qs)
    return {"batch": len(qs), "single_cpu_ms_per_query": round(single, 4),
            "batched_cpu_ms_per_query": round(batched, 4), "single_over_batched": round(single / batched, 2)}


def batched_qps(index: faiss.Index, queries: np.ndarray) -> float:
    start = time.perf_counter()
    index.search(queries, K)
    return len(queries) / (time.perf_counter() - start)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / K for a, b in zip(found, truth)]))


def bench_ann(sizes: Sequence[int], *, dim: int = 512, queries: int = 1000, factories: Sequence[str] | None = None,
              on_result: Callable[[dict], None] | None = None, log=print) -> list[dict]:
    """One result row per (size, factory, search setting); see the module docstring."""
    rows = []
    for n in sizes:
        log(f"[ann] generating {n} x {dim} synthetic vectors")
        data = synthetic_vectors(n, dim, seed=1)
        q = synthetic_vectors(queries, dim, seed=2)
        exact = faiss.IndexFlatIP(dim)  # the reference: brute force, outside the code being measured
        exact.add(data)
        truth = exact.search(q, K)[1]
        del exact
        plan = default_factories(n)
        if factories:
            wanted = set(factories)
            plan = [(f, s) for f, s in plan if f in wanted] + [(f, sweep_for(f)) for f in factories
                                                                if f not in {p for p, _ in plan}]
        flat_ms = None
        for factory, settings in plan:
            gc.collect()
            rss0, start = rss_bytes(), time.perf_counter()
            index = new_index(dim, factory)
            index = train_index(index, data[sample_rows(n)], factory)
            add_blocks(index, [(np.arange(n, dtype=np.int64), data)], factory)
            build_s = time.perf_counter() - start
            rss_delta = rss_bytes() - rss0
            size = int(faiss.serialize_index(index).nbytes)
            for params in settings:
                apply_search_params(index, params)
                _, ids = index.search(q, K)
                row = {"n": n, "dim": dim, "factory": factory, "search_params": params,
                       "build_s": round(build_s, 2), "index_bytes": size, "rss_delta_bytes": int(rss_delta),
                       "single_query_ms": round(single_query_ms(index, q), 4),
                       "batched_qps": round(batched_qps(index, q), 1),
                       "recall@10": round(recall(ids, truth), 4)}
                if factory == "Flat":
                    flat_ms = row["single_query_ms"]
                    row["batch_vs_single"] = batch_vs_single(index, q)
                row["speedup_vs_flat"] = round(flat_ms / row["single_query_ms"], 2) if flat_ms else None
                rows.append(row)
                log(f"[ann] n={n} {factory} {params or ''}: build {row['build_s']} s, {size / 2**20:.1f} MiB, "
                    f"{row['single_query_ms']} ms/query ({row['speedup_vs_flat']}x Flat), "
                    f"{row['batched_qps']} QPS batched, recall@10 {row['recall@10']}")
                if on_result:
                    on_result(row)
            del index
    return rows


def sweep_for(factory: str) -> list[dict[str, float]]:
    if "HNSW" in factory:
        return [{"efSearch": e} for e in (32, 64, 128, 256)]
    if "IVF" in factory:
        return [{"nprobe": p} for p in (8, 16, 32, 64, 128)]
    return [{}]


def bench_teacher(teacher: str | os.PathLike, items: Sequence[ImageItem], *, batch_size: int = 32,
                  workers: int | None = None, reps: int = 2, log=print) -> dict[str, Any]:
    """Raw ORT images/s on pre-decoded tensors vs the full pipeline's images/s on the same images, interleaved."""
    from asymsearch.index.pipeline import embed_into_shards, load_batch
    from asymsearch.index.shards import ShardStore
    embedder = OnnxEmbedder(teacher)
    spec = embedder.manifest.preprocessing
    log(f"[teacher] pre-decoding {len(items)} images")
    decoded = load_batch(items, range(len(items)), [spec]).arrays[0]
    raw, piped = [], []
    tmp = Path(tempfile.mkdtemp(prefix="asymsearch-bench-"))
    try:
        embedder.embed_arrays(decoded[:batch_size])  # warm up
        for rep in range(reps):
            start = time.perf_counter()
            for b in range(0, len(decoded), batch_size):
                embedder.embed_arrays(decoded[b:b + batch_size])
            raw.append(len(decoded) / (time.perf_counter() - start))
            store = ShardStore.open(tmp / f"rep{rep}", {"count": len(items), "shard_size": 4096,
                                                        "dim": embedder.dim}, resume=False)
            start = time.perf_counter()
            embed_into_shards(items, embedder, store, batch_size=batch_size, workers=workers, progress=False)
            piped.append(len(items) / (time.perf_counter() - start))
            log(f"[teacher] rep {rep}: raw ORT {raw[-1]:.2f} img/s, full pipeline {piped[-1]:.2f} img/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    raw_m, piped_m = statistics.median(raw), statistics.median(piped)
    return {"teacher": str(teacher), "architecture": embedder.manifest.architecture,
            "input": embedder.manifest.preprocessing.crop, "images": len(items), "batch_size": batch_size,
            "decode_workers": workers, "reps": reps, "raw_ort_img_s": round(raw_m, 2),
            "pipeline_img_s": round(piped_m, 2), "ratio": round(piped_m / raw_m, 3),
            "raw_runs": [round(v, 2) for v in raw], "pipeline_runs": [round(v, 2) for v in piped],
            "cpu_count": os.cpu_count()}


def write_results(path_md: Path, command: str, teacher: dict | None, ann: list[dict]) -> None:
    """docs/results/<name>.md and .json: the exact command, then the tables."""
    path_md.parent.mkdir(parents=True, exist_ok=True)
    check_writable(path_md.with_suffix(".json"))
    payload = {"command": command, "teacher": teacher, "ann": ann,
               "machine": {"cpu_count": os.cpu_count(), "faiss": faiss.__version__,
                           "faiss_gpus": faiss.get_num_gpus(), "faiss_threads": faiss.omp_get_max_threads()},
               "provenance": provenance()}
    path_md.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# bench index", "", f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} CPU cores (shared with other jobs), faiss {faiss.__version__} with "
             f"{faiss.omp_get_max_threads()} OpenMP thread(s), {faiss.get_num_gpus()} GPUs. Speeds are ratios within "
             f"this one run; absolute numbers are noisy. Single-query latency is the median of 200 one-query "
             f"searches; batched QPS is one search of all the queries.", ""]
    if teacher:
        lines += ["## Teacher embedding: raw onnxruntime vs the full build pipeline", "",
                  "| model | input | images | batch | raw ORT img/s | pipeline img/s | ratio |", "|---|---|---|---|---|---|---|",
                  f"| {teacher['architecture'].get('backbone')} | {teacher['input']} | {teacher['images']} | "
                  f"{teacher['batch_size']} | {teacher['raw_ort_img_s']} | {teacher['pipeline_img_s']} | "
                  f"{teacher['ratio']} |", ""]
    if ann:
        lines += ["## faiss on synthetic clustered 512-d vectors (queries not in the database)", "",
                  "| n | factory | params | build s | index MiB | ms/query | x Flat | batched QPS | recall@10 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ann:
            params = ",".join(f"{k}={int(v)}" for k, v in r["search_params"].items()) or "-"
            lines.append(f"| {r['n']:,} | {r['factory']} | {params} | {r['build_s']} | "
                         f"{r['index_bytes'] / 2**20:.1f} | {r['single_query_ms']} | {r['speedup_vs_flat']} | "
                         f"{r['batched_qps']} | {r['recall@10']} |")
        lines.append("")
        pairs = [r for r in ann if "batch_vs_single" in r]
        if pairs:
            lines += [f"## Flat: one search of {BATCH} queries vs {BATCH} single searches (process CPU, interleaved)",
                      "", "| n | single CPU ms/query | batched CPU ms/query | single / batched |", "|---|---|---|---|"]
            for r in pairs:
                b = r["batch_vs_single"]
                lines.append(f"| {r['n']:,} | {b['single_cpu_ms_per_query']} | {b['batched_cpu_ms_per_query']} | "
                             f"{b['single_over_batched']} |")
            lines.append("")
    path_md.write_text("\n".join(lines))


def check_writable(path: Path, key: str = "ann") -> None:
    """Never overwrite a JSON file that is not an earlier bench result (e.g. a model manifest beside --out)."""
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and "command" in earlier and key in earlier):
            raise UserError(f"{path} exists and is not a bench result; choose another --out")


def log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- --auto on student queries (issue 24)


def resembling_blocks(real: np.ndarray, n: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """`resembling_vectors` as (an iterator of (rows, dim) blocks, the description): the real vectors, then blocks
    of up to 100,000 synthetic ones, so a database of any size is written without being held whole."""
    real = np.ascontiguousarray(real, dtype=np.float32)
    r, dim = real.shape
    if n < r:
        raise UserError(f"database size {n} is below the {r} real vectors")
    sims = real @ real.T
    np.fill_diagonal(sims, -np.inf)
    target = float(np.median(sims.max(axis=1)))
    centred = real - real.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    shape = (s[:, None] / math.sqrt(r)) * vt  # rows: principal directions scaled by their standard deviations
    rng = np.random.default_rng(seed)

    def draw(m: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
        around = rng.integers(0, r, m)
        x = real[around] + scale * (rng.normal(size=(m, len(s))).astype(np.float32) @ shape)
        return x / np.linalg.norm(x, axis=1, keepdims=True), around

    lo, hi = 0.0, 4.0  # bisect the noise scale on a sample
    for _ in range(30):
        mid = (lo + hi) / 2
        x, around = draw(2000, mid)
        lo, hi = (mid, hi) if np.median(np.sum(x * real[around], axis=1)) > target else (lo, mid)
    scale = (lo + hi) / 2

    def blocks():
        yield real
        for start in range(r, n, 100_000):
            yield draw(min(100_000, n - start), scale)[0].astype(np.float32)
    return blocks(), {"real": r, "synthetic": n - r, "noise_scale": round(scale, 4),
                      "median_nn_cosine_real": round(target, 4), "seed": seed,
                      "rule": "real teacher vectors, then each synthetic one = a random real vector + Gaussian noise "
                              "with the real vectors' covariance x noise_scale, L2-normalised; noise_scale makes the "
                              "median cosine to its real vector equal the real vectors' median nearest-neighbour "
                              "cosine"}


def resembling_vectors(real: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """A database of `n` unit vectors: the `real` ones (R, dim) first, then n - R synthetic ones, each a random real
    vector plus Gaussian noise shaped like the real vectors' own covariance (their principal directions and
    variances), scaled so that a synthetic vector's cosine to the real vector it was drawn around is, in the median,
    the median cosine of a real vector to its nearest other real vector: "another picture of a similar thing".
    Returns the vectors and a description of the construction (for the results page)."""
    blocks, about = resembling_blocks(real, n, seed)
    out = np.empty((n, np.shape(real)[1]), np.float32)
    start = 0
    for block in blocks:
        out[start:start + len(block)] = block
        start += len(block)
    return out, about


def write_resembling(path: Path, real: np.ndarray, n: int, seed: int = 0) -> dict[str, Any]:
    """`resembling_vectors` written to the .npy `path` block by block (never whole in memory); its description."""
    blocks, about = resembling_blocks(real, n, seed)
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (n, int(np.shape(real)[1]))})
        for block in blocks:
            f.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
    return about


def peak_rss_bytes() -> int:
    """The most memory this process has held resident so far (the kernel's high-water mark, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_auto(real: np.ndarray, tune: np.ndarray, evaluate: np.ndarray, sizes: Sequence[int], *,
               target_recall: float = 0.95, min_speedup: float = 10.0, max_memory: str = "4G",
               threads: int | None = None, log=print, work_dir: str | None = None) -> list[dict]:
    """`index build --auto` (`index.auto.choose_index`) on databases of `sizes` made from `real` teacher vectors
    (`resembling_vectors`), tuned on the student queries `tune` (validation classes) with the latency target
    exact/`min_speedup`, then the chosen index measured once on the student queries `evaluate` (evaluation classes):
    recall@10 against exact search and single-query latency at the server's faiss thread count, for every search
    setting of the chosen factory. Also shows what tuning on database vectors would have picked (from the same
    sweep, which records both recalls) and that setting's recall on the evaluation queries."""
    from asymsearch.index.config import SERVING_SEARCH_THREADS
    threads = SERVING_SEARCH_THREADS if threads is None else threads
    rows = []
    work = Path(tempfile.mkdtemp(prefix="asymsearch-bench-auto-", dir=work_dir))
    try:
        for n in sizes:
            rows.append(_bench_auto_size(real, tune, evaluate, n, work, target_recall=target_recall,
                                         min_speedup=min_speedup, max_memory=max_memory, threads=threads, log=log))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _bench_auto_size(real, tune, evaluate, n, work, *, target_recall, min_speedup, max_memory, threads, log) -> dict:
    """One size of `bench_auto`: the database written to `work` block by block, then exact search, --auto and the
    evaluation sweep, with the process's peak RSS."""
    from asymsearch.index.auto import (Budget, Queries, VectorSource, build_candidate, choose_index, nlist_for,
                                       omp_threads, parse_size, sweep)
    log(f"[auto] database of {n}: {len(real)} real teacher vectors + synthetic ones around them, written to "
        f"{work} block by block")
    path = work / f"database-{n}.npy"
    construction = write_resembling(path, real, n)
    data = VectorSource.of_npy(path)
    exact = build_candidate(data, "Flat")  # exact search over all n, storage reserved, filled block by block
    truth = exact.search(evaluate, K)[1]
    with omp_threads(threads) as used:
        exact_ms = single_query_ms(exact, evaluate)
    del exact
    gc.collect()
    budget = Budget(parse_size(max_memory), target_ms=exact_ms / min_speedup, target_recall=target_recall)
    log(f"[auto] n={n}: exact {exact_ms:.3f} ms/query ({used} thread(s)); target {budget.target_ms:.3f} ms, "
        f"recall@10 >= {target_recall}; peak RSS so far {peak_rss_bytes() / 2**30:.2f} GiB")
    start = time.perf_counter()
    choice = choose_index(data, budget, queries=Queries(tune, "student queries, validation classes"),
                          threads=threads, progress=True)
    seconds = time.perf_counter() - start
    db_pick = next(({"factory": c["factory"], "search_params": s["search_params"],
                     "recall@10_database_queries": s["recall@10_database_queries"]}
                    for c in choice.report["candidates"] for s in c.get("settings", [])
                    if s["recall@10_database_queries"] >= target_recall and s["ms"] <= budget.target_ms), None)
    table = []
    for params in sweep(choice.factory, nlist_for(n)):
        apply_search_params(choice.index, params)
        with omp_threads(threads):
            ids = choice.index.search(evaluate, K)[1]
            ms = single_query_ms(choice.index, evaluate)
        table.append({"search_params": params, "recall@10_eval_student": round(recall(ids, truth), 4),
                      "ms": round(ms, 4), "speedup_vs_exact": round(exact_ms / ms, 2),
                      "chosen": params == choice.search_params,
                      "database_tuning_pick": bool(db_pick and db_pick["factory"] == choice.factory
                                                   and db_pick["search_params"] == params)})
        log(f"[auto] n={n} {choice.factory} {params}: eval recall@10 {table[-1]['recall@10_eval_student']}, "
            f"{ms:.3f} ms ({exact_ms / ms:.1f}x exact)")
    chosen = next(t for t in table if t["chosen"])
    row = {"n": n, "dim": int(data.dim), "database": construction, "search_threads": int(used),
           "exact_ms_per_query": round(exact_ms, 4), "budget": dataclasses.asdict(budget),
           "tune_queries": int(len(tune)), "eval_queries": int(len(evaluate)), "auto_seconds": round(seconds, 1),
           "chosen": choice.factory, "search_params": choice.search_params,
           "recall@10_tune_student": choice.report["recall@10_student_queries"],
           "recall@10_database_queries": choice.report["recall@10_database_queries"],
           "recall@10_eval_student": chosen["recall@10_eval_student"], "eval_ms": chosen["ms"],
           "eval_speedup_vs_exact": chosen["speedup_vs_exact"],
           "target_met_on_eval": bool(chosen["recall@10_eval_student"] >= target_recall
                                      and chosen["speedup_vs_exact"] >= min_speedup),
           "database_tuning_pick": db_pick, "eval_sweep": table, "auto_report": choice.report,
           "memory": {"peak_rss_bytes": peak_rss_bytes(), "database_bytes": int(n) * int(data.dim) * 4,
                      "how": "the database written to a temporary .npy and read block by block (no memory "
                             "map); peak RSS is this process's high-water mark (VmHWM) over the whole run"}}
    del choice
    path.unlink()
    gc.collect()
    log(f"[auto] n={n}: peak RSS {row['memory']['peak_rss_bytes'] / 2**30:.2f} GiB")
    return row


def write_auto_results(path_md: Path, command: str, rows: list[dict], about: str = "") -> None:
    """docs/results/<name>.md and .json for `bench_auto`."""
    path_md.parent.mkdir(parents=True, exist_ok=True)
    check_writable(path_md.with_suffix(".json"), key="auto")
    payload = {"command": command, "about": about, "auto": rows,
               "machine": {"cpu_count": os.cpu_count(), "faiss": faiss.__version__}, "provenance": provenance()}
    path_md.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# bench index: --auto tuned on student queries", "", f"Command: `{command}`", "", about, "",
             "| n | exact ms | chosen | params | recall@10 tune (student) | database-vector recall | "
             "recall@10 eval (student) | ms | x exact | database tuning would pick | its eval recall | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        params = ",".join(f"{k}={int(v)}" for k, v in r["search_params"].items()) or "-"
        pick = r["database_tuning_pick"]
        pick_eval = next((t["recall@10_eval_student"] for t in r["eval_sweep"] if t["database_tuning_pick"]), None)
        pick_text = (f"{pick['factory']} " + ",".join(f"{k}={int(v)}" for k, v in pick["search_params"].items())
                     if pick else "-")
        lines.append(f"| {r['n']:,} | {r['exact_ms_per_query']} | {r['chosen']} | {params} | "
                     f"{r['recall@10_tune_student']} | {r['recall@10_database_queries']} | "
                     f"{r['recall@10_eval_student']} | {r['eval_ms']} | {r['eval_speedup_vs_exact']} | {pick_text} | "
                     f"{pick_eval if pick_eval is not None else '-'} | "
                     f"{round(r['memory']['peak_rss_bytes'] / 2**30, 2) if 'memory' in r else '-'} |")
    for r in rows:
        lines += ["", f"## n = {r['n']:,}: every setting of {r['chosen']} on the evaluation queries", "",
                  "| params | recall@10 eval (student) | ms/query | x exact | |", "|---|---|---|---|---|"]
        for t in r["eval_sweep"]:
            params = ",".join(f"{k}={int(v)}" for k, v in t["search_params"].items()) or "-"
            mark = ", ".join(m for m, on in (("chosen by --auto", t["chosen"]),
                                             ("database-vector tuning's pick", t["database_tuning_pick"])) if on)
            lines.append(f"| {params} | {t['recall@10_eval_student']} | {t['ms']} | {t['speedup_vs_exact']} | {mark} |")
    path_md.write_text("\n".join(lines) + "\n")
