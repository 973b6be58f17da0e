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
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpclib.server
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpclib.protocol import H2Protocol

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
MIN_WAIT = 1.0  # seconds: never re-issue more often than this, whatever the SVID's life
# The built-in unix plugin's defaults, used when no instance of that name is registered.
_DEFAULT_UNIX = UnixAttestor(hash_executable=True, max_bytes=512 * 1024 * 1024)

Stream = grpclib.server.Stream[Any, Any]


class UnixSocketServer(grpclib.server.Server):
    """grpclib's server, closing its client connections when it closes.

    grpclib's ``close`` stops listening and cancels the running calls but leaves connections to
    their clients: a client that never hangs up would keep its socket (and, on Python >= 3.12,
    ``wait_closed``) open. Each connection is closed as grpclib closes a lost one."""

    def __init__(self, handlers: list[Any]) -> None:
        super().__init__(handlers)
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()

    def _protocol_factory(self) -> H2Protocol:
        protocol = super()._protocol_factory()
        self._protocols.add(protocol)
        return protocol

    def close(self) -> None:
        super().close()
        for protocol in list(self._protocols):
            processor = getattr(protocol, "processor", None)  # set once connected
            if processor is not None:
                processor.close("the server is stopping")


@dataclass(frozen=True, slots=True)
class _Caller:
    pid: int
    uid: int
    selectors: frozenset[Selector]


@dataclass(frozen=True, slots=True)
class _Held:
    """One X.509-SVID a stream holds for one entry, with its key and when to rotate it."""

    identity: Identity
    svid: X509Svid
    key_der: bytes
    rotate_at: dt.datetime


class _PeerContext:
    """The attestation context of a Workload API call: the kernel's word, no challenges."""

    def __init__(self, peer: PeerCredentials) -> None:
        self._peer = peer

    @property
    def peer(self) -> PeerCredentials | None:
        return self._peer

    async def challenge(self, payload: bytes) -> bytes:
        raise AttestationRefused("NO_CHALLENGE", "the Workload API answers no challenges")


def _der(certs: Iterable[x509.Certificate]) -> bytes:
    """Certificates as the standard carries them: ASN.1 DER, concatenated."""
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


def _x509_bundles(bundle: TrustBundle) -> dict[str, bytes]:
    """X.509 bundles keyed by trust domain ID: concatenated DER certificates."""
    return {bundle.trust_domain.id.uri: _der(bundle.x509_authorities)}


def _jwt_bundles(bundle: TrustBundle) -> dict[str, bytes]:
    """JWT bundles keyed by trust domain ID: a JWK Set of the JWT-SVID keys."""
    jwks = bundle.jwks()
    jwks["keys"] = [k for k in jwks["keys"] if k.get("use") == "jwt-svid"]
    return {bundle.trust_domain.id.uri: json.dumps(jwks, separators=(",", ":")).encode()}


class SpiffeWorkloadApi(pb_grpclib.SpiffeWorkloadAPIBase):
    def __init__(self, authority: Authority, notifier: ChangeNotifier, attestor: str) -> None:
        self._authority = authority
        self._notifier = notifier
        self._attestor = attestor

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
            spiffe_id, claims = self._authority.validate_jwt_svid(request.svid, request.audience)
            response = pb.ValidateJWTSVIDResponse(spiffe_id=spiffe_id.uri)
            response.claims.update(claims)
            await stream.send_message(response)
        except AuthorityError as exc:
            await fail_grpclib_stream(stream, exc)
        except Exception:
            log.exception("unhandled error in ValidateJWTSVID")
            await fail_grpclib_stream(stream, Internal("unexpected"))

    # --- the flows -----------------------------------------------------------------------

    async def _x509_svids(self, stream: Stream, caller: _Caller) -> None:
        held: dict[str, _Held] = {}
        sent: tuple[object, ...] | None = None
        with self._notifier.watch() as changed:
            while True:
                changed.clear()
                held = await self._refresh(held, self._identities(caller), caller)
                bundle = self._authority.ca.bundle()
                state = (bundle, *(h.svid.serial_hex for h in held.values()))
                if state != sent:
                    bundle_der = _der(bundle.x509_authorities)
                    await stream.send_message(
                        pb.X509SVIDResponse(
                            svids=[
                                pb.X509SVID(
                                    spiffe_id=h.svid.spiffe_id.uri,
                                    x509_svid=_der(h.svid.chain),
                                    x509_svid_key=h.key_der,
                                    bundle=bundle_der,
                                )
                                for h in held.values()
                            ]
                        )
                    )
                    sent = state
                now = self._authority.now()
                due = min(h.rotate_at for h in held.values())
                wait = min(RESYNC_INTERVAL, max(MIN_WAIT, (due - now).total_seconds()))
                await _wait(changed, wait)

    async def _refresh(
        self, held: dict[str, _Held], identities: list[Identity], caller: _Caller
    ) -> dict[str, _Held]:
        """The SVIDs to hold now, in the entries' order: a new entry gets one, an SVID past half
        its life or signed by a key no longer active is re-issued, the rest are kept; what is
        no longer granted (revoked, entry deleted) is dropped."""
        active = self._authority.ca.active_x509_authority().subject
        fresh: dict[str, _Held] = {}
        for template in identities:
            if template.entry_id is None:  # Workload API identities all come from entries
                raise Internal("an identity without an entry")
            current = held.get(template.entry_id)
            now = self._authority.now()
            if (
                current is not None
                and now < current.rotate_at
                and current.svid.certificate.issuer == active
            ):
                fresh[template.entry_id] = current
                continue
            key = ec.generate_private_key(ec.SECP256R1())
            identity, svid = await self._authority.issue_workload_x509(
                template,
                key.public_key(),
                previous=current.identity if current else None,
                details={"pid": caller.pid, "uid": caller.uid},
            )
            key_der = key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            # Half its life as seen from now (notBefore is backdated for clock skew).
            rotate_at = now + (svid.expires_at - now) / 2
            fresh[template.entry_id] = _Held(identity, svid, key_der, rotate_at)
            log.info(
                "workload API %s: spiffe_id=%s serial=%s pid=%d",
                "rotated" if current else "issued",
                svid.spiffe_id,
                svid.serial_hex,
                caller.pid,
            )
        return fresh

    async def _bundle_stream(
        self, stream: Stream, caller: _Caller, message: Callable[[TrustBundle], Any]
    ) -> None:
        sent: bytes | None = None
        with self._notifier.watch() as changed:
            while True:
                changed.clear()
                self._identities(caller)  # still entitled to the bundles?
                reply = message(self._authority.ca.bundle())
                encoded = reply.SerializeToString(deterministic=True)
                if encoded != sent:
                    await stream.send_message(reply)
                    sent = encoded
                await _wait(changed, RESYNC_INTERVAL)

    async def _jwt_svids(self, stream: Stream, caller: _Caller, request: Any) -> None:
        identities = self._identities(caller)
        if request.spiffe_id:
            wanted = SpiffeId.parse(request.spiffe_id)
            identities = [i for i in identities if i.spiffe_id == wanted]
            if not identities:
                raise PermissionDenied(
                    f"no identity issued for {wanted}", reason="NO_IDENTITY_ISSUED"
                )
        svids = []
        for identity in identities:
            svid = await self._authority.fetch_workload_jwt(identity, list(request.audience))
            svids.append(pb.JWTSVID(spiffe_id=svid.spiffe_id.uri, svid=svid.token))
        await stream.send_message(pb.JWTSVIDResponse(svids=svids))

    # --- plumbing ------------------------------------------------------------------------

    async def _serve(
        self,
        stream: Stream,
        flow: Callable[[_Caller, Any], Awaitable[None]],
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
            peer = peer_credentials(stream)
            caller = await self._identify(peer)
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

    async def _identify(self, peer: PeerCredentials) -> _Caller:
        """The caller's selectors, from the kernel's credentials, by the unix attestor."""
        host = self._authority.attestors
        name = self._attestor
        ctx = _PeerContext(peer)
        if host.is_registered(name):
            plugin = host.get(name).plugin
            if plugin != UnixAttestor.plugin_name:
                raise FailedPrecondition(
                    f"workload_api_attestor {name!r} is a {plugin} attestor, not unix",
                    reason="WORKLOAD_API_ATTESTOR",
                )
            selectors = (await host.attest(name, b"", ctx)).selectors
        else:
            try:
                attested = await _DEFAULT_UNIX.attest(b"", ctx)
            except AttestationRefused as exc:
                raise AttestationFailed(f"{name}: {exc.message}", reason=exc.reason) from None
            selectors = frozenset(Selector(name, f"{k}:{v}") for k, v in attested.selectors)
        return _Caller(peer.pid, peer.uid, selectors)

    def _identities(self, caller: _Caller) -> list[Identity]:
        identities = self._authority.workload_identities(self._attestor, caller.selectors)
        if not identities:
            raise PermissionDenied("no identity issued", reason="NO_IDENTITY_ISSUED")
        return identities


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
