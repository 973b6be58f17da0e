"""The gateway as a program: its SVID from the Workload API, the authority over mutual TLS with
it (keys, revocations, ListCallableTools, RecordToolCalls), HTTPS for agents.

The composition root of ``authority gateway``: nothing else reads the configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.backoff import Backoff
from authority.client import (
    FetchedX509Svid,
    ServerRotation,
    WorkloadApiClient,
    WorkloadClient,
    read_trust_bundle,
)
from authority.errors import AuthorityError, FailedPrecondition
from authority.gateway.app import CallableTools, GatewayApp, TokenCheck
from authority.gateway.audit import AuditBatcher
from authority.gateway.config import GatewayConfig
from authority.gateway.upstream import HttpUpstream
from authority.httpserve import HttpsServer, TlsIdentity
from authority.relying import TaskKeySource, TaskTokenVerifier
from authority.watch import RevocationWatcher

log = logging.getLogger(__name__)

_T = TypeVar("_T")
RPC_TIMEOUT = 5.0
STARTUP_WAIT = 10.0


def _key_pem(svid: FetchedX509Svid) -> bytes:
    return svid.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _leaf(chain_pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(chain_pem)


class AuthorityLink:
    """The authority as the gateway reaches it: a ``WorkloadClient`` holding the gateway's
    current SVID, replaced at each rotation (the replicas' rotation is kept across)."""

    def __init__(self, config: GatewayConfig) -> None:
        self._servers = ServerRotation(config.authority, logger=log)
        self._roots = read_trust_bundle(config.trust_bundle)
        self._client: WorkloadClient | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def use(self, svid: FetchedX509Svid) -> None:
        old = self._client
        self._client = WorkloadClient(
            self._servers,
            self._roots + b"\n" + svid.bundle_pem,
            svid_chain_pem=svid.chain_pem,
            svid_key_pem=_key_pem(svid),
            backoff=Backoff(0.05, 1.0),
        )
        if old is not None:  # its streams end, and resume on the new one
            closing = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    @property
    def client(self) -> WorkloadClient:
        assert self._client is not None
        return self._client

    async def _call(
        self, fn: Callable[[pb_grpc.WorkloadAsyncStub], Awaitable[_T]], *, repeatable: bool
    ) -> _T:
        for _ in range(3):  # a call cut by our own channel swap is made on the new channel
            client = self.client
            try:
                return await client.call(fn, mtls=True, repeatable=repeatable)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is not grpc.StatusCode.CANCELLED or client is self.client:
                    raise
        raise ConnectionError("the gateway's channel kept changing under its call")

    async def get_task_keys(self, *, timeout: float) -> pb.TaskKeys:  # noqa: ASYNC109
        return await self.client.get_task_keys(timeout=timeout)

    async def watch_revocations(self, since: int) -> AsyncIterator[pb.RevocationMessage]:
        async for message in self.client.watch_revocations(since):
            yield message

    async def list_callable_tools(
        self, caller_svid: bytes, server: str, audience: str, tools: Sequence[str]
    ) -> list[str]:
        request = pb.ListCallableToolsRequest(
            caller_svid=caller_svid, server=server, audience=audience, tools=list(tools)
        )
        reply = await self._call(
            lambda s: s.ListCallableTools(request, timeout=RPC_TIMEOUT), repeatable=True
        )
        return list(reply.tools)

    async def record_tool_calls(self, records: Sequence[pb.ToolCallRecord]) -> int:
        request = pb.RecordToolCallsRequest(records=list(records))
        # Repeatable here: a batch recorded twice is better than one lost; the authority
        # may drop duplicates by (jti, request_id, at_us).
        reply = await self._call(
            lambda s: s.RecordToolCalls(request, timeout=RPC_TIMEOUT), repeatable=True
        )
        return reply.recorded

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        await asyncio.gather(*self._closing, return_exceptions=True)


class Gateway:
    """Everything ``authority gateway`` runs, started and stopped together."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.link = AuthorityLink(config)
        self.workload_api = WorkloadApiClient(config.workload_api_socket)
        self.identity: TlsIdentity | None = None
        self.spiffe_id = ""
        self.watcher = RevocationWatcher(
            self.link.watch_revocations,
            stale_after=_seconds(config.stale_after_seconds),
            backoff_initial=0.05,
            backoff_max=1.0,
            on_event=self._revoked,
            on_snapshot=self._revoked,
            name="revocation feed (gateway)",
        )
        self.keys = TaskKeySource(self.link, issuer=config.trust_domain)
        verifier = TaskTokenVerifier(
            issuer=config.trust_domain,
            audience=config.audience,
            keys=self.keys,
            revocations=self.watcher,
        )
        self.audit = AuditBatcher(
            self.link.record_tool_calls,
            backlog=config.audit_backlog,
            batch=config.audit_batch,
            flush_interval=config.audit_flush_ms / 1000,
        )
        self.upstream = HttpUpstream(timeout=config.upstream_timeout_seconds)
        self.app = GatewayApp(
            config,
            TokenCheck(verifier, self.watcher),
            CallableTools(self.link, config.audience, config.tools_list_cache_seconds),
            self.audit,
            self.upstream,
        )
        self.server: HttpsServer | None = None
        self._svids: asyncio.Task[None] | None = None

    def _revoked(self, *_: object) -> None:
        self.app.revocations_changed()

    def _take(self, svid: FetchedX509Svid) -> None:
        leaf = _leaf(svid.chain_pem)
        if not svid.spiffe_id.startswith(self.config.trust_domain.id.uri + "/"):
            raise FailedPrecondition(
                f"the Workload API gave {svid.spiffe_id}, not an ID of "
                f"{self.config.trust_domain} (trust_domain)",
                reason="WRONG_TRUST_DOMAIN",
            )
        self.spiffe_id = svid.spiffe_id
        key_pem = _key_pem(svid)
        if self.identity is None:
            self.identity = TlsIdentity(svid.chain_pem, key_pem, svid.bundle_pem)
        else:
            self.identity.update(svid.chain_pem, key_pem, svid.bundle_pem)
        self.link.use(svid)
        log.info(
            "gateway SVID %s serial=%x valid until %s",
            svid.spiffe_id,
            leaf.serial_number,
            leaf.not_valid_after_utc.isoformat(),
        )

    async def start(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def follow() -> None:
            wanted = self.config.spiffe_id
            async for svids in self.workload_api.watch_x509_svids():
                mine = [s for s in svids if not wanted or s.spiffe_id == wanted]
                if not mine:
                    log.warning("the Workload API holds no SVID for %s", wanted or "the gateway")
                    continue
                try:
                    self._take(mine[0])
                except Exception as exc:
                    if not first.done():
                        first.set_exception(exc)
                        return
                    log.error("ignoring an SVID update: %s", exc)
                    continue
                if not first.done():
                    first.set_result(None)

        self._svids = asyncio.create_task(follow(), name="gateway-svid")
        async with asyncio.timeout(timeout):
            await first
        self.watcher.start()
        self.audit.start()
        # Serve once the feed is heard and the keys are held, or after a while regardless:
        # until then every call is refused (503), never admitted unchecked.
        try:
            async with asyncio.timeout(STARTUP_WAIT):
                await self.watcher.wait_synced(STARTUP_WAIT)
                await self.keys.keys()
        except (TimeoutError, AuthorityError) as exc:
            log.warning(
                "serving before the revocation feed or the task-token keys are in hand (%s): "
                "calls are refused until they are",
                type(exc).__name__,
            )
        assert self.identity is not None
        host, _, port = self.config.listen.rpartition(":")
        self.server = HttpsServer(self.app, self.identity, host=host.strip("[]"), port=int(port))
        await self.server.start()
        log.info(
            "gateway serving %s as %s, audience %s, servers: %s",
            self.server.url,
            self.spiffe_id,
            self.config.audience,
            ", ".join(sorted(self.config.servers)),
        )

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        if self._svids is not None:
            self._svids.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._svids
        await self.audit.close()
        await self.watcher.close()
        await self.upstream.aclose()
        await self.link.close()
        await self.workload_api.close()


def _seconds(value: float) -> dt.timedelta:
    return dt.timedelta(seconds=value)


async def run_gateway(config: GatewayConfig, stop: asyncio.Event) -> None:
    gateway = Gateway(config)
    try:
        await gateway.start()
        await stop.wait()
    finally:
        await gateway.stop()
