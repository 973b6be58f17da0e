"""py-spiffe (``spiffe`` and ``spiffe-tls``) against the SPIFFE Workload API, as the authority
serves it and as a node agent serves it.

The clients are the unmodified third-party libraries, on the real socket; this test process is
the workload the kernel names. py-spiffe's clients block, so they run in threads while the
authority (and the agent) serve on the test's event loop. Every test runs twice: against the
authority's own Workload API (entries without a parent), and against a node agent attested to it
with a join token (node entries whose parent is the agent).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from spiffe import JwtSvid, SpiffeId, TrustDomain, WorkloadApiClient, X509Source, X509Svid
from spiffe.errors import PySpiffeError
from spiffetls import ListenOptions, dial, listen
from spiffetls.tlsconfig.authorize import authorize_id

from authority._pb import authority_v1_authority_pb2 as apb
from authority.agent import NodeAgent
from tests.conformance.verifiers import (
    assert_openssl_accepts,
    requires_openssl,
    verify_client,
    write_pem,
)
from tests.helpers import AGENT_ID, Running, running_agent, running_authority, wait_held
from tests.helpers import test_config as make_config

TD = "spiffe://example.org"
DOMAIN = TrustDomain("example.org")
UID = os.getuid()

# spiffe-tls 0.4 calls APIs that spiffe 0.3.2 and pyOpenSSL 26 deprecate (X509Source.svid and
# .bundles, pyOpenSSL X509 objects): their warnings, not ours.
SPIFFETLS_DEPRECATIONS = (
    pytest.mark.filterwarnings("ignore::DeprecationWarning:spiffetls"),
    pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning"),
)


@dataclass
class Api:
    running: Running
    socket: Path
    agent: NodeAgent | None = None  # set when a node agent serves the API

    @property
    def endpoint(self) -> str:
        return f"unix:{self.socket}"

    async def entry(self, path: str, *selectors: str, x509_ttl: int = 0) -> None:
        """Create the entry; with an agent, wait until the agent holds an SVID for it (the
        entry reaches the agent on its sync stream, then it signs)."""
        created = await self.running.admin().stub.CreateEntry(
            apb.CreateEntryRequest(
                spiffe_id=f"{TD}/{path}",
                selectors=[apb.Selector(type="unix", value=s) for s in selectors],
                x509_ttl_seconds=x509_ttl,
                parent_id=AGENT_ID if self.agent else "",
            )
        )
        if self.agent is not None:
            await wait_held(self.agent, created.id)


@pytest.fixture(params=["authority", "agent"])
async def api(
    request: pytest.FixtureRequest, tmp_path: Path, socket_dir: Path
) -> AsyncIterator[Api]:
    config = dataclasses.replace(
        make_config(tmp_path / "data", socket_dir, min_ttl=dt.timedelta(seconds=4)),
        workload_api_socket=socket_dir / "workload.sock",
    )
    async with running_authority(config) as running:
        if request.param == "authority":
            yield Api(running, socket_dir / "workload.sock")
            return
        agent_socket = socket_dir / "agent.sock"
        async with running_agent(running, agent_socket, tmp_path / "agent") as agent:
            yield Api(running, agent_socket, agent)


def _picker(spiffe_id: str) -> Callable[[list[X509Svid]], X509Svid]:
    return lambda svids: next(s for s in svids if str(s.spiffe_id) == spiffe_id)


async def test_x509_context_verifies_against_the_fetched_bundle(api: Api, tmp_path: Path) -> None:
    await api.entry("agent", f"uid:{UID}")

    def fetch() -> tuple[X509Svid, list[x509.Certificate]]:
        with WorkloadApiClient(socket_path=api.endpoint, default_timeout=10) as client:
            context = client.fetch_x509_context()
            bundles = client.fetch_x509_bundles()
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(DOMAIN)
        assert bundle is not None
        standalone = bundles.get_bundle_for_trust_domain(DOMAIN)
        assert standalone is not None
        assert set(standalone.x509_authorities) == set(bundle.x509_authorities)
        return context.default_svid, list(bundle.x509_authorities)

    svid, roots = await asyncio.to_thread(fetch)
    assert str(svid.spiffe_id) == f"{TD}/agent"
    sans, chain = verify_client(svid.leaf, roots, svid.cert_chain[1:])
    assert sans == [x509.UniformResourceIdentifier(f"{TD}/agent")]
    assert chain[-1] in roots
    assert svid.private_key.public_key() == svid.leaf.public_key()


@requires_openssl
async def test_openssl_accepts_the_fetched_svid(api: Api, tmp_path: Path) -> None:
    await api.entry("agent", f"uid:{UID}")

    def fetch() -> tuple[X509Svid, list[x509.Certificate]]:
        with WorkloadApiClient(socket_path=api.endpoint, default_timeout=10) as client:
            context = client.fetch_x509_context()
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(DOMAIN)
        assert bundle is not None
        return context.default_svid, list(bundle.x509_authorities)

    svid, roots = await asyncio.to_thread(fetch)
    ca_file = write_pem(tmp_path / "bundle.pem", roots)
    leaf = write_pem(tmp_path / "leaf.pem", [svid.leaf])
    await asyncio.to_thread(assert_openssl_accepts, ca_file, leaf, purpose="sslclient")


async def test_jwt_svid_validates_locally_and_with_the_api(api: Api) -> None:
    await api.entry("agent", f"uid:{UID}")

    def run() -> None:
        with WorkloadApiClient(socket_path=api.endpoint, default_timeout=10) as client:
            fetched = client.fetch_jwt_svid({"svc-a"})
            assert str(fetched.spiffe_id) == f"{TD}/agent"
            bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(DOMAIN)
            assert bundle is not None
            local = JwtSvid.parse_and_validate(fetched.token, bundle, {"svc-a"})
            assert str(local.spiffe_id) == f"{TD}/agent"
            assert local.expiry > time.time()
            remote = client.validate_jwt_svid(fetched.token, "svc-a")
            assert str(remote.spiffe_id) == f"{TD}/agent"
            with pytest.raises(PySpiffeError):
                client.validate_jwt_svid(fetched.token, "svc-b")
            with pytest.raises(PySpiffeError):
                JwtSvid.parse_and_validate(fetched.token, bundle, {"svc-b"})
            asked = client.fetch_jwt_svid({"svc-a"}, subject=SpiffeId(f"{TD}/agent"))
            assert str(asked.spiffe_id) == f"{TD}/agent"

    await asyncio.to_thread(run)


async def test_spiffe_endpoint_socket_is_honoured(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    await api.entry("agent", f"uid:{UID}")
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", api.endpoint)

    def fetch() -> str:
        with WorkloadApiClient(default_timeout=10) as client:
            return str(client.fetch_x509_svid().spiffe_id)

    assert await asyncio.to_thread(fetch) == f"{TD}/agent"


async def test_x509_source_sees_the_svid_rotate_before_expiry(api: Api) -> None:
    await api.entry("short-lived", f"uid:{UID}", x509_ttl=6)

    def run() -> tuple[float, x509.Certificate, x509.Certificate]:
        updated = threading.Event()
        source = X509Source(socket_path=api.endpoint, timeout_in_seconds=10)
        try:
            source.subscribe_for_updates(updated.set)
            first = source.get_x509_context().default_svid.leaf
            began = time.monotonic()
            while True:
                assert updated.wait(timeout=8), "no rotation within 8 s"
                updated.clear()
                second = source.get_x509_context().default_svid.leaf
                if second.serial_number != first.serial_number:
                    return time.monotonic() - began, first, second
        finally:
            source.close()

    waited, first, second = await asyncio.to_thread(run)
    assert waited < 5.0  # at half of the 6 s life (3 s), not at expiry
    assert second.not_valid_after_utc > first.not_valid_after_utc
    assert dt.datetime.now(dt.UTC) < first.not_valid_after_utc  # the old one is still valid


async def test_x509_source_sees_a_ca_rotation(api: Api) -> None:
    await api.entry("agent", f"uid:{UID}")
    source = await asyncio.to_thread(X509Source, socket_path=api.endpoint, timeout_in_seconds=10)
    try:

        def authorities() -> int:
            bundle = source.get_x509_context().x509_bundle_set.get_bundle_for_trust_domain(DOMAIN)
            assert bundle is not None
            return len(bundle.x509_authorities)

        assert authorities() == 1
        await api.running.admin().stub.RotateCA(apb.RotateCARequest())
        deadline = time.monotonic() + 2.0
        while authorities() != 2:
            assert time.monotonic() < deadline, "the new authority did not arrive within 2 s"
            await asyncio.sleep(0.02)
    finally:
        await asyncio.to_thread(source.close)


@SPIFFETLS_DEPRECATIONS[0]
@SPIFFETLS_DEPRECATIONS[1]
async def test_mtls_between_two_workloads_with_their_svids(api: Api) -> None:
    await api.entry("server", f"uid:{UID}")
    await api.entry("client", f"uid:{UID}")
    server_id, client_id = f"{TD}/server", f"{TD}/client"

    def run() -> tuple[bytes, list[str], list[str]]:
        server_source = X509Source(
            socket_path=api.endpoint, timeout_in_seconds=10, svid_picker=_picker(server_id)
        )
        client_source = X509Source(
            socket_path=api.endpoint, timeout_in_seconds=10, svid_picker=_picker(client_id)
        )
        listener = listen(
            "127.0.0.1:0",
            server_source,
            ListenOptions(authorize_fn=authorize_id(SpiffeId(client_id))),
        )
        seen: dict[str, list[str]] = {}

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                conn.do_handshake()
                peer = conn.get_peer_certificate(as_cryptography=True)
                assert peer is not None
                seen.setdefault("server saw", []).append(_uri(peer))
                conn.sendall(conn.recv(64))
                conn.shutdown()
            finally:
                conn.close()

        port = listener.getsockname()[1]
        thread = threading.Thread(target=serve)
        thread.start()
        try:
            conn = dial(
                f"127.0.0.1:{port}", client_source, authorize_fn=authorize_id(SpiffeId(server_id))
            )
            try:
                peer = conn.get_peer_certificate(as_cryptography=True)
                assert peer is not None
                client_saw = [_uri(peer)]
                conn.sendall(b"ping")
                echoed = conn.recv(64)
            finally:
                conn.close()
        finally:
            thread.join(timeout=10)
            listener.close()
            server_source.close()
            client_source.close()
        return echoed, client_saw, seen.get("server saw", [])

    # Each side's authorize_id checked the other's SPIFFE ID during the handshake.
    echoed, client_saw, server_saw = await asyncio.to_thread(run)
    assert echoed == b"ping"
    assert client_saw == [server_id]
    assert server_saw == [client_id]


def _uri(cert: x509.Certificate) -> str:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (uri,) = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uri
