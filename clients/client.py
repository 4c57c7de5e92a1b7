"""The Python client of the query server, and the on-device embedder for sending vectors instead of images.

    with SearchClient("localhost:50051") as client:
        client.wait_ready(10)
        hits = client.search_image("query.jpg", k=5)          # the server embeds the image with its student
        hits = client.search_on_device(OnDeviceEmbedder("student.onnx"), "query.jpg", k=5)  # only a vector leaves

    with SearchClient("search.example.org:443", tls=TlsOptions(root_ca="ca.pem"), token="...") as client:
        results = client.batch_search(["a.jpg", "b.jpg", vector], k=5)  # one call, one result per query
        for tag, hits in client.stream_search(many_images, k=5): ...    # pipelined: results as they are ready
        client.reload()                                                   # Admin service (needs the token)

    with SearchClient(["10.0.0.1:50051", "10.0.0.2:50051"]) as client:  # replicas: gRPC's round_robin policy
        hits = client.search(pil_image, k=5)                                # path, bytes, PIL image or vector

    with OnDeviceClient(student="student.int8.onnx", address="localhost:50051") as client:
        hits = client.search("query.jpg", k=5)   # embedded here; only the vector (~2 KB) is sent

The asyncio twin is `asymsearch.clients.aio.AsyncSearchClient` (same methods, awaited).

gRPC failures surface as `SearchError` subclasses carrying the server's message; a local file that cannot be
read is a `UserError`. UNAVAILABLE (the server restarting, a connection lost) is retried `retries` times with
exponential back-off and jitter; every other failure is raised at once. No torch here: onnxruntime, grpcio,
numpy and Pillow only.
"""
from __future__ import annotations

import dataclasses
import os
import io
import random
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asymsearch.core import manifest as pairing
from asymsearch.core.errors import UserError
from asymsearch.core.ort import OnnxEmbedder
from asymsearch.core.preprocess import DEFAULT_MAX_PIXELS, decode_image
from asymsearch.protos.v1 import search_pb2, search_pb2_grpc

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["Search"].full_name
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class SearchError(Exception):
    """A request the server did not answer; `code` is the gRPC status code when there was one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class InvalidRequest(SearchError):
    """The server refused the request (INVALID_ARGUMENT): a bad image, vector or k. The message says which."""


class ServerUnavailable(SearchError):
    """The server cannot be reached or did not answer in time (UNAVAILABLE, DEADLINE_EXCEEDED)."""


class ServerBusy(SearchError):
    """The server's queue is full (RESOURCE_EXHAUSTED): retry later, or elsewhere."""


class NotAuthorised(SearchError):
    """A missing or wrong bearer token or client certificate (UNAUTHENTICATED, PERMISSION_DENIED)."""


@dataclasses.dataclass(frozen=True)
class TlsOptions:
    """TLS for the channel: `root_ca` verifies the server (None: the system's roots); `cert` + `key` are the
    client's own certificate when the server asks for one. Paths to PEM files, or the PEM bytes."""

    root_ca: str | os.PathLike | bytes | None = None
    cert: str | os.PathLike | bytes | None = None
    key: str | os.PathLike | bytes | None = None
    server_name: str | None = None  # check the server's certificate for this name instead of the host's

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=_pem(self.root_ca), private_key=_pem(self.key),
                                            certificate_chain=_pem(self.cert))


@dataclasses.dataclass(frozen=True)
class Hit:
    id: int
    score: float  # cosine similarity of the query and the database image
    path: str
    label: str
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)


ImageSource = str | os.PathLike | bytes
Address = str | Sequence[str]
LB_POLICY = "round_robin"


def channel_target(address: Address) -> str:
    """One gRPC target for one or several "host:port" addresses.

    One address (or a comma-separated string holding one) is used as given. Several become a static
    `ipv4:` / `ipv6:` target listing every resolved address, which the `round_robin` load-balancing policy
    (see `channel_options`) spreads calls across; host names are resolved once, here (UserError if one cannot be).
    """
    addresses = _split(address)
    if len(addresses) == 1:
        return addresses[0]
    v4: list[str] = []
    v6: list[str] = []
    for a in addresses:
        host, sep, port = a.rpartition(":")
        if not sep or not port.isdigit():
            raise UserError(f"a server address must be HOST:PORT, got {a!r}")
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise UserError(f"cannot resolve server host {host!r}: {e.strerror or e}") from None
        info = next((i for i in infos if i[0] == socket.AF_INET), infos[0])  # IPv4 first: mixes need one family
        ip, family = info[4][0], info[0]
        (v6 if family == socket.AF_INET6 else v4).append(f"[{ip}]:{port}" if family == socket.AF_INET6
                                                          else f"{ip}:{port}")
    if v4 and v6:
        raise UserError("several server addresses must be all IPv4 or all IPv6")
    return ("ipv6:" if v6 else "ipv4:") + ",".join(v6 or v4)


def channel_options(address: Address, tls: "TlsOptions | None" = None) -> list[tuple[str, Any]]:
    """Channel options shared by the sync and asyncio clients: message limits, round robin for several
    addresses, and (TLS with several addresses) the first host's name as the certificate name to check."""
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    addresses = _split(address)
    if len(addresses) > 1:
        options.append(("grpc.lb_policy_name", LB_POLICY))
    if tls is not None:
        name = tls.server_name or (addresses[0].rpartition(":")[0].strip("[]") if len(addresses) > 1 else None)
        if name:
            options.append(("grpc.ssl_target_name_override", name))
    return options


def _split(address: Address) -> list[str]:
    parts = address.split(",") if isinstance(address, str) else [str(a) for a in address]
    parts = [p.strip() for p in parts if p.strip()]
    if not parts:
        raise UserError("no server address given")
    return parts



def open_channel(module, address: Address, token: str | None, tls: "TlsOptions | None"):
    """(channel, call metadata) for `address`: `module` is `grpc` for the sync client, `grpc.aio` for the async one;
    one or several addresses (round robin), TLS when `tls` is given, the bearer token as call metadata."""
    target, options = channel_target(address), channel_options(address, tls)
    channel = (module.secure_channel(target, tls.credentials(), options=options) if tls is not None
               else module.insecure_channel(target, options=options))
    return channel, ((("authorization", f"Bearer {token}"),) if token else None)

def _display(address: Address) -> str:
    return ",".join(_split(address))


class OnDeviceEmbedder:
    """The student model run locally: images become vectors here, and only the vectors go to the server.

    Pixels are prepared by the same core functions the server and the index builder use.
    """

    def __init__(self, student_onnx: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.model = OnnxEmbedder(student_onnx)
        self.max_pixels = max_pixels

    @property
    def teacher_id(self) -> str:
        return self.model.teacher_id

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def student_id(self) -> str:
        """The id of this student (its manifest's model id): sent with every vector it makes, so the server can
        refuse a vector of a student it has not paired with its index."""
        return self.model.manifest.model_id

    def embed(self, image: ImageSource) -> np.ndarray:
        """An image file or encoded bytes -> its embedding (dim,) float32. Unreadable input raises `UserError`."""
        source = image if isinstance(image, bytes) else Path(image)
        # decoded as the server decodes (at no more than the model needs), so both embed the same pixels
        return self.model.embed_images([decode_image(source, self.max_pixels,
                                                     min_side=self.model.manifest.preprocessing.resize)])[0]


class SearchClient:
    """A connection to a query server at `address` ("host:port"); `timeout` is the deadline of each call, seconds.

    `token` is sent as `authorization: Bearer TOKEN` (the Admin service always needs it); `tls` turns TLS on.
    UNAVAILABLE is retried `retries` times, waiting `backoff` s, then twice that, ... (at most `max_backoff` s),
    each wait with +-50% jitter so that many clients do not come back at the same instant.
    """

    def __init__(self, address: Address, *, timeout: float = 10.0, token: str | None = None,
                 tls: TlsOptions | None = None, retries: int = 3, backoff: float = 0.1,
                 max_backoff: float = 2.0) -> None:
        self.address = _display(address)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.attempts = 0  # calls sent, retries included (for tests and diagnostics)
        self._channel, self._metadata = open_channel(grpc, address, token, tls)
        self._stub = search_pb2_grpc.SearchStub(self._channel)
        self._admin = search_pb2_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._server_info: dict[str, Any] | None = None

    def search_image(self, image: ImageSource, k: int = 10, *, tier: str = "", filter: str = "") -> list[Hit]:
        """Send an image (a file path or encoded bytes); the server embeds it with the student of `tier` (see
        `info()["tiers"]`; empty: the server's default tier). `filter`: only items matching this expression, e.g.
        `label in ("Blue_Jay", "Cardinal") and shop = "north"` (fields: `info()["filter_fields"]`; a malformed one
        raises `InvalidRequest` naming the position)."""
        return hits_from_reply(self.search_image_reply(image, k, tier=tier, filter=filter))

    def search_image_reply(self, image: ImageSource, k: int = 10, *, tier: str = "", filter: str = ""
                           ) -> search_pb2.SearchReply:
        """`search_image`, returning the whole reply: the hits plus the server's own timings and index version
        (`hits_from_reply` turns its hits into `Hit` objects)."""
        data = image if isinstance(image, bytes) else _read_file(Path(image))
        return self._call(self._stub.SearchImage, search_pb2.ImageQuery(image=data, k=k, tier=tier, filter=filter))

    def search_pil(self, image: Any, k: int = 10) -> list[Hit]:
        """Send a PIL image (encoded losslessly as PNG here); the server embeds it with its student."""
        return self.search_image(encode_pil(image), k)

    def search(self, query: Any, k: int = 10) -> list[Hit]:
        """One query of any kind: a path, encoded bytes, a PIL image, or a vector (a 1-D array or sequence)."""
        if isinstance(query, (bytes, str, os.PathLike)):
            return self.search_image(query, k)
        if _is_pil(query):
            return self.search_pil(query, k)
        return self.search_vector(query, k)

    def search_vector(self, vector: Sequence[float] | np.ndarray, k: int = 10, *, tier: str = "",
                      student_id: str = "", filter: str = "") -> list[Hit]:
        """Send a student embedding of the server's dimension (see `info()["dim"]`); the server normalises it.
        `student_id`: the model id of the student that made it; the server refuses the vector when it has not
        paired that student with its index. `filter` as in `search_image`."""
        return _hits(self._call(self._stub.SearchVector, search_pb2.VectorQuery(
            vector=_vector(vector), k=k, tier=tier, student_id=student_id, filter=filter)))

    def search_on_device(self, embedder: OnDeviceEmbedder, image: ImageSource, k: int = 10) -> list[Hit]:
        """Embed `image` locally with `embedder` and send only the vector.

        Raises `PairingError` when the embedder's teacher is not the one that embedded the server's index (the
        server's info is asked once per client and remembered).
        """
        if self._server_info is None:
            self._server_info = self.info()
        check_pairing(embedder, self._server_info, self.address)
        return self.search_vector(embedder.embed(image), k, student_id=embedder.student_id)

    def batch_search(self, queries: Sequence[ImageSource | Sequence[float] | np.ndarray], k: int = 10, *,
                     tier: str = "", student_id: str = "", filter: str = "") -> list[list[Hit] | SearchError]:
        """Many queries in one call: images (paths or bytes) and/or vectors. One entry per query, in order: its
        hits, or the `SearchError` (e.g. `InvalidRequest`) that query alone failed with.

        A batch larger than the server takes in one call (`max_batch_queries` and `max_message_bytes` in its
        Info, asked once and remembered) is sent as several calls, one after another, and the results are put back
        in the order of `queries`. `tier`, `filter` and (for the vectors) `student_id` go with every query."""
        request = [_query(q, k, tag, tier, student_id, filter) for tag, q in enumerate(queries)]
        if not request:
            return []
        if self._server_info is None:
            self._server_info = self.info()
        replies = [self._call(self._stub.BatchSearch, search_pb2.BatchSearchRequest(queries=request[part]))
                   for part in split_batch(request, self._server_info)]
        return in_order([r for reply in replies for r in reply.results], len(request), self.address)

    def stream_search(self, queries: Iterable[ImageSource | Sequence[float] | np.ndarray], k: int = 10, *,
                      tier: str = "", filter: str = "") -> Iterator[tuple[int, list[Hit] | SearchError]]:
        """Pipeline `queries` over one stream; yield (position, hits or error) as results arrive (any order).
        `filter` goes with every query.

        Not retried: a broken stream raises `ServerUnavailable`; resend what had no result yet."""
        requests = (_query(q, k, tag, tier, filter=filter) for tag, q in enumerate(queries))
        try:
            for r in self._stub.SearchStream(requests, timeout=None, metadata=self._metadata):
                yield r.tag, _result(r, self.address)
        except grpc.RpcError as e:
            raise _translate(e, self.address) from None

    def info(self) -> dict[str, Any]:
        """What the server serves: teacher_id, student_id, dim, count, factory, metric, max_k, default_k,
        index_version, search_params, limits and batching settings."""
        return info_dict(self._call(self._stub.Info, search_pb2.InfoRequest()))

    # -- the Admin service (needs the token) ----------------------------------------------------------------

    def reload(self, path: str = "") -> dict[str, Any]:
        """Ask the server to serve its index root's CURRENT version (or `path`): {index_version, count, changed}."""
        return _update(self._call(self._admin.Reload, search_pb2.ReloadRequest(path=str(path))))

    def load_student(self, tier: str, path: str | os.PathLike) -> dict[str, Any]:
        """Ask the server to load the student `path` (on its disk, under its --admin-root) as `tier`, after the
        pairing check and the quality gate: {index_version, count, changed, message}. A refusal (a student of
        another teacher, one below the gate) raises and the served tiers stay."""
        reply = self._call(self._admin.LoadStudent, search_pb2.LoadStudentRequest(tier=tier, path=str(path)))
        return {**_update(reply), "message": reply.message}

    def add_images(self, folder: str | os.PathLike, metadata_csv: str | os.PathLike | None = None
                   ) -> dict[str, Any]:
        """Add the images below `folder` (a folder on the server's disk; labels: parent folder names) to the
        index as a new version, which the server then serves."""
        return _update(self._call(self._admin.AddImages, search_pb2.AddImagesRequest(
            folder=str(folder), metadata_csv=str(metadata_csv or ""))))

    def push_images(self, images: Iterable[tuple[ImageSource, str, Mapping[str, str] | None]], *,
                    timeout: float | None = None) -> dict[str, Any]:
        """Send images over the wire to be embedded by the server's teacher and added as a new index version
        (Admin.UploadImages; needs an admin token). Each item is (image path or bytes, label, metadata or None);
        a path is read here and sent under its file name. Not retried: an upload is not idempotent. `timeout`
        bounds the whole call (default: none, an upload of many images takes long)."""
        seen: set[tuple[str, str]] = set()

        def messages() -> Iterator[search_pb2.UploadImage]:
            for n, (image, label, metadata) in enumerate(images, start=1):
                if isinstance(image, bytes):
                    data, name = image, f"{n:06d}.jpg" if image[:3] == b"\xff\xd8\xff" else f"{n:06d}.png"
                else:
                    data, name = _read_file(Path(image)), Path(image).name
                stem, suffix, k = Path(name).stem, Path(name).suffix, 1
                while (label, name) in seen:  # the same file name under two folders of one label
                    k += 1
                    name = f"{stem}-{k}{suffix}"
                seen.add((label, name))
                yield search_pb2.UploadImage(name=name, label=label, data=data, metadata=dict(metadata or {}))
        try:
            reply = self._admin.UploadImages(messages(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _translate(e, self.address) from None
        return _update(reply)

    def push_folder(self, folder: str | os.PathLike, metadata_csv: str | os.PathLike | None = None, *,
                    timeout: float | None = None) -> dict[str, Any]:
        """`push_images` of every image below `folder` (label: its parent folder's name, as `index add`), with
        user metadata from a CSV with a `path` column (relative to `folder`, or absolute)."""
        from asymsearch.core.data import list_images_flat
        from asymsearch.index.metadata import read_metadata_csv

        items = list_images_flat(folder)
        columns = read_metadata_csv(metadata_csv, folder) if metadata_csv else {}
        unknown = set(columns) - {i.path for i in items}
        if unknown:
            raise UserError(f"metadata CSV {metadata_csv} names {len(unknown)} path(s) that are not images below "
                            f"{folder}")
        return self.push_images(((i.path, i.label, columns.get(i.path)) for i in items), timeout=timeout)

    def remove_images(self, ids: Sequence[int]) -> dict[str, Any]:
        return _update(self._call(self._admin.RemoveImages, search_pb2.RemoveImagesRequest(ids=list(ids))))

    def wait_ready(self, timeout: float) -> None:
        """Block until the server's health service reports the Search service SERVING; else `ServerUnavailable`."""
        deadline = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        last = "no answer"
        while (left := deadline - time.monotonic()) > 0:
            try:
                reply = self._health.Check(request, timeout=left, wait_for_ready=True)
            except grpc.RpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise _translate(e, self.address) from None
                last = e.details() or e.code().name
            else:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
                time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        raise ServerUnavailable(f"server at {self.address} not ready after {timeout:g} s ({last})")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "SearchClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            self.attempts += 1
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise _translate(e, self.address) from None
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")


def check_pairing(embedder: "OnDeviceEmbedder", info: dict[str, Any], address: str) -> None:
    """Raise `PairingError` unless `embedder` is a student of the teacher that embedded the served index (the one
    contract in `asymsearch.core.manifest`)."""
    pairing.check_pairing(embedder.model, info, query_name="the on-device model",
                          database_name=f"the server at {address}")


class OnDeviceClient:
    """Search with the student run here: every image is embedded locally and only its vector is sent.

    `OnDeviceClient(student="student.int8.onnx", address="localhost:50051")`; other keywords go to
    `SearchClient`. Before the first query it asks the server's `Info` and raises `PairingError` when the
    student's teacher is not the teacher of the served index (nothing else is sent in that case).
    """

    def __init__(self, student: str | os.PathLike, address: Address = "localhost:50051", *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, **client_kw: Any) -> None:
        self.embedder = OnDeviceEmbedder(student, max_pixels=max_pixels)
        self.client = SearchClient(address, **client_kw)
        self._checked = False

    @property
    def address(self) -> str:
        return self.client.address

    def check(self) -> dict[str, Any]:
        """Ask the server's Info and check the pairing (done once, before the first query); returns the info."""
        info = self.client.info()
        check_pairing(self.embedder, info, self.client.address)
        self.client._server_info = info
        self._checked = True
        return info

    def embed(self, query: Any) -> np.ndarray:
        if isinstance(query, (bytes, str, os.PathLike)):
            return self.embedder.embed(query)
        if _is_pil(query):
            return self.embedder.embed(encode_pil(query))
        raise UserError(f"an on-device query is an image path, bytes or a PIL image, not {type(query).__name__}")

    def search(self, query: Any, k: int = 10) -> list[Hit]:
        """An image path, encoded bytes or a PIL image, embedded here; only the vector is sent."""
        if not self._checked:
            self.check()
        return self.client.search_vector(self.embed(query), k, student_id=self.embedder.student_id)

    search_image = search
    search_pil = search

    def search_vector(self, vector: Sequence[float] | np.ndarray, k: int = 10) -> list[Hit]:
        if not self._checked:
            self.check()
        return self.client.search_vector(vector, k)

    def batch_search(self, queries: Sequence[Any], k: int = 10) -> list[list[Hit] | SearchError]:
        """Many images embedded here, sent as vectors in one call; one entry per query, in order."""
        if not self._checked:
            self.check()
        vectors = [q if isinstance(q, np.ndarray) else self.embed(q) for q in queries]
        return self.client.batch_search(vectors, k, student_id=self.embedder.student_id)

    def info(self) -> dict[str, Any]:
        return self.client.info()

    def wait_ready(self, timeout: float) -> None:
        self.client.wait_ready(timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "OnDeviceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_pil(obj: Any) -> bool:
    return hasattr(obj, "save") and hasattr(obj, "mode") and hasattr(obj, "size")


def encode_pil(image: Any) -> bytes:
    """A PIL image -> PNG bytes (lossless, so the server sees exactly these pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _translate(e: grpc.RpcError, address: str) -> SearchError:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(details, code)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ServerUnavailable(f"server at {address} unavailable ({code.name}): {details}", code)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ServerBusy(f"server at {address} busy: {details}", code)
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return NotAuthorised(f"server at {address} refused ({code.name}): {details}", code)
    return SearchError(f"server at {address} failed ({code.name}): {details}", code)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e.strerror or e}") from None


def hits_from_reply(reply: search_pb2.SearchReply) -> list[Hit]:
    """The typed hits of a raw `SearchReply`."""
    return [Hit(h.id, h.score, h.path, h.label, dict(h.metadata)) for h in reply.hits]


_hits = hits_from_reply


def _vector(vector: Sequence[float] | np.ndarray) -> list[float]:
    v = np.asarray(vector, dtype=np.float32)
    if v.ndim != 1:
        raise UserError(f"a query vector must be one-dimensional, got shape {v.shape}")
    return v.tolist()


def _query(q: ImageSource | Sequence[float] | np.ndarray, k: int, tag: int, tier: str = "",
           student_id: str = "", filter: str = "") -> search_pb2.Query:
    if isinstance(q, bytes):
        return search_pb2.Query(image=q, k=k, tag=tag, tier=tier, filter=filter)
    if isinstance(q, (str, os.PathLike)):
        return search_pb2.Query(image=_read_file(Path(q)), k=k, tag=tag, tier=tier, filter=filter)
    if _is_pil(q):
        return search_pb2.Query(image=encode_pil(q), k=k, tag=tag, tier=tier, filter=filter)
    return search_pb2.Query(vector=search_pb2.FloatVector(values=_vector(q)), k=k, tag=tag, tier=tier,
                            student_id=student_id, filter=filter)


BATCH_FRAMING_BYTES = 64 * 1024  # room left in a BatchSearch message beside its queries' own bytes


def split_batch(queries: Sequence[search_pb2.Query], info: dict[str, Any]) -> list[slice]:
    """Consecutive parts of `queries`, each within what the server takes in one BatchSearch call: at most
    `info["max_batch_queries"]` queries and `info["max_message_bytes"]` bytes (either 0: no limit). A query larger
    than the byte limit alone goes in a part of its own, for the server to refuse by itself."""
    max_queries = int(info.get("max_batch_queries") or 0) or len(queries)
    max_bytes = int(info.get("max_message_bytes") or 0)
    budget = max(1, max_bytes - BATCH_FRAMING_BYTES) if max_bytes else None
    parts, start, size = [], 0, 0
    for i, q in enumerate(queries):
        n = q.ByteSize() + 8  # the field's tag and length
        if i > start and (i - start >= max_queries or (budget is not None and size + n > budget)):
            parts.append(slice(start, i))
            start, size = i, 0
        size += n
    parts.append(slice(start, len(queries)))
    return parts


def in_order(results: Sequence[search_pb2.QueryResult], n: int, address: str) -> list[list[Hit] | SearchError]:
    """The results of parts sent separately, by their tags (the position of each query), checked complete."""
    out: list[Any] = [None] * n
    for r in results:
        if not 0 <= r.tag < n or out[r.tag] is not None:
            raise SearchError(f"server at {address} answered a batch with an unexpected tag {r.tag}")
        out[r.tag] = _result(r, address)
    if any(o is None for o in out):
        raise SearchError(f"server at {address} left {sum(o is None for o in out)} queries of a batch unanswered")
    return out


def _result(r: search_pb2.QueryResult, address: str) -> list[Hit] | SearchError:
    if r.code == 0:
        return _hits(r.reply)
    code = next((c for c in grpc.StatusCode if c.value[0] == r.code), grpc.StatusCode.UNKNOWN)
    cls = {grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest, grpc.StatusCode.RESOURCE_EXHAUSTED: ServerBusy,
           grpc.StatusCode.DEADLINE_EXCEEDED: ServerUnavailable}.get(code, SearchError)
    return cls(r.message, code)


def info_dict(reply: search_pb2.InfoReply) -> dict[str, Any]:
    """Info as plain values: maps as dicts, `tiers` as a list of dicts (one per tier, the default first)."""
    out: dict[str, Any] = {}
    for field in reply.DESCRIPTOR.fields:
        value = getattr(reply, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = dict(value)
        elif field.message_type is not None:
            value = [{f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields} for m in value]
        elif not isinstance(value, (str, bytes, int, float)):  # a repeated scalar field
            value = list(value)
        out[field.name] = value
    return out


def _update(reply: search_pb2.UpdateReply) -> dict[str, Any]:
    return {"index_version": reply.index_version, "count": reply.count, "changed": reply.changed,
            "message": reply.message}


def _pem(value: str | os.PathLike | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {value}: {e.strerror or e}") from None
