"""`asymsearch web`: a small web page and the HTTP gateway behind it, in front of the gRPC query server.

    gateway = start_gateway(SearchClient("127.0.0.1:50051"), port=0)   # serving in a background thread
    print(gateway.url)                                                  # http://127.0.0.1:PORT/
    ...
    gateway.stop()

The standard library's `ThreadingHTTPServer`, no web framework. Routes:

    GET  /                 the page (clients/web_page.html): upload or drop an image, see the top-k thumbnails
    POST /api/search?k=K   the image as the request body (raw bytes, or multipart/form-data with one file) ->
                           {"hits": [{rank, id, score, label, path, name, metadata, thumbnail}], "k",
                            "server_ms": {decode, embed, search, queue}, "gateway_ms", "index_version"}
    GET  /api/info         the server's Info, and the gateway's own limits
    GET  /thumb/ID         a JPEG thumbnail of database image ID

Every failure is one line for a person, as JSON `{"error": "..."}` with a 4xx/5xx status: 400 an unreadable
image or a bad k, 401/403 a token the server refused, 404 an unknown route or thumbnail, 411/413 a missing length
or an upload over the limit, 502 a server failure, 503 a server that is down, busy or too slow. The gateway keeps
serving after any of them.

Thumbnails are served only for images the server itself named in a search result (id -> path, learned from the
hits, most recent first), and only when that file is on the gateway's disk: a URL never names a path, so there is
nothing to traverse. No torch here: grpcio and Pillow through the SDK.
"""
from __future__ import annotations

import collections
import dataclasses
import email.parser
import email.policy
import io
import json
import logging
import os
import re
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from asymsearch.clients.client import (InvalidRequest, NotAuthorised, SearchClient, SearchError, ServerBusy,
                                       ServerUnavailable, hits_from_reply)
from asymsearch.core.errors import UserError
from asymsearch.core.preprocess import decode_image

log = logging.getLogger("asymsearch.web")

DEFAULT_MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # the server's default message limit
THUMB_PIXELS = 160  # longest side of a thumbnail
KNOWN_PATHS = 100_000  # ids whose paths the gateway remembers (most recently seen kept)
CACHED_THUMBS = 1024
THUMB_ROUTE = re.compile(r"^/thumb/(\d{1,19})$")


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


class Gateway:
    """What the HTTP handler calls: search, info and thumbnails, each raising `HttpError` for a bad request."""

    def __init__(self, client: SearchClient, options: GatewayOptions = GatewayOptions()) -> None:
        self.client = client
        self.options = options
        self._paths: collections.OrderedDict[int, str] = collections.OrderedDict()  # id -> path from hits
        self._thumbs: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def search(self, image: bytes, k: int) -> dict[str, Any]:
        if not image:
            raise HttpError(400, "no image in the request: choose or drop an image file")
        start = time.perf_counter()
        reply = _sdk_call(lambda: self.client.search_image_reply(image, k))  # with the server's own timings
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


class _Handler(BaseHTTPRequestHandler):
    server: "WebGateway"
    server_version = "asymsearch-web"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
        self._dispatch(self._get)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(self._post)

    def _get(self, path: str, query: dict[str, list[str]]) -> None:
        if path in ("/", "/index.html"):
            self._send(200, page_html(), "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(200, self.server.gateway.info())
        elif path == "/healthz":
            self._json(200, {"status": "ok"})
        elif (m := THUMB_ROUTE.match(path)) is not None:
            self._send(200, self.server.gateway.thumbnail(int(m.group(1))), "image/jpeg",
                       cache="private, max-age=300")
        else:
            raise HttpError(404, f"not found: {path}")

    def _post(self, path: str, query: dict[str, list[str]]) -> None:
        if path != "/api/search":
            raise HttpError(404, f"not found: {path}")
        k = self._k(query)
        body = self._body()
        image = image_from_body(body, self.headers.get("Content-Type", ""))
        self._json(200, self.server.gateway.search(image, k))

    def _k(self, query: dict[str, list[str]]) -> int:
        raw = (query.get("k") or [""])[-1].strip()
        if not raw:
            return self.server.gateway.options.default_k
        if not raw.isdigit() or int(raw) < 1:
            raise HttpError(400, f"k must be a whole number of at least 1, got {raw!r}")
        return int(raw)

    def _body(self) -> bytes:
        limit = self.server.gateway.options.max_upload_bytes
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            raise HttpError(411, "send the image with a Content-Length")
        if not length.isdigit():
            raise HttpError(400, f"bad Content-Length {length!r}")
        if int(length) > limit:
            raise HttpError(413, f"the image is {int(length) / 2**20:.1f} MiB; the limit is "
                                 f"{limit / 2**20:.1f} MiB")
        body = self.rfile.read(int(length))
        self._consumed = True
        return body

    def _dispatch(self, route) -> None:
        start = time.perf_counter()
        parts = urlsplit(self.path)
        status = 200
        self._consumed = self.command != "POST"
        try:
            route(parts.path, parse_qs(parts.query))
        except HttpError as e:
            status = e.status
            if not self._consumed:
                self.close_connection = True  # an unread body must not be taken for the next request
            self._json(e.status, {"error": str(e)})
        except (BrokenPipeError, ConnectionResetError):
            status = 499
            self.close_connection = True
        except Exception as e:  # a bug: one line for the person, the traceback in the gateway's log
            status = 500
            self.close_connection = True
            log.exception("gateway error on %s %s", self.command, self.path)
            self._json(500, {"error": f"internal gateway error ({type(e).__name__}); see the gateway's log"})
        log.debug("%s %s %d %.1f ms", self.command, parts.path, status, (time.perf_counter() - start) * 1000)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _send(self, status: int, body: bytes, content_type: str, cache: str = "no-store") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server signature)
        log.info("%s %s", self.address_string(), format % args)


class WebGateway(ThreadingHTTPServer):
    """The HTTP server: one thread per connection, all sharing one `Gateway` (and its one gRPC channel)."""

    daemon_threads = True

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.gateway = gateway
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def start(self) -> "WebGateway":
        self._thread = threading.Thread(target=self.serve_forever, name="asymsearch-web", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()


def start_gateway(client: SearchClient, *, host: str = "127.0.0.1", port: int = 0,
                  options: GatewayOptions = GatewayOptions()) -> WebGateway:
    """Serve the page and the API for `client`'s server in a background thread; `port=0` picks a free port."""
    return WebGateway(Gateway(client, options), host, port).start()


def serve_web(client: SearchClient, *, host: str = "127.0.0.1", port: int = 8080,
              options: GatewayOptions = GatewayOptions(), announce=print) -> None:
    """Serve until interrupted (Ctrl-C), on the calling thread."""
    httpd = WebGateway(Gateway(client, options), host, port)
    announce(f"asymsearch web: serving {httpd.url} (gateway to {client.address}); Ctrl-C stops it")
    sys.stdout.flush()
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
