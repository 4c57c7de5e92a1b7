"""The Python client of the query server, and the on-device embedder for sending vectors instead of images.

    with SearchClient("localhost:50051") as client:
        client.wait_ready(10)
        hits = client.search_image("query.jpg", k=5)          # the server embeds the image with its student
        hits = client.search_on_device(OnDeviceEmbedder("student.onnx"), "query.jpg", k=5)  # only a vector leaves

gRPC failures surface as `SearchError` subclasses carrying the server's message; a local file that cannot be
read is a `UserError`. No torch here: onnxruntime, grpcio, numpy and Pillow only.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asymsearch.core.errors import PairingError, UserError
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


@dataclasses.dataclass(frozen=True)
class Hit:
    id: int
    score: float  # cosine similarity of the query and the database image
    path: str
    label: str


ImageSource = str | os.PathLike | bytes


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

    def embed(self, image: ImageSource) -> np.ndarray:
        """An image file or encoded bytes -> its embedding (dim,) float32. Unreadable input raises `UserError`."""
        source = image if isinstance(image, bytes) else Path(image)
        return self.model.embed_images([decode_image(source, self.max_pixels)])[0]


class SearchClient:
    """A connection to a query server at `address` ("host:port"); `timeout` is the deadline of each call, seconds."""

    def __init__(self, address: str, *, timeout: float = 10.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self._stub = search_pb2_grpc.SearchStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._server_info: dict[str, Any] | None = None

    def search_image(self, image: ImageSource, k: int = 10) -> list[Hit]:
        """Send an image (a file path or encoded bytes); the server embeds it with its student."""
        data = image if isinstance(image, bytes) else _read_file(Path(image))
        return _hits(self._call(self._stub.SearchImage, search_pb2.ImageQuery(image=data, k=k)))

    def search_vector(self, vector: Sequence[float] | np.ndarray, k: int = 10) -> list[Hit]:
        """Send a student embedding of the server's dimension (see `info()["dim"]`); the server normalises it."""
        v = np.asarray(vector, dtype=np.float32)
        if v.ndim != 1:
            raise UserError(f"a query vector must be one-dimensional, got shape {v.shape}")
        return _hits(self._call(self._stub.SearchVector, search_pb2.VectorQuery(vector=v.tolist(), k=k)))

    def search_on_device(self, embedder: OnDeviceEmbedder, image: ImageSource, k: int = 10) -> list[Hit]:
        """Embed `image` locally with `embedder` and send only the vector.

        Raises `PairingError` when the embedder's teacher is not the one that embedded the server's index (the
        server's info is asked once per client and remembered).
        """
        if self._server_info is None:
            self._server_info = self.info()
        served = self._server_info["teacher_id"]
        if embedder.teacher_id != served:
            raise PairingError(f"the on-device model belongs to teacher {embedder.teacher_id} but the server at "
                               f"{self.address} searches an index embedded by teacher {served}")
        return self.search_vector(embedder.embed(image), k)

    def info(self) -> dict[str, Any]:
        """What the server serves: teacher_id, student_id, dim, count, factory, metric, max_k, default_k."""
        reply = self._call(self._stub.Info, search_pb2.InfoRequest())
        return {field.name: getattr(reply, field.name) for field in reply.DESCRIPTOR.fields}

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
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _translate(e, self.address) from None


def _translate(e: grpc.RpcError, address: str) -> SearchError:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(details, code)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ServerUnavailable(f"server at {address} unavailable ({code.name}): {details}", code)
    return SearchError(f"server at {address} failed ({code.name}): {details}", code)


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read image {path}: {e.strerror or e}") from None


def _hits(reply: search_pb2.SearchReply) -> list[Hit]:
    return [Hit(h.id, h.score, h.path, h.label) for h in reply.hits]
