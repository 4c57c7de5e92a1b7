"""The server's life: start (listen, TLS), attach an engine, follow CURRENT, reload, drain and stop; `serve`
(what `asymsearch serve` runs) with SIGTERM / SIGINT handling; `create_server` for tests and the demo.

The gRPC server is a `grpc.aio` server on an event loop of its own, run by one thread ("grpc-aio"), so that it
serves the same way under `serve` and inside another program or a test (`create_server` returns at once; the
caller's thread stays free). Every RPC is a coroutine on that loop; an open stream costs no thread. The threads
of the process are that loop, grpc's own pollers, and the pipeline's bounded pools (decode, embed, search), sized
from the machine: whatever clients do, their number stays the same.

Tiers: `load_student(tier, path)` (Admin `LoadStudent`) adds or replaces one student tier of the engine while it
serves (paired and gated first; refused, the old tier keeps serving). Per-tier Prometheus metrics sit beside the
server's own (`TierMetrics`).

Listening starts before the index is loaded (`attach`), with health NOT_SERVING until then, so probes and
clients see a loading server rather than a refused connection. Standard services: grpc.health.v1 (the asyncio
servicer; NOT_SERVING while loading and while draining) and server reflection.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram

from asymsearch.core.errors import UserError
from asymsearch.index.backend import StoreUnavailable, current_id
from asymsearch.protos.v1 import search_pb2_grpc
from asymsearch.server.batching import Pipeline
from asymsearch.server.engine import QueryEngine
from asymsearch.server.interceptors import (ADMIN_SERVICE_NAME, SERVICE_NAME, AuthInterceptor, LimitsInterceptor,
                                            LoggingInterceptor, MetricsInterceptor, ParsingInterceptor)
from asymsearch.server.metrics import _LATENCY_BUCKETS, ServerMetrics
from asymsearch.server.options import ServeOptions
from asymsearch.server.servicers import AdminServicer, SearchServicer
from asymsearch.server.tokens import TokenStore

log = logging.getLogger(__name__)

HEALTH_SERVICES = ("", SERVICE_NAME)


class TierMetrics(ServerMetrics):
    """The server's metrics plus, per student tier:

        asymsearch_tier_queries_total{tier, kind}        queries answered, by tier and kind (image / vector)
        asymsearch_tier_query_seconds{tier}              admission to answer, by tier
        asymsearch_tier_embed_seconds{tier}              one student call (a batch of that tier's images)
        asymsearch_tier_info{tier, student_id}           1 for each served tier and its student
        asymsearch_tier_gate_ratio{tier}                 the tier's gate ratio (student / teacher Recall@1) at load
        asymsearch_tier_loads_total{tier, result}        LoadStudent: loaded / refused
    """

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.tier_queries = Counter("asymsearch_tier_queries", "queries answered by tier", ["tier", "kind"],
                                    registry=r)
        self.tier_seconds = Histogram("asymsearch_tier_query_seconds", "admission to answer, by tier", ["tier"],
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.tier_embed_seconds = Histogram("asymsearch_tier_embed_seconds", "one student call, by tier", ["tier"],
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.tier_info = Gauge("asymsearch_tier_info", "the served tiers (value 1)", ["tier", "student_id"],
                               registry=r)
        self.tier_gate = Gauge("asymsearch_tier_gate_ratio", "gate ratio of the tier at load", ["tier"], registry=r)
        self.tier_loads = Counter("asymsearch_tier_loads", "LoadStudent by tier and result", ["tier", "result"],
                                  registry=r)

    def tier_embed(self, tier: str, seconds: float, n: int) -> None:
        self.tier_embed_seconds.labels(tier).observe(seconds)

    def tier_query(self, tier: str, kind: str, seconds: float) -> None:
        self.tier_queries.labels(tier, kind).inc()
        self.tier_seconds.labels(tier).observe(seconds)

    def served_tiers(self, tiers: Sequence[Any]) -> None:
        with self._lock:
            self.tier_info.clear()
            self.tier_gate.clear()
            for t in tiers:
                self.tier_info.labels(t.name, t.student_id).set(1)
                if t.gate is not None:
                    self.tier_gate.labels(t.name).set(t.gate.ratio)


class IndexUpdater(Protocol):
    """Publishes a new version of the index root the server follows (the Admin service's AddImages/RemoveImages)."""

    def add(self, root: Path, folder: str, metadata_csv: str | None = None) -> None: ...

    def remove(self, root: Path, ids: Sequence[int]) -> None: ...


class SearchServer:
    """A gRPC server with its pipeline, health, metrics and (optionally) a CURRENT follower.

    The methods are plain blocking calls, safe from any thread but the server's own loop: `start()` listens,
    `attach(engine)` starts serving, `reload()` swaps the index, `stop(grace)` drains and stops.
    """

    def __init__(self, options: ServeOptions = ServeOptions(), *, updater: IndexUpdater | None = None) -> None:
        self.options = options
        self.metrics = TierMetrics()
        self.metrics.budget_bytes.set(options.batching.memory_budget_bytes)
        self.engine: QueryEngine | None = None
        self.pipeline: Pipeline | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self._updater = updater
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._follower: threading.Thread | None = None
        self._reload_lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc-aio", daemon=True)
        self._thread.start()
        self.tokens = TokenStore(options.all_tokens, options.token_file)
        self.limits = LimitsInterceptor(options.max_calls_per_peer, options.max_streams, self.metrics)
        self._grpc, self.health = self._call(self._build())

    # -- running coroutines on the server's loop ------------------------------------------------------------

    def _call(self, coro, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _build(self) -> tuple[grpc.aio.Server, health_aio.HealthServicer]:
        o = self.options
        server = grpc.aio.server(
            options=o.grpc_options(),
            interceptors=[MetricsInterceptor(self.metrics), LoggingInterceptor(),
                          AuthInterceptor(self.tokens, o.search_requires_token), self.limits,
                          ParsingInterceptor()])
        search_pb2_grpc.add_SearchServicer_to_server(SearchServicer(self), server)
        services = [SERVICE_NAME, HEALTH_SERVICE_NAME]
        if o.admin:
            search_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self, self._updater), server)
            services.append(ADMIN_SERVICE_NAME)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if o.reflection:
            reflection.enable_server_reflection(services + [reflection.SERVICE_NAME], server)
        for service in HEALTH_SERVICES:
            await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        return server, health

    async def _bind(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        try:
            return (self._grpc.add_secure_port(address, credentials) if credentials is not None
                    else self._grpc.add_insecure_port(address))
        except RuntimeError:
            return 0

    async def _set_health(self, status: int) -> None:
        for service in HEALTH_SERVICES:
            await self.health.set(service, status)

    # -- start, attach, reload ------------------------------------------------------------------------------

    def start(self) -> int:
        """Listen on options.host:port (TLS when a certificate is given) and serve /metrics if asked; the port."""
        o = self.options
        address = f"{o.host}:{o.port}"
        credentials = server_credentials(o) if o.tls_cert else None
        self.port = self._call(self._bind(address, credentials))
        if self.port == 0:
            self._shutdown_loop()
            raise UserError(f"cannot listen on {address}: the address is in use or not valid here")
        self._call(self._grpc.start())
        if o.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.start_http(o.metrics_host, o.metrics_port)
            except OSError as e:
                self._call(self._grpc.stop(None))
                self._shutdown_loop()
                raise UserError(f"cannot serve metrics on {o.metrics_host}:{o.metrics_port}: {e.strerror or e}")
        log.info("listening on %s:%d (%s), loading", o.host, self.port, "TLS" if o.tls_cert else "plaintext",
                 extra={"event": "listening", "port": self.port, "tls": bool(o.tls_cert),
                        "metrics_port": self.metrics_port})
        return self.port

    def attach(self, engine: QueryEngine) -> None:
        """Serve `engine` from now on: start the pipeline, report SERVING, follow CURRENT if asked."""
        self.engine = engine
        self.pipeline = Pipeline(engine, self.options.batching, self.metrics)
        self._report_index()
        self._call(self._set_health(health_pb2.HealthCheckResponse.SERVING))
        if self.options.follow_current:
            self._follower = threading.Thread(target=self._follow, name="follow-current", daemon=True)
            self._follower.start()

    def reload_tokens(self) -> bool:
        """Read the token file again (SIGHUP); True when the new tokens are in use. A file that does not parse is
        logged (by line number, never its content) and the tokens in use stay."""
        try:
            tokens = self.tokens.reload()
        except UserError as e:
            log.error("token file not reloaded, the tokens in use stay: %s", e, extra={"event": "tokens_refused"})
            return False
        log.info("token file reloaded: %d token(s)", len(tokens), extra={"event": "tokens_reloaded",
                                                                         "tokens": len(tokens)})
        return True

    def _report_index(self) -> None:
        e = self.engine
        self.metrics.served_index(e.index_version, e.index.teacher_id, e.index.count)
        self.metrics.served_tiers(e.tiers)

    def load_student(self, tier: str, path: str | os.PathLike) -> tuple[bool, Any]:
        """Load the student `path` as `tier` beside the served tiers (paired with the index, gated) and switch
        that tier to it; (replaced, Tier). Raises, and the tier it would replace keeps serving, on refusal."""
        with self._reload_lock:
            try:
                replaced, loaded = self.engine.load_tier(tier, path, intra_op_threads=self.options.embed_threads)
            except Exception as e:
                self.metrics.tier_loads.labels(tier[:64], "refused").inc()
                log.error("student %s not loaded as tier %r, the served tiers stay: %s", path, tier, e,
                          extra={"event": "tier_refused", "tier": tier})
                raise
            self.metrics.tier_loads.labels(tier, "loaded").inc()
            self._report_index()
            return replaced, loaded

    def reload(self, path: str | os.PathLike | None = None, *, keep_source: bool = False) -> tuple[bool, str]:
        """Load the version `path` (default: the engine's source, its CURRENT) beside the served one and switch;
        `keep_source`: serve `path` now but keep following the source (Admin's Reload of one version).

        Raises (and keeps the old version serving) when the new one cannot be opened or does not pair."""
        with self._reload_lock:
            try:
                changed, version = self.engine.reload(path, keep_source=keep_source)
            except Exception as e:
                self.metrics.swaps.labels("refused").inc()
                log.error("reload refused, still serving version %r: %s", self.engine.index_version, e,
                          extra={"event": "reload_refused", "version": self.engine.index_version})
                raise
            self.metrics.swaps.labels("swapped" if changed else "unchanged").inc()
            self._report_index()
            return changed, version

    def _follow(self) -> None:
        """Poll the engine's source; reload when its CURRENT names another index than the served one.

        Versions are told apart by manifest id (the digest of their manifest), not by folder name: a version
        that failed to load is retried as soon as CURRENT names different content, even under a reused name."""
        refused: str | None = None  # the manifest id of a version that failed to load
        unavailable = 0.0  # > 0 while the store does not answer: the current back-off, in seconds
        while not self._stopping.wait(self.options.poll_s):
            try:
                current = current_id(self.engine.source)  # CURRENT's manifest id, or the Milvus alias's
            except StoreUnavailable as e:  # Milvus does not answer: NOT_SERVING until it does (polled with back-off)
                if not unavailable:
                    self._call(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
                log.error("index store unavailable, health NOT_SERVING: %s", e, extra={"event": "store_unavailable"})
                unavailable = min(max(2 * unavailable, self.options.poll_s), 30.0)
                self._stopping.wait(unavailable)
                continue
            except Exception as e:
                log.warning("cannot resolve %s: %s", self.engine.source, e, extra={"event": "follow_failed"})
                continue
            if unavailable:
                unavailable = 0.0
                self._call(self._set_health(health_pb2.HealthCheckResponse.SERVING))
                log.info("index store answers again, health SERVING", extra={"event": "store_available"})
            if current == self.engine.index.manifest_id or current == refused:
                continue
            try:
                self.reload()
                refused = None
            except Exception:
                refused = current

    # -- drain and stop -------------------------------------------------------------------------------------

    def stop(self, grace: float | None = None) -> threading.Event:
        """Health NOT_SERVING, refuse new RPCs, give in-flight ones `grace` seconds, stop the pipeline.

        Returns an event set when everything stopped (like `grpc.Server.stop`). Safe to call twice."""
        if self._stopping.is_set():
            self._stopped.wait()
            return self._stopped
        self._stopping.set()
        try:
            self._call(self.health.enter_graceful_shutdown())
            if grace and self.options.drain_announce_s > 0:
                time.sleep(self.options.drain_announce_s)  # let load balancers see NOT_SERVING and move away
            self._call(self._grpc.stop(grace))
            if self.pipeline is not None:
                self.pipeline.close(timeout=0 if grace is None else grace)
            self.metrics.stop_http()
        finally:
            self._shutdown_loop()
            self._stopped.set()
        return self._stopped

    def _shutdown_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._loop.is_running() and not self._loop.is_closed():
            self._loop.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """True once stopped; False when `timeout` passed first."""
        return self._stopped.wait(timeout)


def server_credentials(o: ServeOptions) -> grpc.ServerCredentials:
    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read the {what} {path}: {e.strerror or e}") from None

    key, cert = read(o.tls_key, "TLS private key"), read(o.tls_cert, "TLS certificate")
    ca = read(o.tls_client_ca, "client CA certificate") if o.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def create_server(engine: QueryEngine, options: ServeOptions | None = None, *,
                  updater: IndexUpdater | None = None, **overrides: Any) -> tuple[SearchServer, int]:
    """Start a server for `engine` and return it and its port. `overrides` replace fields of `options`
    (e.g. `create_server(engine, max_streams=8)`); `port=0` (the default) picks a free port.

    Health reports SERVING for "" and for "asymsearch.v1.Search" once started. Stop it with `.stop(grace)`.
    """
    options = dataclasses.replace(options or ServeOptions(), **overrides)
    server = SearchServer(options, updater=updater)
    port = server.start()
    server.attach(engine)
    return server, port


def serve(index: str | os.PathLike, student: str | os.PathLike | Sequence[tuple[str, str | os.PathLike]], *,
          host: str = "127.0.0.1", port: int = 50051,
          max_workers: int | None = None, options: ServeOptions | None = None,
          updater: IndexUpdater | None = None, **engine_kw: Any) -> None:
    """Serve `student` queries (one ONNX, or [(tier, ONNX), ...], the default tier first) against `index` (a
    folder, or a root with CURRENT) until SIGINT or SIGTERM.

    Listens first (health NOT_SERVING), then loads; raises `PairingError` (and stops listening) when the student
    does not belong to the index's teacher. On a signal, health turns NOT_SERVING, new RPCs are refused and
    in-flight ones get `options.drain_s` seconds to finish. SIGHUP reads `options.token_file` again (a file that
    does not parse is logged and the tokens in use stay). Must run on the main thread (signals arrive there).
    `engine_kw` (default_k, max_k, max_pixels, gate) go to `QueryEngine.open`; `max_workers` is ignored (kept for
    callers of the thread-pool server).
    """
    options = dataclasses.replace(options or ServeOptions(), host=host, port=port)
    engine_kw.setdefault("intra_op_threads", options.embed_threads)
    with _signals_caught(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as received:
        server = SearchServer(options, updater=updater)
        bound = server.start()
        try:
            engine = QueryEngine.open(index, student, **engine_kw)
        except BaseException:
            server.stop(None)
            raise
        try:
            server.attach(engine)
            b = options.batching
            log.info("serving %d items on %s:%d (index version %r), tiers %s", engine.index.count, host, bound,
                     engine.index_version, ", ".join(
                         f"{t.name}={t.student_id} ({t.gflops:.3g} GFLOPs, {t.measured_ms:.1f} ms"
                         + (f", gate ratio {t.gate.ratio:.3f}" if t.gate else ", not gated") + ")"
                         for t in engine.tiers), extra={"event": "serving", "count": engine.index.count, "port": bound,
                                                  "version": engine.index_version,
                                                  "embed_workers": b.embed_workers, "embed_batch": b.embed_batch,
                                                  "decode_workers": b.decode_workers,
                                                  "memory_budget_mb": round(b.memory_budget_bytes / 2**20)})
            while True:
                while not received:
                    time.sleep(0.2)
                if received[0] != signal.SIGHUP:
                    break
                received.pop(0)
                server.reload_tokens()
            log.info("%s received: draining in-flight requests for up to %.0f s",
                     signal.Signals(received[0]).name, options.drain_s, extra={"event": "draining"})
            server.stop(options.drain_s)
            log.info("stopped", extra={"event": "stopped"})
        except BaseException:
            server.stop(None)
            raise
        finally:
            engine.close()


@contextlib.contextmanager
def _signals_caught(*signals: signal.Signals) -> Iterator[list[int]]:
    """Record `signals` in the yielded list instead of acting on them; the previous handlers come back on exit
    (so a second Ctrl-C during the drain kills as usual).

    The handler only appends to a list: taking a lock inside a signal handler (as `threading.Event.set` does)
    can deadlock against the very thread it interrupted.
    """
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum)) for sig in signals}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
