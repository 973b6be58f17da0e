"""The fuzz harness can see what it looks for: a bare grpc.aio server whose handler fails, and
one that never answers, are failures to it; the strategies cover every field of every request
type of every endpoint. (Without these the fuzz suite could pass by seeing nothing.)"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings

from tests.fuzz.harness import ENDPOINT_SERVICES, all_rpcs, classify, is_bad, tracebacks_in
from tests.fuzz.strategies import message_strategy
from tests.fuzz.wire import (
    OVERSIZED_HEADERS,
    UNANSWERED,
    Connection,
    grpc_frame,
    unix_target,
)
from tests.helpers import short_socket_dir


async def _fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    raise RuntimeError("boom")


async def _echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


@contextlib.contextmanager
def bare_server() -> Iterator[Path]:
    """A grpc.aio server on a Unix socket, in a thread of its own: /t.T/Fail raises, /t.T/Echo
    echoes."""
    folder = short_socket_dir()
    path = folder / "t.sock"
    ready, stop = threading.Event(), threading.Event()

    async def serve() -> None:
        server = grpc.aio.server()
        handlers = {
            "Fail": grpc.unary_unary_rpc_method_handler(_fail),
            "Echo": grpc.unary_unary_rpc_method_handler(_echo),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
        server.add_insecure_port(f"unix:{path}")
        await server.start()
        ready.set()
        while not stop.is_set():  # noqa: ASYNC110 - the stop signal comes from another thread
            await asyncio.sleep(0.05)
        await server.stop(None)

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(30)
    try:
        yield path
    finally:
        stop.set()
        thread.join(30)
        path.unlink(missing_ok=True)
        folder.rmdir()


def test_a_failing_handler_and_a_silent_server_are_failures() -> None:
    with bare_server() as path, Connection(unix_target("bare", path)) as conn:
        echoed = conn.call("/t.T/Echo", [grpc_frame(b"\x0a\x01x")])
        failed = conn.call("/t.T/Fail", [grpc_frame(b"")])
        silent = conn.call("/t.T/Echo", [], answer_within=1.0)  # no message: grpcio never answers
    assert (echoed.status, echoed.responses) == ("OK", 1)
    assert failed.status == "UNKNOWN"
    assert is_bad(classify("admin", failed))
    assert silent.status == UNANSWERED
    assert is_bad(silent.status)


def test_grpc_core_protocol_errors_are_accepted_only_on_grpcio_endpoints() -> None:
    from tests.fuzz.wire import Outcome

    core = Outcome("INTERNAL", "Error parsing 'grpc-timeout' metadata")
    assert not is_bad(classify("tls", core))
    assert is_bad(classify("attest", core))
    assert is_bad(classify("tls", Outcome("INTERNAL", "internal error")))
    assert is_bad(OVERSIZED_HEADERS)
    assert not is_bad("RESET")
    assert not is_bad("GOAWAY")


def test_tracebacks_are_found_in_a_log() -> None:
    log = (
        "2026-12-07 10:00:00,000 INFO x: fine\n"
        "2026-12-07 10:00:01,000 ERROR y: unhandled\n"
        "Traceback (most recent call last):\n"
        '  File "a.py", line 1, in f\n'
        "    g()\n"
        "ValueError: bad\n"
        "2026-12-07 10:00:02,000 INFO x: fine\n"
    )
    (found,) = tracebacks_in(log)
    assert found.splitlines()[0].endswith("ERROR y: unhandled")
    assert found.splitlines()[-1] == "ValueError: bad"
    assert tracebacks_in("INFO all quiet\n") == []


def test_every_endpoint_has_its_rpcs() -> None:
    names = {rpc.name for rpc in all_rpcs()}
    for endpoint, services in ENDPOINT_SERVICES.items():
        for service in services:
            for method in service.methods:
                assert f"{endpoint}:{service.name}.{method.name}" in names
    assert "attest:Workload.Attest" in names
    assert "workload-api:SpiffeWorkloadAPI.FetchX509SVID" in names


def test_strategies_set_every_field_of_every_request_type() -> None:
    """Over 50 draws each, every field of every request type of every endpoint gets a value,
    and every drawn message encodes."""
    types = {rpc.method.input_type.full_name: rpc.method.input_type for rpc in all_rpcs()}
    missing = {}
    seen: set[str] = set()
    for name, descriptor in types.items():
        seen.clear()

        @settings(
            max_examples=50,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(message_strategy(descriptor))
        def draw(message: Message) -> None:
            message.SerializeToString()
            seen.update(fd.name for fd, _ in message.ListFields())

        draw()
        if unset := {fd.name for fd in descriptor.fields} - seen:
            missing[name] = sorted(unset)
    assert missing == {}
