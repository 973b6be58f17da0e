"""Prometheus metrics end to end: ``authority serve`` and ``authority agent`` as processes of their
own with ``--metrics-listen``, scraped over HTTP and parsed with prometheus_client's parser;
``authority healthcheck`` and ``authority metrics`` as an operator runs them."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from authority._pb import authority_v1_authority_pb2 as pb
from authority.client import AdminClient, WorkloadClient, new_key
from tests.helpers import (
    ServeProcess,
    authority_command,
    free_port,
    serve_process,
    short_socket_dir,
    wait_until,
)
from tests.integration.test_exchange import POLICIES, Agent
from tests.unit.test_grafana_dashboard import queried_metrics

TD = "example.org"
REPORTER = f"spiffe://{TD}/agent/reporter"
AGENT_ID = f"spiffe://{TD}/agent/node1"
UID = os.getuid()

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Series:
    """Every sample of a real GET of ``url``, parsed as Prometheus text."""
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a test URL
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(series: Series, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def rpc(
    series: Series, method: str, code: str = "OK", service: str = "authority.v1.Workload"
) -> float:
    return value(
        series, "authority_grpc_server_handled_total", service=service, method=method, code=code
    )


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[tuple[ServeProcess, str]]:
    port = free_port()
    with serve_process(tmp_path / "data", "--metrics-listen", f"127.0.0.1:{port}") as served:
        yield served, f"http://127.0.0.1:{port}/metrics"


async def _workload(served: ServeProcess, admin: AdminClient) -> WorkloadClient:
    from authority.client import der_chain_to_pem

    bundle = await admin.stub.GetBundle(pb.GetBundleRequest())
    return WorkloadClient(served.address, der_chain_to_pem(list(bundle.x509_authorities)))


async def test_counters_move_by_what_was_done(
    metered: tuple[ServeProcess, str], tmp_path: Path
) -> None:
    """Attest, three Exchanges (allow, deny, require-approval) and a Revoke: each counter moves
    by exactly what was done, the latency histograms by as many observations."""
    served, url = metered
    admin = AdminClient(served.admin_socket)
    workload = await _workload(served, admin)
    try:
        files = [
            pb.PolicyFile(name=name, content=(POLICIES / name).read_text())
            for name in ("agents.cedar", "agents.tests.json")
        ]
        await admin.stub.LoadPolicy(pb.LoadPolicyRequest(files=files))
        token = await admin.stub.CreateJoinToken(
            pb.CreateJoinTokenRequest(spiffe_id=REPORTER, ttl_seconds=600)
        )
        before = scrape(url)

        folder = tmp_path / "reporter"
        await workload.attest_to_folder("join_token", token.token.encode(), folder)
        holder = WorkloadClient.from_svid_dir(served.address, folder)
        agent = Agent(REPORTER, folder, holder)
        allowed = await agent.exchange("read", "metrics/weekly", "metrics-api")
        assert allowed.WhichOneof("result") == "token"
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await agent.exchange("write", "metrics/weekly", "metrics-api")
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        pending = await agent.exchange("deploy", "deploy/production", "deployer")
        assert pending.WhichOneof("result") == "pending"
        jti = allowed.token.jti
        await admin.stub.Revoke(pb.RevokeRequest(kind="jti", target=jti, reason="test"))
        # The store's figures are refreshed at most once a second: until the approval shows.
        scraped: list[Series] = []

        def approval_shown() -> bool:
            scraped.append(scrape(url))
            return value(scraped[-1], "authority_approvals_pending") == 1

        wait_until(approval_shown, "the pending approval in the metrics")
        after = scraped[-1]
        await holder.close()
    finally:
        await workload.close()
        await admin.close()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert rpc(after, "Attest") - rpc(before, "Attest") == 1
    assert rpc(after, "Exchange") - rpc(before, "Exchange") == 2  # allowed, pending
    assert (
        rpc(after, "Exchange", "PERMISSION_DENIED") - rpc(before, "Exchange", "PERMISSION_DENIED")
        == 1
    )
    revokes = rpc(after, "Revoke", service="authority.v1.Admin")
    assert revokes - rpc(before, "Revoke", service="authority.v1.Admin") == 1
    exchange_timed = moved(
        "authority_grpc_server_handling_seconds_count",
        service="authority.v1.Workload",
        method="Exchange",
    )
    assert exchange_timed == 3
    assert moved("authority_credentials_issued_total", kind="x509_svid") == 1
    assert moved("authority_credentials_issued_total", kind="task_token") == 1
    assert moved("authority_credentials_issued_total", kind="jwt_svid") == 0
    assert moved("authority_policy_decisions_total", effect="allow") == 1
    assert moved("authority_policy_decisions_total", effect="deny") == 1
    assert moved("authority_policy_decisions_total", effect="require_approval") == 1
    assert moved("authority_policy_decision_seconds_count") == 3
    assert value(after, "authority_approvals_pending") == 1
    assert value(after, "authority_approvals_oldest_pending_age_seconds") >= 0
    assert moved("authority_revocations_total", kind="jti") == 1
    assert moved("authority_store_commit_seconds_count", backend="sqlite") >= 4
    for kind in ("x509_ca", "jwt", "task"):
        assert (
            value(after, "authority_signing_key_expiry_seconds", key_kind=kind, slot="active") > 0
        )


async def test_series_stay_constant_while_1000_workloads_attest(
    metered: tuple[ServeProcess, str],
) -> None:
    """No SPIFFE ID, entry or token becomes a label: 1,000 distinct workloads attesting add
    samples to the counters, not series."""
    served, url = metered
    admin = AdminClient(served.admin_socket)
    workload = await _workload(served, admin)
    key = new_key()
    try:

        async def attest(n: int) -> None:
            created = await admin.stub.CreateJoinToken(
                pb.CreateJoinTokenRequest(spiffe_id=f"spiffe://{TD}/w/{n}", ttl_seconds=600)
            )
            await workload.attest("join_token", created.token.encode(), key)

        await attest(0)  # every series these calls touch exists from here on
        warm = scrape(url)
        for n in range(1, 1001):
            await attest(n)
        after = scrape(url)
    finally:
        await workload.close()
        await admin.close()
    # The same series, but for a status code a call may end with for the first time: the
    # client cancels Attest once it has its result, which the server sees as CANCELLED when
    # the cancel overtakes the handler's return (codes are grpc's fixed set).
    assert _shape(after) == _shape(warm)
    codes = {dict(labels).get("code") for _, labels in after} - {None}
    assert codes <= {code.name for code in grpc.StatusCode}
    assert len(after) - len(warm) <= len(codes)
    assert not [labels for _, labels in after if any("/w/" in v for _, v in labels)]
    attests = sum(
        rpc(after, "Attest", code) - rpc(warm, "Attest", code) for code in ("OK", "CANCELLED")
    )
    assert attests == 1000
    issued = ("authority_credentials_issued_total", frozenset({("kind", "x509_svid")}))
    assert after[issued] - warm[issued] == 1000


def _shape(series: Series) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    """The series, with the status code left out of the calls' labels."""
    return {(name, frozenset(kv for kv in labels if kv[0] != "code")) for name, labels in series}


def _start_agent(
    served: ServeProcess, bundle: Path, data: Path, socket: Path, log_path: Path, port: int
) -> subprocess.Popen[bytes]:
    token = served.cli("token", "create", "--spiffe-id", AGENT_ID).stdout.strip()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                *authority_command(),
                "agent",
                "--server",
                served.address,
                "--trust-bundle",
                str(bundle),
                "--data-dir",
                str(data),
                "--workload-api-socket",
                str(socket),
                "--join-token",
                "-",
                "--metrics-listen",
                f"127.0.0.1:{port}",
            ],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    assert proc.stdin is not None
    proc.stdin.write(f"{token}\n".encode())
    proc.stdin.close()
    return proc


@contextlib.contextmanager
def _x509_stream(socket: Path) -> Iterator[None]:
    """A workload's FetchX509SVID stream held open on the agent's socket (its first reply read)."""
    from authority._pb import spiffe_workload_pb2 as wl
    from authority._pb import spiffe_workload_pb2_grpc as wl_grpc

    with grpc.insecure_channel(f"unix:{socket}") as channel:
        call = wl_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            wl.X509SVIDRequest(), metadata=(("workload.spiffe.io", "true"),), timeout=30
        )
        assert next(iter(call)).svids
        try:
            yield
        finally:
            call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*authority_command(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_agent_metrics_healthcheck_and_the_metrics_command(tmp_path: Path) -> None:
    """The node agent's /metrics shows its SVID's expiry and what it holds; the authority's
    shows the agent's revocation subscription and, after a revoke, its delivery lag; every
    metric the Grafana dashboard queries is in one or the other;
    ``authority healthcheck`` is 0 against both while they serve and 1 once they are gone;
    ``authority metrics`` prints a few lines per family."""
    socket_dir = short_socket_dir()
    socket = socket_dir / "agent.sock"
    server_port, agent_port = free_port(), free_port()
    server_url = f"http://127.0.0.1:{server_port}/metrics"
    agent_url = f"http://127.0.0.1:{agent_port}/metrics"
    log_path = tmp_path / "agent.log"
    try:
        with serve_process(
            tmp_path / "data", "--metrics-listen", f"127.0.0.1:{server_port}"
        ) as served:
            bundle = tmp_path / "bundle.pem"
            bundle.write_text(served.cli("bundle", "show").stdout)
            served.cli(
                "entry",
                "create",
                "--spiffe-id",
                f"spiffe://{TD}/via-agent",
                "--selector",
                f"unix:uid:{UID}",
                "--parent-id",
                AGENT_ID,
            )
            subscribers = "authority_revocation_subscribers"
            alone = value(scrape(server_url), subscribers)  # the authority's own listeners
            proc = _start_agent(served, bundle, tmp_path / "agent", socket, log_path, agent_port)
            try:

                def agent_series() -> Series | None:
                    assert proc.poll() is None, log_path.read_text()
                    try:
                        return scrape(agent_url)
                    except OSError:
                        return None

                wait_until(
                    lambda: (
                        (s := agent_series()) is not None
                        and value(s, "authority_agent_svids_held") == 1
                    ),
                    "the agent's metrics with one SVID held",
                    timeout=30,
                )
                series = agent_series()
                assert series is not None
                assert 0 < value(series, "authority_agent_svid_expiry_seconds") <= 3600
                assert 0 < value(series, "authority_agent_soonest_svid_expiry_seconds") <= 3600
                assert value(series, "authority_agent_sync_connected") == 1
                assert value(series, "authority_agent_workload_api_streams") == 0
                with _x509_stream(socket):
                    wait_until(
                        lambda: (
                            value(scrape(agent_url), "authority_agent_workload_api_streams") == 1
                        ),
                        "the open Workload API stream in the agent's metrics",
                    )
                wait_until(
                    lambda: value(scrape(agent_url), "authority_agent_workload_api_streams") == 0,
                    "the closed stream gone from the agent's metrics",
                )
                assert 0 <= value(series, "authority_agent_revocation_feed_staleness_seconds") < 30

                wait_until(
                    lambda: value(scrape(server_url), subscribers) == alone + 1,
                    "the agent's revocation subscription",
                )
                lag = "authority_revocation_feed_lag_seconds_count"
                before = value(scrape(server_url), lag)
                served.cli(
                    "revoke",
                    "--spiffe-id",
                    f"spiffe://{TD}/nobody",
                    "--reason",
                    "t",
                    "--preemptive",
                )
                wait_until(
                    lambda: value(scrape(server_url), lag) == before + 1,
                    "the revocation's delivery to the agent",
                )

                agent_ok = _cli("healthcheck", "--workload-api-socket", str(socket))
                assert (agent_ok.returncode, agent_ok.stdout) == (0, "SERVING\n")
                server_ok = _cli("healthcheck", "--admin-socket", str(served.admin_socket))
                assert (server_ok.returncode, server_ok.stdout) == (0, "SERVING\n")

                exposed = {name for name, _ in scrape(server_url)} | {name for name, _ in series}
                missing = queried_metrics() - exposed
                assert not missing, f"the dashboard queries metrics nobody exposes: {missing}"

                shown = _cli("metrics", "--url", server_url)
                assert shown.returncode == 0, shown.stderr
                assert "authority_credentials_issued (counter)" in shown.stdout
                assert "authority_revocation_feed_lag_seconds (histogram): " in shown.stdout
                shown_agent = _cli("metrics", "--url", agent_url)
                assert "authority_agent_svid_expiry_seconds (gauge): " in shown_agent.stdout
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            gone = _cli("healthcheck", "--workload-api-socket", str(socket))
            assert gone.returncode == 1
            assert gone.stdout.startswith("UNREACHABLE: no socket at")
            admin_socket = served.admin_socket
        stopped = _cli("healthcheck", "--admin-socket", str(admin_socket))
        assert stopped.returncode == 1
        assert len(stopped.stdout.splitlines()) == 1
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_a_stopped_server_answers_1_not_serving(tmp_path: Path) -> None:
    """A socket file with nobody behind it (a crashed authority) is 1, in one line."""
    socket_dir = short_socket_dir()
    try:
        path = socket_dir / "admin.sock"
        import socket as sockets

        sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        sock.bind(str(path))
        sock.close()  # the file stays, nobody listens
        result = _cli("healthcheck", "--admin-socket", str(path), "--timeout", "2")
        assert result.returncode == 1
        assert result.stdout.startswith("UNREACHABLE: ")
        assert len(result.stdout.splitlines()) == 1
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_serve_refuses_a_metrics_address_beyond_loopback_or_taken(tmp_path: Path) -> None:
    """One line each, before anything is created; --metrics-allow-remote is the way out."""
    import socket as sockets

    data = tmp_path / "data"
    common = ["--data-dir", str(data), "--listen", "127.0.0.1:0", "--listen-mtls", "127.0.0.1:0"]
    remote = _cli("serve", *common, "--metrics-listen", "0.0.0.0:9464")
    assert remote.returncode == 1
    assert remote.stderr.splitlines() == [
        "error: metrics_listen '0.0.0.0:9464' is not a loopback address: "
        "metrics reveal counts (metrics_allow_remote / --metrics-allow-remote exposes them)"
    ]
    with sockets.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = _cli("serve", *common, "--metrics-listen", f"127.0.0.1:{port}")
    assert busy.returncode == 1
    assert len(busy.stderr.splitlines()) == 1
    assert f"127.0.0.1:{port} is already in use (metrics_listen)" in busy.stderr
    assert not (data / "authority.db").exists()
    agent = _cli(
        "agent",
        "--server",
        "127.0.0.1:1",
        "--trust-bundle",
        str(tmp_path / "none.pem"),
        "--workload-api-socket",
        str(tmp_path / "a.sock"),
        "--metrics-listen",
        "10.0.0.1:9465",
    )
    assert agent.returncode == 1
    assert len(agent.stderr.splitlines()) == 1
    assert "not a loopback address" in agent.stderr
