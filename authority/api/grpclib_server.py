"""The grpclib server of every local Unix socket (attest socket, Workload API), hardened against
hostile wire input.

Anyone local may connect to these sockets (mode 0666), so every byte on them is treated as
hostile. grpclib has no message-size option on its server and answers some malformed requests
with a traceback, an UNKNOWN status or nothing at all; this module closes those gaps at the few
points where grpclib lets a subclass in:

- **Message size, before buffering.** Each stream's receive buffer is replaced, as the stream is
  accepted (before any DATA of it is processed), by ``_FramedBuffer``. A handler's
  ``recv_message`` reads a 5-byte gRPC prefix, then the body: the buffer reads the prefix, and a
  length above ``Limits.max_message_bytes`` is refused (RESOURCE_EXHAUSTED) before a byte of the
  body is taken. What the client sent meanwhile is bounded by HTTP/2 flow control: grpclib
  grants window only as a handler reads, and both windows are set to one message, so a refused
  stream holds at most one message's worth of unread DATA (h2 closes a connection that sends
  past the window). The compressed flag (no compression is negotiated) and a body cut short by
  END_STREAM are refused there too (INVALID_ARGUMENT).
- **Undecodable bodies**: the codec turns protobuf's DecodeError into INVALID_ARGUMENT.
- **Headers**, checked when the stream is accepted, before grpclib's own handling: a request
  without ``:method`` or ``:path`` is reset (RST_STREAM PROTOCOL_ERROR); a header that is not
  printable ASCII, a ``grpc-timeout`` that is not 1 to 8 digits and a unit, or is zero, and a
  ``-bin`` header that is not base64, get INVALID_ARGUMENT. The deadline is enforced here
  (DEADLINE_EXCEEDED, answered), not by grpclib, whose deadline code logs a traceback when a
  deadline has passed before the handler starts.
- **HTTP/2**: the header list is bounded (``Limits.max_header_list_bytes``; h2 closes the
  connection with a larger one, GOAWAY ENHANCE_YOUR_CALM) and so are concurrent streams per
  connection (``Limits.max_concurrent_streams``); frames of unknown types are ignored, as
  RFC 9113 says.
- **Connections**: at most ``Limits.max_local_connections`` at once, and
  ``max_local_connections_per_uid`` from one uid (the kernel's ``SO_PEERCRED``); a connection
  past either is closed as it comes, before grpclib sees it, so one local user cannot take the
  process's descriptors (and with them the admin socket).
- **Handlers**: a domain error escaping a handler becomes its status (``authority.api.status``),
  anything else INTERNAL with a generic message; grpclib's own answers (UNIMPLEMENTED for an
  unknown method, HTTP 415 for a wrong content-type) stand.

Every malformed request is answered (a refused connection is closed), and logged on one line
naming the peer (the uid and pid the kernel gives for the socket), at most
``REFUSAL_LOG_BURST`` lines a minute per server; the decoder's own message never reaches the
caller or the log.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import contextvars
import functools
import logging
import re
import socket
import struct
import time
import weakref
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpclib.const
import grpclib.exceptions
import grpclib.server
import h2.config
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from google.protobuf.message import DecodeError
from grpclib.config import Configuration
from grpclib.encoding.proto import ProtoCodec
from grpclib.metadata import decode_bin_value, encode_grpc_message
from grpclib.protocol import Buffer, H2Protocol
from grpclib.protocol import Stream as H2Stream

from authority.api.status import REASON_KEY, code_for, fail_grpclib_stream
from authority.config import Limits
from authority.errors import AuthorityError, Internal, InvalidArgument, ResourceExhausted
from authority.logs import RateLimitedLog

log = logging.getLogger(__name__)

Stream = grpclib.server.Stream[Any, Any]
_Headers = list[tuple[str, str]]

PREFIX_BYTES = 5  # the gRPC message prefix: compressed flag, 4-byte big-endian length
MIN_WINDOW = 65_535  # HTTP/2's smallest flow-control window
MAX_WINDOW = 2**31 - 1
REFUSAL_LOG_BURST = 20  # refusal lines per REFUSAL_LOG_WINDOW, then one summary
REFUSAL_LOG_WINDOW = 60.0  # seconds
# grpc-timeout: "TimeoutValue TimeoutUnit", at most 8 digits (PROTOCOL-HTTP2.md).
_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_BASE64 = re.compile(r"[A-Za-z0-9+/\-_]*={0,2}")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")  # what gRPC allows in a header (PROTOCOL-HTTP2.md)


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket, as the kernel recorded
    them at connect (``SO_PEERCRED``)."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid, uid, gid


def peer_ids(transport: asyncio.BaseTransport | None) -> tuple[int, int] | None:
    """(uid, pid) of the peer of a Unix-socket transport, for a log line; None when the
    transport is gone or not a Unix socket."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        pid, uid, _ = peer_cred(sock)
    except OSError:
        return None
    return uid, pid


class RefusalLog:
    """One line per refused request, naming the peer; at most ``burst`` lines per ``window``
    seconds in all, then one line counting those left out (a flood does not flood the log).
    ``authority.logs.RateLimitedLog`` under one key: the server, not the reason."""

    KEY = "local socket"

    def __init__(
        self,
        burst: int = REFUSAL_LOG_BURST,
        window: float = REFUSAL_LOG_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lines = RateLimitedLog(
            log, burst=burst, window=window, clock=clock, summary="malformed requests refused"
        )

    def refused(self, reason: str, transport: asyncio.BaseTransport | None, method: str) -> None:
        if not self._lines.admit(self.KEY):
            return
        ids = peer_ids(transport)
        peer = f"uid={ids[0]} pid={ids[1]}" if ids is not None else "peer=unknown"
        log.warning(
            "local socket: refused a malformed request: %s %s method=%r", reason, peer, method
        )


@dataclass(frozen=True, slots=True)
class _Call:
    """What the code below grpclib's request handler needs to know of the call it serves."""

    transport: asyncio.BaseTransport | None
    method: str
    refusals: RefusalLog
    deadline: float | None  # loop time


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("grpclib_call", default=None)


def _refuse(exc: AuthorityError) -> AuthorityError:
    """Log the refusal for the call being served (one line, rate limited); return ``exc``."""
    call = _CALL.get()
    if call is not None:
        call.refusals.refused(exc.reason, call.transport, call.method)
    return exc


def _malformed(message: str, reason: str) -> AuthorityError:
    return _refuse(InvalidArgument(message, reason=reason))


class _FramedBuffer(Buffer):
    """A stream's receive buffer that knows gRPC framing: grpclib reads a 5-byte prefix, then
    the body it announces. An announced length above ``limit`` is refused before the body is
    read (and so before the client is given window to send it)."""

    def __init__(self, ack_callback: Callable[[int], None], limit: int) -> None:
        super().__init__(ack_callback)
        self._limit = limit
        self._body: int | None = None  # the length announced by the prefix just read

    async def read(self, size: int) -> bytes:
        if self._body is None and size == PREFIX_BYTES:
            prefix = await self._read(size)
            if prefix:  # empty: the client ended the stream between messages
                self._check_prefix(prefix)
            return prefix
        if size > self._limit:  # grpclib reads nothing else; refuse whatever asks for more
            raise _refuse(_too_large(size, self._limit))
        self._body = None
        body = await self._read(size)
        if len(body) != size:  # END_STREAM right after the prefix
            raise _truncated()
        return body

    async def _read(self, size: int) -> bytes:
        try:
            return await super().read(size)
        except AssertionError:  # grpclib's Buffer: END_STREAM before ``size`` bytes came
            raise _truncated() from None

    def _check_prefix(self, prefix: bytes) -> None:
        compressed, length = struct.unpack(">BI", prefix)
        if compressed:
            raise _malformed(
                "compressed message, but no compression was negotiated", "COMPRESSED_MESSAGE"
            )
        if length > self._limit:
            raise _refuse(_too_large(length, self._limit))
        self._body = length


def _truncated() -> AuthorityError:
    return _malformed("the message ended before its announced length", "TRUNCATED_MESSAGE")


def _too_large(size: int, limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        f"message of {size} bytes exceeds the limit of {limit} bytes", reason="MESSAGE_TOO_LARGE"
    )


class _StrictCodec(ProtoCodec):
    """Protobuf, with a body that does not decode refused as INVALID_ARGUMENT (the decoder's
    message stays out of the answer and the log)."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            return super().decode(data, message_type)
        except DecodeError:
            raise _malformed("the request message does not decode", "MALFORMED_MESSAGE") from None


# What grpclib's proto codec serves (its request handler checks the same, answering UNKNOWN).
_CONTENT_TYPES = frozenset({"application/grpc", "application/grpc+proto"})


def _check_headers(headers: _Headers) -> tuple[_Headers, float | None]:
    """The headers without ``grpc-timeout`` (enforced here) and the deadline it sets (seconds
    from now), or InvalidArgument."""
    timeouts: list[float] = []
    kept: _Headers = []
    for key, value in headers:
        if _PRINTABLE.fullmatch(key) is None or _PRINTABLE.fullmatch(value) is None:
            raise InvalidArgument("a header is not printable ASCII", reason="BAD_HEADER")
        if key == "grpc-timeout":
            match = _TIMEOUT.fullmatch(value)
            if match is None or int(match.group(1)) == 0 or timeouts:
                raise InvalidArgument("malformed grpc-timeout header", reason="BAD_TIMEOUT")
            timeouts.append(int(match.group(1)) * _TIMEOUT_UNITS[match.group(2)])
            continue
        if key.endswith("-bin") and not key.startswith(("grpc-", ":")):
            _check_base64(value)
        kept.append((key, value))
    return kept, (timeouts[0] if timeouts else None)


def _check_base64(value: str) -> None:
    """What grpclib's ``decode_metadata`` will decode must decode (it would raise outside any
    handler, leaving the call unanswered)."""
    if _BASE64.fullmatch(value) is None:
        raise InvalidArgument("a -bin header is not base64", reason="BAD_BINARY_HEADER")
    try:
        decode_bin_value(value.encode("ascii"))
    except (binascii.Error, ValueError):
        raise InvalidArgument("a -bin header is not base64", reason="BAD_BINARY_HEADER") from None


def _answered(stream: Stream) -> bool:
    # grpclib keeps no public flag for it; its own __aexit__ reads the same attribute.
    return bool(getattr(stream, "_send_trailing_metadata_done", False))


def _guard(
    name: str, func: Callable[[Stream], Awaitable[None]]
) -> Callable[[Stream], Awaitable[None]]:
    """``func`` under the call's deadline; what escapes it becomes an answer, not a traceback."""

    async def guarded(stream: Stream) -> None:
        call = _CALL.get()
        timeout = asyncio.timeout_at(call.deadline if call is not None else None)
        try:
            async with timeout:
                await func(stream)
        except TimeoutError:
            if not timeout.expired():
                raise
            await _answer(
                stream,
                lambda: stream.send_trailing_metadata(
                    status=grpclib.const.Status.DEADLINE_EXCEEDED,
                    status_message="deadline exceeded",
                ),
            )
        except AuthorityError as exc:
            await _answer(stream, functools.partial(fail_grpclib_stream, stream, exc))
        except (grpclib.exceptions.GRPCError, grpclib.exceptions.StreamTerminatedError):
            raise  # grpclib's own: it answers (or the client has gone), without a traceback
        except h2.exceptions.StreamClosedError:
            log.debug("%s: the client closed the stream before its answer", name)
        except Exception:
            log.exception("unhandled error in %s", name)
            await _answer(stream, lambda: fail_grpclib_stream(stream, Internal("unexpected")))

    return guarded


async def _answer(stream: Stream, send: Callable[[], Awaitable[None]]) -> None:
    """Send a status unless one was sent; a client that has gone gets none (and no traceback)."""
    if not _answered(stream):
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            await send()


class _Handler(grpclib.server.Handler):
    """grpclib's per-connection handler, with each accepted stream's buffer framed and its
    headers checked before grpclib's request handler runs."""

    def __init__(self, server: UnixSocketServer, mapping: dict[str, grpclib.const.Handler]) -> None:
        super().__init__(mapping, server._codec, server._status_details_codec, server.__dispatch__)
        self._limits = server.limits
        self._refusals = server.refusals

    def accept(
        self, stream: H2Stream, headers: _Headers, release_stream: Callable[[], Any]
    ) -> None:
        # Called as the HEADERS frame is processed: no DATA of this stream has been buffered.
        assert stream.id is not None
        stream.buffer = _FramedBuffer(
            functools.partial(stream.connection.ack, stream.id), self._limits.max_message_bytes
        )
        self.__gc_step__()
        self._tasks[stream] = self.loop.create_task(self._handle(stream, headers, release_stream))

    async def _handle(
        self, stream: H2Stream, headers: _Headers, release_stream: Callable[[], Any]
    ) -> None:
        method = next((v for k, v in headers if k == ":path"), "")
        names = [k for k, _ in headers]
        transport = getattr(stream, "_transport", None)
        if names.count(":path") != 1 or names.count(":method") != 1:
            try:
                self._refusals.refused("MISSING_PSEUDO_HEADER", transport, method[:128])
                await _reset(stream, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            finally:
                release_stream()
            return
        http_status = "200"
        try:
            content_types = [v for k, v in headers if k == "content-type"]
            if len(content_types) != 1 or content_types[0] not in _CONTENT_TYPES:
                # HTTP 415 as the gRPC spec has it (grpclib's own answer said UNKNOWN).
                http_status = "415"
                raise InvalidArgument(
                    "content-type must be application/grpc", reason="BAD_CONTENT_TYPE"
                )
            if [v for k, v in headers if k == "te"] != ["trailers"]:
                raise InvalidArgument('a gRPC request carries "te: trailers"', reason="BAD_HEADER")
            kept, timeout = _check_headers(headers)
        except InvalidArgument as exc:
            try:
                self._refusals.refused(exc.reason, transport, method[:128])
                await _refuse_headers(stream, exc, http_status)
            finally:
                release_stream()
            return
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        _CALL.set(_Call(transport, method[:128], self._refusals, deadline))
        await grpclib.server.request_handler(
            self.mapping,
            stream,
            kept,
            self.codec,
            self.status_details_codec,
            self.dispatch,
            release_stream,
        )


async def _reset(stream: H2Stream, code: h2.errors.ErrorCodes) -> None:
    with contextlib.suppress(h2.exceptions.ProtocolError):
        if stream.closable:
            await stream.reset(code)


async def _refuse_headers(stream: H2Stream, exc: AuthorityError, http_status: str = "200") -> None:
    """A trailers-only answer to a request refused before grpclib saw it."""
    status = grpclib.const.Status[code_for(exc).name]
    headers = [
        (":status", http_status),
        ("content-type", "application/grpc+proto"),
        ("grpc-status", str(status.value)),
        ("grpc-message", encode_grpc_message(exc.message)),
        (REASON_KEY, exc.reason),
    ]
    with contextlib.suppress(h2.exceptions.ProtocolError):
        await stream.send_headers(headers, end_stream=True)
        if stream.closable:
            stream.reset_nowait()


class _Protocol(H2Protocol):
    """grpclib's HTTP/2 protocol with bounded header lists and concurrent streams, ignoring
    frames of unknown types (grpclib raises on their events), and sending the GOAWAY h2 queues
    on a protocol error before it closes the connection (grpclib closed it unsent)."""

    def __init__(self, handler: _Handler, server: UnixSocketServer) -> None:
        super().__init__(handler, server._config, server._h2_config)
        self._server = server
        self._limits = server.limits
        self._refusals = server.refusals
        self._uid: int | None = None  # set once admitted under the connection caps

    def data_received(self, data: bytes) -> None:
        try:
            events = self.connection.feed(data)
        except h2.exceptions.ProtocolError as exc:
            transport = getattr(self.connection, "_transport", None)
            self._refusals.refused(f"HTTP/2 {type(exc).__name__}", transport, "")
            self.connection.flush()  # h2's GOAWAY, with its error code
            self.processor.close("Protocol error")
            return
        self.connection.flush()
        for event in events:
            self.processor.process(event)
        self.connection.flush()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ids = peer_ids(transport)
        uid = ids[0] if ids is not None else -1
        refused = self._server.admit(uid)
        if refused:
            self._refusals.refused(refused, transport, "")
            transport.close()
            return
        self._uid = uid
        super().connection_made(transport)
        h2_connection = self.connection._connection
        # Announced now, enforced by h2 once the client acknowledges; until then h2's own
        # bounds hold (100 streams, a 64 KiB header list).
        h2_connection.update_settings(
            {
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: (
                    self._limits.max_concurrent_streams
                ),
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self._limits.max_header_list_bytes,
            }
        )
        h2_connection.decoder.max_header_list_size = min(
            h2_connection.decoder.max_header_list_size, self._limits.max_header_list_bytes
        )
        self.connection.flush()
        self.processor.processors[h2.events.UnknownFrameReceived] = _ignore

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._uid is None:
            return  # refused at connect: grpclib never saw it
        self._server.release(self._uid)
        self._uid = None
        super().connection_lost(exc)


def _ignore(event: h2.events.Event) -> None:
    return None


class UnixSocketServer(grpclib.server.Server):
    """grpclib's server, hardened (see the module's docstring), closing its client connections
    when it closes.

    grpclib's ``close`` stops listening and cancels the running calls but leaves connections to
    their clients: a client that never hangs up would keep its socket (and, on Python >= 3.12,
    ``wait_closed``) open. Each connection is closed as grpclib closes a lost one."""

    def __init__(
        self,
        handlers: Collection[Any],
        limits: Limits | None = None,
        *,
        max_connections: int | None = None,
    ) -> None:
        self.limits = limits or Limits()
        # Connections held at once, in all and per uid (``max_connections`` when the process
        # fitted its caps to its descriptor limit).
        self.max_connections = max_connections or self.limits.max_local_connections
        self.max_connections_per_uid = min(
            self.limits.max_local_connections_per_uid, self.max_connections
        )
        self._connections = 0
        self._by_uid: collections.Counter[int] = collections.Counter()
        window = max(MIN_WINDOW, min(MAX_WINDOW, self.limits.max_message_bytes + PREFIX_BYTES))
        super().__init__(
            handlers,
            codec=_StrictCodec(),
            config=Configuration(
                http2_connection_window_size=window, http2_stream_window_size=window
            ),
        )
        # grpclib decodes headers as ASCII: one byte above 0x7f raised out of h2 and dropped the
        # connection with a traceback. Latin-1 decodes any byte; _check_headers refuses the call.
        self._h2_config = h2.config.H2Configuration(
            client_side=False,
            header_encoding="latin-1",
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_inbound_headers=False,
            normalize_outbound_headers=False,
        )
        self._mapping = {
            name: handler._replace(func=_guard(name, handler.func))
            for name, handler in self._mapping.items()
        }
        self.refusals = RefusalLog()
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def admit(self, uid: int) -> str:
        """Count a new connection from ``uid`` in; "" when admitted, else why it is refused."""
        if self._connections >= self.max_connections:
            return f"connection limit ({self.max_connections} on this socket)"
        if self._by_uid[uid] >= self.max_connections_per_uid:
            return f"connection limit ({self.max_connections_per_uid} per uid)"
        self._connections += 1
        self._by_uid[uid] += 1
        return ""

    def release(self, uid: int) -> None:
        self._connections -= 1
        self._by_uid[uid] -= 1
        if not self._by_uid[uid]:
            del self._by_uid[uid]

    @property
    def connections(self) -> int:
        """Connections held now."""
        return self._connections

    def _protocol_factory(self) -> H2Protocol:
        self.__gc_step__()
        handler = _Handler(self, self._mapping)
        self._handlers.add(handler)
        protocol = _Protocol(handler, self)
        self._protocols.add(protocol)
        return protocol

    def close(self) -> None:
        super().close()
        for protocol in list(self._protocols):
            processor = getattr(protocol, "processor", None)  # set once connected
            if processor is not None:
                processor.close("the server is stopping")


__all__ = ["RefusalLog", "UnixSocketServer", "peer_cred", "peer_ids"]
