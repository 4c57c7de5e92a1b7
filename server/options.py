"""Everything about the server except the engine: `ServeOptions`, and the gRPC server options it turns into.

The limits, and why they exist (docs/server.md has the measurements):

    batching.max_queue / memory_budget_bytes   queries admitted at once, by count and by bytes (admission.py)
    max_batch_queries                          queries one BatchSearch call may carry; never above max_queue
    max_concurrent_streams                     HTTP/2 streams (RPCs in progress) on one connection
    max_streams                                SearchStream calls open at once, over all connections
    max_calls_per_peer                         Search RPCs in progress from one client address (streams included)
    stream_idle_s                              a stream with no query in progress for this long is closed
    keepalive_*, min_ping_interval_s           dead connections are found; clients pinging too often are cut off
    max_connection_idle_s                      a connection with no RPC for this long is closed

Health, Info and /metrics are outside every one of these.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from asymsearch.core.errors import UserError
from asymsearch.core.net import is_loopback
from asymsearch.server.batching import BatchingConfig
from asymsearch.server.tokens import ADMIN, Tokens, read_token_file

from asymsearch.server.defaults import (MAX_BATCH_QUERIES, MAX_CALLS_PER_PEER, MAX_CONCURRENT_STREAMS,
                                        MAX_STREAMS, STREAM_IDLE_S)

STOP_GRACE_S = 5.0  # in-flight requests get this long to finish on shutdown


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """Everything about the server except the engine. Defaults are the measured ones (docs/server.md)."""

    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port
    max_workers: int | None = None  # ignored: RPCs are coroutines on grpc.aio, no thread each (kept for callers)
    max_message_bytes: int = 16 * 1024 * 1024
    batching: BatchingConfig = BatchingConfig()
    max_batch_queries: int | None = None  # queries one BatchSearch call may carry (None: 1024, or less to fit
    #                                        what admission takes at once, batching.max_queue)
    tls_cert: str | None = None  # PEM files; cert + key turn TLS on
    tls_key: str | None = None
    tls_client_ca: str | None = None  # when given, clients must present a certificate signed by it
    token: str | None = None  # shorthand for one admin-scope token (admin includes search)
    tokens: Tokens | None = None  # scoped tokens (server.tokens); with `token_file` they are read from it
    token_file: str | None = None  # read at start and again on SIGHUP
    search_requires_token: bool = False
    admin: bool = False
    admin_roots: tuple[str, ...] = ()  # folders a path-based AddImages may read (resolved); none: path adds off
    insecure: bool = False  # allow plaintext on an address other machines can reach
    expose_paths: bool = False  # Search replies carry the server paths of the hits (off: ids, labels, metadata)
    max_upload_bytes: int = 1 << 30  # what one UploadImages call may carry, all images together
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; 0 picks a free port, None: off
    metrics_host: str = "127.0.0.1"
    follow_current: bool = False  # reload when the index root's CURRENT names another version
    poll_s: float = 1.0
    drain_s: float = STOP_GRACE_S
    drain_announce_s: float = 0.0  # on stop, health says NOT_SERVING this long before new RPCs are refused
    reflection: bool = True
    embed_threads: int = 1  # onnxruntime intra-op threads of each embed worker, used by `serve` (0: all cores)
    max_concurrent_streams: int = MAX_CONCURRENT_STREAMS
    max_streams: int = MAX_STREAMS
    max_calls_per_peer: int = MAX_CALLS_PER_PEER
    stream_idle_s: float = STREAM_IDLE_S
    keepalive_time_s: float = 60.0  # the server pings a connection silent this long ...
    keepalive_timeout_s: float = 20.0  # ... and closes it when no answer comes within this
    min_ping_interval_s: float = 10.0  # a client pinging more often than this (twice) is disconnected
    max_connection_idle_s: float = 300.0

    def __post_init__(self) -> None:
        if self.token_file and self.tokens is None:
            object.__setattr__(self, "tokens", read_token_file(self.token_file))
        if self.admin and not self.all_tokens.has(ADMIN):
            raise UserError("the admin service needs an admin-scope bearer token (--token-file with a line "
                            "'admin TOKEN'); it never runs without one")
        if self.search_requires_token and not len(self.all_tokens):
            raise UserError("--search-requires-token needs tokens (--token-file)")
        if not self.tls_cert and not is_loopback(self.host):
            if self.admin:
                raise UserError(f"the admin service over plaintext is only served on a loopback address, not "
                                f"{self.host}: give --tls-cert and --tls-key, or bind 127.0.0.1")
            if not self.insecure:
                raise UserError(f"binding {self.host} (reachable from other machines) without TLS needs "
                                f"--insecure; or give --tls-cert and --tls-key, or bind 127.0.0.1 (the default)")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise UserError("TLS needs both a certificate and its private key (--tls-cert and --tls-key)")
        if self.tls_client_ca and not self.tls_cert:
            raise UserError("client certificates (--tls-client-ca) need TLS on the server (--tls-cert, --tls-key)")
        for name in ("batch_query_limit", "max_concurrent_streams", "max_streams", "max_calls_per_peer",
                     "max_message_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("stream_idle_s", "keepalive_time_s", "keepalive_timeout_s", "min_ping_interval_s",
                     "max_connection_idle_s"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_query_limit > self.batching.max_queue:
            raise UserError(f"max_batch_queries ({self.max_batch_queries}, --max-batch-queries) exceeds the queries "
                            f"admission takes at once ({self.batching.max_queue}, --queue-size): such a batch "
                            f"could never be admitted; lower the first or raise the second")

    @property
    def all_tokens(self) -> Tokens:
        """`tokens` plus the `token` shorthand (an admin token)."""
        extra = Tokens.of(admin=[self.token]) if self.token else Tokens()
        return Tokens((self.tokens.entries if self.tokens else ()) + extra.entries)

    @property
    def batch_query_limit(self) -> int:
        """Queries one BatchSearch call may carry: `max_batch_queries`, or 1024 capped by what admission takes."""
        if self.max_batch_queries is not None:
            return self.max_batch_queries
        return min(MAX_BATCH_QUERIES, self.batching.max_queue)

    def grpc_options(self) -> list[tuple[str, Any]]:
        ms = lambda s: int(s * 1000)  # noqa: E731
        return [("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it silently
                ("grpc.max_concurrent_streams", self.max_concurrent_streams),
                ("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
                ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(self.min_ping_interval_s)),
                ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_ping_interval_s)),
                ("grpc.http2.max_ping_strikes", 2),
                ("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s))]
