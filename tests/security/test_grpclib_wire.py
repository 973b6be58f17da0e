"""Hostile HTTP/2 on the grpclib Unix sockets (issue 11): the attest socket, the authority's
SPIFFE Workload API socket and a node agent's, each sent raw frames no gRPC library would send.

Every attack must be answered (a status, RST_STREAM or GOAWAY: never a hung call), leave no
traceback in the log, log one line naming this process as the peer, and leave the socket
answering a normal call. The servers run in this process: their memory is this process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import struct
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest

from attestors.api import PeerCredentials
from authority._pb import authority_v1_authority_pb2 as apb
from authority._pb import spiffe_workload_pb2 as wpb
from authority.api.grpclib_server import RefusalLog, UnixSocketServer
from authority.api.workload_api import Caller, SpiffeWorkloadApi, X509View, no_identity
from authority.bundle import TrustBundle
from authority.config import Limits
from authority.ids import SpiffeId
from tests.helpers import AGENT_ID, Running, running_agent, running_authority, wait_held
from tests.helpers import test_config as make_config

CALL_TIMEOUT = 20.0
MIB = 1024 * 1024
HUGE = 64 * MIB
RSS_SLACK = 20 * MIB
UID, PID = os.getuid(), os.getpid()
_ZEROS = bytes(64 * 1024)

# grpc-status codes
OK, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED = 0, 2, 3, 4
PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED = 7, 8, 12


# --- a raw HTTP/2 client ------------------------------------------------------------------------


@dataclass
class Answer:
    """What the server sent on one stream."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None  # RST_STREAM error code

    def header(self, name: str) -> str | None:
        for key, value in (*self.trailers, *self.headers):
            if key == name:
                return value
        return None

    @property
    def status(self) -> int | None:
        value = self.header("grpc-status")
        return int(value) if value is not None else None

    @property
    def reason(self) -> str | None:
        return self.header("authority-reason")

    def messages(self) -> list[bytes]:
        out, data = [], bytes(self.data)
        while len(data) >= 5:
            (length,) = struct.unpack(">I", data[1:5])
            if len(data) < 5 + length:
                break
            out.append(data[5 : 5 + length])
            data = data[5 + length :]
        return out


class RawH2:
    """One HTTP/2 connection to a Unix socket, driven frame by frame: headers and DATA as the
    test writes them (no validation), flow control respected so that only the server decides
    what it buffers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding="utf-8",
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                validate_inbound_headers=False,
            )
        )
        self.answers: dict[int, Answer] = {}
        self.goaway: int | None = None
        self.closed = False
        self._changed = asyncio.Event()
        self.conn.initiate_connection()
        self.flush()
        self._task = asyncio.create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path) -> AsyncIterator[RawH2]:
        reader, writer = await asyncio.open_unix_connection(str(path))
        client = cls(reader, writer)
        try:
            yield client
        finally:
            client._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await client._task
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    async def _read(self) -> None:
        try:
            while data := await self._reader.read(65536):
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self._on(event)
                self.flush()
                self._changed.set()
        except OSError:
            pass
        finally:
            self.closed = True
            self._changed.set()

    def _on(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", None)
        answer = self.answers.get(sid) if sid is not None else None
        if isinstance(event, h2.events.ResponseReceived) and answer is not None:
            answer.headers = _text(event.headers)
        elif isinstance(event, h2.events.TrailersReceived) and answer is not None:
            answer.trailers = _text(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            if answer is not None:
                answer.data += event.data
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and answer is not None:
            answer.ended = True
        elif isinstance(event, h2.events.StreamReset) and answer is not None:
            answer.reset = int(event.error_code or 0)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = int(event.error_code or 0)

    async def until(self, done: Callable[[], bool], timeout: float = CALL_TIMEOUT) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    def request(
        self,
        path: str,
        extra: Sequence[tuple[str, str]] = (),
        *,
        content_type: str = "application/grpc",
        without: Iterable[str] = (),
        end: bool = False,
    ) -> int:
        """Send the HEADERS of a call; returns the stream id."""
        sid = self.conn.get_next_available_stream_id()
        skip = set(without)
        headers = [
            (k, v)
            for k, v in (
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "localhost"),
                ("content-type", content_type),
                ("te", "trailers"),
                *extra,
            )
            if k not in skip
        ]
        self.answers[sid] = Answer()
        self.conn.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    def _finished(self, sid: int) -> bool:
        answer = self.answers[sid]
        return answer.ended or answer.reset is not None or self.closed or self.goaway is not None

    async def send(self, sid: int, data: bytes = b"", *, zeros: int = 0, end: bool = True) -> None:
        """``data`` then ``zeros`` zero bytes, as the windows allow; stops when the server has
        finished with the stream (refused it) or the connection."""
        view, left = memoryview(data), zeros
        while view or left:
            if self._finished(sid):
                return
            try:
                window = min(
                    self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
                )
            except h2.exceptions.ProtocolError:
                return
            if window <= 0:
                await self.until(
                    lambda: self._finished(sid) or self.conn.local_flow_control_window(sid) > 0
                )
                continue
            if view:
                chunk, view = bytes(view[:window]), view[window:]
            else:
                size = min(window, left, len(_ZEROS))
                chunk, left = _ZEROS[:size], left - size
            try:
                self.conn.send_data(sid, chunk, end_stream=end and not view and not left)
            except h2.exceptions.ProtocolError:
                return
            self.flush()
            await self._writer.drain()
        if end and not data and not zeros:
            self.conn.end_stream(sid)
            self.flush()

    async def answer(self, sid: int) -> Answer:
        await self.until(lambda: self._finished(sid))
        return self.answers[sid]

    async def first_message(self, sid: int) -> Answer:
        answer = self.answers[sid]
        await self.until(lambda: bool(answer.messages()) or self._finished(sid))
        return answer

    async def call(
        self,
        path: str,
        body: bytes,
        extra: Sequence[tuple[str, str]] = (),
        **options: object,
    ) -> Answer:
        sid = self.request(path, extra, **options)  # type: ignore[arg-type]
        await self.send(sid, body)
        return await self.answer(sid)


def _text(headers: Iterable[tuple[bytes | str, bytes | str]]) -> list[tuple[str, str]]:
    return [
        (k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v)
        for k, v in headers
    ]


def framed(message: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """A gRPC length-prefixed message; ``length`` announces another size than the body's."""
    size = len(message) if length is None else length
    return struct.pack(">BI", int(compressed), size) + message


# --- the three sockets --------------------------------------------------------------------------

WL = ("workload.spiffe.io", "true")


@dataclass(frozen=True)
class Target:
    """One socket: the method the attacks use, and a normal call that must still work."""

    name: str
    socket: Path
    method: str
    extra: tuple[tuple[str, str], ...]
    normal_method: str
    normal_body: bytes
    normal_streams: bool  # the normal call is a stream: its first message is the answer

    async def normal_call(self) -> None:
        async with RawH2.open(self.socket) as client:
            sid = client.request(self.normal_method, self.extra)
            await client.send(sid, framed(self.normal_body))
            if self.normal_streams:
                answer = await client.first_message(sid)
            else:
                answer = await client.answer(sid)
                assert answer.status == OK, (self.name, answer)
            assert answer.messages(), (self.name, answer)


def workload_api_target(name: str, socket: Path) -> Target:
    """A Workload API socket: the attacks on FetchX509SVID, FetchJWTBundles as the normal call."""
    return Target(
        name,
        socket,
        "/SpiffeWorkloadAPI/FetchX509SVID",
        (WL,),
        "/SpiffeWorkloadAPI/FetchJWTBundles",
        wpb.JWTBundlesRequest().SerializeToString(),
        True,
    )


@dataclass
class Sockets:
    running: Running
    targets: list[Target]


@pytest.fixture
async def sockets(
    tmp_path: Path, socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Sockets]:
    caplog.set_level(logging.INFO)
    config = dataclasses.replace(
        make_config(tmp_path / "data", socket_dir), workload_api_socket=socket_dir / "wl.sock"
    )
    async with running_authority(config) as running:
        admin = running.admin().stub
        selectors = [apb.Selector(type="unix", value=f"uid:{UID}")]
        await admin.CreateEntry(
            apb.CreateEntryRequest(spiffe_id="spiffe://example.org/wire", selectors=selectors)
        )
        agent_socket = socket_dir / "agent.sock"
        async with running_agent(running, agent_socket, tmp_path / "agent") as agent:
            entry = await admin.CreateEntry(
                apb.CreateEntryRequest(
                    spiffe_id="spiffe://example.org/wire-agent",
                    selectors=selectors,
                    parent_id=AGENT_ID,
                )
            )
            await wait_held(agent, entry.id)
            targets = [
                Target(
                    "attest",
                    running.data_dir / "attest.sock",
                    "/authority.v1.Workload/Attest",
                    (),
                    "/authority.v1.Workload/GetBundle",
                    apb.GetBundleRequest().SerializeToString(),
                    False,
                ),
                workload_api_target("workload_api", socket_dir / "wl.sock"),
                workload_api_target("agent", agent_socket),
            ]
            for target in targets:
                await target.normal_call()
            yield Sockets(running, targets)


def assert_clean_log(caplog: pytest.LogCaptureFixture, *reasons: str) -> None:
    """No traceback anywhere in the log; for each reason, a refusal line naming this process."""
    for record in caplog.records:
        assert record.exc_info is None, f"traceback logged: {record.name}: {record.getMessage()}"
        assert "Traceback" not in record.getMessage(), record.getMessage()
    lines = [r.getMessage() for r in caplog.records if r.name == "authority.api.grpclib_server"]
    for reason in reasons:
        assert any(reason in line and f"uid={UID} pid={PID}" in line for line in lines), (
            reason,
            lines,
        )


def memory(field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (the peak since ``reset_peak``) of this process, in
    bytes. The peak matters: a message read whole and freed at once leaves VmRSS as it was."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)


# --- the attacks ---------------------------------------------------------------------------------


async def test_a_64_mb_message_is_refused_before_it_is_read(
    sockets: Sockets, caplog: pytest.LogCaptureFixture
) -> None:
    """Four connections at once per socket each announce 64 MB and start sending it: each is
    refused RESOURCE_EXHAUSTED on the length prefix, and the server's peak memory does not grow
    by the messages (grpclib alone read each whole message into memory: +300 MB)."""
    assert Limits().max_message_bytes < HUGE
    for target in sockets.targets:
        reset_peak()
        before = memory("VmRSS")
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(RawH2.open(target.socket)) for _ in range(4)]
            sids = [c.request(target.method, target.extra) for c in clients]
            await asyncio.gather(
                *(
                    c.send(sid, framed(b"", length=HUGE), zeros=HUGE)
                    for c, sid in zip(clients, sids, strict=True)
                )
            )
            answers = [await c.answer(sid) for c, sid in zip(clients, sids, strict=True)]
        grown = memory("VmHWM") - before
        for answer in answers:
            assert answer.status == RESOURCE_EXHAUSTED, (target.name, answer)
            assert answer.reason == "MESSAGE_TOO_LARGE", (target.name, answer)
        assert grown < RSS_SLACK, f"{target.name}: the server grew by {grown / MIB:.1f} MiB"
        await target.normal_call()
    assert_clean_log(caplog, "MESSAGE_TOO_LARGE")


@dataclass(frozen=True)
class Case:
    """A malformed request: the HEADERS' extra fields, the DATA sent, what must come back."""

    extra: tuple[tuple[str, str], ...] = ()
    body: bytes | None = b""  # None: HEADERS only, the stream left open
    status: int | None = INVALID_ARGUMENT
    reason: str | None = None
    logged: bool = True


CASES = {
    "undecodable body": Case(body=framed(b"\xff\xff\xff\xff\xff"), reason="MALFORMED_MESSAGE"),
    "compressed flag": Case(body=framed(b"\x0a\x00", compressed=True), reason="COMPRESSED_MESSAGE"),
    "body cut short": Case(body=framed(b"\x0a\x05ab", length=100), reason="TRUNCATED_MESSAGE"),
    "prefix alone": Case(body=framed(b"", length=100), reason="TRUNCATED_MESSAGE"),
    "half a prefix": Case(body=b"\x00\x00\x00", reason="TRUNCATED_MESSAGE"),
    "grpc-timeout 0n": Case(extra=(("grpc-timeout", "0n"),), reason="BAD_TIMEOUT"),
    "grpc-timeout 0S": Case(extra=(("grpc-timeout", "0S"),), reason="BAD_TIMEOUT"),
    "grpc-timeout of 9 digits": Case(extra=(("grpc-timeout", "123456789S"),), reason="BAD_TIMEOUT"),
    "grpc-timeout 1.5S": Case(extra=(("grpc-timeout", "1.5S"),), reason="BAD_TIMEOUT"),
    "grpc-timeout -1S": Case(extra=(("grpc-timeout", "-1S"),), reason="BAD_TIMEOUT"),
    "grpc-timeout without unit": Case(extra=(("grpc-timeout", "10"),), reason="BAD_TIMEOUT"),
    "two grpc-timeouts": Case(
        extra=(("grpc-timeout", "5S"), ("grpc-timeout", "6S")), reason="BAD_TIMEOUT"
    ),
    "a deadline already passed": Case(
        extra=(("grpc-timeout", "1n"),), body=None, status=DEADLINE_EXCEEDED, logged=False
    ),
    "a short deadline": Case(
        extra=(("grpc-timeout", "20m"),), body=None, status=DEADLINE_EXCEEDED, logged=False
    ),
    "bad base64 in a -bin header": Case(
        extra=(("x-evil-bin", "!!not base64!!"),), reason="BAD_BINARY_HEADER"
    ),
    "a header that is not ASCII": Case(extra=(("x-name", "caf\u00e9"),), reason="BAD_HEADER"),
    "a header name that is not ASCII": Case(extra=(("x-\u00e9", "1"),), reason="BAD_HEADER"),
    "a line feed in a header": Case(extra=(("x-name", "a\nb"),), reason="BAD_HEADER"),
    "bad base64 padding in a -bin header": Case(
        extra=(("x-evil-bin", "a"),), reason="BAD_BINARY_HEADER"
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_malformed_requests_are_answered_without_a_traceback(
    sockets: Sockets, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    case = CASES[name]
    for target in sockets.targets:
        async with RawH2.open(target.socket) as client:
            sid = client.request(target.method, (*target.extra, *case.extra))
            if case.body is not None:
                await client.send(sid, case.body)
            answer = await client.answer(sid)
        assert answer.status == case.status, (target.name, answer)
        assert answer.reason == case.reason, (target.name, answer)
        # The decoder's words never reach the caller.
        message = answer.header("grpc-message") or ""
        assert "DecodeError" not in message, message
        assert "parsing" not in message.lower(), message
        await target.normal_call()
    assert_clean_log(caplog, *([case.reason] if case.logged and case.reason else []))


async def test_an_unknown_method_is_unimplemented(
    sockets: Sockets, caplog: pytest.LogCaptureFixture
) -> None:
    for target in sockets.targets:
        async with RawH2.open(target.socket) as client:
            answer = await client.call("/no.Such/Method", framed(b""), target.extra)
        assert answer.status == UNIMPLEMENTED, (target.name, answer)
        await target.normal_call()
    assert_clean_log(caplog)


async def test_a_wrong_content_type_is_refused_415(
    sockets: Sockets, caplog: pytest.LogCaptureFixture
) -> None:
    for target in sockets.targets:
        async with RawH2.open(target.socket) as client:
            answer = await client.call(
                target.method, framed(b""), target.extra, content_type="text/plain"
            )
        assert answer.header(":status") == "415", (target.name, answer)
        assert answer.status == INVALID_ARGUMENT, (target.name, answer)  # grpclib said UNKNOWN
        async with RawH2.open(target.socket) as client:  # a second one, after a right one
            answer = await client.call(
                target.method, framed(b""), [*target.extra, ("content-type", "application/json")]
            )
        assert answer.status == INVALID_ARGUMENT, (target.name, answer)
        await target.normal_call()
    assert_clean_log(caplog, "BAD_CONTENT_TYPE")


async def test_a_request_without_te_trailers_is_invalid_argument(
    sockets: Sockets, caplog: pytest.LogCaptureFixture
) -> None:
    """``te: gzip`` (or none) instead of ``te: trailers``: grpclib answered UNKNOWN."""
    for target in sockets.targets:
        for case in ("none", "gzip as well"):
            async with RawH2.open(target.socket) as client:
                if case == "none":
                    answer = await client.call(
                        target.method, framed(b""), target.extra, without=["te"]
                    )
                else:
                    extra = [*target.extra, ("te", "gzip")]
                    answer = await client.call(target.method, framed(b""), extra)
            assert answer.status == INVALID_ARGUMENT, (target.name, case, answer)
        await target.normal_call()
    assert_clean_log(caplog, "BAD_HEADER")


async def test_a_request_without_a_path_is_reset(
    sockets: Sockets, caplog: pytest.LogCaptureFixture
) -> None:
    """grpclib alone raised KeyError outside any handler and never answered."""
    for target in sockets.targets:
        async with RawH2.open(target.socket) as client:
            answer = await client.call(target.method, framed(b""), target.extra, without=[":path"])
        assert answer.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR, (target.name, answer)
        await target.normal_call()
    assert_clean_log(caplog, "MISSING_PSEUDO_HEADER")


async def test_an_oversized_header_list_closes_the_connection(
    sockets: Sockets, caplog: pytest.LogCaptureFixture
) -> None:
    limit = Limits().max_header_list_bytes
    for target in sockets.targets:
        async with RawH2.open(target.socket) as client:
            # Once the server's SETTINGS are in (its bound announced), go past it.
            await client.until(lambda: client.conn.remote_settings.max_header_list_size == limit)
            client.request(target.method, (*target.extra, ("x-big", "a" * (2 * limit))))
            await client.until(lambda: client.goaway is not None)
        assert client.goaway == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, target.name
        await target.normal_call()
    assert_clean_log(caplog, "HTTP/2 DenialOfServiceError")


async def test_frames_of_unknown_types_are_ignored(
    sockets: Sockets, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 9113 says ignore them; grpclib alone raised NotImplementedError on their events
    (a traceback, and the connection dropped)."""
    for target in sockets.targets:
        async with RawH2.open(target.socket) as client:
            # type 0xfa, no flags, stream 0, 4 bytes of payload
            client._writer.write(struct.pack(">I", 4)[1:] + b"\xfa\x00" + b"\x00" * 4 + b"ping")
            sid = client.request(target.normal_method, target.extra)
            await client.send(sid, framed(target.normal_body))
            answer = await client.first_message(sid)
        assert answer.messages(), (target.name, answer)
        assert client.goaway is None
    assert_clean_log(caplog)


def test_status_codes_are_grpcs() -> None:
    """The numbers this module compares with are gRPC's (a typo would make tests vacuous)."""
    import grpclib.const

    assert grpclib.const.Status.INVALID_ARGUMENT.value == INVALID_ARGUMENT
    assert grpclib.const.Status.RESOURCE_EXHAUSTED.value == RESOURCE_EXHAUSTED
    assert grpclib.const.Status.DEADLINE_EXCEEDED.value == DEADLINE_EXCEEDED
    assert grpclib.const.Status.UNIMPLEMENTED.value == UNIMPLEMENTED
    assert grpclib.const.Status.OK.value == OK
    assert grpclib.const.Status.PERMISSION_DENIED.value == PERMISSION_DENIED


class _GatedSource:
    """A Workload API source whose caller identification waits at a gate, counting the streams
    inside it at once; then refuses (no identity) so that every stream is answered."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.inside = 0
        self.most = 0

    async def identify(self, peer: PeerCredentials) -> Caller:
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            await self.gate.wait()
        finally:
            self.inside -= 1
        raise no_identity()

    def open_x509(self, caller: Caller) -> X509View:
        raise NotImplementedError

    def bundle_for(self, caller: Caller) -> TrustBundle:
        raise NotImplementedError

    async def jwt_svids(
        self, caller: Caller, spiffe_id: SpiffeId | None, audience: list[str]
    ) -> list[tuple[str, str]]:
        raise NotImplementedError

    def validate_jwt(self, token: str, audience: str) -> tuple[SpiffeId, dict[str, Any]]:
        raise NotImplementedError

    def watch(self) -> contextlib.AbstractContextManager[asyncio.Event]:
        raise NotImplementedError


async def test_a_storm_of_new_streams_is_identified_a_few_at_a_time(socket_dir: Path) -> None:
    """2,000 streams opened at once used to keep 2,000 tasks busy on the event loop (a 4-8 s
    stall of every other endpoint, scripts/bench_wire.py): they now queue for a few slots."""
    source = _GatedSource()
    server = UnixSocketServer([SpiffeWorkloadApi(source, busy_streams=4)])
    path = socket_dir / "gated.sock"
    await server.start(path=str(path))
    try:
        async with RawH2.open(path) as client:
            body = framed(wpb.X509SVIDRequest().SerializeToString())
            sids = [client.request("/SpiffeWorkloadAPI/FetchX509SVID", (WL,)) for _ in range(40)]
            for sid in sids:
                await client.send(sid, body)
            await client.until(lambda: source.inside >= 4)
            for _ in range(200):  # every request is in: an unbounded server lets them all in
                await asyncio.sleep(0)
            assert (source.inside, source.most) == (4, 4)
            source.gate.set()
            answers = [await client.answer(sid) for sid in sids]
        assert {(a.status, a.reason) for a in answers} == {
            (PERMISSION_DENIED, "NO_IDENTITY_ISSUED")
        }
        assert source.most == 4
    finally:
        server.close()
        await server.wait_closed()


async def test_more_streams_than_a_connection_may_open_close_it(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server announces its bound on concurrent streams; a client that opens one more
    (its h2 told it otherwise) loses the connection: GOAWAY, and one line naming it."""
    server = UnixSocketServer(
        [SpiffeWorkloadApi(_GatedSource(), busy_streams=2)], Limits(max_concurrent_streams=10)
    )
    path = socket_dir / "bounded.sock"
    await server.start(path=str(path))
    try:
        async with RawH2.open(path) as client:
            settings = client.conn.remote_settings
            await client.until(lambda: settings.max_concurrent_streams == 10)
            settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1000  # a liar's client
            settings.acknowledge()
            for _ in range(11):
                client.request("/SpiffeWorkloadAPI/FetchX509SVID", (WL,))
            await client.until(lambda: client.goaway is not None)
        assert client.goaway == h2.errors.ErrorCodes.PROTOCOL_ERROR
        assert_clean_log(caplog, "HTTP/2 TooManyStreamsError")
    finally:
        server.close()
        await server.wait_closed()


def test_refusals_are_logged_at_most_burst_lines_a_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flood of malformed requests writes ``burst`` lines, then one count of the rest."""
    now = [0.0]
    refusals = RefusalLog(burst=2, window=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="authority.api.grpclib_server"):
        for _ in range(50):
            refusals.refused("MALFORMED_MESSAGE", None, "/x/Y")
        assert len(caplog.records) == 2
        now[0] = 61.0
        refusals.refused("MALFORMED_MESSAGE", None, "/x/Y")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines
    assert "48 more malformed requests refused" in lines[2]
    assert "MALFORMED_MESSAGE peer=unknown method='/x/Y'" in lines[3]
