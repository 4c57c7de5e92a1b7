"""The servicers: each RPC is a coroutine that parses its request, calls the pipeline or the server, and builds
the reply. No thread is held while a query waits: the pipeline's futures are awaited on the event loop, and
blocking work (decode, embed, search, reload, index updates) runs on bounded executors. Errors are raised and
mapped to a status by `rpc_errors`; cross-cutting concerns (auth, limits, metrics, logging) are interceptors.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from asymsearch.protos.v1 import search_pb2, search_pb2_grpc
from asymsearch.server.admin import Upload, confined_folder, confined_student, confined_version
from asymsearch.server.batching import Pipeline
from asymsearch.server.engine import InvalidQuery, SearchResult
from asymsearch.server.errors import DeadlineExceeded, NotReady, StreamIdle, Unimplemented, rpc_errors, status_of

if TYPE_CHECKING:
    from asymsearch.server.lifecycle import SearchServer

STREAM_WINDOW = 64  # queries of one stream in progress at once; the stream's reader waits beyond that
_END = object()


# -- requests and replies ----------------------------------------------------------------------------------------

def search_reply(result: SearchResult, expose_paths: bool = False) -> search_pb2.SearchReply:
    """The reply of one query; the hits' server paths only when the server exposes them (`--expose-paths`)."""
    return search_pb2.SearchReply(
        hits=[search_pb2.Hit(id=h.id, score=h.score, path=h.path if expose_paths else "", label=h.label,
                             metadata=h.metadata)
              for h in result.hits],
        embed_ms=result.embed_ms, search_ms=result.search_ms, index_version=result.index_version,
        queue_ms=max(0.0, result.queue_ms), decode_ms=result.decode_ms, batch_size=result.batch_size)


def query_result(tag: int, future: concurrent.futures.Future | None = None,
                 error: BaseException | None = None, expose_paths: bool = False) -> search_pb2.QueryResult:
    if future is not None:
        error = future.exception()
        if error is None:
            return search_pb2.QueryResult(tag=tag, code=0, reply=search_reply(future.result(), expose_paths))
    code, message = status_of(error, "a batched query")
    return search_pb2.QueryResult(tag=tag, code=code.value[0], message=message)


def parse_query(q: search_pb2.Query) -> tuple[str, object, int, str, str, str]:
    """(kind, payload, k, tier, student_id, filter) of one query of a batch or stream."""
    kind = q.WhichOneof("query")
    if kind == "image":
        return "image", q.image, q.k, q.tier, "", q.filter
    if kind == "vector":
        return "vector", q.vector.values, q.k, q.tier, q.student_id, q.filter
    raise InvalidQuery("empty query: it carries neither an image nor a vector")


def remaining(context) -> float | None:
    """Seconds to the caller's deadline, None without one (grpc reports None or a huge number then)."""
    left = context.time_remaining()
    return None if left is None or left > 1e7 else max(0.0, left)


class Caller:
    """The caller's deadline (as `time.monotonic()`) and whether it is still waiting, for the pipeline's jobs
    (read from the batcher threads, hence a plain flag rather than the grpc context)."""

    def __init__(self, context) -> None:
        left = remaining(context)
        self.deadline = None if left is None else time.monotonic() + left
        self.waiting = True

    def alive(self) -> bool:
        return self.waiting


async def wait_all(futures: Sequence[concurrent.futures.Future], caller: Caller, context, what: str) -> None:
    """Until every future is done, within the caller's deadline. The futures themselves are never cancelled (the
    pipeline finishes or drops its jobs; a gone caller only marks them expired)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [len(futures)]

    def one_done() -> None:
        left[0] -= 1
        if left[0] == 0 and not done.done():
            done.set_result(None)

    def callback(_: concurrent.futures.Future) -> None:
        try:
            loop.call_soon_threadsafe(one_done)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    if not futures:
        return
    for f in futures:
        f.add_done_callback(callback)
    try:
        await asyncio.wait_for(done, remaining(context))
    except asyncio.TimeoutError:
        caller.waiting = False
        raise DeadlineExceeded(f"deadline exceeded while {what} waited") from None
    except asyncio.CancelledError:
        caller.waiting = False
        raise


# -- Search ------------------------------------------------------------------------------------------------------

class SearchServicer(search_pb2_grpc.SearchServicer):
    def __init__(self, server: "SearchServer") -> None:
        self._server = server

    def _pipeline(self) -> Pipeline:
        pipeline = self._server.pipeline
        if pipeline is None:
            raise NotReady("the server is still loading its index")
        return pipeline

    async def _one(self, submit: Callable[..., concurrent.futures.Future], payload: Any, k: int, context,
                   **query: Any) -> search_pb2.SearchReply:
        caller = Caller(context)
        future = submit(payload, k, deadline=caller.deadline, alive=caller.alive, **query)
        await wait_all([future], caller, context, "the query")
        return search_reply(future.result(), self._server.options.expose_paths)

    @rpc_errors
    async def SearchImage(self, request, context):
        return await self._one(self._pipeline().submit_image, request.image, request.k, context, tier=request.tier,
                               filter=request.filter)

    @rpc_errors
    async def SearchVector(self, request, context):
        return await self._one(self._pipeline().submit_vector, request.vector, request.k, context,
                               tier=request.tier, student_id=request.student_id, filter=request.filter)

    @rpc_errors
    async def BatchSearch(self, request, context):
        pipeline = self._pipeline()
        n, limit = len(request.queries), self._server.options.batch_query_limit
        if n == 0:
            raise InvalidQuery("empty batch: send at least one query")
        if n > limit:
            raise InvalidQuery(f"{n} queries in one batch; the limit is {limit} (max_batch_queries in Info; the "
                               f"SDK's batch_search splits larger batches)")
        parsed: list[tuple[str, object, int, str, str, str] | InvalidQuery] = []
        for q in request.queries:
            try:
                parsed.append(parse_query(q))
            except InvalidQuery as e:
                parsed.append(e)
        valid = [p for p in parsed if not isinstance(p, InvalidQuery)]
        caller = Caller(context)
        # admission reads every image's header (~0.1 ms each): off the event loop, so that a batch of a thousand
        # images does not hold up health and the other calls meanwhile
        submitted = await asyncio.to_thread(pipeline.submit_many, valid, deadline=caller.deadline,
                                            alive=caller.alive)
        await wait_all(submitted, caller, context, "the batch")
        futures, expose = iter(submitted), self._server.options.expose_paths
        return search_pb2.BatchSearchReply(results=[
            query_result(q.tag, error=p) if isinstance(p, InvalidQuery)
            else query_result(q.tag, next(futures), expose_paths=expose)
            for q, p in zip(request.queries, parsed)])

    @rpc_errors
    async def SearchStream(self, request_iterator, context):
        pipeline = self._pipeline()
        idle_s = self._server.options.stream_idle_s
        loop = asyncio.get_running_loop()
        results: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        caller = Caller(context)

        in_progress = [0]  # queries read and not yet answered

        def arrived(tag: int, future: concurrent.futures.Future) -> None:
            try:
                loop.call_soon_threadsafe(results.put_nowait, (tag, future))
            except RuntimeError:  # the loop is closed
                pass

        failed: list[BaseException] = []  # what ended the reading early (a malformed message): ends the stream

        async def read() -> None:
            try:
                async for q in request_iterator:
                    await window.acquire()
                    in_progress[0] += 1
                    try:
                        kind, payload, k, tier, student_id, filter_text = parse_query(q)
                        if kind == "image":
                            future = pipeline.submit_image(payload, k, deadline=caller.deadline, alive=caller.alive,
                                                           tier=tier, filter=filter_text)
                        else:
                            future = pipeline.submit_vector(payload, k, deadline=caller.deadline, alive=caller.alive,
                                                            tier=tier, student_id=student_id, filter=filter_text)
                    except Exception as e:  # refused alone: its result says why, the stream goes on
                        results.put_nowait(query_result(q.tag, error=e))
                        continue
                    future.add_done_callback(lambda f, tag=q.tag: arrived(tag, f))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - re-raised by the replying loop, mapped by rpc_errors
                failed.append(e)
            finally:  # the client half-closed, or went away: answer what is in progress, then end
                results.put_nowait(_END)

        reader = asyncio.create_task(read())
        ended = False
        try:
            while not (ended and in_progress[0] == 0):
                idle = not ended and in_progress[0] == 0
                try:
                    item = await asyncio.wait_for(results.get(), idle_s if idle else None)
                except asyncio.TimeoutError:
                    raise StreamIdle(f"the stream was idle (no query in progress) for {idle_s:g} s; the limit is "
                                     f"{idle_s:g} s (--stream-idle-s)") from None
                if item is _END:
                    if failed:
                        raise failed[0]
                    ended = True
                    continue
                in_progress[0] -= 1
                window.release()
                yield item if isinstance(item, search_pb2.QueryResult) else \
                    query_result(*item, expose_paths=self._server.options.expose_paths)
        finally:
            caller.waiting = False
            reader.cancel()

    @rpc_errors
    async def Info(self, request, context):
        engine = self._server.engine
        if engine is None:
            raise NotReady("the server is still loading its index")
        o = self._server.options
        return search_pb2.InfoReply(**engine.info(), max_batch_queries=o.batch_query_limit,
                                    max_message_bytes=o.max_message_bytes, batch_max_size=o.batching.max_batch,
                                    batch_max_delay_ms=o.batching.max_delay_ms, admin_enabled=o.admin)


# -- Admin -------------------------------------------------------------------------------------------------------

class AdminServicer(search_pb2_grpc.AdminServicer):
    """Reload, and index updates through an `IndexUpdater` (which publishes a new version; then reload). The work
    runs in a thread, so the event loop keeps answering meanwhile."""

    def __init__(self, server: "SearchServer", updater) -> None:
        self._server = server
        self._updater = updater

    def _engine(self):
        if self._server.engine is None:
            raise NotReady("the server is still loading its index")
        return self._server.engine

    def _reply(self, changed: bool, version: str) -> search_pb2.UpdateReply:
        return search_pb2.UpdateReply(index_version=version, count=self._engine().index.count, changed=changed)

    @rpc_errors
    async def Reload(self, request, context):
        engine = self._engine()
        version = confined_version(request.path, engine.source) if request.path else None
        return self._reply(*await asyncio.to_thread(self._server.reload, version, keep_source=True))

    async def _update(self, what: str, apply: Callable[[Path], None]) -> search_pb2.UpdateReply:
        engine = self._engine()
        if self._updater is None:
            raise Unimplemented(f"{what} is not available on this server (it needs an index updater, e.g. "
                                f"`serve --admin --teacher T.onnx`)")

        def run() -> tuple[bool, str]:
            apply(engine.source)
            return self._server.reload()
        return self._reply(*await asyncio.to_thread(run))

    @rpc_errors
    async def AddImages(self, request, context):
        if not request.folder:
            raise InvalidQuery("AddImages needs the folder of the images to add")
        roots = self._server.options.admin_roots
        folder, csv_file = await asyncio.to_thread(confined_folder, request.folder, request.metadata_csv, roots)
        return await self._update("AddImages", lambda root: self._updater.add(
            root, str(folder), str(csv_file) if csv_file else None))

    @rpc_errors
    async def UploadImages(self, request_iterator, context):
        engine = self._engine()
        if self._updater is None:
            raise Unimplemented("UploadImages is not available on this server (it needs an index updater, e.g. "
                                "`serve --admin --teacher T.onnx`)")
        upload = await asyncio.to_thread(Upload, engine.source, self._server.options.max_upload_bytes,
                                          self._server.options.admin_roots)
        try:
            async for image in request_iterator:
                await asyncio.to_thread(upload.add, image.name, image.label, image.data, dict(image.metadata))
            if upload.count == 0:
                raise InvalidQuery("UploadImages received no image")
            csv_file = await asyncio.to_thread(upload.metadata_csv)
            reply = await self._update("UploadImages", lambda root: self._updater.add(
                root, str(upload.folder), str(csv_file) if csv_file else None))
        except BaseException:
            await asyncio.to_thread(upload.discard)
            raise
        reply.message = f"{upload.count} image(s) received ({upload.bytes / 2**20:.1f} MiB), kept as upload {upload.id}"
        return reply

    @rpc_errors
    async def LoadStudent(self, request, context):
        """Load a student under --admin-root as a tier (paired, gated), then switch that tier to it."""
        engine = self._engine()
        if not request.tier or not request.path:
            raise InvalidQuery("LoadStudent needs a tier name and the path of the student .onnx")
        path = await asyncio.to_thread(confined_student, request.path, self._server.options.admin_roots)
        replaced, tier = await asyncio.to_thread(self._server.load_student, request.tier, path)
        return search_pb2.UpdateReply(
            index_version=engine.index_version, count=engine.index.count, changed=True,
            message=f"tier {tier.name!r} {'replaced' if replaced else 'added'}: student {tier.student_id}"
                    + (f"; gate: {tier.gate.summary()}" if tier.gate else "; not gated (no probe set)"))

    @rpc_errors
    async def RemoveImages(self, request, context):
        if not request.ids:
            raise InvalidQuery("RemoveImages needs at least one id")
        return await self._update("RemoveImages", lambda root: self._updater.remove(root, list(request.ids)))
