"""The load generator of `asymsearch bench serve`: worker processes, each running threads of blocking calls.

Processes, not threads of the benchmarking process, so that the clients' Python work (protobuf, grpc) does not
share a GIL with anything it measures. Each worker keeps one channel per address and runs "levels" it receives
on its command queue: `threads` callers send requests back to back from a common wall-clock start for
`duration` seconds; latencies of the requests that started inside the window are returned, with status counts.
A caller that gets an error waits `error_pause` seconds before the next request (as a client backing off would).
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import threading
import time
from typing import Any

import grpc

from asymsearch.protos.v1 import search_pb2, search_pb2_grpc

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def _requests(kind: str, payloads: list[Any], k: int) -> list[Any]:
    if kind == "image":
        out = []
        for path in payloads:
            with open(path, "rb") as f:
                out.append(search_pb2.ImageQuery(image=f.read(), k=k))
        return out
    return [search_pb2.VectorQuery(vector=v, k=k) for v in payloads]


def run_level(stub: search_pb2_grpc.SearchStub, kind: str, threads: int, start_at: float, duration: float,
              k: int, payloads: list[Any], seed: int = 0, timeout: float = 30.0,
              error_pause: float = 0.01) -> dict[str, Any]:
    """Run `threads` back-to-back callers from wall time `start_at` for `duration` s; return latencies (s) of
    requests started in the window that succeeded, status counts, and how many finished inside the window."""
    requests = _requests(kind, payloads, k)
    method = stub.SearchImage if kind == "image" else stub.SearchVector
    end_at = start_at + duration
    lock = threading.Lock()
    latencies: list[float] = []
    codes: collections.Counter = collections.Counter()
    finished = [0]

    def caller(t: int) -> None:
        i = (seed * 7919 + t * 104729) % len(requests)
        for _ in range(2):  # warm-up, before the window
            try:
                method(requests[i], timeout=timeout)
            except grpc.RpcError:
                pass
        mine_lat, mine_codes, mine_done = [], collections.Counter(), 0
        time.sleep(max(0.0, start_at - time.time()))
        while True:
            started_wall = time.time()
            if started_wall >= end_at:
                break
            i = (i + 1) % len(requests)
            t0 = time.perf_counter()
            try:
                method(requests[i], timeout=timeout)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
            dt = time.perf_counter() - t0
            mine_codes[code] += 1
            if code == "OK":
                mine_lat.append(dt)
            else:
                time.sleep(error_pause)
            if started_wall + dt <= end_at:
                mine_done += 1
        with lock:
            latencies.extend(mine_lat)
            codes.update(mine_codes)
            finished[0] += mine_done

    workers = [threading.Thread(target=caller, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"latencies": latencies, "codes": dict(codes), "finished_in_window": finished[0]}


def worker_main(index: int, commands: mp.Queue, results: mp.Queue) -> None:
    """The loop of one worker process: run each command's level, put the result (tagged with `index`)."""
    channels: dict[str, tuple[grpc.Channel, search_pb2_grpc.SearchStub]] = {}
    while True:
        cmd = commands.get()
        if cmd is None:
            break
        address = cmd.pop("address")
        if address not in channels:
            ch = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                                         ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
            channels[address] = (ch, search_pb2_grpc.SearchStub(ch))
        try:
            out = run_level(channels[address][1], seed=index, **cmd)
        except Exception as e:  # report, never hang the benchmark
            out = {"latencies": [], "codes": {f"CLIENT_ERROR {type(e).__name__}: {e}": 1}, "finished_in_window": 0}
        results.put((index, out))
    for ch, _ in channels.values():
        ch.close()


class ClientPool:
    """`processes` worker processes (spawned once); `run` spreads `concurrency` callers over them."""

    def __init__(self, processes: int) -> None:
        ctx = mp.get_context("spawn")
        self._results = ctx.Queue()
        self._commands = [ctx.Queue() for _ in range(processes)]
        self._procs = [ctx.Process(target=worker_main, args=(i, q, self._results), daemon=True)
                       for i, q in enumerate(self._commands)]
        for p in self._procs:
            p.start()

    def run(self, address: str, kind: str, concurrency: int, duration: float, k: int, payloads: list[Any],
            *, lead_s: float = 1.5, timeout: float = 30.0) -> dict[str, Any]:
        """All callers start `lead_s` from now (time for the workers to warm up). Returns merged results."""
        n = len(self._procs)
        shares = [concurrency // n + (1 if i < concurrency % n else 0) for i in range(n)]
        start_at = time.time() + lead_s
        busy = [i for i, s in enumerate(shares) if s]
        for i in busy:
            self._commands[i].put({"address": address, "kind": kind, "threads": shares[i], "start_at": start_at,
                                   "duration": duration, "k": k, "payloads": payloads, "timeout": timeout})
        latencies: list[float] = []
        codes: collections.Counter = collections.Counter()
        finished = 0
        for _ in busy:
            _, out = self._results.get(timeout=lead_s + duration + timeout + 120)
            latencies.extend(out["latencies"])
            codes.update(out["codes"])
            finished += out["finished_in_window"]
        return {"latencies": latencies, "codes": dict(codes), "finished_in_window": finished,
                "duration": duration, "processes": len(busy)}

    def close(self) -> None:
        for q in self._commands:
            q.put(None)
        for p in self._procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)

    def __enter__(self) -> "ClientPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
