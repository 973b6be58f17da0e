"""The node agent (``authority agent``): the SPIFFE Workload API on machines other than the
authority's.

It attests itself once (join token, x509pop or a platform JWT) and keeps its own SVID and key on
disk (``<data-dir>/agent/identity.pem``, 0600, one file replaced atomically), renewed at half its
life, so a restart needs no new join token. Over
mutual TLS with that SVID it holds three streams and calls open to the authority:

- ``SyncAgent``: the node entries it serves (entries whose ``parent_id`` is its SPIFFE ID) and
  the bundle, pushed on every change;
- ``WatchRevocations``: applied at once: an identity whose subject, entry, attestor or agent is
  revoked is dropped from every open stream (PERMISSION_DENIED when nothing is left), an SVID
  signed by a revoked key is re-issued;
- ``SignAgentSVIDs`` (batched) and ``FetchAgentJWTSVID``: SVIDs for the workloads of its
  entries. Workload keys are generated here and never leave the node.

One X.509-SVID is held per entry, shared by every workload the entry matches, re-issued at
about half its life and pushed on the open streams at once; JWT-SVIDs are cached per entry
and audience until half their life. Local callers are identified by the kernel (the ``unix``
attestor's selectors, typed ``workload_attestor``), as on the authority's own Workload API.

When the authority cannot be reached the agent keeps serving what it holds until it expires
(availability over freshness, as SPIRE agents do) and logs the revocation feed's silence; with
``fail_closed`` it serves nothing (UNAVAILABLE) while the feed is silent past ``stale_after``.
It never serves an SVID past its ``not_after``, signed by a key that left the bundle or revoked;
its health says NOT_SERVING when an SVID it serves is past 3/4 of its life (overdue for rotation)
or one of its tasks is down.

Unattended: its tasks (sync, rotation, own renewal) run under a ``Supervisor``; every retry loop
backs off with full jitter (0.5 s doubling to 10 s) and the authority's reachability is logged
once per change ("authority lost: UNAVAILABLE ..." / "authority restored after 43s"). A call
cut by the agent's own channel swap (its SVID renewed) is made again on the new channel. The
latest bundle received is kept beside the SVID (``<data-dir>/agent/bundle.pem``, 0600, replaced
atomically) and trusted on the next start: ``trust_bundle_pem`` is for first contact only.

Several servers (``AgentConfig.server``: the authority's replicas on one database): a call or
stream that cannot reach the current one moves the agent to the next (``ServerRotation``); its
calls are all repeatable and are made there at once, its streams reopen there after their
backoff, the revocation feed from the last sequence number it applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpclib.const
import grpclib.exceptions
import grpclib.server
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2

from attestors.api import PeerCredentials
from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.api.convert import bundle_from_pb
from authority.api.grpclib_server import UnixSocketServer
from authority.api.status import error_from_status
from authority.api.workload_api import (
    RESYNC_INTERVAL,
    Caller,
    SpiffeWorkloadApi,
    X509Item,
    X509View,
    der_concat,
    key_der,
    no_identity,
    unix_selectors,
)
from authority.backoff import Backoff, LinkState
from authority.binding import check_unix_socket_free
from authority.bundle import TrustBundle, jwk_thumbprint
from authority.changes import Waiters
from authority.client import (
    Responder,
    ServerRotation,
    WorkloadClient,
    der_chain_to_pem,
    make_csr,
    new_key,
    server_addresses,
)
from authority.config import MAX_UNIX_SOCKET_PATH
from authority.errors import (
    AuthorityError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
)
from authority.ids import SpiffeId
from authority.jwt_svid import check_jwt_svid
from authority.keyvault import private_key_pem, write_private_file
from authority.models import Selector
from authority.supervisor import Outage, Supervisor, describe
from authority.watch import RevocationWatcher

log = logging.getLogger(__name__)

SIGN_BATCH = 64  # the authority's max_node_csrs default
JWT_CACHE_SIZE = 4096
UPSTREAM_CALLS = 64
BACKOFF_INITIAL = 0.5  # every retry loop's backoff: full jitter, doubling from here...
# ...up to this. The agent is one client per node, and what it serves expires: a short SVID
# (30 s, rotated at half life) must be signed again within the 15 s an outage leaves it.
BACKOFF_MAX = 10.0
FEED_BACKOFF_MAX = 5.0  # the revocation feed's cap: what it misses is served meanwhile
STALE_FEED = dt.timedelta(seconds=15)  # the revocation feed's silence that counts as stale
OVERDUE = 0.75  # an SVID past this fraction of its life should have been rotated: unhealthy
SWAP_RETRIES = 3  # a call cut by the agent's own channel swap is made again, this many times
_AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
# The authority cannot be reached (as opposed to a refusal, which it answers).
_UNREACHABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
)
SYNC_TASK = "agent-sync"
ROTATE_TASK = "agent-rotate"
RENEW_TASK = "agent-renew"
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class AttestProof:
    """How the agent proves itself: an attestor instance, its evidence, a challenge responder.
    ``reusable``: whether the proof may be presented again (a join token may not)."""

    attestor: str
    evidence: bytes
    respond: Responder | None = None
    reusable: bool = False


@dataclass(frozen=True, slots=True)
class AgentConfig:
    # HOST:PORT of the authority's server-TLS endpoint, or several (its replicas, in the order
    # to try): the agent moves to the next when one cannot be reached.
    server: str | Sequence[str]
    trust_bundle_pem: bytes  # roots that verify the authority at first contact
    data_dir: Path
    socket: Path  # where the Workload API is served
    proof: AttestProof | None = None  # needed unless a saved SVID is still good
    workload_attestor: str = "unix"  # the selector type of the local callers
    spiffe_id_hint: str = ""
    socket_mode: int = 0o666  # any local process may ask; the kernel says who it is
    # Serve nothing (UNAVAILABLE) while the revocation feed is stale, instead of what is held.
    fail_closed: bool = False
    stale_after: dt.timedelta = STALE_FEED

    @property
    def servers(self) -> tuple[str, ...]:
        return server_addresses(self.server)

    def __post_init__(self) -> None:
        server_addresses(self.server)  # at least one
        if len(str(self.socket).encode()) > MAX_UNIX_SOCKET_PATH:
            raise InvalidArgument(
                f"the Workload API socket path must be at most {MAX_UNIX_SOCKET_PATH} bytes"
            )


@dataclass(frozen=True, slots=True)
class NodeEntry:
    id: str
    spiffe_id: SpiffeId
    selectors: frozenset[Selector]

    @classmethod
    def from_pb(cls, entry: pb.RegistrationEntry) -> NodeEntry:
        return cls(
            entry.id,
            SpiffeId.parse(entry.spiffe_id),
            frozenset(Selector(s.type, s.value) for s in entry.selectors),
        )


def _union_pem(saved: bytes | None, configured: bytes) -> bytes:
    """The certificates of both PEM bundles, each once (saved first)."""
    if not saved:
        return configured
    seen: set[bytes] = set()
    blocks: list[bytes] = []
    for pem in (saved, configured):
        try:
            certificates = x509.load_pem_x509_certificates(pem)
        except ValueError:
            continue
        for cert in certificates:
            der = cert.public_bytes(serialization.Encoding.DER)
            if der not in seen:
                seen.add(der)
                blocks.append(cert.public_bytes(serialization.Encoding.PEM))
    return b"".join(blocks) or configured


@dataclass(frozen=True, slots=True)
class HeldSvid:
    """The X.509-SVID the agent holds for one entry (its key never leaves this process)."""

    entry: NodeEntry
    item: X509Item
    not_after: dt.datetime
    rotate_at: dt.datetime
    overdue_at: dt.datetime  # still held past this: rotation is failing (health says so)
    issuer: x509.Name
    issuer_kid: str  # the signing key, as revocations of kind ``key`` name it


@dataclass(slots=True)
class AgentStats:
    signed: int = 0  # X.509-SVIDs received from the authority
    sign_calls: int = 0
    jwt_fetched: int = 0
    jwt_cached: int = 0
    dropped: int = 0  # held SVIDs dropped for a revocation or a deleted entry
    own_renewals: int = 0
    syncs: int = 0
    attestations: int = 0
    first_sync_s: float = 0.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class NodeAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.stats = AgentStats()
        self.spiffe_id: SpiffeId | None = None
        self._attestor = ""  # the instance that attested this agent (revocations name it)
        self._identity_path = config.data_dir / "agent" / "identity.pem"
        self._meta_path = config.data_dir / "agent" / "agent.json"
        self._bundle_path = config.data_dir / "agent" / "bundle.pem"
        # The roots that verify the authority: the latest bundle received, kept on disk; the
        # configured trust bundle only until the first one arrives.
        self._bundle_pem = _union_pem(self._saved_bundle(), config.trust_bundle_pem)
        self._bundle: TrustBundle | None = None
        self._active_issuer: x509.Name | None = None
        # The bundle's X.509 authorities' key ids, by subject (what revocations of keys name).
        self._authority_kids: dict[x509.Name, str] = {}
        self._synced_changes = False  # a sync brought news the streams have not been told
        self._client: WorkloadClient | None = None
        # Which of the authority's servers is used now, kept across the clients of the agent's
        # successive SVIDs: a renewal does not send it back to a server that failed.
        self._servers = ServerRotation(config.servers, logger=log)
        self._own_not_after = _now()
        self._own_rotate_at = _now()
        self._own_overdue_at = _now()
        self._generation = 0  # bumped on every channel swap (a new SVID of the agent's own)
        self._reach = LinkState("authority", log)
        self._sign_backoff = Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        self._sign_retry_at = 0.0  # monotonic: signing failed, not again before this
        self.supervisor = Supervisor(
            backoff_initial=BACKOFF_INITIAL,
            backoff_cap=BACKOFF_MAX,
            generation=lambda: self._generation,
            expected=(grpc.aio.AioRpcError, ConnectionError, OSError, AuthorityError),
        )
        self._entries: dict[str, NodeEntry] = {}
        self._held: dict[str, HeldSvid] = {}
        self._refused: dict[str, float] = {}  # entry id -> monotonic time to ask again
        self._jwts: OrderedDict[tuple[str, tuple[str, ...]], tuple[str, float, float]] = (
            OrderedDict()
        )
        self._changes = Waiters()
        self._jwt_flights: dict[tuple[str, tuple[str, ...]], asyncio.Future[str]] = {}
        # Upstream calls in flight at once: well under the authority's stream limit.
        self._upstream = asyncio.Semaphore(UPSTREAM_CALLS)
        self._wake = asyncio.Event()
        self._watcher = RevocationWatcher(
            self._open_feed,
            stale_after=config.stale_after,
            backoff_initial=BACKOFF_INITIAL,
            backoff_max=FEED_BACKOFF_MAX,
            on_event=lambda _: self._wake.set(),
            on_snapshot=self._wake.set,
        )
        self._first_call: grpc.aio.UnaryStreamCall[Any, Any] | None = None
        self._own_pem = (b"", b"")  # the agent's SVID chain and key, PEM
        self._client_roots = b""  # the roots its channel verifies the authority with
        self._closing: set[asyncio.Task[None]] = set()
        self._server: UnixSocketServer | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Attest (or reuse the saved SVID), take the first entries and bundle, sign what they
        need, then open the Workload API socket: a workload never sees a half-started agent.
        A socket another agent is serving on is refused first, before a proof is spent."""
        check_unix_socket_free(self.config.socket, "--workload-api-socket", "agent")
        began = time.monotonic()
        async with asyncio.timeout(timeout):
            saved = self._load_saved()
            if saved:
                try:
                    first = await self._first_sync()
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in _AUTH_CODES or self.config.proof is None:
                        raise
                    log.warning("saved agent SVID refused (%s): attesting again", exc.code().name)
                    await self._attest()
                    first = await self._first_sync()
            else:
                await self._attest()
                first = await self._first_sync()
            self._watcher.start()
            await self._watcher.wait_synced(timeout)  # what was revoked before we came
            await self._reconcile()
            self.stats.first_sync_s = time.monotonic() - began
        self._first_call = first
        self.supervisor.start(SYNC_TASK, self._sync_loop)
        self.supervisor.start(ROTATE_TASK, self._rotate_loop)
        self.supervisor.start(RENEW_TASK, self._own_renewal_loop)
        await self._serve()
        log.info(
            "agent serving: spiffe_id=%s entries=%d socket=%s",
            self.spiffe_id,
            len(self._entries),
            self.config.socket,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            self.config.socket.unlink(missing_ok=True)
        await self.supervisor.stop()
        await self._watcher.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def _serve(self) -> None:
        path = self.config.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self._server = UnixSocketServer([SpiffeWorkloadApi(AgentSource(self)), AgentHealth(self)])
        old = os.umask(0o177)
        try:
            await self._server.start(path=str(path))
        finally:
            os.umask(old)
        os.chmod(path, self.config.socket_mode)

    # --- the agent's own identity ----------------------------------------------------------

    def _load_saved(self) -> bool:
        """Use the SVID saved by an earlier run, if it is whole and valid for a while."""
        try:
            data = self._identity_path.read_bytes()
            meta = json.loads(self._meta_path.read_text())
            chain, _, key_block = data.partition(_KEY_BEGIN)
            key_pem = _KEY_BEGIN + key_block
            leaf = x509.load_pem_x509_certificate(chain)
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if key.public_key() != leaf.public_key():
            log.warning("the saved agent SVID and key do not match: ignored")
            return False
        if _now() >= leaf.not_valid_after_utc - dt.timedelta(seconds=5):
            return False
        self._use_svid(chain, key_pem, leaf, str(meta["attestor"]))
        return True

    def _saved_bundle(self) -> bytes | None:
        # Trusted on start together with --trust-bundle (``_union_pem``): the saved one covers
        # rotations since first contact, the configured one an agent stopped across a rotation
        # whose operator handed it the current bundle.
        """The bundle kept by an earlier run, if it holds at least one certificate."""
        try:
            data = self._bundle_path.read_bytes()
            x509.load_pem_x509_certificates(data)
        except (OSError, ValueError):
            return None
        return data

    def _keep_bundle(self, pem: bytes) -> None:
        """Trust ``pem`` from now on, and on the next start (0600, replaced atomically)."""
        self._bundle_pem = pem
        self._bundle_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_file(self._bundle_path, pem)

    async def _attest(self) -> None:
        proof = self.config.proof
        if proof is None:
            raise FailedPrecondition(
                "the agent has no valid saved SVID and no proof to attest with",
                reason="AGENT_NO_PROOF",
            )
        key = new_key()
        async with WorkloadClient(self._servers, self._bundle_pem) as client:
            result = await client.attest(
                proof.attestor,
                proof.evidence,
                key,
                respond=proof.respond,
                spiffe_id_hint=self.config.spiffe_id_hint,
            )
        if not result.svids:
            raise FailedPrecondition("the authority returned no SVID", reason="AGENT_NO_SVID")
        chain = der_chain_to_pem(list(result.svids[0].cert_chain))
        self._keep_bundle(der_chain_to_pem(list(result.bundle.x509_authorities)))
        self._adopt(chain, key, proof.attestor)
        self.stats.attestations += 1
        log.info("agent attested: spiffe_id=%s attestor=%s", self.spiffe_id, proof.attestor)

    def _adopt(self, chain: bytes, key: ec.EllipticCurvePrivateKey, attestor: str) -> None:
        """A new SVID of the agent's own: on disk first, then in use."""
        self._save(chain, key, attestor)
        leaf = x509.load_pem_x509_certificate(chain)
        self._use_svid(chain, private_key_pem(key), leaf, attestor)

    def _save(self, chain: bytes, key: ec.EllipticCurvePrivateKey, attestor: str) -> None:
        """The SVID and its key in one file (0600, fsync'd, replaced atomically): a crash
        leaves the old pair or the new one, never a key beside another's certificate."""
        folder = self._identity_path.parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private_file(self._meta_path, json.dumps({"attestor": attestor}).encode())
        write_private_file(self._identity_path, chain + private_key_pem(key))

    def _use_svid(self, chain: bytes, key: bytes, leaf: x509.Certificate, attestor: str) -> None:
        """Talk to the authority with this SVID from now on. Streams on the previous channel
        end and reconnect on this one."""
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        (uri,) = san.get_values_for_type(x509.UniformResourceIdentifier)
        self.spiffe_id = SpiffeId.parse(uri)
        self._attestor = attestor
        now = _now()
        self._own_not_after = leaf.not_valid_after_utc
        self._own_rotate_at = now + (self._own_not_after - now) / 2
        self._own_overdue_at = now + (self._own_not_after - now) * OVERDUE
        self._own_pem = (chain, key)
        self._connect()

    def _connect(self) -> None:
        """A new channel with the agent's SVID and the roots in hand. Streams on the previous
        channel end and reconnect on this one; its calls in flight are made again."""
        chain, key = self._own_pem
        old = self._client
        self._generation += 1
        self._client_roots = self._bundle_pem
        self._client = WorkloadClient(
            self._servers,
            self._bundle_pem,
            svid_chain_pem=chain,
            svid_key_pem=key,
            backoff=Backoff(BACKOFF_INITIAL, BACKOFF_MAX),
        )
        if old is not None:  # its streams end and reconnect on the new channel
            closing = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _mtls(self) -> pb_grpc.WorkloadAsyncStub:
        """The current server's mutual-TLS stub (its channels are kept by the client)."""
        assert self._client is not None
        return await self._client.mtls_stub()

    async def _call(self, call: Callable[[pb_grpc.WorkloadAsyncStub], Awaitable[_T]]) -> _T:
        """One call to the authority, on the next server when the current one cannot be
        reached: every call the agent makes is repeatable (SignAgentSVIDs and RenewX509SVID
        sign fresh CSRs, FetchAgentJWTSVID mints a token: done twice, one answer is kept).
        A call cut by the agent's own channel swap (its SVID renewed meanwhile) is made again
        on the new channel; a call cancelled otherwise is a ConnectionError, not a silent end
        of the task making it."""
        for _ in range(SWAP_RETRIES):
            generation = self._generation
            assert self._client is not None
            try:
                return await self._client.call(call, mtls=True, repeatable=True)
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                if self._generation == generation:
                    raise ConnectionError("the call to the authority was cancelled") from None
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.CANCELLED or self._generation == generation:
                    raise
        raise ConnectionError("the agent's channel kept changing under its call")

    def _unreachable(self, exc: BaseException, address: str | None = None) -> None:
        """Logged once until the authority answers again; a stream on ``address`` that was cut
        moves the agent to the next server. A channel made before the latest bundle arrived
        is made again with it: the authority's certificate may be signed by a key the old
        roots do not hold (a CA rotation while connected)."""
        if isinstance(exc, grpc.aio.AioRpcError):
            details = " ".join((exc.details() or "").split())[:200]
            reason = f"{exc.code().name} {details}".strip()
            moves = exc.code() in _UNREACHABLE
        else:
            reason = describe(exc)
            moves = isinstance(exc, ConnectionError | OSError)
        self._reach.lost(reason)
        if address is not None and moves:
            self._servers.failed(address, reason)
        if self._client is not None and self._client_roots != self._bundle_pem:
            log.info("agent reconnecting with the latest bundle it received")
            self._connect()

    def _reached(self) -> None:
        self._reach.restored()
        # The authority answers: a revocation feed still waiting out its backoff comes back now.
        self._watcher.retry_now()

    @property
    def reachable(self) -> bool:
        return self._reach.up

    @property
    def server(self) -> str:
        """The authority server (of those configured) the agent uses now."""
        return self._servers.current

    async def renew(self) -> None:
        """Renew the agent's own SVID now (the renewal task does it at half its life)."""
        await self._renew_own()

    async def _own_renewal_loop(self) -> None:
        backoff = Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        while True:
            await asyncio.sleep(max(0.0, (self._own_rotate_at - _now()).total_seconds()))
            try:
                await self._renew_own()
                backoff.reset()
                self.supervisor.ok(RENEW_TASK)
                continue
            except grpc.aio.AioRpcError as exc:
                proof = self.config.proof
                if exc.code() in _AUTH_CODES and proof is not None and proof.reusable:
                    log.warning("agent SVID renewal refused (%s): attesting again", exc.code().name)
                    with contextlib.suppress(Exception):
                        await self._attest()
                        continue
                if exc.code() in _UNREACHABLE:
                    self._unreachable(exc)
                else:
                    log.warning("agent SVID renewal refused: %s", exc.code().name)
            except (ConnectionError, OSError) as exc:
                self._unreachable(exc)
            await asyncio.sleep(backoff.next_delay())

    async def _renew_own(self) -> None:
        key = new_key()
        request = pb.RenewX509SVIDRequest(csr=make_csr(key))
        response = await self._call(lambda stub: stub.RenewX509SVID(request))
        self._reached()
        chain = der_chain_to_pem(list(response.svid.cert_chain))
        self._adopt(chain, key, self._attestor)
        self.stats.own_renewals += 1
        log.info("agent SVID renewed: spiffe_id=%s", self.spiffe_id)

    # --- entries and bundle ----------------------------------------------------------------

    async def _first_sync(self) -> grpc.aio.UnaryStreamCall[Any, Any]:
        """The first state, from the first server that answers (the stream is repeatable:
        it begins with the whole state); the stream stays open on that server."""

        async def first(
            stub: pb_grpc.WorkloadAsyncStub,
        ) -> tuple[grpc.aio.UnaryStreamCall[Any, Any], Any]:
            call = stub.SyncAgent(pb.SyncAgentRequest())
            try:
                return call, await call.read()
            except BaseException:
                call.cancel()
                raise

        assert self._client is not None
        call, state = await self._client.call(first, mtls=True, repeatable=True)
        if not isinstance(state, pb.AgentState):  # grpc.aio.EOF: the stream ended at once
            raise ConnectionError("the authority closed the sync stream")
        self._apply(state)
        return call

    async def _sync_loop(self) -> None:
        """Follow SyncAgent: reconnect with backoff when it ends; at once after a swap."""
        call, self._first_call = self._first_call, None
        backoff = Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        while True:
            generation = self._generation
            address = self._servers.current  # the first call was made there too
            try:
                if call is None:
                    call = (await self._mtls()).SyncAgent(pb.SyncAgentRequest())
                while isinstance(state := await call.read(), pb.AgentState):
                    self._apply(state)
                    self._reached()
                    self.supervisor.ok(SYNC_TASK)
                    backoff.reset()
                raise ConnectionError("the authority ended the sync stream")
            except asyncio.CancelledError:
                if _cancelling():
                    if call is not None:
                        call.cancel()
                    raise
                if self._generation == generation:  # not our swap: the call died under us
                    self._unreachable(ConnectionError("the sync stream was cancelled"), address)
                    await asyncio.sleep(backoff.next_delay())
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.CANCELLED or self._generation == generation:
                    self._unreachable(exc, address)
                    await asyncio.sleep(backoff.next_delay())
            except ConnectionError as exc:
                self._unreachable(exc, address)
                await asyncio.sleep(backoff.next_delay())
            call = None

    def _apply(self, state: pb.AgentState) -> None:
        self.stats.syncs += 1
        self._entries = {e.id: NodeEntry.from_pb(e) for e in state.entries}
        bundle = bundle_from_pb(state.bundle)
        active = x509.load_der_x509_certificate(state.active_x509_authority)
        self._active_issuer = active.subject
        if self._bundle is None or bundle.sequence != self._bundle.sequence:
            self._bundle = bundle
            self._keep_bundle(bundle.pem())
            self._authority_kids = {
                cert.subject: jwk_thumbprint(key)
                for cert in bundle.x509_authorities
                if isinstance(key := cert.public_key(), ec.EllipticCurvePublicKey)
            }
            log.info("agent bundle: sequence=%d", bundle.sequence)
        # The rotator tells the streams, once it has re-signed what the change calls for: a
        # workload sees the new bundle with the SVIDs that go with it.
        self._synced_changes = True
        self._wake.set()

    def _open_feed(self, since: int) -> Any:
        """The revocation feed from ``since`` (the watcher's last sequence number: it resumes,
        on the next server when the current one was lost: the numbers are the database's)."""

        async def stream() -> Any:
            assert self._client is not None
            try:
                async for message in self._client.watch_revocations(since):
                    self._reached()
                    yield message
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.CANCELLED:
                    self._unreachable(exc)
                raise

        return stream()

    # --- the SVIDs held for the entries ----------------------------------------------------

    def revoked(self, entry: NodeEntry) -> bool:
        """Whether ``entry`` may not be served now: its entry, subject, this agent or the
        attestor behind it is revoked."""
        has = self._watcher.revoked.has
        now_us = int(time.time() * 1_000_000)
        return (
            has("entry", entry.id, now_us)
            or has("subject", entry.spiffe_id.uri, now_us)
            or (self.spiffe_id is not None and has("subject", self.spiffe_id.uri, now_us))
            or has("attestor", self._attestor, now_us)
        )

    async def _rotate_loop(self) -> None:
        stale = Outage("revocation feed", lost="silent", restored="heard again", logger=log)
        while True:
            self._wake.clear()
            due = await self._reconcile()
            self.supervisor.ok(ROTATE_TASK)
            staleness = self._watcher.staleness()
            if staleness is not None and staleness > self.config.stale_after.total_seconds():
                stale.fail(f"nothing for {staleness:.0f}s (serving what is held)")
            else:
                stale.ok()
            # Signing failed: not again before the backoff says (a wake-up does not hurry it).
            hold = self._sign_retry_at - time.monotonic()
            if hold > 0:
                due = max(due, hold)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(RESYNC_INTERVAL, max(0.05, due))):
                    await self._wake.wait()

    async def _reconcile(self) -> float:
        """Drop what may no longer be served (at once, before any call), then sign what is
        missing or due. Returns the seconds until the next rotation is due."""
        now = _now()
        kept: dict[str, HeldSvid] = {}
        for entry_id, held in self._held.items():
            entry = self._entries.get(entry_id)
            if entry is None or self.revoked(entry) or now >= held.not_after:
                self._dropped(held)
                continue
            # An entry updated since it was signed (entry update: selectors, TTLs): what is
            # held is served under the entry as it is now, not as it was.
            kept[entry_id] = held if held.entry == entry else dataclasses.replace(held, entry=entry)
        if kept != self._held:
            self._held = kept
            self._jwts.clear()
            self._changes.notify()
        bundle_kids = self._authority_kids.values()
        key_revoked = self._watcher.revoked.has
        now_us = int(now.timestamp() * 1_000_000)
        clock = time.monotonic()
        wanted = [
            e
            for e in self._entries.values()
            if not self.revoked(e)
            and self._refused.get(e.id, 0.0) <= clock
            and (
                e.id not in self._held
                or now >= self._held[e.id].rotate_at
                or self._held[e.id].issuer_kid not in bundle_kids
                or self._held[e.id].issuer != self._active_issuer
                or key_revoked("key", self._held[e.id].issuer_kid, now_us)
            )
        ]
        if wanted and time.monotonic() >= self._sign_retry_at:
            await self._sign(wanted)
        if self._synced_changes:
            self._synced_changes = False
            self._changes.notify()
        due = [h.rotate_at for h in self._held.values()]
        return (min(due) - _now()).total_seconds() if due else RESYNC_INTERVAL

    async def _sign(self, entries: list[NodeEntry]) -> None:
        for start in range(0, len(entries), SIGN_BATCH):
            batch = entries[start : start + SIGN_BATCH]
            keys = [new_key() for _ in batch]
            request = pb.SignAgentSVIDsRequest(
                csrs=[
                    pb.AgentCSR(entry_id=e.id, csr=make_csr(k))
                    for e, k in zip(batch, keys, strict=True)
                ]
            )
            try:
                self.stats.sign_calls += 1
                # A call cut by the agent's own renewal is made again on the new channel.
                response = await self._sign_call(request)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.PERMISSION_DENIED and len(batch) > 1:
                    for entry in batch:  # find the refused one(s); the batch is all or nothing
                        await self._sign([entry])
                    continue
                if exc.code() is grpc.StatusCode.PERMISSION_DENIED:
                    log.warning("agent signing refused: entry=%s %s", batch[0].id, exc.details())
                    self._refused[batch[0].id] = time.monotonic() + BACKOFF_MAX
                    # The authority no longer vouches for this identity (revoked, say, while
                    # the feed was away): what is held for it is not served a moment longer.
                    self._forget(batch[0].id)
                    continue
                self._signing_failed(exc)
                return
            except ConnectionError as exc:
                self._signing_failed(exc)
                return
            self._reached()
            self._sign_backoff.reset()
            self._sign_retry_at = 0.0
            self._take(batch, keys, list(response.svids))

    def _forget(self, entry_id: str) -> None:
        held = self._held.pop(entry_id, None)
        if held is None:
            return
        self._dropped(held)
        self._jwts.clear()
        self._changes.notify()

    def _dropped(self, held: HeldSvid) -> None:
        self.stats.dropped += 1
        log.info("agent dropped: entry=%s spiffe_id=%s", held.entry.id, held.entry.spiffe_id)

    async def _sign_call(self, request: pb.SignAgentSVIDsRequest) -> pb.SignAgentSVIDsResponse:
        return await self._call(lambda stub: stub.SignAgentSVIDs(request))

    def _signing_failed(self, exc: BaseException) -> None:
        """The authority did not answer: logged once (unreachable), tried again after the
        backoff, not at every wake-up."""
        if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in _UNREACHABLE:
            log.warning("agent signing failed: %s %s", exc.code().name, exc.details())
        else:
            self._unreachable(exc)
        self._sign_retry_at = time.monotonic() + self._sign_backoff.next_delay()

    def _take(
        self, batch: list[NodeEntry], keys: list[ec.EllipticCurvePrivateKey], svids: list[Any]
    ) -> None:
        now = _now()
        for entry, key, svid in zip(batch, keys, svids, strict=True):
            chain = [x509.load_der_x509_certificate(d) for d in svid.cert_chain]
            leaf = chain[0]
            if leaf.public_key() != key.public_key():
                log.error("the authority signed another key for entry %s: dropped", entry.id)
                continue
            not_after = leaf.not_valid_after_utc
            self._held[entry.id] = HeldSvid(
                entry=entry,
                item=X509Item(
                    entry.spiffe_id.uri, der_concat(chain), key_der(key), svid_serial(leaf)
                ),
                not_after=not_after,
                rotate_at=now + (not_after - now) / 2,
                overdue_at=now + (not_after - now) * OVERDUE,
                issuer=leaf.issuer,
                issuer_kid=self._authority_kids.get(leaf.issuer, ""),
            )
            self._refused.pop(entry.id, None)
            self.stats.signed += 1
            log.info(
                "agent holds: entry=%s spiffe_id=%s serial=%s",
                entry.id,
                entry.spiffe_id,
                svid_serial(leaf),
            )
        self._changes.notify()

    # --- what the Workload API asks ---------------------------------------------------------

    def matching(self, caller: Caller) -> list[HeldSvid]:
        if self.config.fail_closed and not self._watcher.fresh():
            raise Unavailable(
                "the agent's revocation feed is stale: serving nothing until it returns",
                reason="AGENT_FEED_STALE",
            )
        selected = [
            h
            for h in self._held.values()
            if h.entry.selectors <= caller.selectors and not self.revoked(h.entry)
        ]
        now = _now()
        held = [h for h in selected if self.servable(h, now)]
        if not held:
            if selected or any(  # entitled, but nothing valid in hand: the authority is away
                e.selectors <= caller.selectors
                and not self.revoked(e)
                and e.id not in self._refused
                for e in self._entries.values()
            ):
                raise Unavailable(
                    "the agent holds no valid SVID for this caller now: try again",
                    reason="AGENT_NO_VALID_SVID",
                )
            raise no_identity()
        held.sort(key=lambda h: (h.entry.spiffe_id, h.entry.id))
        return held

    def servable(self, held: HeldSvid, now: dt.datetime) -> bool:
        """Whether ``held`` may be handed out now: within its life, signed by a key still in
        the bundle and not revoked (the rotation task drops it soon; this is the last word)."""
        if now >= held.not_after or held.issuer_kid not in self._authority_kids.values():
            return False
        now_us = int(now.timestamp() * 1_000_000)
        return not self._watcher.revoked.has("key", held.issuer_kid, now_us)

    def bundle(self) -> TrustBundle:
        if self._bundle is None:
            raise no_identity()
        return self._bundle

    async def jwt_svid(self, entry: NodeEntry, audience: list[str]) -> str:
        """A JWT-SVID for ``entry``: from the cache until half its life, else from the
        authority, one call per (entry, audience) however many workloads ask at once."""
        key = (entry.id, tuple(sorted(set(audience))))
        cached = self._jwts.get(key)
        if cached is not None and time.time() < cached[1]:
            self.stats.jwt_cached += 1
            self._jwts.move_to_end(key)
            return cached[0]
        flight = self._jwt_flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(self._fetch_jwt(key, entry, audience))
            self._jwt_flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        # Shielded: a workload that hangs up does not cancel the others' answer.
        return await asyncio.shield(flight)

    def _landed(self, key: tuple[str, tuple[str, ...]], done: asyncio.Future[str]) -> None:
        self._jwt_flights.pop(key, None)
        if not done.cancelled():
            done.exception()  # observed here, whether or not a workload still waits

    async def _fetch_jwt(
        self, key: tuple[str, tuple[str, ...]], entry: NodeEntry, audience: list[str]
    ) -> str:
        async with self._upstream:
            try:
                request = pb.FetchAgentJWTSVIDRequest(entry_id=entry.id, audience=audience)
                response = await self._call(lambda stub: stub.FetchAgentJWTSVID(request))
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _UNREACHABLE:
                    self._unreachable(exc)
                raise error_from_status(exc) from None
            except ConnectionError as exc:
                self._unreachable(exc)
                raise Unavailable("the authority cannot be reached now") from None
        self.stats.jwt_fetched += 1
        now = time.time()
        refresh_at = now + (response.expires_at - now) / 2
        self._jwts[key] = (response.token, refresh_at, float(response.expires_at))
        if len(self._jwts) > JWT_CACHE_SIZE:
            self._jwts.popitem(last=False)
        return str(response.token)

    def healthy(self) -> bool:
        """Its own SVID valid and not overdue for renewal, its revocation feed fresh, a bundle
        in hand, no SVID it serves overdue for rotation (past 3/4 of its life), none missing
        while the authority is unreachable, and none of its tasks down."""
        now = _now()
        return (
            now < self._own_overdue_at
            and self._watcher.fresh()
            and self._bundle is not None
            and all(now < h.overdue_at for h in self._held.values())
            and (self.reachable or not self._unserved())
            and self.supervisor.healthy()
        )

    def _unserved(self) -> bool:
        """Whether an entry it should serve has no SVID held (one that expired was dropped):
        unhealthy while the authority cannot be asked for one (a new entry, with the authority
        answering, is only a signing round away)."""
        clock = time.monotonic()
        return any(
            e.id not in self._held and not self.revoked(e) and self._refused.get(e.id, 0.0) <= clock
            for e in self._entries.values()
        )

    def is_subject_revoked(self, subject: str) -> bool:
        return self._watcher.revoked.has("subject", subject, int(time.time() * 1_000_000))

    def watch(self) -> contextlib.AbstractContextManager[asyncio.Event]:
        return self._changes.watch()

    @property
    def held(self) -> dict[str, HeldSvid]:
        return dict(self._held)

    @property
    def feed_seq(self) -> int:
        return self._watcher.seq

    # --- read by the metrics endpoint (authority/prom.py) ---

    @property
    def own_not_after(self) -> dt.datetime:
        return self._own_not_after

    @property
    def workload_streams(self) -> int:
        """Workload API streams open (each X.509-SVID or bundle stream watches for changes)."""
        return self._changes.watching

    @property
    def sync_connected(self) -> bool:
        return self._reach.up and not self.supervisor.is_down(SYNC_TASK)

    @property
    def feed_staleness(self) -> float | None:
        """Seconds since the revocation feed was last heard (None: never)."""
        return self._watcher.staleness()


def _cancelling() -> bool:
    """Whether the running task is being cancelled (not merely a gRPC call inside it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def svid_serial(cert: x509.Certificate) -> str:
    return format(cert.serial_number, "x")


_KEY_BEGIN = b"-----BEGIN PRIVATE KEY-----"


class AgentHealth:
    """``grpc.health.v1.Health`` on the agent's socket (grpclib), with grpcio-health-checking's
    messages: grpclib's own health module registers the same protobuf names, and both cannot
    live in one process. SERVING for the whole server ("") and for "SpiffeWorkloadAPI" while
    ``NodeAgent.healthy`` (no SVID, its own included, past 3/4 of its life; the revocation feed
    fresh; a bundle in hand; no task down); else NOT_SERVING. Check only: probes poll."""

    def __init__(self, agent: NodeAgent) -> None:
        self._agent = agent

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            "/grpc.health.v1.Health/Check": grpclib.const.Handler(
                self.Check,
                grpclib.const.Cardinality.UNARY_UNARY,
                health_pb2.HealthCheckRequest,
                health_pb2.HealthCheckResponse,
            )
        }

    async def Check(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        if request.service not in ("", "SpiffeWorkloadAPI"):
            raise grpclib.exceptions.GRPCError(grpclib.const.Status.NOT_FOUND, "unknown service")
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self._agent.healthy()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await stream.send_message(health_pb2.HealthCheckResponse(status=status))


class AgentSource:
    """The agent as a ``WorkloadSource``: what it holds, for the callers its entries select."""

    def __init__(self, agent: NodeAgent) -> None:
        self._agent = agent

    async def identify(self, peer: PeerCredentials) -> Caller:
        selectors = await unix_selectors(self._agent.config.workload_attestor, peer)
        return Caller(peer.pid, peer.uid, selectors)

    def open_x509(self, caller: Caller) -> X509View:
        return _AgentX509View(self._agent, caller)

    def bundle_for(self, caller: Caller) -> TrustBundle:
        self._agent.matching(caller)
        return self._agent.bundle()

    async def jwt_svids(
        self, caller: Caller, spiffe_id: SpiffeId | None, audience: list[str]
    ) -> list[tuple[str, str]]:
        held = self._agent.matching(caller)
        if spiffe_id is not None:
            held = [h for h in held if h.entry.spiffe_id == spiffe_id]
            if not held:
                raise PermissionDenied(
                    f"no identity issued for {spiffe_id}", reason="NO_IDENTITY_ISSUED"
                )
        tokens = await asyncio.gather(*(self._agent.jwt_svid(h.entry, audience) for h in held))
        return [(h.entry.spiffe_id.uri, t) for h, t in zip(held, tokens, strict=True)]

    def validate_jwt(self, token: str, audience: str) -> tuple[SpiffeId, dict[str, Any]]:
        return check_jwt_svid(
            token, audience, self._agent.bundle(), _now(), self._agent.is_subject_revoked
        )

    def watch(self) -> contextlib.AbstractContextManager[asyncio.Event]:
        return self._agent.watch()


class _AgentX509View:
    def __init__(self, agent: NodeAgent, caller: Caller) -> None:
        self._agent = agent
        self._caller = caller

    async def current(self) -> tuple[list[X509Item], TrustBundle, float]:
        held = self._agent.matching(self._caller)
        # Look again when the first one expires, at the latest (it is not sent past that).
        expires = min(h.not_after for h in held) - _now()
        return [h.item for h in held], self._agent.bundle(), expires.total_seconds()


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    agent = NodeAgent(config)
    await agent.start()
    try:
        await stop.wait()
    finally:
        await agent.stop()


__all__ = [
    "AgentConfig",
    "AgentSource",
    "AttestProof",
    "NodeAgent",
    "run_agent",
]
