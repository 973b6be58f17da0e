"""A deliberately raw gRPC client: HTTP/2 (the ``h2`` state machine) over a plain socket.

The fuzzer needs what no gRPC library lets a caller do: send any bytes as a message, a length
prefix that lies, a compressed flag without an encoding, a ``-bin`` header that is not base64;
and it needs the server's own status, not one a client library made up when a write raced the
server's answer (grpc/grpc#36066). Everything here is synchronous and bounded by deadlines: a
call the server never answers is an outcome (``UNANSWERED``), not a hang.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

# Outcomes that are not a gRPC status.
UNANSWERED = "UNANSWERED"  # no status and no reset before the deadline
STREAM_OPEN = "STREAM_OPEN"  # a server stream still open when the fuzzer stopped reading
RESET = "RESET"  # the server reset the stream (HTTP/2 RST_STREAM): a transport protocol error
GOAWAY = "GOAWAY"  # the server closed the connection with GOAWAY
CLOSED = "CLOSED"  # the connection ended without GOAWAY
NO_STATUS = "NO_STATUS"  # the stream ended without grpc-status
# Response headers past what gRPC clients accept (grpc core refuses metadata over 16 KiB): the
# client would see an error of its own instead of the server's status.
OVERSIZED_HEADERS = "OVERSIZED_HEADERS"
MAX_HEADER_LIST = 16 * 1024

STATUS_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}

WINDOW = 16 * 1024 * 1024
SEND_WITHIN = 30.0  # a server that stops reading mid-request fails the send after this long


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def grpc_frame(message: bytes, *, compressed: int = 0, length: int | None = None) -> bytes:
    """One gRPC length-prefixed message; ``length`` may lie about the payload's size."""
    size = len(message) if length is None else length
    return struct.pack(">BI", compressed, size & 0xFFFFFFFF) + message


@dataclass
class Outcome:
    """What one call came to."""

    status: str  # a gRPC status name, or one of the transport outcomes above
    message: str = ""  # grpc-message, or the transport's detail
    responses: int = 0  # complete gRPC messages received
    response_bytes: int = 0


@dataclass
class Target:
    """How to reach one endpoint: a socket factory and the request headers it needs."""

    name: str
    connect: Callable[[], socket.socket]
    scheme: str
    authority: str
    headers: tuple[tuple[str, str], ...] = ()


def unix_target(name: str, path: Path, headers: tuple[tuple[str, str], ...] = ()) -> Target:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(path))
        return sock

    return Target(name, connect, "http", "localhost", headers)


def tls_target(
    name: str, address: str, bundle_pem: bytes, *, cert: Path | None = None, key: Path | None = None
) -> Target:
    """Server TLS (or mutual TLS with ``cert``/``key``), the server verified against the bundle."""
    host, port = address.rsplit(":", 1)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=bundle_pem.decode())
    context.check_hostname = False  # the bundle is what is verified; the name is not fuzzed
    context.set_alpn_protocols(["h2"])
    if cert is not None:
        context.load_cert_chain(certfile=str(cert), keyfile=str(key))

    def connect() -> socket.socket:
        raw = socket.create_connection((host, int(port)), timeout=10)
        return context.wrap_socket(raw, server_hostname="localhost")

    return Target(name, connect, "https", address)


@dataclass
class _Stream:
    status: str | None = None
    message: str = ""
    buffer: bytearray = field(default_factory=bytearray)
    responses: int = 0
    response_bytes: int = 0
    headers_seen: bool = False
    ended: bool = False


class Connection:
    """One HTTP/2 connection; calls run one after the other on it. When the server ends the
    connection, the next call opens a new one."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._sock: socket.socket | None = None
        self._h2: h2.connection.H2Connection | None = None
        self._streams: dict[int, _Stream] = {}
        self._dead: str | None = None

    def close(self) -> None:
        if self._sock is not None:
            try:
                if self._h2 is not None and self._dead is None:
                    self._h2.close_connection()
                    self._sock.sendall(self._h2.data_to_send())
            except (OSError, h2.exceptions.ProtocolError):
                pass
            self._sock.close()
        self._sock = None
        self._h2 = None
        self._streams.clear()
        self._dead = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> tuple[socket.socket, h2.connection.H2Connection]:
        if self._sock is not None and self._dead is None:
            # Answer what came while the connection sat idle (keepalive PINGs), and notice a
            # connection the server has closed meanwhile: the call then goes on a new one.
            while self._dead is None and self._pump(time.monotonic() + 0.001):
                pass
        if self._dead is not None:
            self.close()
        if self._sock is None or self._h2 is None:
            sock = self.target.connect()
            conn = h2.connection.H2Connection(
                h2.config.H2Configuration(
                    client_side=True,
                    header_encoding="utf-8",
                    validate_outbound_headers=False,
                    normalize_outbound_headers=False,
                    validate_inbound_headers=False,
                )
            )
            conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW}
            )
            conn.decoder.max_header_list_size = MAX_HEADER_LIST
            conn.initiate_connection()
            conn.increment_flow_control_window(WINDOW)
            sock.sendall(conn.data_to_send())
            self._sock, self._h2 = sock, conn
        return self._sock, self._h2

    def _flush(self) -> None:
        assert self._sock is not None
        assert self._h2 is not None
        data = self._h2.data_to_send()
        if data:
            self._sock.settimeout(SEND_WITHIN)  # _pump leaves its own read timeout behind
            self._sock.sendall(data)

    def _pump(self, deadline: float) -> bool:
        """Read once (until ``deadline``) and handle the events; False on timeout."""
        assert self._sock is not None
        assert self._h2 is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self._sock.settimeout(remaining)
        try:
            data = self._sock.recv(1 << 20)
        except (TimeoutError, ssl.SSLWantReadError):
            return False
        except OSError as exc:
            self._dead = f"{CLOSED}: {exc}"
            return True
        if not data:
            self._dead = CLOSED
            return True
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._dead = f"{CLOSED}: client-side h2 error {exc}"
            if "Oversized header block" in str(exc):
                for stream in self._streams.values():
                    if stream.status is None:
                        stream.status, stream.message = OVERSIZED_HEADERS, str(exc)
            return True
        for event in events:
            self._handle(event)
        try:
            self._flush()
        except OSError as exc:
            self._dead = f"{CLOSED}: {exc}"
        return True

    def _handle(self, event: h2.events.Event) -> None:
        assert self._h2 is not None
        if isinstance(event, h2.events.ConnectionTerminated):
            self._dead = f"{GOAWAY}: error={event.error_code!r} {event.additional_data!r}"
            return
        if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
            # Also for a stream already given up: the connection's window must not shrink.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        stream_id = getattr(event, "stream_id", None)
        stream = self._streams.get(stream_id) if stream_id else None
        if stream is None:
            return
        if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
            stream.headers_seen = True
            headers = {_text(k): _text(v) for k, v in event.headers or []}
            http_status = headers.get(":status")
            if http_status is not None and http_status != "200":
                stream.status = f"HTTP_{http_status}"
            if "grpc-status" in headers:
                code = headers["grpc-status"]
                stream.status = (
                    STATUS_NAMES.get(int(code), f"CODE_{code}")
                    if code.isdigit()
                    else (f"BAD_STATUS_{code[:20]}")
                )
                stream.message = headers.get("grpc-message", "")
        elif isinstance(event, h2.events.DataReceived):
            stream.buffer += event.data or b""
            stream.response_bytes += len(event.data or b"")
            while len(stream.buffer) >= 5:
                size = struct.unpack(">I", stream.buffer[1:5])[0]
                if len(stream.buffer) < 5 + size:
                    break
                del stream.buffer[: 5 + size]
                stream.responses += 1
        elif isinstance(event, h2.events.StreamEnded):
            stream.ended = True
            if stream.status is None:
                stream.status = NO_STATUS
        elif isinstance(event, h2.events.StreamReset):
            stream.ended = True
            if stream.status is None:
                stream.status = RESET
                stream.message = f"error={event.error_code!r}"

    def _send_data(self, stream_id: int, data: bytes, end: bool, deadline: float) -> bool:
        """Send ``data`` within flow control; False when the stream or connection ended first."""
        assert self._h2 is not None
        view = memoryview(data)
        while True:
            stream = self._streams[stream_id]
            if self._dead is not None or stream.ended:
                return False
            try:
                window = min(
                    self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size
                )
            except h2.exceptions.StreamClosedError:
                return False
            if not view and end:
                self._h2.end_stream(stream_id)
                self._flush()
                return True
            if not view:
                return True
            if window <= 0:
                if not self._pump(deadline):
                    return False
                continue
            chunk, view = view[:window], view[window:]
            try:
                self._h2.send_data(stream_id, bytes(chunk), end_stream=end and not view)
                self._flush()
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                return False
            except OSError as exc:
                self._dead = f"{CLOSED}: {exc}"
                return False
            if not view:
                return True

    def call(
        self,
        path: str,
        frames: Sequence[bytes],
        *,
        headers: Sequence[tuple[str, str]] = (),
        end_stream: bool = True,
        answer_within: float = 10.0,
        stream_idle: float | None = None,
        max_responses: int = 2,
    ) -> Outcome:
        """Send ``frames`` (already gRPC-framed, or not) as the request body of ``path``.

        ``stream_idle``: for a server stream, stop waiting after this long once the call is
        accepted (or without any answer) and cancel it: a subscription may rightly stay quiet.
        After ``max_responses`` complete messages the call is cancelled too."""
        try:
            _, conn = self._open()
        except OSError as exc:
            return Outcome(CLOSED, f"connect: {exc}")
        stream_id = conn.get_next_available_stream_id()
        request_headers = [
            (":method", "POST"),
            (":scheme", self.target.scheme),
            (":path", path),
            (":authority", self.target.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *self.target.headers,
            *headers,
        ]
        stream = self._streams[stream_id] = _Stream()
        deadline = time.monotonic() + answer_within
        try:
            conn.send_headers(stream_id, request_headers, end_stream=end_stream and not frames)
            self._flush()
        except OSError as exc:
            self._dead = f"{CLOSED}: {exc}"
            return Outcome(CLOSED, str(exc))
        for index, frame in enumerate(frames):
            last = index == len(frames) - 1
            if not self._send_data(stream_id, frame, end_stream and last, deadline):
                break
        idle_deadline = None if stream_idle is None else time.monotonic() + stream_idle
        try:
            while stream.status is None and self._dead is None:
                if stream_idle is not None and stream.responses >= max_responses:
                    return self._cancel(stream_id, stream)
                limit = deadline if idle_deadline is None else min(deadline, idle_deadline)
                if not self._pump(limit):
                    if idle_deadline is not None and time.monotonic() >= idle_deadline:
                        return self._cancel(stream_id, stream)
                    if time.monotonic() >= deadline:
                        self._cancel(stream_id, stream)
                        return Outcome(UNANSWERED, f"no status within {answer_within}s")
            if stream.status is None:
                return Outcome(
                    self._dead.split(":", 1)[0] if self._dead else CLOSED,
                    self._dead or "",
                    stream.responses,
                    stream.response_bytes,
                )
            return Outcome(stream.status, stream.message, stream.responses, stream.response_bytes)
        finally:
            self._streams.pop(stream_id, None)

    def _cancel(self, stream_id: int, stream: _Stream) -> Outcome:
        assert self._h2 is not None
        try:
            self._h2.reset_stream(stream_id, error_code=h2.errors.ErrorCodes.CANCEL)
            self._flush()
        except (h2.exceptions.ProtocolError, OSError):
            pass
        return Outcome(STREAM_OPEN, "", stream.responses, stream.response_bytes)
