"""Client SDK: the operator client (Unix socket), the workload client (TLS / mutual TLS), and,
re-exported here, the relying-service side: ``TaskTokenVerifier``, ``TaskKeySource`` and
``TaskTokenInterceptor`` (from ``authority.relying``) with ``RevocationWatcher`` (from
``authority.watch``).

Workload keys are generated here and never leave the process: the authority gets a CSR.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import os
import socket
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority._pb import spiffe_workload_pb2 as spiffe_pb
from authority._pb import spiffe_workload_pb2_grpc as spiffe_grpc
from authority.backoff import DEFAULT_CAP, DEFAULT_INITIAL, Backoff, LinkState
from authority.errors import FailedPrecondition, InvalidArgument
from authority.files import private_folder, write_at
from authority.keyvault import private_key_pem
from authority.relying import (
    StaticKeys,
    TaskKeySource,
    TaskTokenInterceptor,
    TaskTokenVerifier,
    current_task_token,
)
from authority.watch import RevocationWatcher, stub_stream

__all__ = [
    "AdminClient",
    "FetchedX509Svid",
    "RevocationWatcher",
    "ServerRotation",
    "StaticKeys",
    "SvidFiles",
    "TaskKeySource",
    "TaskTokenInterceptor",
    "TaskTokenVerifier",
    "WorkloadApiClient",
    "WorkloadClient",
    "check_svid_current",
    "current_task_token",
    "make_csr",
    "new_key",
    "read_trust_bundle",
    "requires_client_certificate",
    "server_addresses",
    "stub_stream",
    "workload_api_target",
    "x509pop_responder",
]

Responder = Callable[[bytes], Awaitable[bytes]]
log = logging.getLogger(__name__)
_T = TypeVar("_T")

# gRPC's own reconnect backoff (1 s doubling up to 120 s by default) would outlast ours: a call
# made on a channel in its backoff fails at once. Aligned with ``authority.backoff``'s defaults.
RECONNECT_OPTIONS: dict[str, int | str] = {
    "grpc.initial_reconnect_backoff_ms": int(DEFAULT_INITIAL * 1000),
    "grpc.max_reconnect_backoff_ms": int(DEFAULT_CAP * 1000),
}

# The Workload API is a local socket: reconnecting costs nothing, and the SVIDs it carries are
# short (an agent restart must not leave a workload waiting out a 30 s backoff).
LOCAL_BACKOFF_MAX = 5.0


def channel_options(
    options: list[tuple[str, int | str]] | None = None,
) -> list[tuple[str, int | str]]:
    """``RECONNECT_OPTIONS``, then ``options`` (which win)."""
    return list({**RECONNECT_OPTIONS, **dict(options or [])}.items())


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A CSR that proves possession of ``key`` and asks for nothing else."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def x509pop_responder(key_pem: bytes) -> Responder:
    """Answers the x509pop challenge: a signature over the nonce with the certificate's key."""
    from attestors.x509pop import sign_challenge

    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("the x509pop key must be EC or RSA")

    async def respond(nonce: bytes) -> bytes:
        return sign_challenge(key, nonce)

    return respond


def der_chain_to_pem(chain: list[bytes]) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in chain
    )


@dataclass(frozen=True, slots=True)
class SvidFiles:
    """A workload's credentials on disk: ``svid.pem`` (leaf, then intermediates), ``svid.key``
    (PKCS#8, mode 0600) and ``bundle.pem``."""

    folder: Path

    @property
    def cert_path(self) -> Path:
        return self.folder / "svid.pem"

    @property
    def key_path(self) -> Path:
        return self.folder / "svid.key"

    @property
    def bundle_path(self) -> Path:
        return self.folder / "bundle.pem"

    def write(self, chain_pem: bytes, key: ec.EllipticCurvePrivateKey, bundle_pem: bytes) -> None:
        """Into a folder of the user's own (``files.private_folder``: created 0700, or checked
        and tightened), each file replaced atomically and never written through a link."""
        with private_folder(self.folder) as folder:
            write_at(folder, self.key_path.name, private_key_pem(key), 0o600)
            write_at(folder, self.cert_path.name, chain_pem, 0o644)
            write_at(folder, self.bundle_path.name, bundle_pem, 0o644)

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(chain PEM, key PEM, bundle PEM)."""
        return (
            self.cert_path.read_bytes(),
            self.key_path.read_bytes(),
            self.bundle_path.read_bytes(),
        )

    def read_checked(self, now: dt.datetime | None = None) -> tuple[bytes, bytes, bytes]:
        """``read``, refused before anything is dialed when the SVID is not current
        (``check_svid_current``) or the key is not the certificate's (``InvalidArgument``
        SVID_KEY_MISMATCH; gRPC would log lines of its own and answer a bare UNAVAILABLE)."""
        chain, key, bundle = self.read()
        if not _key_matches(key, check_svid_current(chain, now)):
            raise InvalidArgument(
                f"{self.key_path} is not the key of {self.cert_path}", reason="SVID_KEY_MISMATCH"
            )
        return chain, key, bundle


def check_svid_current(chain_pem: bytes, now: dt.datetime | None = None) -> x509.Certificate:
    """The leaf of ``chain_pem`` (PEM, leaf first) if it is valid at ``now`` (default: the
    system clock); else ``FailedPrecondition`` SVID_EXPIRED or SVID_NOT_YET_VALID, saying when
    and what to do. A server would refuse the handshake without saying why."""
    try:
        leaf = x509.load_pem_x509_certificates(chain_pem)[0]
    except ValueError:
        raise InvalidArgument(
            "the SVID file holds no PEM certificate", reason="SVID_MALFORMED"
        ) from None
    now = now or dt.datetime.now(dt.UTC)
    if now > leaf.not_valid_after_utc:
        raise FailedPrecondition(
            f"SVID expired at {_utc(leaf.not_valid_after_utc)}, attest again",
            reason="SVID_EXPIRED",
        )
    if now < leaf.not_valid_before_utc:
        raise FailedPrecondition(
            f"SVID not valid until {_utc(leaf.not_valid_before_utc)} (is this machine's clock "
            "behind?)",
            reason="SVID_NOT_YET_VALID",
        )
    return leaf


def read_trust_bundle(path: Path) -> bytes:
    """The PEM roots in ``path``, checked before gRPC sees them (it would log its own lines and
    fail the call with a bare UNAVAILABLE): ``InvalidArgument`` BAD_TRUST_BUNDLE, one line,
    when the file cannot be read or holds no PEM certificate."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(
            f"cannot read trust bundle {path}: {exc.strerror or exc}", reason="BAD_TRUST_BUNDLE"
        ) from None
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise InvalidArgument(
            f"{path} holds no PEM certificate", reason="BAD_TRUST_BUNDLE"
        ) from None
    return pem


def _key_matches(key_pem: bytes, leaf: x509.Certificate) -> bool:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return False
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(
        serialization.Encoding.DER, public
    ) == leaf.public_key().public_bytes(serialization.Encoding.DER, public)


def requires_client_certificate(address: str, timeout: float = 3.0) -> bool:
    """Whether the TLS server at ``address`` (HOST:PORT) closes a connection that presented no
    client certificate right after the handshake, as the authority's mutual-TLS port does
    (gRPC reports that only as ``Socket closed``). Its server-TLS port sends HTTP/2 settings
    instead. Asked after a call failed, to say which port was dialed; nothing is sent, and
    what the server presents is not trusted for anything."""
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only the server's behaviour is read, never its data
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw,
            context.wrap_socket(raw) as tls,
        ):
            try:
                return tls.recv(1) == b""
            except (ssl.SSLError, ConnectionResetError):
                return True  # the certificate it required is missing: an alert, or a reset
    except (OSError, ValueError):
        return False  # nothing there, not TLS, or a handshake that failed: not that port


def _utc(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"


def workload_api_target(socket: str | Path | None = None) -> str:
    """The gRPC target of a SPIFFE Workload API: ``socket`` (a path, or a URI) when given, else
    the ``SPIFFE_ENDPOINT_SOCKET`` environment variable, as the SPIFFE Workload Endpoint
    standard defines it: ``unix:///absolute/path`` (or ``unix:/absolute/path``) or
    ``tcp://IP:PORT``. ValueError for anything else."""
    value = str(socket) if socket is not None else os.environ.get(ENDPOINT_ENV, "")
    if not value:
        raise ValueError(f"no Workload API socket: give one or set {ENDPOINT_ENV}")
    if value.startswith("/"):
        return f"unix:{value}"
    parsed = urllib.parse.urlsplit(value)
    if parsed.query or parsed.fragment or parsed.username or parsed.password:
        raise ValueError(f"{ENDPOINT_ENV} {value!r} may not carry a query, fragment or user")
    if parsed.scheme == "unix":
        if parsed.netloc or not parsed.path.startswith("/"):
            raise ValueError(f"{ENDPOINT_ENV} {value!r}: a unix URI names an absolute path")
        return f"unix:{parsed.path}"
    if parsed.scheme == "tcp":
        try:
            ipaddress.ip_address(parsed.hostname or "")
        except ValueError:
            raise ValueError(f"{ENDPOINT_ENV} {value!r}: a tcp URI names an IP address") from None
        if parsed.port is None or parsed.path not in ("", "/"):
            raise ValueError(f"{ENDPOINT_ENV} {value!r}: a tcp URI is tcp://IP:PORT")
        return parsed.netloc
    raise ValueError(f"{ENDPOINT_ENV} {value!r} is neither a unix:// nor a tcp:// URI")


@dataclass(frozen=True, slots=True)
class FetchedX509Svid:
    spiffe_id: str
    chain_pem: bytes
    key: ec.EllipticCurvePrivateKey
    bundle_pem: bytes


class _OneChannel:
    """A client over one insecure (Unix socket) channel, usable with ``async with``."""

    _channel: grpc.aio.Channel

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class WorkloadApiClient(_OneChannel):
    """A client of the SPIFFE Workload API (the authority's or a node agent's), where the kernel
    identifies the caller: no credential of its own. ``socket`` defaults to
    ``SPIFFE_ENDPOINT_SOCKET``."""

    HEADER = (("workload.spiffe.io", "true"),)

    def __init__(self, socket: str | Path | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(
            workload_api_target(socket),
            channel_options([("grpc.max_reconnect_backoff_ms", int(LOCAL_BACKOFF_MAX * 1000))]),
        )
        self.stub = spiffe_grpc.SpiffeWorkloadAPIStub(self._channel)

    async def fetch_x509_svids(self) -> list[FetchedX509Svid]:
        """The caller's X.509-SVIDs now (the first message of the stream)."""
        call = self.stub.FetchX509SVID(spiffe_pb.X509SVIDRequest(), metadata=self.HEADER)
        try:
            reply = await call.read()
        finally:
            call.cancel()
        if not isinstance(reply, spiffe_pb.X509SVIDResponse):
            raise ConnectionError("the Workload API closed the stream without an answer")
        return self._svids(reply)

    async def watch_x509_svids(
        self, *, backoff: Backoff | None = None
    ) -> AsyncIterator[list[FetchedX509Svid]]:
        """The caller's X.509-SVIDs, then each update, for as long as the caller iterates.

        A lost stream (the agent or authority restarting) is reopened after a ``backoff`` delay
        (full jitter; default 0.5 s doubling up to 5 s); its first message is the current
        state, so nothing is missed. The loss and the recovery are logged once each, with the
        outage's duration. INVALID_ARGUMENT (a request the API will never accept) is raised."""
        backoff = backoff or Backoff(cap=LOCAL_BACKOFF_MAX)
        link = LinkState("Workload API X.509-SVID stream", log)
        while True:
            call = self.stub.FetchX509SVID(spiffe_pb.X509SVIDRequest(), metadata=self.HEADER)
            try:
                async for reply in call:
                    link.restored()
                    backoff.reset()
                    yield self._svids(reply)
                link.lost("the stream ended")
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                link.lost(f"{exc.code().name}: {exc.details()}")
            finally:
                call.cancel()
            await asyncio.sleep(backoff.next_delay())

    @staticmethod
    def _svids(reply: spiffe_pb.X509SVIDResponse) -> list[FetchedX509Svid]:
        out = []
        for svid in reply.svids:
            key = serialization.load_der_private_key(svid.x509_svid_key, password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("the Workload API sent a key that is not EC")
            out.append(
                FetchedX509Svid(
                    svid.spiffe_id, _der_to_pem(svid.x509_svid), key, _der_to_pem(svid.bundle)
                )
            )
        return out

    async def fetch_jwt_svid(self, audience: list[str], spiffe_id: str = "") -> tuple[str, str]:
        """(SPIFFE ID, token): the caller's first identity's, or ``spiffe_id``'s."""
        reply = await self.stub.FetchJWTSVID(
            spiffe_pb.JWTSVIDRequest(audience=audience, spiffe_id=spiffe_id),
            metadata=self.HEADER,
        )
        if not reply.svids:
            raise ConnectionError("the Workload API returned no JWT-SVID")
        return reply.svids[0].spiffe_id, reply.svids[0].svid


def _der_to_pem(der: bytes) -> bytes:
    """Concatenated DER certificates (as the Workload API carries them) as PEM."""
    pem = b""
    while der:
        cert = x509.load_der_x509_certificate(der[: _der_length(der)])
        pem += cert.public_bytes(serialization.Encoding.PEM)
        der = der[_der_length(der) :]
    return pem


def _der_length(der: bytes) -> int:
    """The length of the DER SEQUENCE at the start of ``der``, header included."""
    if len(der) < 2 or der[0] != 0x30:
        raise ValueError("not a DER certificate")
    size = der[1]
    if not size & 0x80:
        return 2 + size
    count = size & 0x7F
    return 2 + count + int.from_bytes(der[2 : 2 + count], "big")


def _split(address: str) -> tuple[str, str]:
    host, _, port = address.rpartition(":")
    return host, port


# --- several authority servers ------------------------------------------------------------------

# A server that has not answered a connection attempt in this long is passed over for the next.
CONNECT_TIMEOUT = 5.0
# What moves a repeatable call to the next server: the server could not be reached, or did
# not answer in time.
_MOVE_ON = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def server_addresses(servers: str | Sequence[str]) -> tuple[str, ...]:
    """``servers`` (one address, or several) as a tuple, each address once, in the order
    given; ValueError when there is none or one is empty."""
    given = (servers,) if isinstance(servers, str) else tuple(servers)
    addresses = tuple(dict.fromkeys(a.strip() for a in given))
    if not addresses or not all(addresses):
        raise ValueError("give at least one authority server address (HOST:PORT)")
    return addresses


class ServerRotation:
    """Which of the authority's servers (replicas on one database) a client uses now.

    No I/O: callers report what they saw. ``failed(address)`` moves to the next address only
    while ``address`` is still the current one, so the calls and streams that all fail on one
    dead server move once, not once each. A move away from a server that was answering is
    logged (INFO); moves while every server is down are DEBUG, as the retries of an outage are.
    The pacing (``authority.backoff``) is the caller's: a rotation never sleeps."""

    def __init__(self, servers: str | Sequence[str], *, logger: logging.Logger = log) -> None:
        self.addresses = server_addresses(servers)
        self._index = 0
        self._answering = False  # the current server has answered since the client moved to it
        self._log = logger
        self.moves = 0

    @property
    def current(self) -> str:
        return self.addresses[self._index]

    def __len__(self) -> int:
        return len(self.addresses)

    def ok(self, address: str) -> None:
        """A call to ``address`` was answered."""
        if address == self.current:
            self._answering = True

    def failed(self, address: str, reason: str) -> bool:
        """A call to ``address`` could not reach it (or its stream was cut): use the next
        address from now on. True when this moved the rotation."""
        if len(self.addresses) == 1 or address != self.current:
            return False
        self._index = (self._index + 1) % len(self.addresses)
        self.moves += 1
        level = logging.INFO if self._answering else logging.DEBUG
        self._answering = False
        self._log.log(
            level,
            "authority server %s failed (%s): moving to %s",
            address,
            " ".join(reason.split())[:200],
            self.current,
        )
        return True


def _rotation(servers: str | Sequence[str] | ServerRotation) -> ServerRotation:
    return servers if isinstance(servers, ServerRotation) else ServerRotation(servers)


async def _connects(channel: grpc.aio.Channel, timeout: float) -> bool:  # noqa: ASYNC109
    """Whether ``channel`` connects (READY) within ``timeout``: False at its first failure
    (TRANSIENT_FAILURE, refused or a failed handshake) or when it hangs. Nothing is sent."""
    ready, failure = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE
    try:
        async with asyncio.timeout(timeout):
            state = channel.get_state(try_to_connect=True)
            while state is not ready:
                if state is failure:
                    return False
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        return False
    return True


class _Endpoint:
    """One authority server: its server-TLS channel, and its mutual-TLS channel once the
    address of that port is known (GetServerInfo). Each server is verified on its own name
    against the roots: every replica presents an SVID of the trust domain with its own
    addresses; no certificate is pinned."""

    def __init__(
        self,
        address: str,
        bundle: bytes | None,
        chain: bytes | None,
        key: bytes | None,
        options: list[tuple[str, int | str]],
    ) -> None:
        self.address = address
        self._bundle, self._chain, self._key, self._options = bundle, chain, key, options
        if address.startswith("unix:"):
            self.tls = grpc.aio.insecure_channel(address, options)
        else:
            if not bundle:
                raise ValueError("a trust bundle is needed to verify the authority over TLS")
            creds = grpc.ssl_channel_credentials(root_certificates=bundle)
            self.tls = grpc.aio.secure_channel(address, creds, options)
        self.tls_stub: pb_grpc.WorkloadAsyncStub = pb_grpc.WorkloadStub(self.tls)
        self.mtls: grpc.aio.Channel | None = None
        self._mtls_stub: pb_grpc.WorkloadAsyncStub | None = None

    async def mtls_stub(self) -> pb_grpc.WorkloadAsyncStub:
        if self._mtls_stub is None:
            if self._chain is None or self._key is None:
                raise ValueError("this client has no SVID: attest first or load an SVID folder")
            info = await self.tls_stub.GetServerInfo(pb.GetServerInfoRequest())
            host, port = _split(info.mtls_address)
            address = f"{host or _split(self.address)[0]}:{port}"
            creds = grpc.ssl_channel_credentials(
                root_certificates=self._bundle, private_key=self._key, certificate_chain=self._chain
            )
            self.mtls = grpc.aio.secure_channel(address, creds, self._options)
            self._mtls_stub = pb_grpc.WorkloadStub(self.mtls)
        return self._mtls_stub

    async def close(self) -> None:
        await self.tls.close(None)
        if self.mtls is not None:
            await self.mtls.close(None)


class AdminClient(_OneChannel):
    """The operator API over the admin Unix socket."""

    def __init__(self, socket_path: str | Path) -> None:
        self._channel = grpc.aio.insecure_channel(f"unix:{socket_path}", channel_options())
        self.stub: pb_grpc.AdminAsyncStub = pb_grpc.AdminStub(self._channel)


class WorkloadClient:
    """A workload's view of the authority: attest over server TLS (or the local Unix socket),
    then use its SVID over mutual TLS.

    ``server`` is the server-TLS address (HOST:PORT; a DNS name with several addresses is
    gRPC's to try in turn), several of them (replicas of one authority, in the order to try),
    a ``ServerRotation`` shared with other clients, or ``unix:PATH`` for the authority's local
    socket (where the kernel identifies the caller, and no TLS is needed); each server's
    mutual-TLS address is discovered with GetServerInfo.

    With several servers, ``call`` moves to the next one when the current one cannot be
    reached, waiting a ``Backoff`` delay between servers, and makes a call again on the next
    server only when that is safe: a ``repeatable`` call (a read, a renewal, a signing: done
    twice, the caller still gets one answer it can use) after UNAVAILABLE or DEADLINE_EXCEEDED;
    any call when the connection to the server could not be made, so nothing was sent. A call
    that is not repeatable and may have run (UNAVAILABLE once connected) is never made twice.
    """

    def __init__(
        self,
        server: str | Sequence[str] | ServerRotation,
        trust_bundle_pem: bytes | None,
        *,
        svid_chain_pem: bytes | None = None,
        svid_key_pem: bytes | None = None,
        options: list[tuple[str, int | str]] | None = None,
        backoff: Backoff | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.servers = _rotation(server)
        self._bundle = trust_bundle_pem
        self._options = channel_options(options)
        self._chain = svid_chain_pem
        self._key = svid_key_pem
        self._backoff = backoff or Backoff(DEFAULT_INITIAL, DEFAULT_CAP)
        self._connect_timeout = connect_timeout
        self._endpoints: dict[str, _Endpoint] = {}
        self._closing: set[asyncio.Task[None]] = set()
        if not trust_bundle_pem and any(not a.startswith("unix:") for a in self.servers.addresses):
            raise ValueError("a trust bundle is needed to verify the authority over TLS")
        self._endpoint(self.servers.current)

    @classmethod
    def from_svid_dir(
        cls,
        server: str | Sequence[str] | ServerRotation,
        folder: Path,
        trust_bundle: Path | None = None,
    ) -> Self:
        """A client holding the SVID saved in ``folder``: refused before anything is dialed
        (``FailedPrecondition``) when that SVID has expired or is not valid yet, which the
        mutual-TLS endpoint would otherwise answer with a bare closed socket, or when its key
        is not the certificate's (``SvidFiles.read_checked``)."""
        chain, key, bundle = SvidFiles(folder).read_checked()
        if trust_bundle is not None:
            bundle = read_trust_bundle(trust_bundle)
        return cls(server, bundle, svid_chain_pem=chain, svid_key_pem=key)

    def _endpoint(self, address: str) -> _Endpoint:
        endpoint = self._endpoints.get(address)
        if endpoint is None:
            endpoint = _Endpoint(address, self._bundle, self._chain, self._key, self._options)
            self._endpoints[address] = endpoint
        return endpoint

    @property
    def address(self) -> str:
        """The server this client uses now."""
        return self.servers.current

    @property
    def tls_stub(self) -> pb_grpc.WorkloadAsyncStub:
        """The current server's server-TLS stub (no failover: see ``call``)."""
        return self._endpoint(self.servers.current).tls_stub

    async def close(self) -> None:
        endpoints, self._endpoints = list(self._endpoints.values()), {}
        for endpoint in endpoints:
            await endpoint.close()
        await asyncio.gather(*self._closing, return_exceptions=True)

    def _discard(self, address: str) -> None:
        """Forget the channels to a server that could not be connected to (so no call is live
        on them): the next call to it dials afresh, paced by our backoff, instead of waiting
        out gRPC's own reconnect backoff (up to 30 s) on a channel that failed before."""
        endpoint = self._endpoints.pop(address, None)
        if endpoint is not None:
            closing = asyncio.get_running_loop().create_task(endpoint.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def mtls_stub(self) -> pb_grpc.WorkloadAsyncStub:
        """The current server's mutual-TLS stub (no failover: see ``call``)."""
        return await self._endpoint(self.servers.current).mtls_stub()

    def failover(self, address: str, reason: str) -> bool:
        """A call or stream on ``address`` failed to reach it: use the next server from now on
        (see ``ServerRotation.failed``)."""
        return self.servers.failed(address, reason)

    async def call(
        self,
        fn: Callable[[pb_grpc.WorkloadAsyncStub], Awaitable[_T]],
        *,
        mtls: bool,
        repeatable: bool,
    ) -> _T:
        """``fn`` on the current server's stub (mutual TLS or server TLS), each server tried
        at most once, from the current one on; the class's docstring says when a failed call
        is made again on the next. The last server's failure is raised as gRPC reported it."""
        attempts = len(self.servers)
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(self._backoff.next_delay())
            last = attempt == attempts - 1
            address = self.servers.current
            endpoint = self._endpoint(address)
            try:
                stub = await endpoint.mtls_stub() if mtls else endpoint.tls_stub
            except grpc.aio.AioRpcError as exc:  # GetServerInfo: a read, safe to move on
                if last or exc.code() not in _MOVE_ON:
                    self._failed(address, exc)
                    raise
                self._failed(address, exc)
                continue
            if not last:
                channel = endpoint.mtls if mtls else endpoint.tls
                assert channel is not None
                if not await _connects(channel, self._connect_timeout):
                    self._discard(address)
                    self.servers.failed(address, "no connection")
                    continue
            try:
                result = await fn(stub)
            except grpc.aio.AioRpcError as exc:
                self._failed(address, exc)
                if last or not repeatable or exc.code() not in _MOVE_ON:
                    raise
                continue
            self.servers.ok(address)
            self._backoff.reset()
            return result
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _failed(self, address: str, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() in _MOVE_ON:
            self.servers.failed(address, f"{exc.code().name}: {exc.details()}")

    async def watch_revocations(self, since: int) -> AsyncIterator[pb.RevocationMessage]:
        """The revocation feed from ``since`` on the current server (mutual TLS): a stream
        factory for ``RevocationWatcher``. When the server cannot be reached or ends the
        stream, the next stream opens on the next server; the watcher resumes it from the
        last sequence number it applied (global across replicas: one database)."""
        address = self.servers.current
        try:
            stub = await self._endpoint(address).mtls_stub()
            async for message in stub.WatchRevocations(pb.WatchRevocationsRequest(since=since)):
                self.servers.ok(address)
                yield message
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                self.servers.failed(address, f"{exc.code().name}: {exc.details()}")
            raise
        self.servers.failed(address, "the stream ended")

    async def get_bundle(self) -> pb.Bundle:
        request = pb.GetBundleRequest()
        return await self.call(lambda s: s.GetBundle(request), mtls=False, repeatable=True)

    async def get_task_keys(self, *, timeout: float) -> pb.TaskKeys:  # noqa: ASYNC109
        """The task-token keys (``TaskKeySource`` takes this client as its origin)."""
        request = pb.GetTaskKeysRequest()
        return await self.call(
            lambda s: s.GetTaskKeys(request, timeout=timeout), mtls=False, repeatable=True
        )

    async def exchange(self, request: pb.ExchangeRequest) -> pb.ExchangeResponse:
        """Not repeatable: it opens a task (or an approval) and is audited."""
        return await self.call(lambda s: s.Exchange(request), mtls=True, repeatable=False)

    async def delegate(self, request: pb.DelegateRequest) -> pb.ExchangeResponse:
        """Not repeatable: it issues a token that is audited under its task."""
        return await self.call(lambda s: s.Delegate(request), mtls=True, repeatable=False)

    async def end_task(self, request: pb.EndTaskRequest) -> pb.EndTaskResponse:
        """Not repeatable: done twice, the second answer would not be the first's."""
        return await self.call(lambda s: s.EndTask(request), mtls=True, repeatable=False)

    async def attest(
        self,
        attestor: str,
        evidence: bytes,
        key: ec.EllipticCurvePrivateKey,
        *,
        respond: Responder | None = None,
        spiffe_id_hint: str = "",
    ) -> pb.AttestResult:
        """Run the Attest stream; ``respond`` answers the attestor's challenges, if it sends any.
        Not repeatable (a join token is spent by the first run): with several servers, it
        moves on only while no connection could be made."""
        return await self.call(
            lambda stub: self._attest(stub, attestor, evidence, key, respond, spiffe_id_hint),
            mtls=False,
            repeatable=False,
        )

    @staticmethod
    async def _attest(
        stub: pb_grpc.WorkloadAsyncStub,
        attestor: str,
        evidence: bytes,
        key: ec.EllipticCurvePrivateKey,
        respond: Responder | None,
        spiffe_id_hint: str,
    ) -> pb.AttestResult:
        outbox: asyncio.Queue[pb.AttestRequest | None] = asyncio.Queue()
        outbox.put_nowait(
            pb.AttestRequest(
                params=pb.AttestParams(
                    attestor=attestor,
                    evidence=evidence,
                    csr=make_csr(key),
                    spiffe_id_hint=spiffe_id_hint,
                )
            )
        )

        async def requests() -> AsyncIterator[pb.AttestRequest]:
            while (item := await outbox.get()) is not None:
                yield item

        call = stub.Attest(requests())
        try:
            async for response in call:
                if response.WhichOneof("step") == "result":
                    return response.result
                if respond is None:
                    raise ValueError("the attestor sent a challenge and no responder was given")
                answer = await respond(response.challenge)
                outbox.put_nowait(pb.AttestRequest(challenge_response=answer))
        finally:
            outbox.put_nowait(None)
            call.cancel()
        raise ConnectionError("the Attest stream ended without a result")

    async def attest_to_folder(
        self,
        attestor: str,
        evidence: bytes,
        folder: Path,
        *,
        respond: Responder | None = None,
        spiffe_id_hint: str = "",
    ) -> pb.AttestResult:
        key = new_key()
        result = await self.attest(
            attestor, evidence, key, respond=respond, spiffe_id_hint=spiffe_id_hint
        )
        if not result.svids:
            raise ConnectionError("the authority returned no SVID")
        chain = der_chain_to_pem(list(result.svids[0].cert_chain))
        bundle = der_chain_to_pem(list(result.bundle.x509_authorities))
        SvidFiles(folder).write(chain, key, bundle)
        return result

    async def fetch_jwt(self, audience: list[str], ttl_seconds: int = 0) -> pb.FetchJWTSVIDResponse:
        """Repeatable: a second run mints a second token; the caller gets one."""
        request = pb.FetchJWTSVIDRequest(audience=audience, ttl_seconds=ttl_seconds)
        return await self.call(lambda s: s.FetchJWTSVID(request), mtls=True, repeatable=True)

    async def renew(self, key: ec.EllipticCurvePrivateKey) -> pb.X509SVID:
        """Repeatable: a second run signs the same key again; the caller keeps one."""
        request = pb.RenewX509SVIDRequest(csr=make_csr(key))
        response = await self.call(lambda s: s.RenewX509SVID(request), mtls=True, repeatable=True)
        return response.svid
