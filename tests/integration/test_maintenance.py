"""The authority's scheduled jobs fail alone (issue 11, finding 4).

The policy reload ran first in one try block with CA rotation and the server certificate's
renewal: with the policy file deleted, neither happened again. Each job now runs on its own under
the supervisor, logged once per change of state and named in the admin socket's health service.

The server runs on a fake clock the test moves; its jobs' waits are shortened to a few
milliseconds (``sleep``), so hours of schedule pass in a moment without timed assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority.clock import FakeClock
from authority.server import (
    CA_JOB,
    POLICY_JOB,
    SERVER_CERT_JOB,
)
from tests.helpers import Running, running_authority
from tests.helpers import test_config as make_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TIMEOUT = 30.0


async def quick(seconds: float) -> None:
    """The jobs' waits, shortened: the fake clock says what time it is."""
    await asyncio.sleep(min(seconds, 0.01))


@contextlib.asynccontextmanager
async def running_on(
    clock: FakeClock, config_path: Path, socket_dir: Path
) -> AsyncIterator[Running]:
    policy = config_path / "deny.cedar"
    policy.write_text("forbid (principal, action, resource);\n")
    config = dataclasses.replace(
        make_config(config_path / "data", socket_dir), policy_files=(str(policy),)
    )
    async with running_authority(config, clock, sleep=quick) as running:
        yield running


async def health(running: Running, service: str) -> int:
    async with grpc.aio.insecure_channel(f"unix:{running.admin_socket}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        return int(reply.status)


async def eventually(check: Callable[[], object], what: str) -> None:
    """Until ``check()`` (sync or async) is true; the jobs run every few milliseconds."""
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                result = check()
                if asyncio.iscoroutine(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not seen in {TIMEOUT:.0f}s: {what}") from None


def served_certificate(running: Running) -> x509.Certificate:
    """The certificate the TLS port presents to a new handshake (not verified: only read)."""
    pem = ssl.get_server_certificate(("127.0.0.1", running.port))
    return x509.load_pem_x509_certificate(pem.encode())


async def authorities(running: Running) -> dict[str, str]:
    listed = await running.admin().stub.ListAuthorities(pb.ListAuthoritiesRequest())
    return {a.key_id: a.state for a in listed.authorities if a.kind == "x509"}


def failing_lines(caplog: pytest.LogCaptureFixture, job: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"task {job} ")]


async def test_with_the_policy_file_gone_the_ca_rotates_and_the_server_certificate_renews(
    tmp_path: Path, socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock(dt.datetime.now(dt.UTC))
    async with running_on(clock, tmp_path, socket_dir) as running:
        first_cert = await asyncio.to_thread(served_certificate, running)
        before = await authorities(running)
        (active,) = [k for k, state in before.items() if state == "active"]

        (tmp_path / "deny.cedar").unlink()  # the attack: the policy file is gone
        await eventually(lambda: _is(running, POLICY_JOB, NOT_SERVING), "the policy job failing")

        # The server's SVID (1 h) is due at half its life: renewed though the policy fails.
        clock.advance(dt.timedelta(minutes=31))

        async def renewed() -> bool:
            cert = await asyncio.to_thread(served_certificate, running)
            return cert.serial_number != first_cert.serial_number

        await eventually(renewed, "the server certificate was renewed")

        # The CA (24 h) prepares its next key at half its life and activates it at 5/6.
        clock.advance(dt.timedelta(hours=12))

        async def prepared() -> bool:
            return "prepared" in (await authorities(running)).values()

        await eventually(prepared, "the CA prepared its next key")
        clock.advance(dt.timedelta(hours=8, minutes=30))

        async def rotated() -> bool:
            now = await authorities(running)
            return now.get(active) == "old" and "active" in now.values()

        await eventually(rotated, "the CA activated its next key")

        # The policy job still fails, alone: logged once, health names it, the server serves.
        assert await health(running, POLICY_JOB) == NOT_SERVING
        assert await health(running, CA_JOB) == SERVING
        assert await health(running, SERVER_CERT_JOB) == SERVING
        assert await health(running, "") == SERVING
        assert len(failing_lines(caplog, POLICY_JOB)) == 1
        assert running.server.supervisor.restarts(POLICY_JOB) > 1

        # Put back, the policy job recovers: one line, health SERVING again.
        (tmp_path / "deny.cedar").write_text("forbid (principal, action, resource);\n")
        await eventually(lambda: _is(running, POLICY_JOB, SERVING), "the policy job recovered")
        lines = failing_lines(caplog, POLICY_JOB)
        assert len(lines) == 2
        assert "recovered after" in lines[1]


async def test_a_failing_ca_job_makes_the_server_not_serving_while_the_others_go_on(
    tmp_path: Path, socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock(dt.datetime.now(dt.UTC))
    async with running_on(clock, tmp_path, socket_dir) as running:
        keys = running.data_dir / "keys"
        keys.rename(running.data_dir / "keys.away")
        keys.write_text("not a folder")  # the CA cannot save its next key
        first_cert = await asyncio.to_thread(served_certificate, running)

        clock.advance(dt.timedelta(hours=12, minutes=1))  # the CA's next key is due
        await eventually(lambda: _is(running, CA_JOB, NOT_SERVING), "the CA job failing")
        assert await health(running, "") == NOT_SERVING
        assert await health(running, POLICY_JOB) == SERVING

        async def renewed() -> bool:
            cert = await asyncio.to_thread(served_certificate, running)
            return cert.serial_number != first_cert.serial_number

        await eventually(renewed, "the server certificate was renewed all the same")

        keys.unlink()
        (running.data_dir / "keys.away").rename(keys)
        await eventually(lambda: _is(running, "", SERVING), "the server serving again")

        async def prepared() -> bool:
            return "prepared" in (await authorities(running)).values()

        await eventually(prepared, "the CA prepared its next key")
        assert len(failing_lines(caplog, CA_JOB)) == 2  # failing, recovered


async def test_a_refused_policy_change_is_logged_and_recorded_once_and_the_old_one_runs(
    tmp_path: Path, socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock(dt.datetime.now(dt.UTC))
    async with running_on(clock, tmp_path, socket_dir) as running:
        policy = running.server.policy
        before = policy.state().version
        (tmp_path / "deny.cedar").write_text("this is not cedar\n")
        await eventually(lambda: _is(running, POLICY_JOB, NOT_SERVING), "the policy job failing")
        restarts = running.server.supervisor.restarts(POLICY_JOB)
        await eventually(  # it keeps trying, quietly
            lambda: running.server.supervisor.restarts(POLICY_JOB) >= restarts + 3,
            "more attempts",
        )
        assert policy.state().version == before  # the old policy runs
        assert await refusals(running) == 1  # recorded once for this version of the files
        assert len(failing_lines(caplog, POLICY_JOB)) == 1
        assert await health(running, "") == SERVING

        (tmp_path / "deny.cedar").write_text("forbid (principal, action, resource);\n// fixed\n")
        await eventually(lambda: _is(running, POLICY_JOB, SERVING), "the policy job recovered")
        assert policy.state().version != before


async def refusals(running: Running) -> int:
    authority = running.server.authority
    assert authority is not None
    records = await authority.audit_records()
    return sum(r.kind == "policy.load_refused" for r in records)


async def _is(running: Running, service: str, status: int) -> bool:
    return await health(running, service) == status
