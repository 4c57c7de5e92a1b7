"""The asyncio client of the query server: `SearchClient`'s methods, awaited, on one `grpc.aio` channel.

    async with AsyncSearchClient(["127.0.0.1:50051", "127.0.0.1:50052"], token="...") as client:
        await client.wait_ready(10)
        hits = await client.search_image("query.jpg", k=5)
        many = await asyncio.gather(*(client.search(q, k=5) for q in queries))  # one channel, many in flight

Same options (deadline `timeout`, `retries` with exponential back-off and jitter on UNAVAILABLE, `token`, `tls`,
round robin across several addresses), same typed results (`Hit`) and exceptions (`SearchError` subclasses,
`UserError` for a local file that cannot be read, `PairingError` for a student of another teacher). Create and
use it inside a running event loop. No torch here.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any, Callable, Sequence

import grpc
import grpc.aio
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from asymsearch.clients.client import (Address, Hit, OnDeviceEmbedder, SearchError, ServerUnavailable,
                                       TlsOptions, _display, _hits, _is_pil, _query, _read_file,
                                       _translate, _update, _vector, in_order, open_channel, split_batch,
                                       check_pairing, encode_pil, info_dict)
from asymsearch.core.preprocess import DEFAULT_MAX_PIXELS
from asymsearch.protos.v1 import search_pb2, search_pb2_grpc

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["Search"].full_name

__all__ = ["AsyncSearchClient", "AsyncOnDeviceClient"]


class AsyncSearchClient:
    """An asyncio connection to one query server, or to several replicas (round robin). See `SearchClient`."""

    def __init__(self, address: Address, *, timeout: float = 10.0, token: str | None = None,
                 tls: TlsOptions | None = None, retries: int = 3, backoff: float = 0.1,
                 max_backoff: float = 2.0) -> None:
        self.address = _display(address)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.attempts = 0
        self._channel, self._metadata = open_channel(grpc.aio, address, token, tls)
        self._stub = search_pb2_grpc.SearchStub(self._channel)
        self._admin = search_pb2_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._server_info: dict[str, Any] | None = None

    async def search_image(self, image: str | os.PathLike | bytes, k: int = 10, *, tier: str = "",
                           filter: str = "") -> list[Hit]:
        data = image if isinstance(image, bytes) else _read_file(_path(image))
        return _hits(await self._call(self._stub.SearchImage, search_pb2.ImageQuery(image=data, k=k, tier=tier,
                                                                                    filter=filter)))

    async def search_pil(self, image: Any, k: int = 10) -> list[Hit]:
        return await self.search_image(encode_pil(image), k)

    async def search_vector(self, vector: Sequence[float] | np.ndarray, k: int = 10, *, tier: str = "",
                            student_id: str = "", filter: str = "") -> list[Hit]:
        return _hits(await self._call(self._stub.SearchVector, search_pb2.VectorQuery(
            vector=_vector(vector), k=k, tier=tier, student_id=student_id, filter=filter)))

    async def search(self, query: Any, k: int = 10) -> list[Hit]:
        """A path, encoded bytes, a PIL image, or a vector."""
        if isinstance(query, (bytes, str, os.PathLike)):
            return await self.search_image(query, k)
        if _is_pil(query):
            return await self.search_pil(query, k)
        return await self.search_vector(query, k)

    async def search_on_device(self, embedder: OnDeviceEmbedder, image: Any, k: int = 10) -> list[Hit]:
        """Embed locally (in a worker thread, so the loop keeps running) and send only the vector; raises
        `PairingError` for a student of another teacher than the served index's."""
        if self._server_info is None:
            self._server_info = await self.info()
        check_pairing(embedder, self._server_info, self.address)
        data = encode_pil(image) if _is_pil(image) else image
        vector = await asyncio.to_thread(embedder.embed, data)
        return await self.search_vector(vector, k, student_id=embedder.student_id)

    async def batch_search(self, queries: Sequence[Any], k: int = 10, *, tier: str = "",
                           student_id: str = "", filter: str = "") -> list[list[Hit] | SearchError]:
        """Many queries; split into several calls, one after another, when larger than the server takes in one
        (as `SearchClient.batch_search`); one entry per query, in order; `filter` goes with every query."""
        request = [_query(q, k, tag, tier, student_id, filter) for tag, q in enumerate(queries)]
        if not request:
            return []
        if self._server_info is None:
            self._server_info = await self.info()
        results = []
        for part in split_batch(request, self._server_info):
            reply = await self._call(self._stub.BatchSearch, search_pb2.BatchSearchRequest(queries=request[part]))
            results.extend(reply.results)
        return in_order(results, len(request), self.address)

    async def info(self) -> dict[str, Any]:
        return info_dict(await self._call(self._stub.Info, search_pb2.InfoRequest()))

    async def reload(self, path: str = "") -> dict[str, Any]:
        return _update(await self._call(self._admin.Reload, search_pb2.ReloadRequest(path=str(path))))

    async def add_images(self, folder: str | os.PathLike, metadata_csv: str | os.PathLike | None = None
                         ) -> dict[str, Any]:
        return _update(await self._call(self._admin.AddImages, search_pb2.AddImagesRequest(
            folder=str(folder), metadata_csv=str(metadata_csv or ""))))

    async def remove_images(self, ids: Sequence[int]) -> dict[str, Any]:
        return _update(await self._call(self._admin.RemoveImages, search_pb2.RemoveImagesRequest(ids=list(ids))))

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        last = "no answer"
        while (left := deadline - time.monotonic()) > 0:
            try:
                reply = await self._health.Check(request, timeout=left, wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise _translate(e, self.address) from None
                last = e.details() or e.code().name
            else:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = f"health status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
                await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        raise ServerUnavailable(f"server at {self.address} not ready after {timeout:g} s ({last})")

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncSearchClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Any], request: Any) -> Any:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            self.attempts += 1
            try:
                return await method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.retries:
                    raise _translate(e, self.address) from None
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, self.max_backoff)
        raise AssertionError("unreachable")


class AsyncOnDeviceClient:
    """`OnDeviceClient` for asyncio: embeds here (in a worker thread), checks the pairing before the first
    query, sends only vectors."""

    def __init__(self, student: str | os.PathLike, address: Address = "localhost:50051", *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, **client_kw: Any) -> None:
        self.embedder = OnDeviceEmbedder(student, max_pixels=max_pixels)
        self.client = AsyncSearchClient(address, **client_kw)

    async def check(self) -> dict[str, Any]:
        info = await self.client.info()
        check_pairing(self.embedder, info, self.client.address)
        self.client._server_info = info
        return info

    async def search(self, query: Any, k: int = 10) -> list[Hit]:
        return await self.client.search_on_device(self.embedder, query, k)

    async def info(self) -> dict[str, Any]:
        return await self.client.info()

    async def close(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> "AsyncOnDeviceClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _path(p: str | os.PathLike):
    from pathlib import Path
    return Path(p)
