"""Cross-cutting concerns, one interceptor each, in the order the server applies them (outermost first):

    MetricsInterceptor   requests by method and status code, latency (every RPC but health's Watch)
    LoggingInterceptor   one access-log line per RPC at DEBUG (costs nothing at INFO)
    AuthInterceptor      scoped bearer tokens: admin for Admin, search (or admin) for Search when asked
    LimitsInterceptor    Search calls in progress per client address, SearchStream calls open in total
    ParsingInterceptor   a request that does not parse is INVALID_ARGUMENT (grpc would answer UNKNOWN)

Health, Info and reflection are never limited: whatever the load, they answer.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any, Awaitable, Callable, Sequence

import grpc
import grpc.aio

from asymsearch.protos.v1 import search_pb2
from asymsearch.server.engine import InvalidQuery
from asymsearch.server.errors import LimitReached
from asymsearch.server.metrics import ServerMetrics
from asymsearch.server.tokens import ADMIN, SEARCH, TokenStore

log = logging.getLogger(__name__)

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["Search"].full_name  # "asymsearch.v1.Search"
ADMIN_SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["Admin"].full_name  # "asymsearch.v1.Admin"
UNLIMITED = {f"/{SERVICE_NAME}/Info"}  # Search methods outside the limits
STREAM_METHOD = f"/{SERVICE_NAME}/SearchStream"


def _rebuild(handler: grpc.RpcMethodHandler, unary=None, stream=None) -> grpc.RpcMethodHandler:
    kw = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
    if handler.unary_unary and unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary, **kw)
    if handler.stream_stream and stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream, **kw)
    if handler.unary_stream and stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kw)
    if handler.stream_unary and unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    return handler


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable:
    return handler.unary_unary or handler.stream_stream or handler.unary_stream or handler.stream_unary


class _Around(grpc.aio.ServerInterceptor):
    """Runs `around(method, context, call)` around every unary or streaming RPC it `applies` to; `call()` runs the
    RPC (awaited for a unary one; for a streaming one `around` gets an async iterator of the replies)."""

    def applies(self, method: str) -> bool:
        return True

    async def unary(self, method: str, context, call: Callable[[], Awaitable[Any]]) -> Any:
        return await call()

    async def stream(self, method: str, context, replies):
        async for reply in replies:
            yield reply

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not self.applies(details.method):
            return handler
        method, behaviour = details.method, _behaviour(handler)
        if handler.unary_stream and not self.wraps_unary_stream:
            return handler

        async def unary(request, context):
            return await self.unary(method, context, lambda: behaviour(request, context))

        async def stream(request, context):
            async for reply in self.stream(method, context, behaviour(request, context)):
                yield reply
        return _rebuild(handler, unary, stream)

    wraps_unary_stream = False  # health's Watch stays as it is


class Malformed:
    """Stands for a request whose bytes do not parse as the method's message (see `ParsingInterceptor`)."""

    def __init__(self, what: str) -> None:
        self.what = what


class MalformedRequest(InvalidQuery):
    """A stream message that does not parse: the stream ends with INVALID_ARGUMENT."""


class ParsingInterceptor(grpc.aio.ServerInterceptor):
    """Requests that do not parse are INVALID_ARGUMENT, not UNKNOWN. grpc parses a request with the method's
    deserializer before any servicer code runs, and a parse error becomes UNKNOWN with the parser's text; here the
    deserializer is made tolerant (it returns `Malformed`) and the handler refuses such a request, or ends a stream
    at its first malformed message, with INVALID_ARGUMENT naming the message type. Innermost interceptor, so the
    others keep the tolerant deserializer when they rebuild a handler."""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        strict, behaviour, method = handler.request_deserializer, _behaviour(handler), details.method

        def parse(data: bytes):
            try:
                return strict(data)
            except Exception:  # noqa: BLE001 - DecodeError, or any other failure of the generated parser
                return Malformed(method.rsplit("/", 1)[-1])

        def refusal(what: str) -> str:
            return f"the request of {what} is not a valid protobuf message of its type"

        async def unary(request, context):
            if isinstance(request, Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal(request.what))
            return await behaviour(request, context)

        async def checked(requests, context):
            async for r in requests:
                if isinstance(r, Malformed):
                    raise MalformedRequest(refusal(r.what) + " (the stream ends there)")
                yield r

        kw = dict(request_deserializer=parse, response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary, **kw)
        if handler.unary_stream:
            async def unary_stream(request, context):
                if isinstance(request, Malformed):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refusal(request.what))
                async for reply in behaviour(request, context):
                    yield reply
            return grpc.unary_stream_rpc_method_handler(unary_stream, **kw)
        if handler.stream_unary:
            async def stream_unary(requests, context):
                try:
                    return await behaviour(checked(requests, context), context)
                except MalformedRequest as e:  # a servicer that let it through
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)

        async def stream_stream(requests, context):
            try:
                async for reply in behaviour(checked(requests, context), context):
                    yield reply
            except MalformedRequest as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return grpc.stream_stream_rpc_method_handler(stream_stream, **kw)


class MetricsInterceptor(_Around):
    """`asymsearch_requests_total{method, code}` and `asymsearch_request_seconds{method}`."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def _record(self, method: str, context, start: float, failed: bool) -> None:
        code = context.code()
        name = code.name if isinstance(code, grpc.StatusCode) else ("UNKNOWN" if failed else "OK")
        if name == "OK" and failed:
            name = "CANCELLED"
        self._metrics.request(method.rsplit("/", 1)[-1], name, time.perf_counter() - start)

    async def unary(self, method, context, call):
        start, failed = time.perf_counter(), True
        try:
            reply = await call()
            failed = False
            return reply
        finally:
            self._record(method, context, start, failed)

    async def stream(self, method, context, replies):
        start, failed = time.perf_counter(), True
        try:
            async for reply in replies:
                yield reply
            failed = False
        finally:
            self._record(method, context, start, failed)


class LoggingInterceptor(_Around):
    """An access-log line per RPC (method, code, ms, peer) at DEBUG; at INFO it does not wrap anything."""

    def applies(self, method: str) -> bool:
        return log.isEnabledFor(logging.DEBUG)

    def _line(self, method: str, context, start: float) -> None:
        code = context.code()
        name = code.name if isinstance(code, grpc.StatusCode) else "OK"
        ms = (time.perf_counter() - start) * 1e3
        log.debug("%s %s %.1f ms", method, name, ms,
                  extra={"event": "rpc", "method": method.rsplit("/", 1)[-1], "code": name, "ms": round(ms, 3),
                         "peer": context.peer()})

    async def unary(self, method, context, call):
        start = time.perf_counter()
        try:
            return await call()
        finally:
            self._line(method, context, start)

    async def stream(self, method, context, replies):
        start = time.perf_counter()
        try:
            async for reply in replies:
                yield reply
        finally:
            self._line(method, context, start)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer tokens (metadata `authorization: Bearer TOKEN`) with scopes (`server.tokens`): Admin always needs an
    admin token; Search needs a search (or admin) token when asked. An unknown token is UNAUTHENTICATED; a known
    one without the scope the service needs is PERMISSION_DENIED. Health and reflection need nothing."""

    def __init__(self, store: TokenStore, search_requires_token: bool) -> None:
        self._store = store
        self._search = search_requires_token

    def needs(self, method: str) -> str | None:
        if method.startswith(f"/{ADMIN_SERVICE_NAME}/"):
            return ADMIN
        if self._search and method.startswith(f"/{SERVICE_NAME}/"):
            return SEARCH
        return None

    def refusal(self, metadata: Sequence[tuple[str, Any]] | None, scope: str
                ) -> tuple[grpc.StatusCode, str] | None:
        """None when authorised, else (code, why not)."""
        tokens = self._store.tokens
        if not tokens.has(scope):
            return grpc.StatusCode.UNAUTHENTICATED, f"this server has no {scope} token configured, so this " \
                                                    f"service is closed"
        values = [v for k, v in (metadata or ()) if k == "authorization"]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, "missing bearer token (metadata 'authorization: Bearer TOKEN')"
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        kind, _, given = value.partition(" ")
        allowed = tokens.scopes_of(given.strip()) if kind.lower() == "bearer" else set()
        if not allowed:
            return grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token"
        if scope not in allowed:
            return grpc.StatusCode.PERMISSION_DENIED, f"this token's scope does not include {scope}: the " \
                                                      f"{'Admin service' if scope == ADMIN else 'Search service'} " \
                                                      f"needs a token of scope {scope}"
        return None

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        scope = self.needs(details.method) if handler is not None else None
        if scope is None:
            return handler
        refused = self.refusal(details.invocation_metadata, scope)
        if refused is None:
            return handler

        async def unary(request, context):
            await context.abort(*refused)

        async def stream(request, context):
            await context.abort(*refused)
            yield  # pragma: no cover
        return _rebuild(handler, unary, stream)


def peer_address(peer: str) -> str:
    """"ipv4:10.0.0.7:51234" -> "10.0.0.7", "ipv6:[::1]:5000" -> "::1"; a unix socket peer stays as it is."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host = rest.rpartition(":")[0] or rest
        return host.strip("[]")
    return peer


class LimitsInterceptor(_Around):
    """RESOURCE_EXHAUSTED, naming the limit, for a Search call beyond `max_per_peer` calls in progress from its
    client address, or a SearchStream beyond `max_streams` open in total. Counted on the event loop (one thread),
    so no lock is needed."""

    def __init__(self, max_per_peer: int, max_streams: int, metrics: ServerMetrics) -> None:
        self.max_per_peer = max_per_peer
        self.max_streams = max_streams
        self.by_peer: defaultdict[str, int] = defaultdict(int)
        self.streams = 0
        self._metrics = metrics

    def applies(self, method: str) -> bool:
        return method.startswith(f"/{SERVICE_NAME}/") and method not in UNLIMITED

    def _enter(self, method: str, context) -> str:
        peer = peer_address(context.peer())
        if self.by_peer[peer] >= self.max_per_peer:
            self._metrics.dropped("peer_limit")
            raise LimitReached(f"{self.by_peer[peer]} calls in progress from {peer}; the limit per client address "
                               f"is {self.max_per_peer} (--max-calls-per-peer)")
        if method == STREAM_METHOD:
            if self.streams >= self.max_streams:
                self._metrics.dropped("stream_limit")
                raise LimitReached(f"{self.streams} streams open; the limit is {self.max_streams} (--max-streams)")
            self.streams += 1
            self._metrics.streams.set(self.streams)
        self.by_peer[peer] += 1
        return peer

    def _leave(self, method: str, peer: str) -> None:
        self.by_peer[peer] -= 1
        if not self.by_peer[peer]:
            del self.by_peer[peer]
        if method == STREAM_METHOD:
            self.streams -= 1
            self._metrics.streams.set(self.streams)

    async def unary(self, method, context, call):
        try:
            peer = self._enter(method, context)
        except LimitReached as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        try:
            return await call()
        finally:
            self._leave(method, peer)

    async def stream(self, method, context, replies):
        try:
            peer = self._enter(method, context)
        except LimitReached as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        try:
            async for reply in replies:
                yield reply
        finally:
            self._leave(method, peer)
