"""The gRPC face of the query engine: servicers, interceptors, the server, and `serve` (what `asymsearch serve`
runs).

Each RPC parses its request, hands the query to the batching pipeline (`asymsearch.server.batching`), waits for
its result within the caller's deadline, and builds the reply. Errors leave here and only here:

    InvalidQuery -> INVALID_ARGUMENT     Overloaded -> RESOURCE_EXHAUSTED     Expired -> DEADLINE_EXCEEDED
    no index yet / shutting down -> UNAVAILABLE      PairingError on reload -> FAILED_PRECONDITION
    anything unexpected -> INTERNAL with a short message (the traceback goes to the log); the server keeps serving

Cross-cutting concerns are one interceptor: the bearer token (always for the Admin service, for Search too when
asked), the request counter and latency histogram by method and status, and an access log line (DEBUG).
Standard services: grpc.health.v1 (NOT_SERVING while the index loads and while draining) and server reflection.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hmac
import logging
import os
import queue
import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asymsearch.core.errors import PairingError, UserError
from asymsearch.protos.v1 import search_pb2, search_pb2_grpc
from asymsearch.server.batching import BatchingConfig, Closed, Expired, Overloaded, Pipeline
from asymsearch.server.engine import InvalidQuery, QueryEngine, SearchResult, resolve_index_folder
from asymsearch.server.metrics import ServerMetrics

log = logging.getLogger(__name__)

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["Search"].full_name  # "asymsearch.v1.Search"
ADMIN_SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["Admin"].full_name  # "asymsearch.v1.Admin"
STOP_GRACE_S = 5.0  # in-flight requests get this long to finish on shutdown
STREAM_WINDOW = 64  # queries of one stream in progress at once; the stream's reader waits beyond that


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """Everything about the server except the engine. Defaults are the measured ones (docs/server.md)."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port
    max_workers: int = 64  # RPC threads (each waits on its query's batch)
    max_message_bytes: int = 16 * 1024 * 1024
    batching: BatchingConfig = BatchingConfig()
    max_batch_queries: int = 1024  # queries one BatchSearch call may carry
    tls_cert: str | None = None  # PEM files; cert + key turn TLS on
    tls_key: str | None = None
    tls_client_ca: str | None = None  # when given, clients must present a certificate signed by it
    token: str | None = None  # the bearer token; always required by Admin
    search_requires_token: bool = False
    admin: bool = False
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; 0 picks a free port, None: off
    metrics_host: str = "127.0.0.1"
    follow_current: bool = False  # reload when the index root's CURRENT names another version
    poll_s: float = 1.0
    drain_s: float = STOP_GRACE_S
    drain_announce_s: float = 0.0  # on stop, health says NOT_SERVING this long before new RPCs are refused
    reflection: bool = True
    embed_threads: int = 1  # onnxruntime intra-op threads of the student, used by `serve` (0: all cores)

    def __post_init__(self) -> None:
        if self.admin and not self.token:
            raise UserError("the admin service needs a bearer token (--token-file); it never runs without one")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UserError("TLS needs both a certificate and its private key (--tls-cert and --tls-key)")
        if self.tls_client_ca and not self.tls_cert:
            raise UserError("client certificates (--tls-client-ca) need TLS on the server (--tls-cert, --tls-key)")
        if self.max_workers < 1 or self.max_batch_queries < 1:
            raise UserError("max_workers and max_batch_queries must be positive")


class IndexUpdater(Protocol):
    """Publishes a new version of the index root the server follows (the Admin service's AddImages/RemoveImages)."""

    def add(self, root: Path, folder: str, metadata_csv: str | None = None) -> None: ...

    def remove(self, root: Path, ids: Sequence[int]) -> None: ...


# -- errors at the boundary --------------------------------------------------------------------------------------

_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidQuery, grpc.StatusCode.INVALID_ARGUMENT), (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Expired, grpc.StatusCode.DEADLINE_EXCEEDED), (Closed, grpc.StatusCode.UNAVAILABLE),
    (PairingError, grpc.StatusCode.FAILED_PRECONDITION), (UserError, grpc.StatusCode.INVALID_ARGUMENT)]


def status_of(exc: BaseException, where: str = "") -> tuple[grpc.StatusCode, str]:
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code, str(exc)
    log.error("unexpected error%s", f" in {where}" if where else "", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal server error (details in the server log)"


def _abort(context: grpc.ServicerContext, exc: BaseException, where: str) -> None:
    code, message = status_of(exc, where)
    context.abort(code, message)


def _remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds to the caller's deadline, None without one (grpc reports a huge number then)."""
    left = context.time_remaining()
    return None if left is None or left > 1e7 else max(0.0, left)


def _deadline(context: grpc.ServicerContext) -> float | None:
    left = _remaining(context)
    return None if left is None else time.monotonic() + left


def _search_reply(result: SearchResult) -> search_pb2.SearchReply:
    return search_pb2.SearchReply(
        hits=[search_pb2.Hit(id=h.id, score=h.score, path=h.path, label=h.label, metadata=h.metadata)
              for h in result.hits],
        embed_ms=result.embed_ms, search_ms=result.search_ms, index_version=result.index_version,
        queue_ms=max(0.0, result.queue_ms), decode_ms=result.decode_ms, batch_size=result.batch_size)


def _query_result(tag: int, future: concurrent.futures.Future | None = None,
                  error: BaseException | None = None) -> search_pb2.QueryResult:
    if future is not None:
        error = future.exception()
        if error is None:
            return search_pb2.QueryResult(tag=tag, code=0, reply=_search_reply(future.result()))
    code, message = status_of(error, "a batched query")
    return search_pb2.QueryResult(tag=tag, code=code.value[0], message=message)


def _parse_query(q: search_pb2.Query) -> tuple[str, object, int]:
    kind = q.WhichOneof("query")
    if kind == "image":
        return "image", q.image, q.k
    if kind == "vector":
        return "vector", q.vector.values, q.k
    raise InvalidQuery("empty query: it carries neither an image nor a vector")


# -- the servicers -----------------------------------------------------------------------------------------------

class SearchServicer(search_pb2_grpc.SearchServicer):
    def __init__(self, server: "SearchServer") -> None:
        self._server = server

    def _pipeline(self, context: grpc.ServicerContext) -> Pipeline:
        pipeline = self._server.pipeline
        if pipeline is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its index")
        return pipeline

    def _wait(self, context: grpc.ServicerContext, future: concurrent.futures.Future, where: str) -> Any:
        try:
            return future.result(timeout=_remaining(context))
        except concurrent.futures.TimeoutError:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while the query waited")
        except Exception as e:
            _abort(context, e, where)

    def SearchImage(self, request, context):
        pipeline = self._pipeline(context)
        try:
            future = pipeline.submit_image(request.image, request.k, deadline=_deadline(context),
                                           alive=context.is_active)
        except Exception as e:
            _abort(context, e, "SearchImage")
        return _search_reply(self._wait(context, future, "SearchImage"))

    def SearchVector(self, request, context):
        pipeline = self._pipeline(context)
        try:
            future = pipeline.submit_vector(request.vector, request.k, deadline=_deadline(context),
                                            alive=context.is_active)
        except Exception as e:
            _abort(context, e, "SearchVector")
        return _search_reply(self._wait(context, future, "SearchVector"))

    def BatchSearch(self, request, context):
        pipeline = self._pipeline(context)
        n, limit = len(request.queries), self._server.options.max_batch_queries
        if n == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty batch: send at least one query")
        if n > limit:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{n} queries in one batch; the limit is {limit}")
        parsed: list[tuple[str, object, int] | InvalidQuery] = []
        for q in request.queries:
            try:
                parsed.append(_parse_query(q))
            except InvalidQuery as e:
                parsed.append(e)
        valid = [p for p in parsed if not isinstance(p, InvalidQuery)]
        try:
            submitted = iter(pipeline.submit_many(valid, deadline=_deadline(context), alive=context.is_active))
        except Exception as e:
            _abort(context, e, "BatchSearch")
        results = []
        for q, p in zip(request.queries, parsed):
            if isinstance(p, InvalidQuery):
                results.append(_query_result(q.tag, error=p))
                continue
            future = next(submitted)
            try:
                future.result(timeout=_remaining(context))
            except concurrent.futures.TimeoutError:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while the batch waited")
            except Exception:
                pass  # reported in its result
            results.append(_query_result(q.tag, future))
        return search_pb2.BatchSearchReply(results=results)

    def SearchStream(self, request_iterator, context):
        pipeline = self._pipeline(context)
        results: queue.SimpleQueue = queue.SimpleQueue()
        window = threading.BoundedSemaphore(STREAM_WINDOW)
        end = object()
        submitted = [0]

        def read() -> None:
            try:
                for q in request_iterator:
                    while not window.acquire(timeout=0.5):
                        if not context.is_active():
                            return
                    submitted[0] += 1
                    try:
                        kind, payload, k = _parse_query(q)
                        if kind == "image":
                            f = pipeline.submit_image(payload, k, deadline=_deadline(context), alive=context.is_active)
                        else:
                            f = pipeline.submit_vector(payload, k, deadline=_deadline(context),
                                                       alive=context.is_active)
                    except Exception as e:
                        results.put(_query_result(q.tag, error=e))
                        continue
                    f.add_done_callback(lambda f, tag=q.tag: results.put(_query_result(tag, f)))
            except Exception as e:  # the client cancelled or the connection broke: nothing left to answer
                log.debug("stream reader ended: %s", e)
            finally:
                results.put(end)

        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        sent, total = 0, None
        while total is None or sent < total:
            try:
                item = results.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if item is end:
                total = submitted[0]
                continue
            window.release()
            sent += 1
            yield item

    def Info(self, request, context):
        engine = self._server.engine
        if engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its index")
        o = self._server.options
        return search_pb2.InfoReply(**engine.info(), max_batch_queries=o.max_batch_queries,
                                    max_message_bytes=o.max_message_bytes, batch_max_size=o.batching.max_batch,
                                    batch_max_delay_ms=o.batching.max_delay_ms, admin_enabled=o.admin)


class AdminServicer(search_pb2_grpc.AdminServicer):
    """Reload, and index updates through an `IndexUpdater` (which publishes a new version; then reload)."""

    def __init__(self, server: "SearchServer", updater: IndexUpdater | None) -> None:
        self._server = server
        self._updater = updater

    def _reply(self, changed: bool, version: str, message: str = "") -> search_pb2.UpdateReply:
        return search_pb2.UpdateReply(index_version=version, count=self._server.engine.index.count,
                                      changed=changed, message=message)

    def Reload(self, request, context):
        if self._server.engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its index")
        try:
            changed, version = self._server.reload(request.path or None)
        except Exception as e:
            _abort(context, e, "Reload")
        return self._reply(changed, version)

    def _update(self, context, what: str, apply: Callable[[Path], None]):
        if self._server.engine is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is still loading its index")
        if self._updater is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{what} is not available on this server (it needs an "
                                                         f"index updater, e.g. `serve --admin --teacher T.onnx`)")
        try:
            apply(self._server.engine.source)
            changed, version = self._server.reload()
        except Exception as e:
            _abort(context, e, what)
        return self._reply(changed, version)

    def AddImages(self, request, context):
        if not request.folder:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "AddImages needs the folder of the images to add")
        return self._update(context, "AddImages",
                            lambda root: self._updater.add(root, request.folder, request.metadata_csv or None))

    def RemoveImages(self, request, context):
        if not request.ids:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "RemoveImages needs at least one id")
        return self._update(context, "RemoveImages", lambda root: self._updater.remove(root, list(request.ids)))


# -- the interceptor ---------------------------------------------------------------------------------------------

class _Interceptor(grpc.ServerInterceptor):
    """Bearer token check, metrics by method and status, access log."""

    def __init__(self, metrics: ServerMetrics, token: str | None, search_requires_token: bool) -> None:
        self._metrics = metrics
        self._token = token
        self._protected = (f"/{ADMIN_SERVICE_NAME}/",) + ((f"/{SERVICE_NAME}/",) if search_requires_token else ())

    def _authorised(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        """None when authorised, else why not."""
        if not self._token:
            return "this server has no token configured, so this service is closed"
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return "missing bearer token (metadata 'authorization: Bearer TOKEN')"
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, given = value.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token.encode()):
            return "invalid bearer token"
        return None

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        if method.startswith(self._protected):
            refused = self._authorised(details.invocation_metadata)
            if refused:
                handler = _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, refused)
        return _observed(handler, method.rsplit("/", 1)[-1], self._metrics)


def _refusing(handler, code: grpc.StatusCode, message: str):
    def refuse(request, context):
        context.abort(code, message)

    def refuse_stream(request, context):
        context.abort(code, message)
        yield  # pragma: no cover

    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kw)


def _code_name(context: grpc.ServicerContext, failed: bool) -> str:
    code = context.code()
    if code is None:
        return "UNKNOWN" if failed else "OK"
    return code.name


def _observed(handler, method: str, metrics: ServerMetrics):
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

    def record(context, start: float, failed: bool) -> None:
        code = _code_name(context, failed)
        seconds = time.perf_counter() - start
        metrics.request(method, code, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %.1f ms", method, code, seconds * 1e3,
                      extra={"event": "rpc", "method": method, "code": code, "ms": round(seconds * 1e3, 3),
                             "peer": context.peer()})

    if handler.unary_unary:
        behaviour = handler.unary_unary

        def unary(request, context):
            start, failed = time.perf_counter(), True
            try:
                reply = behaviour(request, context)
                failed = False
                return reply
            finally:
                record(context, start, failed)
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.stream_stream:
        behaviour = handler.stream_stream

        def stream(request_iterator, context):
            start, failed = time.perf_counter(), True
            try:
                yield from behaviour(request_iterator, context)
                failed = False
            finally:
                record(context, start, failed)
        return grpc.stream_stream_rpc_method_handler(stream, **kw)
    return handler  # health Watch (unary-stream): not counted


# -- the server --------------------------------------------------------------------------------------------------

class SearchServer:
    """A started gRPC server with its pipeline, health, metrics and (optionally) a CURRENT follower.

    Listening starts before the index is loaded (`attach`), with health NOT_SERVING until then, so probes and
    clients see a loading server rather than a refused connection.
    """

    def __init__(self, options: ServeOptions = ServeOptions(), *, updater: IndexUpdater | None = None) -> None:
        self.options = options
        self.metrics = ServerMetrics()
        self.engine: QueryEngine | None = None
        self.pipeline: Pipeline | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self._updater = updater
        self._stopping = threading.Event()
        self._follower: threading.Thread | None = None
        self._reload_lock = threading.Lock()
        self.health = health.HealthServicer()
        grpc_options = [("grpc.max_receive_message_length", options.max_message_bytes),
                        ("grpc.max_send_message_length", options.max_message_bytes),
                        ("grpc.so_reuseport", 0)]  # a second server on a busy port must fail, not share it silently
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.max_workers, thread_name_prefix="rpc"),
            options=grpc_options, maximum_concurrent_rpcs=options.batching.max_queue + options.max_workers,
            interceptors=[_Interceptor(self.metrics, options.token, options.search_requires_token)])
        search_pb2_grpc.add_SearchServicer_to_server(SearchServicer(self), self._grpc)
        services = [SERVICE_NAME, health.SERVICE_NAME]
        if options.admin:
            search_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self, updater), self._grpc)
            services.append(ADMIN_SERVICE_NAME)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        if options.reflection:
            try:
                from grpc_reflection.v1alpha import reflection
            except ImportError:  # grpcio-reflection not installed: serve without it
                log.warning("grpcio-reflection is not installed: server reflection (grpcurl list) is off")
            else:
                reflection.enable_server_reflection(services + [reflection.SERVICE_NAME], self._grpc)
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)

    def start(self) -> int:
        o = self.options
        address = f"{o.host}:{o.port}"
        try:
            if o.tls_cert:
                self.port = self._grpc.add_secure_port(address, _server_credentials(o))
            else:
                self.port = self._grpc.add_insecure_port(address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise UserError(f"cannot listen on {address}: the address is in use or not valid here")
        self._grpc.start()
        if o.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.start_http(o.metrics_host, o.metrics_port)
            except OSError as e:
                self._grpc.stop(None)
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
        for service in ("", SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if self.options.follow_current:
            self._follower = threading.Thread(target=self._follow, name="follow-current", daemon=True)
            self._follower.start()

    def _report_index(self) -> None:
        e = self.engine
        self.metrics.served_index(e.index_version, e.index.teacher_id, e.index.count)

    def reload(self, path: str | os.PathLike | None = None) -> tuple[bool, str]:
        """Load the version `path` (default: the engine's source, its CURRENT) beside the served one and switch.

        Raises (and keeps the old version serving) when the new one cannot be opened or does not pair."""
        with self._reload_lock:
            try:
                changed, version = self.engine.reload(path)
            except Exception as e:
                self.metrics.swaps.labels("refused").inc()
                log.error("reload refused, still serving version %r: %s", self.engine.index_version, e,
                          extra={"event": "reload_refused", "version": self.engine.index_version})
                raise
            self.metrics.swaps.labels("swapped" if changed else "unchanged").inc()
            self._report_index()
            return changed, version

    def _follow(self) -> None:
        """Poll the engine's source; reload when its CURRENT names a version other than the served one."""
        refused: Path | None = None  # a version that failed to load is retried only once CURRENT changes again
        while not self._stopping.wait(self.options.poll_s):
            try:
                folder = resolve_index_folder(self.engine.source)[0].resolve()
            except Exception as e:
                log.warning("cannot resolve %s: %s", self.engine.source, e, extra={"event": "follow_failed"})
                continue
            if folder == Path(self.engine.index.folder).resolve() or folder == refused:
                continue
            try:
                self.reload()
                refused = None
            except Exception:
                refused = folder

    def stop(self, grace: float | None = None) -> threading.Event:
        """Health NOT_SERVING, refuse new RPCs, give in-flight ones `grace` seconds, stop the pipeline.

        Returns an event set when everything stopped (like `grpc.Server.stop`)."""
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        if grace and self.options.drain_announce_s > 0:
            time.sleep(self.options.drain_announce_s)  # let load balancers see NOT_SERVING and move away
        done = self._grpc.stop(grace)
        done.wait()
        if self.pipeline is not None:
            self.pipeline.close(timeout=0 if grace is None else grace)
        self.metrics.stop_http()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._grpc.wait_for_termination(timeout)


def _server_credentials(o: ServeOptions) -> grpc.ServerCredentials:
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
    (e.g. `create_server(engine, max_workers=4)`); `port=0` (the default) picks a free port.

    Health reports SERVING for "" and for "asymsearch.v1.Search" once started. Stop it with `.stop(grace)`.
    """
    options = dataclasses.replace(options or ServeOptions(), **overrides)
    server = SearchServer(options, updater=updater)
    port = server.start()
    server.attach(engine)
    return server, port


def serve(index: str | os.PathLike, student: str | os.PathLike, *, host: str = "0.0.0.0", port: int = 50051,
          max_workers: int | None = None, options: ServeOptions | None = None,
          updater: IndexUpdater | None = None, **engine_kw: Any) -> None:
    """Serve `student` queries against `index` (a folder, or a root with CURRENT) until SIGINT or SIGTERM.

    Listens first (health NOT_SERVING), then loads; raises `PairingError` (and stops listening) when the student
    does not belong to the index's teacher. On a signal, health turns NOT_SERVING, new RPCs are refused and
    in-flight ones get `options.drain_s` seconds to finish. Must run on the main thread (signals arrive there).
    `engine_kw` (default_k, max_k, max_pixels) go to `QueryEngine.open`.
    """
    overrides: dict[str, Any] = {"host": host, "port": port}
    if max_workers is not None:
        overrides["max_workers"] = max_workers
    options = dataclasses.replace(options or ServeOptions(), **overrides)
    engine_kw.setdefault("intra_op_threads", options.embed_threads)
    with _signals_caught(signal.SIGINT, signal.SIGTERM) as received:
        server = SearchServer(options, updater=updater)
        bound = server.start()
        try:
            engine = QueryEngine.open(index, student, **engine_kw)
        except BaseException:
            server.stop(None)
            raise
        try:
            server.attach(engine)
            log.info("serving %d items on %s:%d (index version %r)", engine.index.count, host, bound,
                     engine.index_version, extra={"event": "serving", "count": engine.index.count, "port": bound,
                                                  "version": engine.index_version})
            while not received:
                time.sleep(0.2)
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
