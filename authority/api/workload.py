"""The Workload service: attestation, renewal, JWT-SVIDs, bundle and server info."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization

from attestors.api import PeerCredentials
from authority import __version__
from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.api.convert import (
    approval_to_pb,
    attest_params,
    attest_response,
    audit_context_from_pb,
    bundle_to_pb,
    entry_to_pb,
    exchange_request_from_pb,
    exchange_response,
    jwt_svid_to_pb,
    seconds,
    svid_to_pb,
    task_token_to_pb,
    tool_call_records_from_pb,
)
from authority.api.revocations import RevocationFeed
from authority.api.status import abort, rpc
from authority.changes import ChangeNotifier
from authority.errors import AuthorityError, InvalidArgument, PermissionDenied, Unauthenticated
from authority.exchange import ExchangeService
from authority.service import Authority, Caller
from authority.tool_calls import NOT_A_GATEWAY, ToolGateways

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
# A node agent's sync stream looks at its caller again at least this often (seconds).
AGENT_RECHECK_SECONDS = 5.0


def peer_certificate_pem(context: Context) -> bytes | None:
    """The client's leaf certificate as gRPC verified it (mutual-TLS endpoint only)."""
    certs = list(context.auth_context().get("x509_pem_cert", ()))
    return certs[0] if certs else None


def peer_host(context: Context) -> str:
    """The caller's network address without its port ("ipv4:127.0.0.1"): whom a refusal
    budget counts (a new connection gets a new port, not a new budget)."""
    peer: str = context.peer() or ""
    return peer.rsplit(":", 1)[0] if peer.startswith(("ipv4:", "ipv6:")) else peer


class _StreamChallenger:
    """Carries attestor challenges over the Attest stream (a network peer: no kernel creds)."""

    peer: PeerCredentials | None = None

    def __init__(self, requests: AsyncIterator[pb.AttestRequest], context: Context) -> None:
        self._requests = requests
        self._context = context

    async def challenge(self, payload: bytes) -> bytes:
        await self._context.write(pb.AttestResponse(challenge=payload))
        try:
            reply = await anext(self._requests)
        except StopAsyncIteration:
            raise InvalidArgument("the stream ended before the challenge was answered") from None
        if reply.WhichOneof("step") != "challenge_response":
            raise InvalidArgument("expected a challenge_response")
        return reply.challenge_response


class WorkloadService(pb_grpc.WorkloadServicer):
    def __init__(
        self,
        authority: Authority,
        exchange: ExchangeService,
        feed: RevocationFeed,
        changes: ChangeNotifier,
        mtls_address: str,
        server_spiffe_id: str,
        *,
        tool_gateways: ToolGateways | None = None,
    ) -> None:
        self._authority = authority
        self._tool_gateways = tool_gateways
        self._exchange = exchange
        self._feed = feed
        self._changes = changes
        self._info = pb.ServerInfo(
            trust_domain=authority.trust_domain,
            spiffe_id=server_spiffe_id,
            mtls_address=mtls_address,
            version=__version__,
        )

    async def _caller(self, context: Context) -> Caller:
        pem = peer_certificate_pem(context)
        if pem is None:
            raise Unauthenticated(
                "this call needs the caller's X.509-SVID over mutual TLS; use the mutual-TLS "
                f"endpoint ({self._info.mtls_address})",
                reason="NO_CLIENT_SVID",
            )
        return await self._authority.authenticate(pem)

    @rpc
    async def Attest(  # type: ignore[override]  # writes through the context
        self, request_iterator: AsyncIterator[pb.AttestRequest], context: Context
    ) -> None:
        requests = aiter(request_iterator)
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            raise InvalidArgument("the Attest stream ended before its first message") from None
        params = attest_params(first)
        result = await self._authority.attest(
            attestor=params.attestor,
            evidence=params.evidence,
            csr=params.csr,
            challenger=_StreamChallenger(requests, context),
            spiffe_id_hint=params.spiffe_id_hint,
            origin=peer_host(context),
        )
        await context.write(attest_response(result, self._authority.ca.bundle()))

    @rpc
    async def RenewX509SVID(
        self, request: pb.RenewX509SVIDRequest, context: Context
    ) -> pb.RenewX509SVIDResponse:
        caller = await self._caller(context)
        svid = await self._authority.renew_x509(caller, request.csr)
        return pb.RenewX509SVIDResponse(svid=svid_to_pb(svid, caller.identity.entry_id))

    @rpc
    async def FetchJWTSVID(
        self, request: pb.FetchJWTSVIDRequest, context: Context
    ) -> pb.FetchJWTSVIDResponse:
        caller = await self._caller(context)
        svid = await self._authority.fetch_jwt(
            caller, list(request.audience), seconds(request.ttl_seconds, self._authority.limits)
        )
        return jwt_svid_to_pb(svid)

    @rpc
    async def GetBundle(self, request: pb.GetBundleRequest, context: Context) -> pb.Bundle:
        return bundle_to_pb(self._authority.ca.bundle())

    @rpc
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Context
    ) -> pb.ServerInfo:
        return self._info

    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        return pb.PingResponse()

    @rpc
    async def Exchange(self, request: pb.ExchangeRequest, context: Context) -> pb.ExchangeResponse:
        caller = await self._caller(context)
        outcome = await self._exchange.exchange(
            caller, exchange_request_from_pb(request, self._authority.limits)
        )
        return exchange_response(outcome, self._exchange_now())

    @rpc
    async def Delegate(self, request: pb.DelegateRequest, context: Context) -> pb.ExchangeResponse:
        caller = await self._caller(context)
        token = await self._exchange.delegate(
            caller,
            parent_token=request.parent_token,
            delegate_certificate_der=request.delegate_svid,
            action=request.action,
            resource=request.resource,
            ttl=seconds(request.ttl_seconds, self._authority.limits),
            context=audit_context_from_pb(request.context),
        )
        return pb.ExchangeResponse(token=task_token_to_pb(token), decision_id=token.decision_id)

    @rpc
    async def EndTask(self, request: pb.EndTaskRequest, context: Context) -> pb.EndTaskResponse:
        caller = await self._caller(context)
        jtis = await self._exchange.end_task(caller, request.task_id, request.reason)
        return pb.EndTaskResponse(revoked_jtis=jtis)

    @rpc
    async def GetApproval(
        self, request: pb.GetApprovalRequest, context: Context
    ) -> pb.ApprovalInfo:
        caller = await self._caller(context)
        approval = await self._exchange.approval_status(caller, request.id)
        return approval_to_pb(approval, self._exchange_now())

    # --- MCP gateways ---------------------------------------------------------------------

    def _gateways(self) -> ToolGateways:
        if self._tool_gateways is None:
            raise PermissionDenied("no MCP gateway is configured here", reason=NOT_A_GATEWAY)
        return self._tool_gateways

    @rpc
    async def ListCallableTools(
        self, request: pb.ListCallableToolsRequest, context: Context
    ) -> pb.ListCallableToolsResponse:
        gateway = await self._caller(context)
        tools = await self._gateways().callable_tools(
            gateway,
            caller_svid=request.caller_svid,
            server=request.server,
            audience=request.audience,
            tools=list(request.tools),
        )
        return pb.ListCallableToolsResponse(tools=tools)

    @rpc
    async def RecordToolCalls(
        self, request: pb.RecordToolCallsRequest, context: Context
    ) -> pb.RecordToolCallsResponse:
        gateway = await self._caller(context)
        gateways = self._gateways()
        gateways.check_gateway(gateway)  # before reading what a non-gateway sent
        recorded = await gateways.record(gateway, tool_call_records_from_pb(request.records))
        return pb.RecordToolCallsResponse(recorded=recorded)

    # --- node agents ---------------------------------------------------------------------

    @rpc
    async def SyncAgent(  # type: ignore[override]  # writes through the context
        self, request: pb.SyncAgentRequest, context: Context
    ) -> None:
        """The agent's node entries and the bundle, again on every change. The caller is
        checked again on every wake-up: a revoked or expired agent loses the stream."""
        sent = b""
        with self._changes.watch() as changed:
            while True:
                changed.clear()
                caller = await self._caller(context)
                state = pb.AgentState(
                    entries=[
                        entry_to_pb(e) for e in self._authority.node_entries(caller.spiffe_id)
                    ],
                    bundle=bundle_to_pb(self._authority.ca.bundle()),
                    active_x509_authority=self._authority.ca.active_x509_authority().public_bytes(
                        serialization.Encoding.DER
                    ),
                )
                encoded = state.SerializeToString(deterministic=True)
                if encoded != sent:
                    await context.write(state)
                    sent = encoded
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(AGENT_RECHECK_SECONDS):
                        await changed.wait()

    @rpc
    async def SignAgentSVIDs(
        self, request: pb.SignAgentSVIDsRequest, context: Context
    ) -> pb.SignAgentSVIDsResponse:
        caller = await self._caller(context)
        signed = await self._authority.sign_node_svids(
            caller, [(c.entry_id, c.csr) for c in request.csrs]
        )
        return pb.SignAgentSVIDsResponse(svids=[svid_to_pb(s, e) for s, e in signed])

    @rpc
    async def FetchAgentJWTSVID(
        self, request: pb.FetchAgentJWTSVIDRequest, context: Context
    ) -> pb.FetchJWTSVIDResponse:
        caller = await self._caller(context)
        svid = await self._authority.fetch_node_jwt(
            caller, request.entry_id, list(request.audience)
        )
        return jwt_svid_to_pb(svid)

    @rpc
    async def GetTaskKeys(self, request: pb.GetTaskKeysRequest, context: Context) -> pb.TaskKeys:
        ca = self._authority.ca
        return pb.TaskKeys(issuer=ca.issuer, jwks_json=ca.task_jwks_json())

    async def WatchRevocations(
        self, request: pb.WatchRevocationsRequest, context: Context
    ) -> AsyncIterator[pb.RevocationMessage]:
        try:
            await self._caller(context)
        except AuthorityError as exc:
            await abort(context, exc, where="WorkloadService.WatchRevocations")
        async for message in self._feed.stream(request.since):
            yield message

    def _exchange_now(self) -> dt.datetime:
        return self._authority.now()
