"""Fuzz target: request handling of the Search service, over a real channel to an in-process server on port 0
(the tiny hand-built models of tests/conftest.py, a synthetic index).

The fuzzer's bytes drive a `FuzzedDataProvider` that builds one call per input: SearchImage (random bytes, seed
images of many formats, seeds cut short or with bytes overwritten, an empty or an oversized image), SearchVector
(any length, NaN / inf / huge / zero values), BatchSearch (empty, a few queries, the limit, one over it; each query
an image, a vector or neither), SearchStream (several queries and possibly raw bytes), Info, and raw bytes sent
as the request of any Search method (whether or not they parse as its message; those that parse are checked
like the messages built). k is any int32 (edges included), tags any uint64; a call's deadline is generous (30 s)
or, sometimes, a few milliseconds.

Invariants, for every call:
* the status is OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED, with a non-empty message; never
  INTERNAL, UNKNOWN, or a hang (DEADLINE_EXCEEDED only when the call's own deadline was a few milliseconds);
  each BatchSearch / stream result likewise (code 0, 3, 8 or 4, a message when not 0);
* OK only for what is valid: k in 0..max_k, a vector of the index's dimension; hits at most k (0: the default),
  distinct ids, finite scores in descending order; a batch answers each query once, in order, with its tag; a
  stream answers each query once (tags as a multiset);
every 200 inputs and when the run ends: a known image query still gets the same hits and health is SERVING.

Known open bugs (ISSUES below) are counted and reported instead of stopping the run, so that fuzzing goes on
past them; ASYMSEARCH_FUZZ_STRICT=1 makes them fail like any other, as the replay of saved inputs always does.

By hand (libFuzzer flags pass through; the target runs its final check when -max_total_time is reached):

    python tests/fuzz/fuzz_requests.py -max_total_time=600 -artifact_prefix=tests/fuzz/regressions/requests/ CORPUS
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

try:
    import atheris
except ImportError:
    atheris = None

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # seeds.py, and tests/conftest.py for the tiny models


def _instrumented():
    if atheris is not None and __name__ == "__main__":
        return atheris.instrument_imports(include=["asymsearch"])
    return contextlib.nullcontext()


with _instrumented():
    import grpc
    from asymsearch.core.synthetic import make_synthetic_dataset
    from asymsearch.index.build import build_index
    from asymsearch.protos.v1 import search_pb2
    from asymsearch.server.engine import QueryEngine
    from asymsearch.server.service import create_server
    from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import TINY_DIM, make_linear_onnx
from seeds import seed_images

DEFAULT_K, MAX_K = 5, 50
MAX_PIXELS = 1 << 20
MAX_MESSAGE = 256 * 1024  # small, so that an oversized message costs little to send
CALL_TIMEOUT = 30.0
CHECK_EVERY = 200
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
           grpc.StatusCode.DEADLINE_EXCEEDED}
ALLOWED_RESULT_CODES = {c.value[0] for c in ALLOWED}
INT32 = (-2**31, 2**31 - 1)
K_EDGES = (0, 1, DEFAULT_K, MAX_K, MAX_K + 1, -1, INT32[0], INT32[1])
REQUESTS = {"SearchImage": search_pb2.ImageQuery, "SearchVector": search_pb2.VectorQuery,
            "BatchSearch": search_pb2.BatchSearchRequest, "Info": search_pb2.InfoRequest}
REPLIES = {"SearchImage": search_pb2.SearchReply, "SearchVector": search_pb2.SearchReply,
           "BatchSearch": search_pb2.BatchSearchReply, "Info": search_pb2.InfoReply}

# Open bugs in server/, found by this target (docs/fuzzing.md). Each is a regression file replayed as a strict
# xfail; remove the entry once fixed (the replay then passes and the xfail must go too).
ISSUES: dict[str, str] = {}  # open bugs, by key (none now: the two the fuzzer found are fixed, their inputs replayed)
STRICT = os.environ.get("ASYMSEARCH_FUZZ_STRICT") == "1"


class KnownIssue(AssertionError):
    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {ISSUES[key]} ({detail})")
        self.key = key


def pick(fdp, values):
    return values[fdp.ConsumeIntInRange(0, len(values) - 1)]


def parses(message_type, raw: bytes) -> bool:
    try:
        message_type.FromString(raw)
        return True
    except Exception:  # noqa: BLE001 - protobuf's DecodeError, or anything else the parser raises
        return False


class Target:
    """The served index and the checks; `check(data)` runs one input (`strict`: known issues fail too)."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        images = make_synthetic_dataset(folder / "images", num_classes=4, per_class=5, size=48, seed=1)
        rng = np.random.default_rng(0)
        w = rng.normal(size=(48, TINY_DIM))
        teacher = make_linear_onnx(folder / "teacher.onnx", role="teacher", teacher_id="teacher-a", weight=w)
        student = make_linear_onnx(folder / "student.onnx", role="student", teacher_id="teacher-a",
                                   weight=w + 0.05 * rng.normal(size=w.shape))
        build_index(teacher, images, folder / "index", progress=False)
        self.engine = QueryEngine.open(folder / "index", student, default_k=DEFAULT_K, max_k=MAX_K,
                                       max_pixels=MAX_PIXELS)
        self.server, port = create_server(self.engine, max_message_bytes=MAX_MESSAGE)
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE),
                                                                    ("grpc.max_receive_message_length", -1)])
        self.good_image = sorted(images.rglob("*.jpg"))[3].read_bytes()
        self.good_hits = [h.id for h in self.engine.search_image(self.good_image, 3).hits]
        self.seeds = list(seed_images().values())
        self.batch_limit = self.server.options.batch_query_limit
        self.runs = 0
        self.known: collections.Counter = collections.Counter()

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)
        self.engine.close()

    # -- building requests from the fuzzer's bytes -----------------------------------------------------------

    def k(self, fdp) -> int:
        return pick(fdp, K_EDGES) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(*INT32)

    def image(self, fdp) -> bytes:
        how = fdp.ConsumeIntInRange(0, 5)
        if how == 0:
            return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048))
        if how == 4:
            return b""
        if how == 5:
            return b"\x89PNG\r\n\x1a\n" + bytes(MAX_MESSAGE)  # over the message limit
        data = bytearray(pick(fdp, self.seeds))
        if how == 2:  # cut short
            data = data[:fdp.ConsumeIntInRange(0, len(data))]
        elif how == 3:  # bytes overwritten
            for _ in range(fdp.ConsumeIntInRange(1, 8)):
                if data:
                    data[fdp.ConsumeIntInRange(0, len(data) - 1)] = fdp.ConsumeIntInRange(0, 255)
        return bytes(data)

    def vector(self, fdp) -> list[float]:
        n = pick(fdp, (TINY_DIM, TINY_DIM, TINY_DIM, 0, TINY_DIM - 1, TINY_DIM + 1,
                                 fdp.ConsumeIntInRange(0, 4 * TINY_DIM)))
        how = fdp.ConsumeIntInRange(0, 3)
        if how == 0:
            return fdp.ConsumeFloatListInRange(n, -1.0, 1.0)
        if how == 1:
            return fdp.ConsumeFloatList(n)  # NaN, inf, huge and tiny values among them
        if how == 2:
            return [0.0] * n
        return fdp.ConsumeRegularFloatList(n)

    def query(self, fdp) -> search_pb2.Query:
        q = search_pb2.Query(k=self.k(fdp), tag=fdp.ConsumeIntInRange(0, 2**64 - 1))
        kind = fdp.ConsumeIntInRange(0, 4)
        if kind in (0, 1):
            q.vector.values.extend(self.vector(fdp))
        elif kind in (2, 3):
            q.image = self.image(fdp)
        return q  # kind 4: neither (an empty query)

    # -- checking replies -----------------------------------------------------------------------------------

    def k_valid(self, k: int) -> bool:
        return 0 <= k <= MAX_K

    def vector_valid(self, values) -> bool:
        v = np.asarray(values, dtype=np.float32)
        return len(v) == TINY_DIM and bool(np.isfinite(v).all()) and float(np.linalg.norm(v.astype(np.float64))) > 0

    def check_hits(self, reply: search_pb2.SearchReply, k: int, what: str) -> None:
        hits = list(reply.hits)
        assert len(hits) <= (k or DEFAULT_K), f"{what}: {len(hits)} hits for k={k}"
        assert len({h.id for h in hits}) == len(hits), f"{what}: duplicate ids {[h.id for h in hits]}"
        scores = [h.score for h in hits]
        assert all(math.isfinite(s) for s in scores), f"{what}: scores {scores}"
        assert all(a >= b - 1e-5 for a, b in itertools.pairwise(scores)), f"{what}: scores not descending {scores}"

    def check_status(self, code: grpc.StatusCode, details: str, short_deadline: bool, what: str) -> None:
        assert code in ALLOWED, f"{what}: {code.name} ({details!r})"
        if code != grpc.StatusCode.OK:
            assert details, f"{what}: {code.name} with an empty message"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            assert short_deadline, f"{what}: DEADLINE_EXCEEDED within a {CALL_TIMEOUT:g} s deadline (a hang)"

    def check_result(self, r: search_pb2.QueryResult, q: search_pb2.Query | None, short_deadline: bool,
                     what: str) -> None:
        assert r.code in ALLOWED_RESULT_CODES, f"{what}: result code {r.code} ({r.message!r})"
        if r.code != 0:
            assert r.message, f"{what}: result code {r.code} with an empty message"
        if r.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]:
            assert short_deadline, f"{what}: DEADLINE_EXCEEDED within a {CALL_TIMEOUT:g} s deadline (a hang)"
        if r.code == 0 and q is not None:
            self.check_valid_when_ok(q, what)
            self.check_hits(r.reply, q.k, what)

    def check_valid_when_ok(self, q: search_pb2.Query, what: str) -> None:
        kind = q.WhichOneof("query")
        assert kind is not None, f"{what}: an empty query answered OK"
        assert self.k_valid(q.k), f"{what}: k={q.k} answered OK"
        if kind == "vector":
            assert self.vector_valid(q.vector.values), f"{what}: invalid vector {list(q.vector.values)} answered OK"

    def unary(self, method: str, raw: bytes, timeout: float):
        call = self.channel.unary_unary(f"/asymsearch.v1.Search/{method}",
                                        response_deserializer=REPLIES[method].FromString)
        try:
            return grpc.StatusCode.OK, "", call(raw, timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), e.details() or "", None

    # -- one input ------------------------------------------------------------------------------------------

    def check(self, data: bytes, strict: bool = True) -> None:
        try:
            self._check(data)
        except KnownIssue as e:
            if strict:
                raise
            self.known[e.key] += 1
        self.runs += 1
        if self.runs % CHECK_EVERY == 0:
            self.check_alive()

    def _check(self, data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        short = fdp.ConsumeIntInRange(0, 9) == 0
        timeout = fdp.ConsumeIntInRange(1, 50) / 1000 if short else CALL_TIMEOUT
        action = fdp.ConsumeIntInRange(0, 6)
        if action == 0:
            q = search_pb2.ImageQuery(image=self.image(fdp), k=self.k(fdp))
            self.one("SearchImage", q.SerializeToString(), timeout, short,
                     search_pb2.Query(image=q.image, k=q.k))
        elif action == 1:
            q = search_pb2.VectorQuery(vector=self.vector(fdp), k=self.k(fdp))
            self.one("SearchVector", q.SerializeToString(), timeout, short,
                     search_pb2.Query(vector=search_pb2.FloatVector(values=q.vector), k=q.k))
        elif action == 2:
            self.batch(fdp, timeout, short)
        elif action == 3:
            self.stream(fdp, timeout, short)
        elif action == 4:
            code, details, _ = self.unary("Info", b"", timeout)
            self.check_status(code, details, short, "Info")
        else:  # raw bytes as the request of a Search method
            method = pick(fdp, sorted(REQUESTS))
            raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 4096))
            if parses(REQUESTS[method], raw):  # a message with random fields: checked like one we built
                self.parsed(method, REQUESTS[method].FromString(raw), raw, timeout, short)
                return
            code, details, _ = self.unary(method, raw, timeout)
            if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                raise AssertionError(f"{method}: raw bytes that do not parse got {code.name} {details!r} instead "
                                     f"of INVALID_ARGUMENT")
            self.check_status(code, details, short, f"{method} (unparsable bytes)")

    def parsed(self, method: str, message, raw: bytes, timeout: float, short: bool) -> None:
        """Random bytes that parse as `method`'s request, sent as they are (unknown fields included)."""
        if method == "SearchImage":
            self.one(method, raw, timeout, short, search_pb2.Query(image=message.image, k=message.k))
        elif method == "SearchVector":
            self.one(method, raw, timeout, short,
                     search_pb2.Query(vector=search_pb2.FloatVector(values=message.vector), k=message.k))
        elif method == "BatchSearch":
            self.check_batch(raw, list(message.queries), timeout, short)
        else:
            code, details, _ = self.unary(method, raw, timeout)
            self.check_status(code, details, short, f"{method} (random fields)")

    def one(self, method: str, raw: bytes, timeout: float, short: bool, as_query: search_pb2.Query) -> None:
        code, details, reply = self.unary(method, raw, timeout)
        what = f"{method}(k={as_query.k})"
        self.check_status(code, details, short, what)
        if code == grpc.StatusCode.OK:
            self.check_valid_when_ok(as_query, what)
            self.check_hits(reply, as_query.k, what)

    def batch(self, fdp, timeout: float, short: bool) -> None:
        size = fdp.ConsumeIntInRange(0, 15)
        if size < 12:
            queries = [self.query(fdp) for _ in range(size)]
        else:  # empty, the limit, one over it (cheap vector queries)
            n = (0, self.batch_limit, self.batch_limit + 1, self.batch_limit)[size - 12]
            template = self.query(fdp)
            queries = [search_pb2.Query(vector=search_pb2.FloatVector(values=np.random.default_rng(i).normal(
                size=TINY_DIM)), k=template.k, tag=i) for i in range(n)]
        self.check_batch(search_pb2.BatchSearchRequest(queries=queries).SerializeToString(), queries, timeout, short)

    def check_batch(self, raw: bytes, queries: list[search_pb2.Query], timeout: float, short: bool) -> None:
        code, details, reply = self.unary("BatchSearch", raw, timeout)
        what = f"BatchSearch({len(queries)} queries)"
        self.check_status(code, details, short, what)
        if code != grpc.StatusCode.OK:
            return
        assert 1 <= len(queries) <= self.batch_limit, f"{what} answered OK (limit {self.batch_limit})"
        assert [r.tag for r in reply.results] == [q.tag for q in queries], f"{what}: results do not match queries"
        for i, (q, r) in enumerate(zip(queries, reply.results)):
            self.check_result(r, q, short, f"{what}[{i}]")

    def stream(self, fdp, timeout: float, short: bool) -> None:
        messages: list[tuple[bytes, search_pb2.Query | None]] = []
        for _ in range(fdp.ConsumeIntInRange(0, 6)):
            if fdp.ConsumeIntInRange(0, 5) == 0:
                raw = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256))
                messages.append((raw, search_pb2.Query.FromString(raw) if parses(search_pb2.Query, raw) else None))
            else:
                q = self.query(fdp)
                messages.append((q.SerializeToString(), q))
        call = self.channel.stream_stream("/asymsearch.v1.Search/SearchStream",
                                          response_deserializer=search_pb2.QueryResult.FromString)
        results, code, details = [], grpc.StatusCode.OK, ""
        try:
            results.extend(call(iter([raw for raw, _ in messages]), timeout=timeout))
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        what = f"SearchStream({len(messages)} messages)"
        self.check_status(code, details, short, what)
        if code != grpc.StatusCode.OK:
            return
        unparsable = [i for i, (_, q) in enumerate(messages) if q is None]
        if unparsable:
            raise AssertionError(f"{what}: message {unparsable[0]} does not parse, yet the stream ended OK with "
                                 f"{len(results)} results (it must end with INVALID_ARGUMENT)")
        by_tag = collections.defaultdict(list)
        for _, q in messages:
            by_tag[q.tag].append(q)
        assert sorted(r.tag for r in results) == sorted(q.tag for _, q in messages), \
            f"{what}: result tags {sorted(r.tag for r in results)} for queries {sorted(by_tag)}"
        for r in results:
            qs = by_tag[r.tag]
            # tags may repeat: check validity only where the query is unambiguous
            self.check_result(r, qs[0] if len(qs) == 1 else None, short, f"{what} tag {r.tag}")

    # -- the server keeps serving ---------------------------------------------------------------------------

    def check_alive(self) -> None:
        """A good image query still gets its hits, and health is SERVING."""
        reply = self.channel.unary_unary("/asymsearch.v1.Search/SearchImage",
                                         response_deserializer=search_pb2.SearchReply.FromString)(
            search_pb2.ImageQuery(image=self.good_image, k=3).SerializeToString(), timeout=CALL_TIMEOUT)
        assert [h.id for h in reply.hits] == self.good_hits, ([h.id for h in reply.hits], self.good_hits)
        status = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(),
                                                                timeout=CALL_TIMEOUT).status
        assert status == health_pb2.HealthCheckResponse.SERVING, status


def _take_total_time(argv: list[str]) -> tuple[list[str], float | None]:
    """Remove -max_total_time=N (the target ends the run itself, after its final check) and return N."""
    rest, seconds = [], None
    for a in argv:
        if a.startswith("-max_total_time="):
            seconds = float(a.split("=", 1)[1])
        else:
            rest.append(a)
    return rest, seconds


def main(argv: list[str]) -> None:
    if atheris is None:
        sys.exit("fuzz_requests: atheris is not installed (pip install -e '.[dev]')")
    argv, seconds = _take_total_time(argv)
    target = Target(tempfile.mkdtemp(prefix="fuzz-requests-"))
    strict = STRICT
    end = None if seconds is None else time.monotonic() + seconds
    started = time.monotonic()

    def finish() -> None:
        target.check_alive()
        print(f"fuzz_requests: {target.runs} inputs in {time.monotonic() - started:.0f} s; after them a good "
              f"query got its hits and health was SERVING", flush=True)
        for key, n in sorted(target.known.items()):
            print(f"fuzz_requests: known issue {key} hit {n} times: {ISSUES[key]}", flush=True)
        target.close()
        os._exit(0)  # libFuzzer would exit without returning here; nothing after Fuzz() runs

    def one_input(data: bytes) -> None:
        if end is not None and time.monotonic() >= end:
            finish()
        target.check(bytes(data), strict=strict)

    backstop = [] if seconds is None else [f"-max_total_time={int(seconds) + 600}"]
    warnings.simplefilter("ignore")  # Pillow warns on corrupt EXIF and the like: not an invariant
    atheris.Setup(argv + backstop, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
