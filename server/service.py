"""The gRPC face of the query engine: the servicer, the server, and `serve` (what `asymsearch serve` runs).

Each RPC parses its request, calls the engine, and builds the reply. Errors leave here and only here:
`InvalidQuery` becomes INVALID_ARGUMENT with its message; anything unexpected becomes INTERNAL with a short
message while the traceback goes to the log, and the server keeps serving.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from concurrent import futures
from typing import Any, Callable, Iterator, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from asymsearch.core.errors import UserError
from asymsearch.protos.v1 import search_pb2, search_pb2_grpc
from asymsearch.server.engine import InvalidQuery, QueryEngine, SearchResult

log = logging.getLogger(__name__)

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["Search"].full_name  # "asymsearch.v1.Search"
STOP_GRACE_S = 5.0  # in-flight requests get this long to finish on shutdown

T = TypeVar("T")


class SearchServicer(search_pb2_grpc.SearchServicer):
    def __init__(self, engine: QueryEngine) -> None:
        self.engine = engine

    def SearchImage(self, request: search_pb2.ImageQuery, context: grpc.ServicerContext) -> search_pb2.SearchReply:
        result = _call(context, self.engine.search_image, request.image, request.k)
        return _search_reply(result)

    def SearchVector(self, request: search_pb2.VectorQuery, context: grpc.ServicerContext) -> search_pb2.SearchReply:
        result = _call(context, self.engine.search_vector, request.vector, request.k)
        return _search_reply(result)

    def Info(self, request: search_pb2.InfoRequest, context: grpc.ServicerContext) -> search_pb2.InfoReply:
        return search_pb2.InfoReply(**_call(context, self.engine.info))


def _call(context: grpc.ServicerContext, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)`; turn its failures into a gRPC status (`context.abort` raises, so this never returns None)."""
    try:
        return fn(*args)
    except InvalidQuery as e:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    except Exception:
        log.exception("unexpected error in %s", getattr(fn, "__name__", fn))
        context.abort(grpc.StatusCode.INTERNAL, "internal server error (details in the server log)")
    raise AssertionError("unreachable: context.abort raises")


def _search_reply(result: SearchResult) -> search_pb2.SearchReply:
    return search_pb2.SearchReply(
        hits=[search_pb2.Hit(id=h.id, score=h.score, path=h.path, label=h.label) for h in result.hits],
        embed_ms=result.embed_ms, search_ms=result.search_ms)


def create_server(engine: QueryEngine, *, host: str = "127.0.0.1", port: int = 0, max_workers: int = 8,
                  max_message_bytes: int = 16 * 1024 * 1024) -> tuple[grpc.Server, int]:
    """Start a server for `engine` with the Search and the standard health service; return it and its port.

    `port=0` picks a free port. Health reports SERVING for "" and for "asymsearch.v1.Search" once started.
    """
    server, bound, _ = _start_server(engine, host=host, port=port, max_workers=max_workers,
                                     max_message_bytes=max_message_bytes)
    return server, bound


def _start_server(engine: QueryEngine, *, host: str, port: int, max_workers: int,
                  max_message_bytes: int) -> tuple[grpc.Server, int, health.HealthServicer]:
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]  # a second server on a busy port must fail, not share it silently
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="search"),
                         options=options)
    search_pb2_grpc.add_SearchServicer_to_server(SearchServicer(engine), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise UserError(f"cannot listen on {address}: the address is in use or not valid here")
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def serve(index: str | os.PathLike, student: str | os.PathLike, *, host: str = "0.0.0.0", port: int = 50051,
          max_workers: int = 8) -> None:
    """Serve `student` queries against the index folder `index` until SIGINT or SIGTERM.

    Raises `PairingError` (before listening) when the student does not belong to the index's teacher. On a
    signal, health turns NOT_SERVING and in-flight requests get `STOP_GRACE_S` seconds to finish. Must run on
    the main thread (Python delivers signals there).
    """
    engine = QueryEngine.open(index, student)
    try:
        with _signals_caught(signal.SIGINT, signal.SIGTERM) as received:
            server, bound, health_servicer = _start_server(engine, host=host, port=port, max_workers=max_workers,
                                                           max_message_bytes=16 * 1024 * 1024)
            try:
                log.info("serving %d items on %s:%d", engine.index.count, host, bound)
                while not received:
                    time.sleep(0.2)
            except BaseException:
                server.stop(None)
                raise
        log.info("%s received: draining in-flight requests for up to %.0f s",
                 signal.Signals(received[0]).name, STOP_GRACE_S)
        health_servicer.enter_graceful_shutdown()
        server.stop(STOP_GRACE_S).wait()
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
