"""`asymsearch bench serve`: the server under load, against the in-process limit, side by side in one run.

1. Artifacts: the given `--index/--student/--images`, or generated on the spot: synthetic images
   (`asymsearch.core.synthetic`), a random-weight convolutional teacher and student exported as ONNX with
   manifests (no training: speed does not depend on the weights), an index of the images plus random unit-vector
   distractors (so that faiss does real work).
2. The in-process limit: the same `Pipeline` (decode pool + batched student + batched search) the server runs,
   with no gRPC, fed by a closed loop of 16, 64 or all queries in flight (the best is the limit; measured before
   and after the server runs, the better one kept); and one batched faiss search of 16 queries.
3. The server (`asymsearch serve`, its own process) and a pool of client processes (`asymsearch.bench.loadgen`):
   throughput and p50/p95/p99 at each concurrency for image and vector queries, with the ratio to the limit.
4. A soak (errors, the server's RSS at start and end), and an overload run (a small queue, far more callers).

Writes JSON and a latency-vs-concurrency PNG. Load goes to 127.0.0.1 only, bounded in time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from asymsearch.core.errors import UserError

SEARCH_BATCH_FOR_TARGET = 16


@dataclasses.dataclass
class BenchConfig:
    workdir: Path
    out_json: Path
    out_png: Path
    index: Path | None = None
    student: Path | None = None
    images: Path | None = None
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    seconds: float = 5.0
    soak_seconds: float = 60.0
    soak_concurrency: int = 16
    k: int = 10
    client_processes: int = 8
    distractors: int = 100_000
    query_images: int = 64
    batch_max_size: int = 32
    batch_max_delay_ms: float = 1.0
    embed_max_batch: int | None = None
    embed_threads: int = 1
    search_threads: int = 1
    decode_workers: int = 2
    queue_size: int = 256
    workers: int = 64
    overload_concurrency: int = 128
    overload_queue: int = 16  # 0: no overload run
    lead_s: float = 1.5  # client warm-up before each measured window
    limit_images: int = 192  # queries per measurement of the in-process limit
    limit_vectors: int = 1024
    limit_rounds: int = 1
    sweep: tuple[tuple[int, float, int | None], ...] = ()  # (max batch, max delay ms, embed batch) tried at c=16
    command: str = ""


# -- artifacts ---------------------------------------------------------------------------------------------------

def make_conv_onnx(path: Path, *, role: str, teacher_id: str, seed: int, dim: int = 64, crop: int = 160,
                   widths: Sequence[int] = (24, 48, 96, 192)) -> Path:
    """A random-weight CNN (4 stride-2 3x3 convs + ReLU, global average pool, linear, L2 norm) with a manifest:
    about 0.1 GFLOP per 160 px image, the cost class of a small mobile student."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from asymsearch.core.manifest import ModelManifest, Preprocessing, manifest_path_for, sha256_file

    rng = np.random.default_rng(seed)
    nodes, inits, prev, cin = [], [], "images", 3
    for i, cout in enumerate(widths):
        w = rng.normal(0, np.sqrt(2.0 / (9 * cin)), size=(cout, cin, 3, 3)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(np.zeros(cout, np.float32), f"B{i}")]
        nodes += [helper.make_node("Conv", [prev, f"W{i}", f"B{i}"], [f"c{i}"], kernel_shape=[3, 3], strides=[2, 2],
                                   pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
        prev, cin = f"r{i}", cout
    inits += [numpy_helper.from_array(rng.normal(size=(cin, dim)).astype(np.float32), "P"),
              numpy_helper.from_array(np.array([1], np.int64), "axes"),
              numpy_helper.from_array(np.array(1e-12, np.float32), "eps")]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
              helper.make_node("MatMul", ["flat", "P"], ["proj"]),
              helper.make_node("ReduceL2", ["proj", "axes"], ["norm"], keepdims=1),
              helper.make_node("Max", ["norm", "eps"], ["safe"]),
              helper.make_node("Div", ["proj", "safe"], ["embeddings"])]
    graph = helper.make_graph(nodes, "bench_cnn",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, crop, crop])],
                              [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", dim])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    ModelManifest(role=role, architecture={"backbone": "bench_cnn", "widths": list(widths), "dim": dim}, dim=dim,
                  input_size=crop, preprocessing=Preprocessing(resize=crop, crop=crop, mean=(0.485, 0.456, 0.406),
                                                               std=(0.229, 0.224, 0.225)),
                  opset=18, sha256=sha256_file(path), teacher_id=teacher_id,
                  model_id=teacher_id if role == "teacher" else f"bench-student-of-{teacher_id}",
                  ).save(manifest_path_for(path))
    return path


def add_distractors(index_dir: Path, n: int, seed: int = 0) -> int:
    """Append `n` random unit vectors (metadata path `distractor/N`, label `distractor`) to a plain index folder."""
    import faiss

    from asymsearch.core.manifest import IndexManifest

    manifest = IndexManifest.load(index_dir / "manifest.json")
    index = faiss.read_index(str(index_dir / "index.faiss"))
    start = int(manifest.build.get("next_id", index.ntotal))
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, manifest.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(start, start + n, dtype=np.int64)
    if isinstance(index, faiss.IndexIDMap):
        index.add_with_ids(vectors, ids)
    else:
        index.add(vectors)
    faiss.write_index(index, str(index_dir / "index.faiss"))
    con = sqlite3.connect(index_dir / "meta.sqlite")
    with con:
        con.executemany("INSERT INTO items(id, path, label) VALUES (?, ?, ?)",
                        ((int(i), f"distractor/{i}", "distractor") for i in ids))
    con.close()
    build = {**manifest.build, "next_id": start + n, "distractors": n}
    IndexManifest(**{**manifest.to_dict(), "count": int(index.ntotal), "build": build}).save(
        index_dir / "manifest.json")
    return int(index.ntotal)


def prepare_artifacts(cfg: BenchConfig) -> dict[str, Any]:
    from asymsearch.core.data import list_image_folder

    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if cfg.index and cfg.student:
        images = Path(cfg.images) if cfg.images else None
        if images is None:
            raise UserError("with --index and --student, give --images (query images) too")
        source = "given"
        index, student = Path(cfg.index), Path(cfg.student)
    elif cfg.index or cfg.student:
        raise UserError("give both --index and --student, or neither (then everything is generated)")
    else:
        from asymsearch.core.synthetic import make_synthetic_dataset
        from asymsearch.index.build import build_index
        source = "generated"
        images = cfg.images or work / "images"
        if not cfg.images and not (images / "class_15").is_dir():
            make_synthetic_dataset(images, num_classes=16, per_class=16, size=256, seed=0)
        teacher = make_conv_onnx(work / "teacher.onnx", role="teacher", teacher_id="bench-teacher", seed=1)
        student = make_conv_onnx(work / "student.onnx", role="student", teacher_id="bench-teacher", seed=2,
                                 widths=(16, 32, 64, 128))
        index = work / "index"
        build_index(teacher, images, index, overwrite=True, progress=False)
        if cfg.distractors:
            add_distractors(index, cfg.distractors)
    items = list_image_folder(images)
    if not items:
        raise UserError(f"no images in {images}")
    step = max(1, len(items) // cfg.query_images)
    paths = [it.path for it in items[::step][:cfg.query_images]]
    return {"source": source, "index": index, "student": student, "query_paths": paths}


# -- the in-process limit ----------------------------------------------------------------------------------------

def measure_limit(cfg: BenchConfig, index: Path, student: Path, paths: list[str], vectors: list[list[float]]
                  ) -> dict[str, Any]:
    """Throughput of the server's own pipeline without gRPC (the best over 16, 64 and all queries in flight), and
    the time of one batched faiss search of `SEARCH_BATCH_FOR_TARGET` queries (median of 20)."""
    from asymsearch.server.batching import BatchingConfig, Pipeline
    from asymsearch.server.engine import QueryEngine

    data = [Path(p).read_bytes() for p in paths]
    out: dict[str, Any] = {}
    if cfg.search_threads > 0:
        import faiss
        faiss.omp_set_num_threads(cfg.search_threads)  # for the batched search timed on this thread below
    with QueryEngine.open(index, student, max_k=max(cfg.k, 10), intra_op_threads=cfg.embed_threads) as engine:
        n_img, n_vec, rounds = cfg.limit_images, cfg.limit_vectors, cfg.limit_rounds
        pipeline = Pipeline(engine, BatchingConfig(max_batch=cfg.batch_max_size, max_delay_ms=cfg.batch_max_delay_ms,
                                                   max_queue=max(n_img, n_vec),
                                                   decode_workers=cfg.decode_workers,
                                                   max_embed_batch=cfg.embed_max_batch,
                                                   search_threads=cfg.search_threads))
        try:
            for kind, n in (("image", n_img), ("vector", n_vec)):
                by_window, cpu = {}, []
                for window in sorted({16, 64, n}):
                    for _ in range(rounds):
                        qps = _closed_loop(pipeline, kind, data, vectors, n, window, cfg.k)
                        by_window[str(window)] = max(qps, by_window.get(str(window), 0.0))
                        cpu.append(_closed_loop.cpu_ms_per_query)
                out[f"{kind}_qps_by_in_flight"] = by_window
                out[f"{kind}_qps"] = max(by_window.values())
                out[f"{kind}_cpu_ms_per_query"] = min(cpu)  # process CPU time / queries: robust to a busy machine
        finally:
            pipeline.close(10)
        q = np.asarray(vectors[:SEARCH_BATCH_FOR_TARGET], np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        times = []
        for _ in range(20):
            start = time.perf_counter()
            engine.search_batch(q, [cfg.k] * len(q))
            times.append(time.perf_counter() - start)
        out["search_batch16_ms"] = float(np.median(times) * 1e3)
        start = time.perf_counter()
        for d in data[:32]:
            engine.prepare_image(d)
        out["decode_ms_per_image"] = (time.perf_counter() - start) / min(32, len(data)) * 1e3
        pixels = np.stack([engine.prepare_image(d) for d in data[:cfg.embed_max_batch or cfg.batch_max_size]])
        start = time.perf_counter()
        for _ in range(5):
            engine.embed_prepared(pixels)
        out["embed_ms_per_image_batched"] = (time.perf_counter() - start) / (5 * len(pixels)) * 1e3
        out["index_count"] = engine.index.count
        out["dim"] = engine.dim
    return out


def _closed_loop(pipeline, kind: str, data: list[bytes], vectors: list[list[float]], n: int, window: int,
                 k: int) -> float:
    """Queries per second of `n` queries through `pipeline` with at most `window` in flight (a new one is
    submitted as one finishes, as `window` closed-loop clients would)."""
    slots = threading.Semaphore(window)
    futures = []
    _closed_loop.cpu_start = time.process_time()
    start = time.perf_counter()
    for i in range(n):
        slots.acquire()
        if kind == "image":
            f = pipeline.submit_image(data[i % len(data)], k)
        else:
            f = pipeline.submit_vector(vectors[i % len(vectors)], k)
        f.add_done_callback(lambda _: slots.release())
        futures.append(f)
    for f in futures:
        f.result(120)
    seconds = time.perf_counter() - start
    _closed_loop.cpu_ms_per_query = (time.process_time() - _closed_loop.cpu_start) / n * 1e3
    return n / seconds


def query_vectors(student: Path, paths: list[str]) -> list[list[float]]:
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.core.preprocess import decode_image
    model = OnnxEmbedder(student)
    return model.embed_images([decode_image(p) for p in paths]).tolist()


# -- the server process ------------------------------------------------------------------------------------------

class ServerProcess:
    """`asymsearch serve` on 127.0.0.1 in its own process; `.address`, `.rss_mb()`; SIGTERM on exit."""

    def __init__(self, index: Path, student: Path, *, max_k: int, batch_max_size: int, batch_max_delay_ms: float,
                 queue_size: int, workers: int, decode_workers: int, embed_max_batch: int | None,
                 embed_threads: int, search_threads: int) -> None:
        cmd = [sys.executable, "-m", "asymsearch.cli.main", "serve", "--index", str(index), "--student", str(student),
               "--host", "127.0.0.1", "--port", "0", "--log-format", "json", "--max-k", str(max_k),
               "--batch-max-size", str(batch_max_size), "--batch-max-delay-ms", str(batch_max_delay_ms),
               "--queue-size", str(queue_size), "--workers", str(workers), "--decode-workers", str(decode_workers),
               "--embed-threads", str(embed_threads), "--search-threads", str(search_threads),
               "--metrics-port", "0"]
        if embed_max_batch:
            cmd += ["--embed-max-batch", str(embed_max_batch)]
        self.settings = {"batch_max_size": batch_max_size, "batch_max_delay_ms": batch_max_delay_ms,
                         "queue_size": queue_size, "workers": workers, "decode_workers": decode_workers,
                         "embed_max_batch": embed_max_batch, "embed_threads": embed_threads,
                         "search_threads": search_threads}
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.log: list[str] = []
        port, deadline = None, time.monotonic() + 120
        self.metrics_port = None
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if '"event": "listening"' in line:
                self.metrics_port = json.loads(line).get("metrics_port")
            if '"event": "serving"' in line:
                port = json.loads(line)["port"]
        if port is None:
            self.stop()
            raise UserError("the server did not start: " + "".join(self.log[-5:]))
        self.address = f"127.0.0.1:{port}"
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _read_rest(self) -> None:
        for line in self.proc.stderr:
            self.log.append(line)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def requests_served(self) -> float:
        """Search RPCs answered so far (any status), from the server's own /metrics."""
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        pattern = r'^asymsearch_requests_total\{[^}]*method="Search\w+"[^}]*\} (\S+)'
        return sum(float(v) for v in re.findall(pattern, text, re.M))

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    lat = np.asarray(result["latencies"]) * 1e3
    errors = {c: n for c, n in result["codes"].items() if c != "OK"}
    out = {"qps": result["finished_in_window"] / result["duration"], "ok": result["codes"].get("OK", 0),
           "errors": errors, "processes": result["processes"]}
    if len(lat):
        out.update({f"p{q}_ms": float(np.percentile(lat, q)) for q in (50, 95, 99)})
        out["max_ms"] = float(lat.max())
    return out


def _server_kw(cfg: BenchConfig, **over: Any) -> dict[str, Any]:
    kw = dict(max_k=max(cfg.k, 10), batch_max_size=cfg.batch_max_size, batch_max_delay_ms=cfg.batch_max_delay_ms,
              queue_size=cfg.queue_size, workers=cfg.workers, decode_workers=cfg.decode_workers,
              embed_max_batch=cfg.embed_max_batch, embed_threads=cfg.embed_threads,
              search_threads=cfg.search_threads)
    kw.update(over)
    return kw


def run_bench(cfg: BenchConfig, log=print) -> dict[str, Any]:
    from asymsearch.bench.loadgen import ClientPool

    art = prepare_artifacts(cfg)
    paths = art["query_paths"]
    vectors = query_vectors(art["student"], paths)
    log(f"artifacts ({art['source']}): index {art['index']}, student {art['student']}, {len(paths)} query images")
    limit = measure_limit(cfg, art["index"], art["student"], paths, vectors)
    limit["measured"] = "before the server levels"
    log(f"in-process limit: {limit['image_qps']:.0f} image q/s, {limit['vector_qps']:.0f} vector q/s; one batched "
        f"search of {SEARCH_BATCH_FOR_TARGET}: {limit['search_batch16_ms']:.2f} ms ({limit['index_count']} items)")
    report: dict[str, Any] = {
        "command": cfg.command, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_start": os.getloadavg()},
        "artifacts": {"source": art["source"], "index": str(art["index"]), "student": str(art["student"]),
                      "query_images": len(paths)},
        "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("workdir", "out_json", "out_png")},
        "limit": limit, "levels": {"image": {}, "vector": {}}}
    payloads = {"image": paths, "vector": vectors}
    with ClientPool(cfg.client_processes) as pool:
        with ServerProcess(art["index"], art["student"], **_server_kw(cfg)) as server:
            report["server_settings"] = server.settings
            for kind in ("image", "vector"):
                for c in cfg.concurrency:
                    cpu0, n0 = server.cpu_seconds(), server.requests_served()
                    s = summarise(pool.run(server.address, kind, c, cfg.seconds, cfg.k, payloads[kind],
                                           lead_s=cfg.lead_s))
                    s["server_cpu_ms_per_query"] = ((server.cpu_seconds() - cpu0) * 1e3
                                                    / max(1.0, server.requests_served() - n0))
                    s["ratio_to_limit"] = s["qps"] / limit[f"{kind}_qps"]
                    report["levels"][kind][str(c)] = s
                    log(f"{kind:6s} c={c:3d}: {s['qps']:7.1f} q/s ({s['ratio_to_limit']:.2f}x limit)  "
                        f"p50 {s.get('p50_ms', float('nan')):6.1f}  p95 {s.get('p95_ms', float('nan')):6.1f}  "
                        f"p99 {s.get('p99_ms', float('nan')):6.1f} ms  errors {s['errors'] or 0}")
            if cfg.soak_seconds > 0:
                rss_start = server.rss_mb()
                samples: list[tuple[float, float]] = []
                stop = threading.Event()

                def sample() -> None:
                    t0 = time.monotonic()
                    while not stop.wait(max(1.0, cfg.soak_seconds / 30)):
                        if server.alive():
                            samples.append((round(time.monotonic() - t0, 1), round(server.rss_mb(), 1)))
                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                s = summarise(pool.run(server.address, "image", cfg.soak_concurrency, cfg.soak_seconds, cfg.k,
                                       paths, lead_s=cfg.lead_s))
                stop.set()
                rss_end = server.rss_mb()
                s.update(seconds=cfg.soak_seconds, concurrency=cfg.soak_concurrency, rss_start_mb=rss_start,
                         rss_end_mb=rss_end, rss_growth=rss_end / rss_start - 1, rss_samples=samples)
                report["soak"] = s
                log(f"soak {cfg.soak_seconds:.0f} s at c={cfg.soak_concurrency}: {s['ok']} ok, errors "
                    f"{s['errors'] or 0}, RSS {rss_start:.0f} -> {rss_end:.0f} MB ({100 * s['rss_growth']:+.1f}%)")
            report["server_exit_code"] = server.stop()
        if cfg.overload_queue:
            with ServerProcess(art["index"], art["student"], **_server_kw(cfg, queue_size=cfg.overload_queue)) as srv:
                rss0 = srv.rss_mb()
                s = summarise(pool.run(srv.address, "image", cfg.overload_concurrency, cfg.seconds, cfg.k, paths,
                                       lead_s=cfg.lead_s))
                s.update(concurrency=cfg.overload_concurrency, queue_size=cfg.overload_queue,
                         rss_start_mb=rss0, rss_end_mb=srv.rss_mb(), server_alive=srv.alive())
                s["exit_code"] = srv.stop()
                report["overload"] = s
                log(f"overload c={cfg.overload_concurrency}, queue {cfg.overload_queue}: {s['ok']} ok "
                    f"(p99 {s.get('p99_ms', float('nan')):.1f} ms), refused {s['errors']}, alive {s['server_alive']}")
        report["sweep"] = []
        for max_batch, delay, embed_batch in cfg.sweep:
            with ServerProcess(art["index"], art["student"],
                               **_server_kw(cfg, batch_max_size=max_batch, batch_max_delay_ms=delay,
                                            embed_max_batch=embed_batch)) as srv:
                row = {"batch_max_size": max_batch, "batch_max_delay_ms": delay, "embed_max_batch": embed_batch}
                for kind, c in (("image", 16), ("image", 1), ("vector", 16)):
                    s = summarise(pool.run(srv.address, kind, c, cfg.seconds, cfg.k, payloads[kind],
                                           lead_s=cfg.lead_s))
                    row[f"{kind}_c{c}"] = {k: s.get(k) for k in ("qps", "p50_ms", "p99_ms", "errors")}
                report["sweep"].append(row)
                log(f"sweep batch {max_batch:3d} embed {embed_batch or max_batch:3d} delay {delay:4.1f} ms: "
                    f"image c16 {row['image_c16']['qps']:.0f} q/s "
                    f"p99 {row['image_c16']['p99_ms']:.1f}; image c1 p50 {row['image_c1']['p50_ms']:.1f} ms; "
                    f"vector c16 {row['vector_c16']['qps']:.0f} q/s p99 {row['vector_c16']['p99_ms']:.1f}")
    # the machine is shared: measure the limit again and keep the better one (the ratio can only get harsher)
    again = measure_limit(cfg, art["index"], art["student"], paths, vectors)
    report["limit_after"] = again
    for kind in ("image", "vector"):
        key = f"{kind}_qps"
        if again[key] > limit[key]:
            limit[key] = again[key]
            for s in report["levels"][kind].values():
                s["ratio_to_limit"] = s["qps"] / limit[key]
    limit["search_batch16_ms"] = min(limit["search_batch16_ms"], again["search_batch16_ms"])
    for kind in ("image", "vector"):
        key = f"{kind}_cpu_ms_per_query"
        limit[key] = min(limit[key], again[key])
        for s in report["levels"][kind].values():
            # the fraction of the limit's throughput the server reaches with the same CPU time per query
            s["cpu_efficiency_vs_limit"] = limit[key] / s["server_cpu_ms_per_query"]
    limit["measured"] = "best of before and after the server levels"
    log(f"in-process limit again: {again['image_qps']:.0f} image q/s, {again['vector_qps']:.0f} vector q/s; "
        f"batched search of {SEARCH_BATCH_FOR_TARGET}: {again['search_batch16_ms']:.2f} ms (the best of both is used)")
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["targets"] = targets(report)
    Path(cfg.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out_json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(report, Path(cfg.out_png))
    Path(cfg.out_json).with_suffix(".md").write_text(markdown(report, Path(cfg.out_png).name))
    return report


def _ms(level: dict[str, Any], key: str) -> str:
    return f"{level[key]:.1f}" if key in level else "-"


def markdown(report: dict[str, Any], png_name: str) -> str:
    """The report as a results page: the command, the limit, the levels, soak, overload, sweep, targets."""
    lim = report["limit"]
    lines = ["# bench serve: the gRPC server under load vs the in-process limit", "",
             f"Command: `{report['command']}`  ",
             f"Run: {report['time']} on {report['machine']['cpus']} CPUs ({report['machine']['platform']}); load "
             f"average at start {report['machine']['loadavg_start'][0]:.1f}, at end "
             f"{report['machine']['loadavg_end'][0]:.1f} (the machine was shared with other jobs: figures are noisy, "
             f"compare only within this run).  ",
             f"Artifacts: {report['artifacts']['source']}; index {lim['index_count']} items of dim {lim['dim']}; "
             f"{report['artifacts']['query_images']} query images. Server settings: "
             f"`{json.dumps(report.get('server_settings', {}))}`.", "",
             f"![latency and throughput vs concurrency]({png_name})", "",
             "## In-process limit (same pipeline, no gRPC)", "",
             f"- image queries: **{lim['image_qps']:.0f} q/s** (by queries in flight: "
             f"{ {k: round(v) for k, v in lim.get('image_qps_by_in_flight', {}).items()} }); decode "
             f"{lim['decode_ms_per_image']:.2f} ms/image, student {lim['embed_ms_per_image_batched']:.2f} ms/image "
             f"batched",
             f"- CPU time per query (process CPU seconds / queries, robust to the busy machine): image "
             f"{lim.get('image_cpu_ms_per_query', float('nan')):.2f} ms, vector "
             f"{lim.get('vector_cpu_ms_per_query', float('nan')):.2f} ms",
             f"- vector queries: **{lim['vector_qps']:.0f} q/s**; one batched faiss search of "
             f"{SEARCH_BATCH_FOR_TARGET} queries: **{lim['search_batch16_ms']:.2f} ms**",
             f"- {lim.get('measured', '')}", "",
             "## Server (client processes over 127.0.0.1)", "",
             "| queries | concurrency | q/s | ratio to limit | server CPU ms/query | CPU efficiency vs limit | "
             "p50 ms | p95 ms | p99 ms | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("image", "vector"):
        for c, lv in report["levels"][kind].items():
            lines.append(f"| {kind} | {c} | {lv['qps']:.1f} | {lv['ratio_to_limit']:.2f} | "
                         f"{lv.get('server_cpu_ms_per_query', float('nan')):.2f} | "
                         f"{lv.get('cpu_efficiency_vs_limit', float('nan')):.2f} | {_ms(lv, 'p50_ms')} | "
                         f"{_ms(lv, 'p95_ms')} | {_ms(lv, 'p99_ms')} | {lv['errors'] or 0} |")
    soak = report.get("soak")
    if soak:
        lines += ["", "## Soak", "",
                  f"{soak['seconds']:.0f} s of image queries at concurrency {soak['concurrency']}: {soak['ok']} "
                  f"answered "
                  f"({soak['qps']:.1f} q/s, p99 {_ms(soak, 'p99_ms')} ms), errors: {soak['errors'] or 'none'}; server "
                  f"RSS {soak['rss_start_mb']:.1f} MB -> {soak['rss_end_mb']:.1f} MB "
                  f"({100 * soak['rss_growth']:+.1f}%)."]
    over = report.get("overload")
    if over:
        lines += ["", "## Overload", "",
                  f"Queue size {over['queue_size']}, {over['concurrency']} concurrent callers (each pausing 10 ms "
                  f"after an error) for {report['settings']['seconds']:.0f} s: {over['ok']} answered (p50 "
                  f"{_ms(over, 'p50_ms')} ms, p99 {_ms(over, 'p99_ms')} ms, max {_ms(over, 'max_ms')} ms), refused: "
                  f"{over['errors'] or 'none'}; server alive {over['server_alive']}, RSS {over['rss_start_mb']:.0f} -> "
                  f"{over['rss_end_mb']:.0f} MB, exit code after SIGTERM {over['exit_code']}."]
    if report.get("sweep"):
        lines += ["", "## Batching settings (sweep)", "",
                  "| max batch | embed batch | max delay ms | image c16 q/s | image c16 p99 | image c1 p50 | "
                  "vector c16 q/s | vector c16 p99 |", "|---|---|---|---|---|---|---|---|"]
        for row in report["sweep"]:
            i16, i1, v16 = row["image_c16"], row["image_c1"], row["vector_c16"]
            f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
            lines.append(f"| {row['batch_max_size']} | {row['embed_max_batch'] or row['batch_max_size']} | "
                         f"{row['batch_max_delay_ms']} | {f(i16['qps'])} | {f(i16['p99_ms'])} | {f(i1['p50_ms'])} | "
                         f"{f(v16['qps'])} | {f(v16['p99_ms'])} |")
    lines += ["", "## Targets (issue 7)", "", "| target | measured | met |", "|---|---|---|"]
    for name, t in report["targets"].items():
        shown = {k: v for k, v in t.items() if k not in ("met", "target")}
        lines.append(f"| {name}: {t['target']} | `{json.dumps(shown, default=str)}` | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, each with the measured figure and whether it was met."""
    out: dict[str, Any] = {}
    img16 = report["levels"]["image"].get("16")
    if img16:
        out["image_c16_ratio_to_limit"] = {
            "target": ">= 0.8", "measured": round(img16["ratio_to_limit"], 3),
            "cpu_efficiency_vs_limit": round(img16.get("cpu_efficiency_vs_limit", float("nan")), 3),
            "errors": img16["errors"],
            "met": img16["ratio_to_limit"] >= 0.8 and img16.get("cpu_efficiency_vs_limit", 0) >= 0.8
            and not img16["errors"]}
    vec16 = report["levels"]["vector"].get("16")
    if vec16 and "p99_ms" in vec16:
        ratio = vec16["p99_ms"] / report["limit"]["search_batch16_ms"]
        out["vector_c16_p99_over_batched_search"] = {"target": "<= 3", "measured": round(ratio, 2),
                                                     "p99_ms": vec16["p99_ms"],
                                                     "search_batch16_ms": report["limit"]["search_batch16_ms"],
                                                     "met": ratio <= 3}
    soak = report.get("soak")
    if soak:
        out["soak"] = {"target": "no errors, RSS growth < 10%", "errors": soak["errors"],
                       "rss_growth": round(soak["rss_growth"], 4),
                       "met": not soak["errors"] and soak["rss_growth"] < 0.10}
    over = report.get("overload")
    if over:
        refused = over["errors"].get("RESOURCE_EXHAUSTED", 0)
        other = {c: n for c, n in over["errors"].items() if c != "RESOURCE_EXHAUSTED"}
        out["overload"] = {"target": "RESOURCE_EXHAUSTED for the excess, no crash, bounded latency",
                           "refused": refused, "other_errors": other, "server_alive": over["server_alive"],
                           "admitted_p99_ms": over.get("p99_ms"),
                           "met": refused > 0 and not other and over["server_alive"]}
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_qps) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, style in (("image", "-"), ("vector", "--")):
        levels = report["levels"][kind]
        cs = [int(c) for c in levels]
        for q, marker in (("p50", "o"), ("p95", "s"), ("p99", "^")):
            ys = [levels[str(c)].get(f"{q}_ms", np.nan) for c in cs]
            ax_lat.plot(cs, ys, style, marker=marker, label=f"{kind} {q}")
        ax_qps.plot(cs, [levels[str(c)]["qps"] for c in cs], style, marker="o", label=f"{kind} server")
        ax_qps.axhline(report["limit"][f"{kind}_qps"], linestyle=":", color="gray" if kind == "image" else "black",
                       label=f"{kind} in-process limit")
    for ax in (ax_lat, ax_qps):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms)")
    ax_qps.set_ylabel("queries / s")
    ax_qps.set_yscale("log")
    fig.suptitle(f"asymsearch bench serve ({report['machine']['cpus']} CPUs, {report['artifacts']['source']} "
                 f"artifacts, index {report['limit']['index_count']} items)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
