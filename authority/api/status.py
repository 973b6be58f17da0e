"""Errors become gRPC statuses here, and only here.

One table maps each family of ``authority.errors`` to a code. The stable reason travels in the
trailing metadata key ``authority-reason``; internal errors reach the client as a generic message.

Refusals (UNAUTHENTICATED and PERMISSION_DENIED: a refused attestation, a bad, expired or
revoked token or SVID, a revoked caller, a policy denial, a denied approval) are logged here
too, at WARNING, one line each naming the reason, the method and the caller: its SPIFFE ID when
it presented an SVID over mutual TLS, else its network address, or the uid and pid the kernel
gives on a local socket. Never the message (it may quote what the caller sent) nor a token.
At most ``REFUSAL_LOG_BURST`` lines per reason in ``REFUSAL_LOG_WINDOW`` seconds, then one line
counting those left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
import grpclib.const
import grpclib.server

from authority import errors
from authority.logs import RateLimitedLog

log = logging.getLogger(__name__)

REASON_KEY = "authority-reason"

CODES: tuple[tuple[type[errors.AuthorityError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.Internal, grpc.StatusCode.INTERNAL),
)
GENERIC_INTERNAL = "internal error; the server log has the details"
# A status message may quote what the caller sent (an id, a name): past this it is cut, so an
# answer's trailers stay far below gRPC's 16 KiB metadata limit (a client would otherwise get an
# error of its own instead of the status) and a log line stays a line.
MAX_STATUS_MESSAGE_CHARS = 1024
REFUSAL_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
REFUSAL_LOG_BURST = 10  # lines per reason per window, then one summary line
REFUSAL_LOG_WINDOW = 10.0  # seconds
refusals = RateLimitedLog(log, burst=REFUSAL_LOG_BURST, window=REFUSAL_LOG_WINDOW)


def log_refusal(
    exc: errors.AuthorityError,
    code: grpc.StatusCode,
    method: str,
    caller: Callable[[], tuple[str | None, str]],
) -> None:
    """One rate-limited line for a refused call. ``caller`` gives (SPIFFE ID or None, peer); it
    is asked only when the line is written."""
    if code not in REFUSAL_CODES or not refusals.admit(exc.reason):
        return
    spiffe_id, peer = caller()
    who = f"spiffe_id={spiffe_id} peer={peer}" if spiffe_id else f"peer={peer}"
    log.warning(
        "refused %s: reason=%s method=%s %s",
        code.name,
        exc.reason,
        method,
        who,
        extra={
            "code": code.name,
            "reason": exc.reason,
            "method": method,
            "spiffe_id": spiffe_id,
            "peer": peer,
        },
    )


def _grpc_caller(context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str | None, str]:
    """The SPIFFE ID gRPC verified in the client's certificate (mutual TLS only; the
    authority may still refuse it: revoked, say) and the peer's address."""
    spiffe_id = None
    with contextlib.suppress(Exception):  # a context without a TLS auth context
        ids = context.auth_context().get("peer_spiffe_id") or ()
        spiffe_id = next((bytes(i).decode("utf-8", "replace") for i in ids), None)
    return spiffe_id, context.peer() or "unknown"


def _grpclib_caller(stream: grpclib.server.Stream[Any, Any]) -> tuple[str | None, str]:
    """The uid and pid the kernel gives for a local socket's peer."""
    from authority.api.grpclib_server import peer_ids  # it imports this module

    ids = peer_ids(stream.peer._transport)
    return None, (f"local uid={ids[0]} pid={ids[1]}" if ids is not None else "local")


def status_reason(exc: grpc.aio.AioRpcError) -> str | None:
    """The stable reason a failed call carried in its trailing metadata, if any."""
    trailing: Any = exc.trailing_metadata() or ()
    return next((str(value) for key, value in trailing if key == REASON_KEY), None)


def error_from_status(exc: grpc.aio.AioRpcError) -> errors.AuthorityError:
    """The domain error behind an upstream call's status (a node agent relaying the
    authority's answer): same family, same message and reason; a code outside the table
    (deadline, cancelled, unknown) is UNAVAILABLE: the authority could not answer."""
    reason = status_reason(exc) or "UPSTREAM"
    message = exc.details() or exc.code().name
    for cls, code in CODES:
        if exc.code() is code and cls is not errors.Internal:
            return cls(message, reason=reason)
    return errors.Unavailable(f"the authority did not answer: {message}", reason="UPSTREAM")


def code_for(exc: errors.AuthorityError) -> grpc.StatusCode:
    for cls, code in CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def bounded_message(message: str) -> str:
    """``message`` as a status (or a log line) carries it: at most MAX_STATUS_MESSAGE_CHARS."""
    if len(message) <= MAX_STATUS_MESSAGE_CHARS:
        return message
    return f"{message[:MAX_STATUS_MESSAGE_CHARS]}... ({len(message)} characters)"


async def abort(
    context: grpc.aio.ServicerContext[Any, Any],
    exc: errors.AuthorityError,
    *,
    where: str | None = None,
) -> NoReturn:
    """End the call with ``exc``'s status; ``where`` (the method) logs it when it is a refusal
    (a relying service's interceptor and the listeners' guard log their own)."""
    code = code_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error: reason=%s %s", exc.reason, bounded_message(exc.message))
        message = GENERIC_INTERNAL
    else:
        message = bounded_message(exc.message)
        if where is not None:
            log_refusal(exc, code, where, functools.partial(_grpc_caller, context))
    await _end(context, code, message, exc.reason)


async def _end(
    context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode, message: str, reason: str
) -> NoReturn:
    """``context.abort``; a call its client has already left (cancelled between the refusal and
    the answer) has nobody to answer: the handler ends as cancelled, without grpc's traceback
    for an answer it could not send."""
    try:
        await context.abort(code, message, trailing_metadata=((REASON_KEY, reason),))
    except grpc.aio.AbortError:
        raise
    except Exception:
        if not context.cancelled() and not context.done():
            raise
        log.debug("call ended before its %s answer could be sent", code.name)
        raise asyncio.CancelledError from None
    raise AssertionError("unreachable")  # context.abort always raises


async def _fail(
    context: grpc.aio.ServicerContext[Any, Any], exc: Exception, where: str
) -> NoReturn:
    """End a call with the status of what a handler raised: a domain error's from the table,
    an abort as it was, anything else INTERNAL with a generic message (and the log)."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, errors.AuthorityError):
        await abort(context, exc, where=where)
    log.error("unhandled error in %s", where, exc_info=exc)
    await _end(context, grpc.StatusCode.INTERNAL, GENERIC_INTERNAL, errors.Internal.reason)


_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def rpc(fn: _F) -> _F:
    """Wrap a servicer method: domain errors -> their status, anything else -> INTERNAL."""

    @functools.wraps(fn)
    async def wrapper(
        self: object, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        try:
            return await fn(self, request, context)
        except Exception as exc:  # every failure ends the call with a status
            await _fail(context, exc, fn.__qualname__)

    return wrapper  # type: ignore[return-value]


_G = TypeVar("_G", bound=Callable[..., AsyncIterator[Any]])


def rpc_stream(fn: _G) -> _G:
    """``rpc`` for a servicer method that yields its responses (a server stream): an error
    raised before or between messages ends the stream with its status, never UNKNOWN."""

    @functools.wraps(fn)
    async def wrapper(
        self: object, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for message in fn(self, request, context):
                yield message
        except Exception as exc:  # every failure ends the stream with a status
            await _fail(context, exc, fn.__qualname__)

    return wrapper  # type: ignore[return-value]


async def fail_grpclib_stream(
    stream: grpclib.server.Stream[Any, Any], exc: errors.AuthorityError
) -> None:
    """The same mapping for the grpclib endpoints (Unix sockets): the status as trailers."""
    code = code_for(exc)
    message = bounded_message(exc.message)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error: reason=%s %s", exc.reason, message)
        message = GENERIC_INTERNAL
    else:
        method = str(getattr(stream, "_method_name", "") or "unknown")
        log_refusal(exc, code, method, functools.partial(_grpclib_caller, stream))
    await stream.send_trailing_metadata(
        status=grpclib.const.Status[code.name],
        status_message=message,
        metadata={REASON_KEY: exc.reason},
    )
