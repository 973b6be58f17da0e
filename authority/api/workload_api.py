"""The SPIFFE Workload API, served by the authority on a local Unix socket (grpclib).

Existing SPIFFE clients (py-spiffe, go-spiffe, java-spiffe, Envoy via SDS, spiffe-helper) fetch
and rotate SVIDs here without any credential of their own: the kernel says who is calling.

- Every call must carry the metadata ``workload.spiffe.io: true`` (else INVALID_ARGUMENT).
- The caller is identified from the socket's peer credentials (``SO_PEERCRED``, the process
  pinned with a pidfd) by the ``unix`` attestor: selectors ``<instance>:uid:1000``,
  ``<instance>:path:/usr/bin/python3``, ``<instance>:sha256:...`` and so on, where ``<instance>``
  is ``workload_api_attestor``. When an attestor instance of that name is registered it is used
  (its configuration applies; it must be a ``unix`` one); otherwise the built-in ``unix`` plugin
  with its defaults. Registration entries whose selectors are all present decide the SPIFFE IDs;
  what is revoked is left out; nothing left: PERMISSION_DENIED "no identity issued".
- X.509-SVID keys are generated here (EC P-256) and handed to the workload with the SVID, as the
  standard requires. Each SVID is recorded as an attestation is (identity, issuance, audit), so
  renewal checks, revocation cascades and the audit trail cover it.
- Streams send the full state at once and again on every change: a bundle change, an SVID past
  half its life (re-issued), a revocation (the identity disappears; PERMISSION_DENIED when none is
  left), an entry created or deleted.
- Methods the standard does not define get UNIMPLEMENTED from grpclib.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import grpclib.server
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestors.api import AttestationRefused, PeerCredentials
from attestors.unix import UnixAttestor
from authority._pb import spiffe_workload_grpc as pb_grpclib
from authority._pb import spiffe_workload_pb2 as pb
from authority.api.local import peer_credentials
from authority.api.status import fail_grpclib_stream
from authority.bundle import TrustBundle
from authority.changes import ChangeNotifier
from authority.errors import (
    AttestationFailed,
    AuthorityError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    PermissionDenied,
)
from authority.ids import SpiffeId
from authority.models import Identity, Selector
from authority.service import Authority
from authority.svid import X509Svid

log = logging.getLogger(__name__)

HEADER = "workload.spiffe.io"
RESYNC_INTERVAL = 5.0  # seconds: the longest a stream sleeps without looking again
_REPLY_CACHE = 256  # X.509-SVID replies kept for the streams that send the same state
MIN_WAIT = 1.0  # seconds: never re-issue more often than this, whatever the SVID's life
# Streams doing their costly steps at once (identifying the caller, issuing X.509-SVIDs): the
# others wait their turn off the event loop's ready queue. Without it, 2,000 streams opened
# at once kept 2,000 tasks runnable and every other call on the loop (Ping on the TCP port, the
# attest socket) waited behind each round of them: a 3-8 s stall of a TCP Ping, 0.3-0.8 s with
# 8 (16: the same worst case, a higher median; 4: a slower storm; scripts/bench_wire.py).
BUSY_STREAMS = 8
# The built-in unix plugin's defaults, used when no instance of that name is registered.
_DEFAULT_UNIX = UnixAttestor(hash_executable=True, max_bytes=512 * 1024 * 1024)

Stream = grpclib.server.Stream[Any, Any]


@dataclass(frozen=True, slots=True)
class Caller:
    """A local process, as the kernel and the unix attestor describe it."""

    pid: int
    uid: int
    selectors: frozenset[Selector]


@dataclass(frozen=True, slots=True)
class X509Item:
    """One X.509-SVID as the standard hands it over: DER chain, PKCS#8 DER key."""

    spiffe_id: str
    chain_der: bytes
    key_der: bytes
    serial: str  # what tells one SVID from the next on a stream


class X509View(Protocol):
    """One FetchX509SVID stream's view: what to send now, and when to look again."""

    async def current(self) -> tuple[list[X509Item], TrustBundle, float]:
        """The caller's SVIDs (PERMISSION_DENIED when none is left), the bundle, and the
        seconds until something is due (a rotation)."""
        ...


class WorkloadSource(Protocol):
    """What serves the Workload API: the authority itself, or a node agent."""

    async def identify(self, peer: PeerCredentials) -> Caller: ...

    def open_x509(self, caller: Caller) -> X509View: ...

    def bundle_for(self, caller: Caller) -> TrustBundle:
        """The bundle, for a caller still entitled to some identity (else PERMISSION_DENIED)."""
        ...

    async def jwt_svids(
        self, caller: Caller, spiffe_id: SpiffeId | None, audience: list[str]
    ) -> list[tuple[str, str]]:
        """(SPIFFE ID, token) for each of the caller's identities, or the one asked."""
        ...

    def validate_jwt(self, token: str, audience: str) -> tuple[SpiffeId, dict[str, Any]]: ...

    def watch(self) -> contextlib.AbstractContextManager[asyncio.Event]:
        """An event set on every change (bundle, entries, revocations) while the block runs."""
        ...


def key_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class SpiffeWorkloadApi(pb_grpclib.SpiffeWorkloadAPIBase):
    """The standard's five calls over a ``WorkloadSource``."""

    def __init__(self, source: WorkloadSource, busy_streams: int = BUSY_STREAMS) -> None:
        self._source = source
        self._busy = asyncio.Semaphore(busy_streams)
        self._x509_replies: OrderedDict[tuple[int, tuple[str, ...]], tuple[TrustBundle, Any]] = (
            OrderedDict()
        )

    # --- the calls -----------------------------------------------------------------------

    async def FetchX509SVID(self, stream: Stream) -> None:
        await self._serve(stream, lambda caller, _: self._x509_svids(stream, caller))

    async def FetchX509Bundles(self, stream: Stream) -> None:
        await self._serve(
            stream,
            lambda caller, _: self._bundle_stream(
                stream, caller, lambda b: pb.X509BundlesResponse(bundles=_x509_bundles(b))
            ),
        )

    async def FetchJWTBundles(self, stream: Stream) -> None:
        await self._serve(
            stream,
            lambda caller, _: self._bundle_stream(
                stream, caller, lambda b: pb.JWTBundlesResponse(bundles=_jwt_bundles(b))
            ),
        )

    async def FetchJWTSVID(self, stream: Stream) -> None:
        await self._serve(
            stream, lambda caller, request: self._jwt_svids(stream, caller, request), _check_jwt
        )

    async def ValidateJWTSVID(self, stream: Stream) -> None:
        """Open to any local process (a verifier needs no identity of its own)."""
        try:
            _require_header(stream)
            request = await stream.recv_message()
            if request is None:
                raise InvalidArgument("no request")
            if not request.audience:
                raise InvalidArgument("audience is required", reason="NO_AUDIENCE")
            if not request.svid:
                raise InvalidArgument("svid is required", reason="JWT_SVID_MISSING")
            spiffe_id, claims = self._source.validate_jwt(request.svid, request.audience)
            response = pb.ValidateJWTSVIDResponse(spiffe_id=spiffe_id.uri)
            response.claims.update(claims)
            await stream.send_message(response)
        except AuthorityError as exc:
            await fail_grpclib_stream(stream, exc)
        except Exception:
            log.exception("unhandled error in ValidateJWTSVID")
            await fail_grpclib_stream(stream, Internal("unexpected"))

    # --- the flows -----------------------------------------------------------------------

    async def _x509_svids(self, stream: Stream, caller: Caller) -> None:
        view = self._source.open_x509(caller)
        sent: tuple[object, ...] | None = None
        with self._source.watch() as changed:
            while True:
                changed.clear()
                async with self._busy:
                    items, bundle, due = await view.current()
                state = (bundle, *(i.serial for i in items))
                if state != sent:
                    await stream.send_message(self._x509_reply(items, bundle))
                    sent = state
                await _wait(changed, min(RESYNC_INTERVAL, max(MIN_WAIT, due)))

    def _x509_reply(self, items: list[X509Item], bundle: TrustBundle) -> Any:
        """Built once per state, whatever the number of streams that send it (a node agent
        pushes the same SVIDs to every workload its entry selects)."""
        key = (bundle.sequence, tuple(i.serial for i in items))
        cached = self._x509_replies.get(key)
        if cached is not None and cached[0] is bundle:
            return cached[1]
        bundle_der = der_concat(bundle.x509_authorities)
        reply = pb.X509SVIDResponse(
            svids=[
                pb.X509SVID(
                    spiffe_id=i.spiffe_id,
                    x509_svid=i.chain_der,
                    x509_svid_key=i.key_der,
                    bundle=bundle_der,
                )
                for i in items
            ]
        )
        self._x509_replies[key] = (bundle, reply)
        if len(self._x509_replies) > _REPLY_CACHE:
            self._x509_replies.popitem(last=False)
        return reply

    async def _bundle_stream(
        self, stream: Stream, caller: Caller, message: Callable[[TrustBundle], Any]
    ) -> None:
        sent: bytes | None = None
        with self._source.watch() as changed:
            while True:
                changed.clear()
                reply = message(self._source.bundle_for(caller))
                encoded = reply.SerializeToString(deterministic=True)
                if encoded != sent:
                    await stream.send_message(reply)
                    sent = encoded
                await _wait(changed, RESYNC_INTERVAL)

    async def _jwt_svids(self, stream: Stream, caller: Caller, request: Any) -> None:
        wanted = SpiffeId.parse(request.spiffe_id) if request.spiffe_id else None
        # Not under ``_busy``: a node agent waits on the authority here, and a slow authority
        # must not hold up the streams that it can serve from what it holds.
        svids = await self._source.jwt_svids(caller, wanted, list(request.audience))
        await stream.send_message(
            pb.JWTSVIDResponse(svids=[pb.JWTSVID(spiffe_id=i, svid=t) for i, t in svids])
        )

    # --- plumbing ------------------------------------------------------------------------

    async def _serve(
        self,
        stream: Stream,
        flow: Callable[[Caller, Any], Awaitable[None]],
        check: Callable[[Any], None] | None = None,
    ) -> None:
        """Header, request, caller identification, then ``flow``; errors become statuses."""
        peer: PeerCredentials | None = None
        try:
            _require_header(stream)
            request = await stream.recv_message()
            if request is None:
                raise InvalidArgument("no request")
            if check is not None:
                check(request)
            async with self._busy:  # the pidfd too: a storm of waiting streams holds no fds
                peer = peer_credentials(stream)
                caller = await self._source.identify(peer)
                _close_pidfd(peer)  # the process is identified: the pin is no longer needed
                peer = None
            await flow(caller, request)
        except AuthorityError as exc:
            await fail_grpclib_stream(stream, exc)
        except Exception:
            log.exception("unhandled error on the Workload API")
            await fail_grpclib_stream(stream, Internal("unexpected"))
        finally:
            if peer is not None:
                _close_pidfd(peer)


async def unix_selectors(attestor: str, peer: PeerCredentials) -> frozenset[Selector]:
    """The caller's selectors by the built-in unix plugin with its defaults, typed ``attestor``."""
    try:
        attested = await _DEFAULT_UNIX.attest(b"", _PeerContext(peer))
    except AttestationRefused as exc:
        raise AttestationFailed(f"{attestor}: {exc.message}", reason=exc.reason) from None
    return frozenset(Selector(attestor, f"{k}:{v}") for k, v in attested.selectors)


def no_identity() -> PermissionDenied:
    return PermissionDenied("no identity issued", reason="NO_IDENTITY_ISSUED")


# --- the authority's own Workload API ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Held:
    """One X.509-SVID a stream holds for one entry, with its key and when to rotate it."""

    identity: Identity
    svid: X509Svid
    key_der: bytes
    rotate_at: dt.datetime


class AuthoritySource:
    """The authority serving local workloads itself: each stream gets SVIDs of its own (key
    made here), recorded as an attestation is, so renewal checks, revocation cascades and the
    audit trail cover them."""

    def __init__(self, authority: Authority, changes: ChangeNotifier, attestor: str) -> None:
        self._authority = authority
        self._changes = changes
        self._attestor = attestor

    async def identify(self, peer: PeerCredentials) -> Caller:
        """By the registered instance named ``attestor`` (it must be a unix one), or the
        built-in unix plugin with its defaults."""
        host = self._authority.attestors
        name = self._attestor
        if host.is_registered(name):
            plugin = host.get(name).plugin
            if plugin != UnixAttestor.plugin_name:
                raise FailedPrecondition(
                    f"workload_api_attestor {name!r} is a {plugin} attestor, not unix",
                    reason="WORKLOAD_API_ATTESTOR",
                )
            selectors = (await host.attest(name, b"", _PeerContext(peer))).selectors
        else:
            selectors = await unix_selectors(name, peer)
        return Caller(peer.pid, peer.uid, selectors)

    def open_x509(self, caller: Caller) -> X509View:
        return _AuthorityX509View(self, caller)

    def bundle_for(self, caller: Caller) -> TrustBundle:
        self.identities(caller)  # still entitled?
        return self._authority.ca.bundle()

    async def jwt_svids(
        self, caller: Caller, spiffe_id: SpiffeId | None, audience: list[str]
    ) -> list[tuple[str, str]]:
        identities = self.identities(caller)
        if spiffe_id is not None:
            identities = [i for i in identities if i.spiffe_id == spiffe_id]
            if not identities:
                raise PermissionDenied(
                    f"no identity issued for {spiffe_id}", reason="NO_IDENTITY_ISSUED"
                )
        out = []
        for identity in identities:
            svid = await self._authority.fetch_workload_jwt(identity, audience)
            out.append((svid.spiffe_id.uri, svid.token))
        return out

    def validate_jwt(self, token: str, audience: str) -> tuple[SpiffeId, dict[str, Any]]:
        return self._authority.validate_jwt_svid(token, audience)

    def watch(self) -> contextlib.AbstractContextManager[asyncio.Event]:
        return self._changes.watch()

    def identities(self, caller: Caller) -> list[Identity]:
        identities = self._authority.workload_identities(self._attestor, caller.selectors)
        if not identities:
            raise no_identity()
        return identities

    async def refresh(self, held: dict[str, _Held], caller: Caller) -> dict[str, _Held]:
        """The SVIDs to hold now, in the entries' order: a new entry gets one, an SVID past half
        its life or signed by a key no longer active is re-issued, the rest are kept; what is
        no longer granted (revoked, entry deleted) is dropped."""
        authority = self._authority
        active = authority.ca.active_x509_authority().subject
        bundle = authority.ca.bundle()
        fresh: dict[str, _Held] = {}
        for template in self.identities(caller):
            if template.entry_id is None:  # Workload API identities all come from entries
                raise Internal("an identity without an entry")
            current = held.get(template.entry_id)
            now = authority.now()
            if (
                current is not None
                and now < current.rotate_at
                and current.svid.certificate.issuer == active
                and servable(current.svid, now, bundle)
            ):
                fresh[template.entry_id] = current
                continue
            key = ec.generate_private_key(ec.SECP256R1())
            identity, svid = await authority.issue_workload_x509(
                template,
                key.public_key(),
                previous=current.identity if current else None,
                details={"pid": caller.pid, "uid": caller.uid},
            )
            # Half its life as seen from now (notBefore is backdated for clock skew).
            rotate_at = now + (svid.expires_at - now) / 2
            fresh[template.entry_id] = _Held(identity, svid, key_der(key), rotate_at)
            log.info(
                "workload API %s: spiffe_id=%s serial=%s pid=%d",
                "rotated" if current else "issued",
                svid.spiffe_id,
                svid.serial_hex,
                caller.pid,
            )
        return fresh

    def now(self) -> dt.datetime:
        return self._authority.now()

    def bundle(self) -> TrustBundle:
        return self._authority.ca.bundle()


def servable(svid: X509Svid, now: dt.datetime, bundle: TrustBundle) -> bool:
    """Whether ``svid`` may still be handed out: within its life and signed by a key still in
    the bundle. (What is revoked is not granted at all: ``AuthoritySource.identities``.)"""
    cert = svid.certificate
    return now < cert.not_valid_after_utc and any(
        authority.subject == cert.issuer for authority in bundle.x509_authorities
    )


class _AuthorityX509View:
    def __init__(self, source: AuthoritySource, caller: Caller) -> None:
        self._source = source
        self._caller = caller
        self._held: dict[str, _Held] = {}

    async def current(self) -> tuple[list[X509Item], TrustBundle, float]:
        self._held = await self._source.refresh(self._held, self._caller)
        items = [
            X509Item(h.svid.spiffe_id.uri, der_concat(h.svid.chain), h.key_der, h.svid.serial_hex)
            for h in self._held.values()
        ]
        due = min(h.rotate_at for h in self._held.values()) - self._source.now()
        return items, self._source.bundle(), due.total_seconds()


class _PeerContext:
    """The attestation context of a Workload API call: the kernel's word, no challenges."""

    def __init__(self, peer: PeerCredentials) -> None:
        self._peer = peer

    @property
    def peer(self) -> PeerCredentials | None:
        return self._peer

    async def challenge(self, payload: bytes) -> bytes:
        raise AttestationRefused("NO_CHALLENGE", "the Workload API answers no challenges")


def der_concat(certs: Iterable[x509.Certificate]) -> bytes:
    """Certificates as the standard carries them: ASN.1 DER, concatenated."""
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


def _x509_bundles(bundle: TrustBundle) -> dict[str, bytes]:
    """X.509 bundles keyed by trust domain ID: concatenated DER certificates."""
    return {bundle.trust_domain.id.uri: der_concat(bundle.x509_authorities)}


def _jwt_bundles(bundle: TrustBundle) -> dict[str, bytes]:
    """JWT bundles keyed by trust domain ID: a JWK Set of the JWT-SVID keys."""
    jwks = bundle.jwks()
    jwks["keys"] = [k for k in jwks["keys"] if k.get("use") == "jwt-svid"]
    return {bundle.trust_domain.id.uri: json.dumps(jwks, separators=(",", ":")).encode()}


def _require_header(stream: Stream) -> None:
    if stream.metadata is None or stream.metadata.get(HEADER) != "true":
        raise InvalidArgument(
            f"the {HEADER}: true header is required", reason="MISSING_WORKLOAD_HEADER"
        )


def _check_jwt(request: Any) -> None:
    if not request.audience:
        raise InvalidArgument("audience is required", reason="NO_AUDIENCE")
    if request.spiffe_id:
        SpiffeId.parse(request.spiffe_id)


def _close_pidfd(peer: PeerCredentials) -> None:
    if peer.pidfd is not None:
        with contextlib.suppress(OSError):
            os.close(peer.pidfd)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
