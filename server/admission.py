"""Admission control: how many queries, and how many bytes of them, the server holds at once.

Every query is admitted before any work is done on it and released when it is answered (or fails). Two limits:

    max_queries   queries admitted and not yet answered (`--queue-size`)
    max_bytes     what they occupy (`--memory-budget-mb`): an image query's encoded bytes + its decoded 8-bit
                  RGB image (from the header, before decoding) + the student's input tensor; a vector's values

A query that does not fit is refused at once with `Overloaded`, whose message names the limit that was hit and
its value; nothing waits in an unbounded queue. Health, Info and /metrics never pass through here.
"""
from __future__ import annotations

import threading

MIB = 1024 * 1024


class Overloaded(Exception):
    """A query that does not fit the server's limits now (RESOURCE_EXHAUSTED on the wire); retry later."""


class Closed(Exception):
    """The server is shutting down and takes no new queries."""


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n < 10 * MIB else f"{n / MIB:.0f} MiB"


class Admission:
    """Counts admitted queries and bytes; thread-safe. `admit` raises `Overloaded` or `Closed`, all or nothing."""

    def __init__(self, max_queries: int, max_bytes: int) -> None:
        if max_queries < 1 or max_bytes < 1:
            raise ValueError("admission limits must be positive")
        self.max_queries = max_queries
        self.max_bytes = max_bytes
        self.queries = 0
        self.bytes = 0
        self.closed = False
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def admit(self, n: int, nbytes: int) -> None:
        """Take `n` queries occupying `nbytes` together, or raise without taking anything."""
        with self._lock:
            if self.closed:
                raise Closed("the server is shutting down")
            if self.queries + n > self.max_queries:
                raise Overloaded(f"server busy: {self.queries} queries in progress, the limit is {self.max_queries} "
                                 f"(--queue-size); retry later")
            if nbytes > self.max_bytes:
                raise Overloaded(f"the query needs {_mib(nbytes)} of memory (its bytes and its decoded image), more "
                                 f"than the whole memory budget of {_mib(self.max_bytes)} (--memory-budget-mb); "
                                 f"send a smaller image")
            if self.bytes + nbytes > self.max_bytes:
                raise Overloaded(f"server busy: the memory budget of {_mib(self.max_bytes)} (--memory-budget-mb) "
                                 f"is spent ({_mib(self.bytes)} held by queries in progress, this one needs "
                                 f"{_mib(nbytes)}); retry later")
            self.queries += n
            self.bytes += nbytes

    def release(self, n: int, nbytes: int) -> None:
        """Give back `n` queries (0 for part of a query's bytes only) and `nbytes`."""
        with self._lock:
            self.queries -= n
            self.bytes -= nbytes
            if self.queries == 0:
                self._idle.notify_all()

    def close(self, timeout: float | None) -> bool:
        """Admit nothing more; wait up to `timeout` s for the admitted queries to finish. True when they did."""
        with self._lock:
            self.closed = True
            return self._idle.wait_for(lambda: self.queries == 0, timeout)
