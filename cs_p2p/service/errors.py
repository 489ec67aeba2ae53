"""The one place where store errors become gRPC statuses.

Handlers raise typed `ContentError`s (or let OSError escape); this decorator turns them
into the status code containerd's `errdefs.ToGRPC` would give, with the message kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import logging
from typing import Any, AsyncIterator, Callable

import grpc

from .. import metrics
from ..errors import ContentError, InvalidArgument
from .wire import Malformed

log = logging.getLogger("cs_p2p.service")


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ContentError):
        return exc.code, str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"store is full: {exc}"
    log.exception("unexpected error in handler")
    return grpc.StatusCode.INTERNAL, f"internal error: {exc}"


def check_request(request: Any) -> None:
    if isinstance(request, Malformed):
        raise InvalidArgument(request.reason)


def _code_of(exc: BaseException) -> str:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"  # containerd went away, or stopped reading
    return "UNKNOWN"  # grpc's own abort, or a bug (grpc logs it)


@contextlib.asynccontextmanager
async def _mapped(method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Errors of the body become statuses; the call is counted by the status containerd sees."""
    try:
        yield
    except (ContentError, OSError) as exc:
        status, message = _status_for(exc)
        # Counted before the abort: abort sends the status to containerd before it returns.
        metrics.GRPC_CALLS.labels(method=method, code=status.name).inc()
        await context.abort(status, message)
    except BaseException as exc:
        metrics.GRPC_CALLS.labels(method=method, code=_code_of(exc)).inc()
        raise
    else:
        metrics.GRPC_CALLS.labels(method=method, code="OK").inc()


def grpc_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method (coroutine or async generator) to map errors to statuses, and
    count each call by its status (`cs_p2p_grpc_calls_total`).

    Unary requests that could not be decoded are refused here; stream handlers call
    `check_request` on each message they read.
    """
    method = fn.__name__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def gen(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with _mapped(method, context):
                check_request(request)
                async for item in fn(self, request, context):
                    yield item

        return gen

    @functools.wraps(fn)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _mapped(method, context):
            check_request(request)
            return await fn(self, request, context)

    return unary
