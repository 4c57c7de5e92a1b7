"""`asymsearch web`: a small web page and the HTTP gateway behind it, in front of the gRPC query server.

    gateway = start_gateway(SearchClient("127.0.0.1:50051"), port=0)   # serving in a background thread
    print(gateway.url)                                                  # http://127.0.0.1:PORT/
    ...
    gateway.stop()

A Starlette app served by uvicorn (h11). Routes:

    GET  /                 the page (clients/web_page.html): upload or drop an image, see the top-k thumbnails
    POST /api/search?k=K&filter=EXPR
                           the image as the request body (raw bytes, or multipart/form-data with one file) ->
                           {"hits": [{rank, id, score, label, path, name, metadata, thumbnail}], "k", "filter",
                            "server_ms": {decode, embed, search, queue}, "gateway_ms", "index_version"}
    GET  /api/info         the server's Info, and the gateway's own limits
    GET  /thumb/ID         a JPEG thumbnail of database image ID
    GET  /healthz          {"status": "ok"}

What the gateway enforces (`GatewayOptions`, the `asymsearch web` flags):

- the Host header must name an allowed host (the bound address, localhost, 127.0.0.1, ::1, and `allow_hosts`):
  a page on another site whose name was re-pointed at this machine (DNS rebinding) gets 400;
- a request with an Origin header must come from this page (Origin = the Host it was sent to) or from one of
  `allow_origins`: a cross-site POST gets 403 and never reaches the server (nor spends the gateway's token);
- a connection has `header_timeout` s to send each request's headers (at most `max_header_bytes`, else 400) and
  `body_timeout` s for the whole upload (408); an idle keep-alive connection is closed after `keep_alive_timeout` s;
- at most `max_connections` connections and requests at a time (uvicorn's `limit_concurrency`): beyond, 503;
- the upload is counted while it streams in: 413 as soon as it passes `max_upload_bytes` (at once when the
  Content-Length says so), never read whole first. The default is the largest image that fits in one gRPC message;
- every malformed parameter is a 400 with one line saying what is wrong;
- on SIGINT / SIGTERM (or `stop()`), the listening socket closes, requests still reading an upload or waiting for
  the server are answered 503 at once, and `serve` returns within `shutdown_timeout` s plus a tick.

Every failure is one line for a person, as JSON `{"error": "..."}` with a 4xx/5xx status: 400 an unreadable
image, a bad parameter or a foreign Host, 401/403 a token the server refused (or a foreign Origin), 404 an unknown
route or thumbnail, 408 an upload too slow, 413 an upload over the limit, 502 a server failure, 503 a server that
is down, busy or too slow, or a gateway shutting down. The gateway keeps serving after any of them.

Thumbnails are served only for images the server itself named in a search result (id -> path, learned from the
hits, most recent first), and only when that file is on the gateway's disk: a URL never names a path, so there is
nothing to traverse. The blocking SDK calls and thumbnail decodes run on worker threads (at most
`max_connections`); a connection waiting for bytes holds no thread. No torch here.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import email.parser
import email.policy
import functools
import inspect
import io
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from asymsearch.clients.client import (MAX_MESSAGE_BYTES, InvalidRequest, NotAuthorised, SearchClient, SearchError,
                                       ServerBusy, ServerUnavailable, hits_from_reply)
from asymsearch.core.errors import UserError
from asymsearch.core.filters import MAX_FILTER_CHARS
from asymsearch.core.preprocess import decode_image

log = logging.getLogger("asymsearch.web")

QUERY_ENVELOPE_BYTES = 64  # an ImageQuery around the image: the field tags, the length varint, k (11 bytes at most)
THUMB_PIXELS = 160  # longest side of a thumbnail
KNOWN_PATHS = 100_000  # ids whose paths the gateway remembers (most recently seen kept)
CACHED_THUMBS = 1024
MAX_K = 2**31 - 1  # k is an int32 on the wire; the server's own max_k is far below
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")
# a thread left running when its request is given up (anyio >= 4.1 names it so; 4.0 called it `cancellable`)
_ABANDON = ({"abandon_on_cancel": True} if "abandon_on_cancel" in inspect.signature(anyio.to_thread.run_sync).parameters
            else {"cancellable": True})
_DIGITS = re.compile(r"[0-9]{1,19}")  # ASCII only: str.isdigit() also takes '²', which int() refuses


def max_image_bytes(server_max_message_bytes: int = 0) -> int:
    """The largest upload that fits, with its envelope, in one gRPC message both this client and the server take
    (`server_max_message_bytes` from the server's Info; 0: unknown)."""
    limit = MAX_MESSAGE_BYTES
    if server_max_message_bytes > 0:
        limit = min(limit, server_max_message_bytes)
    return limit - QUERY_ENVELOPE_BYTES


DEFAULT_MAX_UPLOAD_BYTES = max_image_bytes()


class HttpError(Exception):
    """An answer other than 200: its status and the one line shown to the person."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class GatewayOptions:
    default_k: int = 5
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    thumb_pixels: int = THUMB_PIXELS
    max_connections: int = 32  # connections and requests at a time; beyond, 503 (uvicorn's limit_concurrency)
    header_timeout: float = 10.0  # seconds a connection has to send a request's headers
    body_timeout: float = 60.0  # seconds for the whole upload
    keep_alive_timeout: int = 5  # seconds an idle keep-alive connection is kept
    max_header_bytes: int = 16 * 1024  # request line + headers (h11's max_incomplete_event_size); beyond, 400
    shutdown_timeout: float = 0.5  # seconds in-flight answers get on SIGINT / SIGTERM before being cancelled
    allow_hosts: tuple[str, ...] = ()  # Host names accepted besides the bound address and the loopback names
    allow_origins: tuple[str, ...] = ()  # Origins accepted besides the page's own, e.g. "https://search.example"


class Gateway:
    """What the HTTP handler calls: search, info and thumbnails, each raising `HttpError` for a bad request."""

    def __init__(self, client: SearchClient, options: GatewayOptions = GatewayOptions()) -> None:
        self.client = client
        self.options = options
        self._paths: collections.OrderedDict[int, str] = collections.OrderedDict()  # id -> path from hits
        self._thumbs: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def search(self, image: bytes, k: int, filter: str = "") -> dict[str, Any]:
        """`filter`: only items matching it (the server parses it; a malformed one is a 400 naming the position)."""
        if not image:
            raise HttpError(400, "no image in the request: choose or drop an image file")
        start = time.perf_counter()
        extra = {"filter": filter} if filter else {}
        reply = _sdk_call(lambda: self.client.search_image_reply(image, k, **extra))  # with the server's own timings
        gateway_ms = (time.perf_counter() - start) * 1000
        hits = hits_from_reply(reply)
        with self._lock:
            for h in hits:
                if self._paths.get(h.id) != h.path:
                    self._thumbs.pop(h.id, None)  # an updated index may have given the id another image
                self._paths[h.id] = h.path
                self._paths.move_to_end(h.id)
            while len(self._paths) > KNOWN_PATHS:
                self._paths.popitem(last=False)
        return {
            "k": k,
            "filter": filter,
            "index_version": reply.index_version,
            "gateway_ms": round(gateway_ms, 3),
            "server_ms": {"decode": round(reply.decode_ms, 3), "embed": round(reply.embed_ms, 3),
                          "search": round(reply.search_ms, 3), "queue": round(reply.queue_ms, 3)},
            "hits": [{"rank": rank, "id": h.id, "score": h.score, "label": h.label, "path": h.path,
                      "name": os.path.basename(h.path), "metadata": h.metadata,
                      "thumbnail": f"/thumb/{h.id}" if os.path.isfile(h.path) else None}
                     for rank, h in enumerate(hits, start=1)],
        }

    def info(self) -> dict[str, Any]:
        info = _sdk_call(self.client.info)
        return {"server": self.client.address, "info": info, "default_k": self.options.default_k,
                "max_upload_bytes": self.options.max_upload_bytes}

    def thumbnail(self, image_id: int) -> bytes:
        """A JPEG of database image `image_id`, if a search result named it and its file is readable here."""
        with self._lock:
            path = self._paths.get(image_id)
            cached = self._thumbs.get(image_id)
            if cached is not None:
                self._thumbs.move_to_end(image_id)
                return cached
        if path is None or not os.path.isfile(path):
            raise HttpError(404, f"no thumbnail for id {image_id}")
        try:
            image = decode_image(path)
        except UserError as e:
            raise HttpError(404, f"no thumbnail for id {image_id}: {e}") from None
        image.thumbnail((self.options.thumb_pixels, self.options.thumb_pixels))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        with self._lock:
            self._thumbs[image_id] = data
            while len(self._thumbs) > CACHED_THUMBS:
                self._thumbs.popitem(last=False)
        return data


def _sdk_call(call):
    """The SDK's typed errors -> an `HttpError` with the status a browser or script expects."""
    try:
        return call()
    except InvalidRequest as e:
        raise HttpError(400, str(e) or "the server refused the request") from None
    except NotAuthorised as e:
        status = 401 if e.code is not None and e.code.name == "UNAUTHENTICATED" else 403
        raise HttpError(status, f"{e} (the gateway's --token)") from None
    except (ServerUnavailable, ServerBusy) as e:
        raise HttpError(503, str(e)) from None
    except SearchError as e:
        raise HttpError(502, str(e)) from None
    except UserError as e:
        raise HttpError(400, str(e)) from None


def page_html() -> bytes:
    return resources.files("asymsearch.clients").joinpath("web_page.html").read_bytes()


def image_from_body(body: bytes, content_type: str) -> bytes:
    """The uploaded image: the raw body, or the first file part of a multipart/form-data body."""
    if not content_type.lower().startswith("multipart/form-data"):
        return body
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body)
    if not message.is_multipart():
        raise HttpError(400, "a multipart/form-data body without parts")
    for part in message.iter_parts():
        if part.get_filename() is not None or part.get_param("name", header="content-disposition") in ("image",
                                                                                                        "file"):
            return part.get_payload(decode=True) or b""
    raise HttpError(400, "no file in the multipart/form-data body (send it as the field `image`)")


def parse_k(values: list[str], default: int) -> int:
    """`?k=` (the last one if repeated): empty or absent -> `default`; else a whole number 1..MAX_K, or 400."""
    raw = values[-1].strip() if values else ""
    if not raw:
        return default
    if _DIGITS.fullmatch(raw) is None or int(raw) < 1:
        raise HttpError(400, f"k must be a whole number of at least 1, got {raw[:40]!r}")
    if int(raw) > MAX_K:
        raise HttpError(400, f"k={raw} is larger than any server answers (the server's Info gives its max_k)")
    return int(raw)


def parse_filter_param(values: list[str]) -> str:
    """`?filter=` (the last one if repeated) as text for the server to parse; longer than the grammar allows: 400."""
    raw = values[-1] if values else ""
    if len(raw) > MAX_FILTER_CHARS:
        raise HttpError(400, f"the filter is {len(raw)} characters long; the limit is {MAX_FILTER_CHARS}")
    return raw


# -- Host and Origin ------------------------------------------------------------------------------------------

def _hostname(host_header: str) -> str:
    """'Example.org:8080' -> 'example.org', '[::1]:80' -> '::1'."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed_hosts(bound_host: str, extra: tuple[str, ...] = ()) -> frozenset[str]:
    names = {*LOOPBACK_HOSTS, *(_hostname(h) for h in extra)}
    if bound_host not in WILDCARD_HOSTS:
        names.add(bound_host.strip("[]").lower())
    return frozenset(names)


def _origin(value: str) -> str:
    return value.strip().lower().rstrip("/")


class HostOriginGuard:
    """ASGI middleware: refuse a Host that is not ours (DNS rebinding, 400) and an Origin that is not the page's
    own or an allowed one (cross-site requests, 403), before any route runs."""

    def __init__(self, app, hosts: frozenset[str], origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = frozenset(_origin(o) for o in origins)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(Headers(scope=scope))
            if refusal is not None:
                await _error_response(refusal, close=True)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers) -> HttpError | None:
        host = headers.get("host", "")
        if _hostname(host) not in self.hosts:
            return HttpError(400, f"Host {host[:100]!r} is not a name this gateway answers to (DNS rebinding "
                                  f"guard; allowed: {', '.join(sorted(self.hosts))}; add one with --allow-host)")
        origin = headers.get("origin")
        if origin is None:  # not sent by browsers for same-origin GETs, nor by curl or scripts
            return None
        parts = urlsplit(_origin(origin))
        same_origin = parts.scheme in ("http", "https") and parts.netloc == host.strip().lower()
        if not same_origin and _origin(origin) not in self.origins:
            return HttpError(403, f"cross-site request refused: Origin {origin[:100]!r} is not this page's "
                                  f"(add it with --allow-origin)")
        return None


# -- responses -------------------------------------------------------------------------------------------------

SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def _response(status: int, body: bytes, media_type: str, cache: str = "no-store", close: bool = False) -> Response:
    headers = {"cache-control": cache, **SECURITY_HEADERS}
    if close:
        headers["connection"] = "close"  # an unread body must not be taken for the next request
    return Response(body, status_code=status, media_type=media_type, headers=headers)


def _json(status: int, payload: dict[str, Any], close: bool = False) -> Response:
    return _response(status, json.dumps(payload).encode("utf-8"), "application/json", close=close)


def _error_response(error: HttpError, close: bool = False) -> Response:
    return _json(error.status, {"error": str(error)}, close=close)


# -- the app ---------------------------------------------------------------------------------------------------

class _App:
    """The routes over one `Gateway`: bodies read with a running count, blocking calls on bounded worker threads,
    both given up at once (503) when the gateway shuts down."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.options = gateway.options
        self._closing = asyncio.Event()
        self._limiter: anyio.CapacityLimiter | None = None

    def close(self) -> None:
        """Called on the event loop when shutdown starts."""
        self._closing.set()

    async def _unless_closing(self, awaitable):
        work = asyncio.ensure_future(awaitable)
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            done, _ = await asyncio.wait({work, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not work.done():
                work.cancel()
        if work in done:
            return work.result()
        raise HttpError(503, "the gateway is shutting down")

    async def _blocking(self, call: Callable[[], Any]) -> Any:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.options.max_connections)
        return await self._unless_closing(
            anyio.to_thread.run_sync(call, limiter=self._limiter, **_ABANDON))

    async def _body(self, request: Request) -> bytes:
        limit = self.options.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if _DIGITS.fullmatch(declared.strip()) is None:
                raise HttpError(400, f"bad Content-Length {declared[:40]!r}")
            if int(declared) > limit:
                raise HttpError(413, _too_large(int(declared), limit))
        body = bytearray()

        async def read() -> None:
            with anyio.fail_after(self.options.body_timeout):
                async for chunk in request.stream():
                    body.extend(chunk)
                    if len(body) > limit:
                        raise HttpError(413, _too_large(None, limit))

        try:
            await self._unless_closing(read())
        except TimeoutError:
            raise HttpError(408, f"the upload did not arrive within {self.options.body_timeout:g} s") from None
        except ClientDisconnect:
            raise HttpError(400, "the upload was interrupted") from None
        return bytes(body)

    async def page(self, request: Request) -> Response:
        return _response(200, page_html(), "text/html; charset=utf-8")

    async def healthz(self, request: Request) -> Response:
        return _json(200, {"status": "ok"})

    async def info(self, request: Request) -> Response:
        return _json(200, await self._blocking(self.gateway.info))

    async def thumbnail(self, request: Request) -> Response:
        raw = request.path_params["image_id"]
        if _DIGITS.fullmatch(raw) is None:
            raise HttpError(404, f"not found: {request.url.path[:200]}")
        data = await self._blocking(functools.partial(self.gateway.thumbnail, int(raw)))
        return _response(200, data, "image/jpeg", cache="private, max-age=300")

    async def search(self, request: Request) -> Response:
        k = parse_k(request.query_params.getlist("k"), self.options.default_k)
        filter_text = parse_filter_param(request.query_params.getlist("filter"))
        image = image_from_body(await self._body(request), request.headers.get("content-type", ""))
        return _json(200, await self._blocking(functools.partial(self.gateway.search, image, k, filter_text)))


def _too_large(size: int | None, limit: int) -> str:
    what = f"the image is {size / 2**20:.1f} MiB" if size is not None else "the image is larger than the limit"
    return f"{what}; the limit is {limit / 2**20:.1f} MiB ({limit} bytes)"


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return _error_response(exc, close=request.method == "POST")


async def _on_starlette_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = f"not found: {request.url.path[:200]}" if exc.status_code == 404 else str(exc.detail)
    return _json(exc.status_code, {"error": message}, close=request.method == "POST")


async def _on_bug(request: Request, exc: Exception) -> Response:  # uvicorn logs the traceback
    return _json(500, {"error": f"internal gateway error ({type(exc).__name__}); see the gateway's log"}, close=True)


def create_app(gateway: Gateway, hosts: frozenset[str], origins: tuple[str, ...] = ()) -> tuple[Starlette, _App]:
    """The Starlette app for `gateway`, answering only requests whose Host is in `hosts`."""
    app = _App(gateway)
    routes = [Route("/", app.page, methods=["GET"]), Route("/index.html", app.page, methods=["GET"]),
              Route("/healthz", app.healthz, methods=["GET"]), Route("/api/info", app.info, methods=["GET"]),
              Route("/thumb/{image_id}", app.thumbnail, methods=["GET"]),
              Route("/api/search", app.search, methods=["POST"])]
    starlette = Starlette(routes=routes, middleware=[Middleware(HostOriginGuard, hosts=hosts, origins=origins)],
                          exception_handlers={HttpError: _on_http_error, HTTPException: _on_starlette_error,
                                              Exception: _on_bug})
    return starlette, app


# -- the server ------------------------------------------------------------------------------------------------

class _H11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers.

    uvicorn times out only an idle keep-alive connection after a response, and cancels that timer at the first byte
    of the next request: a connection that never completes its headers (or never sends any) would be held for ever
    and count against limit_concurrency. Here every connection gets `header_timeout` s from its start, and again
    after each response, to deliver the next request's headers; then it is closed unless a request is running."""

    def __init__(self, *args: Any, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self._header_timeout, self._headers_overdue)

    def _headers_overdue(self) -> None:
        self._header_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when shutdown starts, and without re-raising the signal that stopped it
    (uvicorn does, which would turn a clean stop into exit status 130 or death by SIGTERM)."""

    def __init__(self, config: uvicorn.Config, app: _App) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._app.close()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET  # "localhost": 127.0.0.1, as before
        return socket.create_server((host.strip("[]"), port), family=family, backlog=256)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


class WebGateway:
    """The HTTP server around one `Gateway` (and its one gRPC channel): bound at construction, then served on the
    calling thread (`serve`, stopped by SIGINT / SIGTERM) or a background thread (`start` ... `stop`)."""

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.gateway = gateway
        o = gateway.options
        self.host = host
        self._socket = _listen(host, port)
        self.server_address = self._socket.getsockname()[:2]
        self.allowed_hosts = allowed_hosts(host, o.allow_hosts)
        asgi, self._app = create_app(gateway, self.allowed_hosts, o.allow_origins)
        config = uvicorn.Config(
            asgi, http=functools.partial(_H11Protocol, header_timeout=o.header_timeout), loop="asyncio",
            lifespan="off", interface="asgi3", log_config=None, access_log=log.isEnabledFor(logging.INFO),
            proxy_headers=False, server_header=False, limit_concurrency=o.max_connections,
            timeout_keep_alive=o.keep_alive_timeout, timeout_graceful_shutdown=o.shutdown_timeout,  # type: ignore
            h11_max_incomplete_event_size=o.max_header_bytes, backlog=256)
        self._server = _Server(config, self._app)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = "127.0.0.1" if host in WILDCARD_HOSTS else host
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def serve(self) -> None:
        """Serve until SIGINT or SIGTERM (when on the main thread) or `stop()`."""
        try:
            self._server.run(sockets=[self._socket])
        finally:
            self._socket.close()

    def start(self) -> WebGateway:
        self._thread = threading.Thread(target=self.serve, name="asymsearch-web", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the web gateway did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()


def start_gateway(client: SearchClient, *, host: str = "127.0.0.1", port: int = 0,
                  options: GatewayOptions = GatewayOptions()) -> WebGateway:
    """Serve the page and the API for `client`'s server in a background thread; `port=0` picks a free port."""
    return WebGateway(Gateway(client, options), host, port).start()


def serve_web(client: SearchClient, *, host: str = "127.0.0.1", port: int = 8080,
              options: GatewayOptions = GatewayOptions(), announce=print) -> None:
    """Serve until SIGINT or SIGTERM, on the calling thread; returns normally after either."""
    httpd = WebGateway(Gateway(client, options), host, port)
    announce(f"asymsearch web: serving {httpd.url} (gateway to {client.address}); Ctrl-C stops it")
    sys.stdout.flush()
    httpd.serve()
