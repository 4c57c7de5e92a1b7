"""A server under test, seen only from outside: `asymsearch serve` in its own process, its Prometheus /metrics
endpoint, its process in /proc, gRPC health, and idle streams held open by another process.

Nothing here imports the server's code: the benchmark measures whatever `asymsearch serve` is, and reads its
figures where an operator would (the metrics endpoint), never from its log lines. The log goes to a file in the
work folder, shown only when the server fails to start.
"""
from __future__ import annotations

import asyncio
import collections
import multiprocessing as mp
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector

from asymsearch.core.errors import UserError
from asymsearch.protos.v1 import search_pb2, search_pb2_grpc

SEARCH_METHODS = {"image": "SearchImage", "vector": "SearchVector"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- Prometheus ---------------------------------------------------------------------------------------------------

def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of every sample in a Prometheus text exposition."""
    return [(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def sample_sum(samples: Iterable[tuple[str, dict[str, str], float]], name: str, **contains: str) -> float | None:
    """Sum of the samples called `name` whose labels contain each given substring (method="SearchImage" matches
    "SearchImage" and "/asymsearch.v1.Search/SearchImage"); None when there is no such sample."""
    values = [v for n, labels, v in samples if n == name
              and all(want in labels.get(key, "") for key, want in contains.items())]
    return sum(values) if values else None


STAGES = ("decode", "embed", "search")  # the pipeline stages whose thread CPU the server exports


class ServerProcess:
    """`asymsearch serve` on 127.0.0.1 (ports chosen here) with /metrics on; ready when health says SERVING."""

    def __init__(self, index: Path, student: Path, *, serve_args: Sequence[str] = (), log_path: Path,
                 start_timeout: float = 300.0, env: dict[str, str] | None = None) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "asymsearch.cli.main", "serve", "--index", str(index),
                        "--student", str(student), "--host", "127.0.0.1", "--port", str(self.port),
                        "--metrics-port", str(self.metrics_port), *serve_args]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._process = ProcessCollector(namespace="", pid=lambda: self.proc.pid, registry=None)
        self.channel = grpc.insecure_channel(self.address)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.search = search_pb2_grpc.SearchStub(self.channel)
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise UserError(f"the server exited with status {self.proc.returncode} before serving: "
                                f"{self.log_tail()}")
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING and self.metrics_text():
                    return
            except (grpc.RpcError, OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise UserError(f"the server did not report SERVING within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        self._log.flush()
        return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])

    # -- what the server says about itself ----------------------------------------------------------------------

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def snapshot(self) -> dict[str, Any]:
        """Requests answered per search method (from /metrics), process CPU seconds (from /metrics when the server
        exports process_cpu_seconds_total, else from /proc/<pid> read by prometheus_client's collector), RSS
        and threads."""
        samples = parse_metrics(self.metrics_text())
        out: dict[str, Any] = {kind: sample_sum(samples, "asymsearch_requests_total", method=m)
                               for kind, m in SEARCH_METHODS.items()}
        out["open_streams"] = sample_sum(samples, "asymsearch_open_streams")
        # thread CPU of the pipeline's stages (a server of older code exports none: {})
        out["stage_cpu_s"] = {stage: v for stage in STAGES
                              if (v := sample_sum(samples, "asymsearch_stage_cpu_seconds_total", stage=stage))
                              is not None}
        cpu = sample_sum(samples, "process_cpu_seconds_total")
        out["cpu_source"] = "/metrics process_cpu_seconds_total"
        if cpu is None:
            own = [(s.name, s.labels, s.value) for f in self._process.collect() for s in f.samples]
            cpu, out["cpu_source"] = sample_sum(own, "process_cpu_seconds_total"), f"/proc/{self.proc.pid}/stat"
        out["cpu_s"] = cpu
        out["rss_mb"] = self.rss_mb()
        out["threads"] = self.threads()
        return out

    def _status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise UserError(f"/proc/{self.proc.pid}/status has no {key}")

    def rss_mb(self) -> float:
        return self._status("VmRSS") / 1024

    def threads(self) -> int:
        return self._status("Threads")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- idle streams -------------------------------------------------------------------------------------------------

async def _hold_streams(address: str, n: int, per_channel: int, report: Any, stop: Any) -> None:
    release = asyncio.Event()

    async def never():  # a request stream that sends nothing until released
        await release.wait()
        return
        yield  # unreachable: makes this an async generator

    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(max(1, -(-n // per_channel)))]
    calls = [search_pb2_grpc.SearchStub(channels[i // per_channel]).SearchStream(never()) for i in range(n)]
    started = await asyncio.gather(*(asyncio.wait_for(c.wait_for_connection(), 60) for c in calls),
                                   return_exceptions=True)
    await asyncio.sleep(0.5)  # let the server refuse what it refuses
    refused: dict[str, int] = {}
    for call, s in zip(calls, started):
        if isinstance(s, BaseException) or call.done():
            code = (await call.code()).name if call.done() else type(s).__name__
            refused[code] = refused.get(code, 0) + 1
    report.put({"opened": n - sum(refused.values()), "refused": refused})
    await asyncio.to_thread(stop.wait)
    release.set()
    for c in calls:
        c.cancel()
    for ch in channels:
        await ch.close()


def _idle_main(address: str, n: int, per_channel: int, report: Any, stop: Any) -> None:
    asyncio.run(_hold_streams(address, n, per_channel, report, stop))


class IdleStreams:
    """`n` SearchStream calls opened and left idle (no query sent), held by a separate process over
    ceil(n / per_channel) connections; `.opened` and `.refused` (status counts) once they are up."""

    def __init__(self, address: str, n: int, per_channel: int = 100, timeout: float = 120.0) -> None:
        ctx = mp.get_context("spawn")
        self._report, self._stop = ctx.Queue(), ctx.Event()
        self._proc = ctx.Process(target=_idle_main, args=(address, n, per_channel, self._report, self._stop),
                                 daemon=True)
        self._proc.start()
        try:
            got = self._report.get(timeout=timeout)
        except Exception:
            self.close()
            raise UserError(f"could not open {n} idle streams to {address} within {timeout:.0f} s") from None
        self.opened, self.refused = int(got["opened"]), dict(got["refused"])

    def close(self) -> None:
        self._stop.set()
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)

    def __enter__(self) -> "IdleStreams":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe_latency(server: ServerProcess, vector: Sequence[float], *, samples: int = 20, timeout: float = 5.0
                  ) -> dict[str, Any]:
    """Latency (ms) of health checks and of vector queries, one at a time, each on a fresh connection's warm
    channel; a call that fails or times out counts by its status code."""
    out: dict[str, Any] = {}
    channel = grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
    try:
        calls = {"health": lambda: health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                                              timeout=timeout),
                 "vector": lambda: search_pb2_grpc.SearchStub(channel).SearchVector(
                     search_pb2.VectorQuery(vector=list(vector), k=10), timeout=timeout)}
        for name, call in calls.items():
            times, errors = [], {}
            for _ in range(samples):
                start = time.perf_counter()
                try:
                    call()
                    times.append((time.perf_counter() - start) * 1e3)
                except grpc.RpcError as e:
                    errors[e.code().name] = errors.get(e.code().name, 0) + 1
            out[name] = {"ok": len(times), "errors": errors,
                         "p50_ms": statistics.median(times) if times else None,
                         "max_ms": max(times) if times else None}
    finally:
        channel.close()
    return out


def deep_png(side: int) -> bytes:
    """A side x side 16-bit greyscale PNG of a smooth gradient: tens of KB on the wire, side^2 x 2 bytes of pixels."""
    import io

    import numpy as np
    from PIL import Image
    ramp = (np.arange(side, dtype=np.uint32) * 65535 // max(1, side - 1)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()).save(buf, "PNG")
    return buf.getvalue()


def probe_large_images(server: ServerProcess, image: bytes, normal: bytes, *, count: int = 16,
                       timeout: float = 120.0) -> dict[str, Any]:
    """`count` copies of `image` sent at once (each from its own thread and channel) while `normal` image queries
    are sent one after another until they are all answered or refused: the server's RSS growth (sampled every
    20 ms), the normal queries' latency, and how the large ones ended (OK, or the status that refused them)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    rss0, peak, done = server.rss_mb(), [server.rss_mb()], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            try:
                peak[0] = max(peak[0], server.rss_mb())
            except (OSError, ValueError):
                return

    def large() -> str:
        with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1),
                                                            ("grpc.max_send_message_length", 64 << 20)]) as ch:
            try:
                search_pb2_grpc.SearchStub(ch).SearchImage(search_pb2.ImageQuery(image=image, k=10), timeout=timeout)
                return "OK"
            except grpc.RpcError as e:
                return e.code().name
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    latencies: list[float] = []
    with ThreadPoolExecutor(count) as pool, grpc.insecure_channel(server.address) as ch:
        stub = search_pb2_grpc.SearchStub(ch)
        pending = [pool.submit(large) for _ in range(count)]
        while not all(f.done() for f in pending):
            start = time.perf_counter()
            stub.SearchImage(search_pb2.ImageQuery(image=normal, k=10), timeout=timeout)
            latencies.append((time.perf_counter() - start) * 1e3)
        outcomes = [f.result() for f in pending]
    done.set()
    sampler.join()
    return {"count": count, "image_bytes": len(image), "outcomes": dict(collections.Counter(outcomes)),
            "rss_before_mb": round(rss0, 1), "rss_peak_mb": round(peak[0], 1),
            "rss_growth_mb": round(peak[0] - rss0, 1), "normal_queries": len(latencies),
            "normal_p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "normal_max_ms": round(max(latencies), 1) if latencies else None}


__all__ = ["IdleStreams", "ServerProcess", "deep_png", "free_port", "parse_metrics", "probe_large_images",
           "probe_latency", "sample_sum"]
