"""Errors at the boundary: typed exceptions inside, one gRPC status outside, mapped in one place.

    InvalidQuery, UserError -> INVALID_ARGUMENT     Overloaded, LimitReached -> RESOURCE_EXHAUSTED
    Expired, DeadlineExceeded, StreamIdle -> DEADLINE_EXCEEDED
    NotReady, Closed -> UNAVAILABLE                 PairingError (on reload) -> FAILED_PRECONDITION
    Unimplemented -> UNIMPLEMENTED                  PermissionDenied (Admin confinement) -> PERMISSION_DENIED
    anything unexpected -> INTERNAL with a short message (the traceback goes to the log); the server keeps serving

Servicer methods raise; `rpc_errors` (a decorator for unary coroutines and streaming async generators alike)
turns what they raise into `context.abort(code, message)`.
"""
from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import grpc
import grpc.aio

from asymsearch.core.errors import PairingError, UserError
from asymsearch.server.admin import PermissionDenied
from asymsearch.server.admission import Closed, Overloaded
from asymsearch.server.batching import Expired
from asymsearch.server.engine import InvalidQuery

log = logging.getLogger(__name__)


class NotReady(Exception):
    """No index is loaded yet."""


class DeadlineExceeded(Exception):
    """The caller's deadline passed while its query waited."""


class StreamIdle(Exception):
    """A stream stayed open with no query in progress for longer than the idle limit."""


class LimitReached(Exception):
    """An RPC-level limit (streams open, calls per peer) refuses this call."""


class Unimplemented(Exception):
    """The call needs something this server was not started with."""


_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidQuery, grpc.StatusCode.INVALID_ARGUMENT), (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (LimitReached, grpc.StatusCode.RESOURCE_EXHAUSTED), (Expired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED), (StreamIdle, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Closed, grpc.StatusCode.UNAVAILABLE), (NotReady, grpc.StatusCode.UNAVAILABLE),
    (PairingError, grpc.StatusCode.FAILED_PRECONDITION), (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (UserError, grpc.StatusCode.INVALID_ARGUMENT)]


def status_of(exc: BaseException, where: str = "") -> tuple[grpc.StatusCode, str]:
    """(code, message) for `exc`; an unexpected one is logged with its traceback and answered INTERNAL."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code, str(exc)
    log.error("unexpected error%s", f" in {where}" if where else "", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal server error (details in the server log)"


def rpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (a coroutine, or an async generator for a streaming reply) so that whatever it raises
    leaves as `context.abort` with the status of `status_of`."""
    where = method.__name__
    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def streaming(self, request, context):
            try:
                async for reply in method(self, request, context):
                    yield reply
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await context.abort(*status_of(e, where))
        return streaming

    @functools.wraps(method)
    async def unary(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await context.abort(*status_of(e, where))
    return unary
