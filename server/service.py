"""The gRPC face of the query engine, by concern:

    options.py       ServeOptions: limits, TLS, tokens, drain; the gRPC server options they become
    admission.py     queries and bytes admitted at once (the memory budget)
    batching.py      the pipeline: decode pool, embed workers, search batcher
    servicers.py     Search and Admin: parse -> call -> reply, as coroutines on grpc.aio
    errors.py        typed exceptions -> gRPC status, in one decorator
    interceptors.py  metrics, access log, bearer token, per-peer and stream limits
    lifecycle.py     SearchServer (start, TLS, attach, reload, follow CURRENT, drain), create_server, serve

This module is the stable import point: `from asymsearch.server.service import create_server, serve, ...`.
"""
from __future__ import annotations

from asymsearch.server.errors import status_of
from asymsearch.server.interceptors import ADMIN_SERVICE_NAME, SERVICE_NAME
from asymsearch.server.lifecycle import IndexUpdater, SearchServer, create_server, serve
from asymsearch.server.options import STOP_GRACE_S, ServeOptions
from asymsearch.server.servicers import STREAM_WINDOW

__all__ = ["ADMIN_SERVICE_NAME", "SERVICE_NAME", "STOP_GRACE_S", "STREAM_WINDOW", "IndexUpdater", "SearchServer",
           "ServeOptions", "create_server", "serve", "status_of"]
