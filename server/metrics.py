"""Prometheus metrics of one server (its own registry, so several servers can live in one process, as in tests).

    asymsearch_requests_total{method, code}          RPCs by method and final status code
    asymsearch_request_seconds{method}               RPC latency as the server sees it
    asymsearch_stage_seconds{stage}                  decode / queue / embed / search / total (per query or batch)
    asymsearch_batch_size{stage}                     queries per student (embed) and faiss (search) batch
    asymsearch_queue_depth                           queries admitted and not yet answered
    asymsearch_dropped_total{reason}                 queries refused (overloaded, memory_budget, peer_limit,
                                                     stream_limit) or dropped (expired)
    asymsearch_admitted_bytes                        bytes the admitted queries hold (of the memory budget)
    asymsearch_memory_budget_bytes                   the memory budget (--memory-budget-mb)
    asymsearch_open_streams                          SearchStream calls open now
    asymsearch_index_info{version, teacher_id}       1 for the served index version
    asymsearch_index_items                           items in the served index
    asymsearch_index_swaps_total{result}             reloads: swapped / unchanged / refused
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from asymsearch.server.batching import Metrics

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics(Metrics):
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("asymsearch_requests", "RPCs by method and status code", ["method", "code"],
                                registry=r)
        self.request_seconds = Histogram("asymsearch_request_seconds", "RPC latency on the server", ["method"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.stage_seconds = Histogram("asymsearch_stage_seconds", "time per stage: decode, queue, embed, search, "
                                       "total", ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        # thread CPU time (time.thread_time) of the pipeline's stages: the student and faiss run on the calling thread
        # with one onnxruntime / OpenMP thread (serve's defaults), so with those settings this is each stage's whole
        # CPU and the process CPU left over is gRPC, asyncio and the hand-offs between threads (bench serve: "rest")
        self.stage_cpu_seconds = Counter("asymsearch_stage_cpu_seconds", "CPU time of the thread running each stage "
                                         "(decode, embed, search)", ["stage"], registry=r)
        self.stage_items = Counter("asymsearch_stage_items", "queries through each stage (the denominator of "
                                   "asymsearch_stage_cpu_seconds)", ["stage"], registry=r)
        self.batch_size = Histogram("asymsearch_batch_size", "queries per batch", ["stage"], buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.depth = Gauge("asymsearch_queue_depth", "queries admitted and not yet answered", registry=r)
        self.dropped_total = Counter("asymsearch_dropped", "queries refused or dropped", ["reason"], registry=r)
        self.held_bytes = Gauge("asymsearch_admitted_bytes", "bytes the admitted queries hold", registry=r)
        self.budget_bytes = Gauge("asymsearch_memory_budget_bytes", "the memory budget of admitted queries",
                                  registry=r)
        self.streams = Gauge("asymsearch_open_streams", "SearchStream calls open now", registry=r)
        self.index_info = Gauge("asymsearch_index_info", "the served index version (value 1)",
                                ["version", "teacher_id"], registry=r)
        self.index_items = Gauge("asymsearch_index_items", "items in the served index", registry=r)
        self.swaps = Counter("asymsearch_index_swaps", "index reloads by result", ["result"], registry=r)
        self._lock = threading.Lock()
        self._http = None

    # Metrics (the pipeline's hooks)
    def stage(self, stage: str, seconds: float, n: int = 1) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def batch(self, stage: str, size: int) -> None:
        self.batch_size.labels(stage).observe(size)

    def stage_cpu(self, stage: str, seconds: float, n: int = 1) -> None:
        self.stage_cpu_seconds.labels(stage).inc(max(0.0, seconds))
        self.stage_items.labels(stage).inc(n)

    def queue_depth(self, depth: int) -> None:
        self.depth.set(depth)

    def dropped(self, reason: str, n: int = 1) -> None:
        self.dropped_total.labels(reason).inc(n)

    def admitted_bytes(self, nbytes: int) -> None:
        self.held_bytes.set(nbytes)

    # the server's own
    def request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.request_seconds.labels(method).observe(seconds)

    def served_index(self, version: str, teacher_id: str, count: int) -> None:
        with self._lock:
            self.index_info.clear()
            self.index_info.labels(version, teacher_id).set(1)
            self.index_items.set(count)

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def start_http(self, host: str, port: int) -> int:
        """Serve /metrics on host:port (0 picks a free port); return the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
