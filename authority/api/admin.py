"""The Admin service, served only on the operator Unix socket (file permissions are the gate)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

import grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.api.convert import (
    approval_to_pb,
    attestor_to_pb,
    audit_record_messages,
    authority_to_pb,
    bundle_to_pb,
    checkpoint_to_pb,
    entry_to_pb,
    policy_info,
    seconds,
    selectors_from_pb,
    sequence,
    ts,
)
from authority.api.revocations import RevocationFeed
from authority.api.status import REASON_KEY, rpc, rpc_stream
from authority.attestation import parse_config
from authority.console.server import ConsoleServer
from authority.errors import FailedPrecondition, InvalidArgument
from authority.exchange import ExchangeService
from authority.metrics import METRICS
from authority.models import RevocationKind, check_json, check_length
from authority.policy_admin import PolicyAdmin
from authority.service import Authority

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
ADMIN_SERVICE = "authority.v1.Admin"
FOLLOW_POLL_SECONDS = 0.2


class AdminService(pb_grpc.AdminServicer):
    def __init__(
        self,
        authority: Authority,
        exchange: ExchangeService,
        policy: PolicyAdmin,
        feed: RevocationFeed,
        *,
        console: ConsoleServer | None = None,
    ) -> None:
        self._authority = authority
        self._console = console
        self._exchange = exchange
        self._policy = policy
        self._feed = feed
        self._limits = authority.limits

    @rpc
    async def CreateEntry(
        self, request: pb.CreateEntryRequest, context: Context
    ) -> pb.RegistrationEntry:
        entry = await self._authority.create_entry(
            spiffe_id=request.spiffe_id,
            selectors=selectors_from_pb(list(request.selectors)),
            x509_ttl=seconds(request.x509_ttl_seconds, self._limits, "x509_ttl_seconds"),
            jwt_ttl=seconds(request.jwt_ttl_seconds, self._limits, "jwt_ttl_seconds"),
            dns_names=list(request.dns_names),
            admin=request.admin,
            record_prompts=request.record_prompts,
            parent_id=request.parent_id,
            force=request.force,
        )
        return entry_to_pb(entry)

    @rpc
    async def UpdateEntry(
        self, request: pb.UpdateEntryRequest, context: Context
    ) -> pb.RegistrationEntry:
        entry = await self._authority.update_entry(
            request.id,
            selectors=selectors_from_pb(list(request.selectors))
            if request.replace_selectors
            else None,
            x509_ttl=self._optional_seconds(request, "x509_ttl_seconds"),
            jwt_ttl=self._optional_seconds(request, "jwt_ttl_seconds"),
            dns_names=list(request.dns_names) if request.replace_dns_names else None,
            record_prompts=request.record_prompts if request.HasField("record_prompts") else None,
            force=request.force,
        )
        return entry_to_pb(entry)

    def _optional_seconds(
        self, request: pb.UpdateEntryRequest, field: Literal["x509_ttl_seconds", "jwt_ttl_seconds"]
    ) -> dt.timedelta | None:
        """Unset: None (unchanged); 0: a zero duration (the configured default)."""
        if not request.HasField(field):
            return None
        return seconds(getattr(request, field), self._limits, field) or dt.timedelta(0)

    @rpc
    async def ListEntries(
        self, request: pb.ListEntriesRequest, context: Context
    ) -> pb.ListEntriesResponse:
        return pb.ListEntriesResponse(
            entries=[entry_to_pb(e) for e in self._authority.list_entries()]
        )

    @rpc
    async def GetEntry(self, request: pb.GetEntryRequest, context: Context) -> pb.RegistrationEntry:
        return entry_to_pb(self._authority.get_entry(request.id))

    @rpc
    async def DeleteEntry(
        self, request: pb.DeleteEntryRequest, context: Context
    ) -> pb.DeleteEntryResponse:
        await self._authority.delete_entry(request.id)
        return pb.DeleteEntryResponse()

    @rpc
    async def CreateJoinToken(
        self, request: pb.CreateJoinTokenRequest, context: Context
    ) -> pb.CreateJoinTokenResponse:
        secret, token = await self._authority.create_join_token(
            request.spiffe_id, seconds(request.ttl_seconds, self._limits)
        )
        return pb.CreateJoinTokenResponse(
            token=secret, token_id=token.token_id, expires_at=ts(token.expires_at)
        )

    @rpc
    async def GetBundle(self, request: pb.GetBundleRequest, context: Context) -> pb.Bundle:
        return bundle_to_pb(self._authority.ca.bundle())

    @rpc
    async def RotateCA(self, request: pb.RotateCARequest, context: Context) -> pb.RotateCAResponse:
        infos = await self._authority.ca.rotate(immediate=request.immediate)
        log.info("operator rotated the CA: immediate=%s", request.immediate)
        return pb.RotateCAResponse(authorities=[authority_to_pb(i) for i in infos])

    @rpc
    async def RegisterAttestor(
        self, request: pb.RegisterAttestorRequest, context: Context
    ) -> pb.AttestorInstance:
        record = await self._authority.attestors.register(
            request.name, request.plugin, parse_config(request.config_json, self._limits)
        )
        return attestor_to_pb(record)

    @rpc
    async def UpdateAttestor(
        self, request: pb.UpdateAttestorRequest, context: Context
    ) -> pb.AttestorInstance:
        record = await self._authority.attestors.update(
            request.name, parse_config(request.config_json, self._limits)
        )
        return attestor_to_pb(record)

    @rpc
    async def ListAttestors(
        self, request: pb.ListAttestorsRequest, context: Context
    ) -> pb.ListAttestorsResponse:
        host = self._authority.attestors
        return pb.ListAttestorsResponse(
            attestors=[attestor_to_pb(r) for r in host.instances()], plugins=host.plugins()
        )

    @rpc
    async def GetAttestor(
        self, request: pb.GetAttestorRequest, context: Context
    ) -> pb.AttestorInstance:
        return attestor_to_pb(self._authority.attestors.get(request.name))

    @rpc
    async def UnregisterAttestor(
        self, request: pb.UnregisterAttestorRequest, context: Context
    ) -> pb.UnregisterAttestorResponse:
        await self._authority.unregister_attestor(request.name)
        return pb.UnregisterAttestorResponse()

    @rpc_stream
    async def ExportAudit(
        self, request: pb.ExportAuditRequest, context: Context
    ) -> AsyncIterator[pb.AuditRecord]:
        """The chain in pages bounded in records and bytes; a record larger than
        limits.audit_fragment_bytes goes out in fragments (``continued``)."""
        after = sequence(request.after_seq, "after_seq")
        tasks = list(request.task_ids)
        fragment = self._limits.audit_fragment_bytes
        while True:
            batch = await self._authority.audit_records(after_seq=after, task_ids=tasks)
            for record in batch:
                after = record.seq
                if record.time_us >= request.since_time_us:
                    for message in audit_record_messages(record, fragment):
                        yield message
            if not batch:
                if not request.follow:
                    return
                await asyncio.sleep(FOLLOW_POLL_SECONDS)

    @rpc
    async def GetAuditInfo(self, request: pb.GetAuditInfoRequest, context: Context) -> pb.AuditInfo:
        (
            (anchor_seq, anchor_hash),
            (head_seq, head_hash),
            checkpoints,
        ) = await self._authority.audit_info()
        return pb.AuditInfo(
            anchor_seq=anchor_seq,
            anchor_prev_hash=anchor_hash,
            head_seq=head_seq,
            head_hash=head_hash,
            checkpoints=[checkpoint_to_pb(c) for c in checkpoints],
            jwks_json=self._authority.ca.bundle().jwks_json(),
        )

    @rpc
    async def CheckpointAudit(
        self, request: pb.CheckpointAuditRequest, context: Context
    ) -> pb.AuditCheckpoint:
        checkpoint = await self._authority.checkpoint(sequence(request.seq, "seq") or None)
        if checkpoint is None:
            raise FailedPrecondition("the audit chain is empty", reason="AUDIT_EMPTY")
        return checkpoint_to_pb(checkpoint)

    @rpc
    async def PruneAudit(
        self, request: pb.PruneAuditRequest, context: Context
    ) -> pb.PruneAuditResponse:
        through = sequence(request.through_seq, "through_seq")
        return pb.PruneAuditResponse(removed=await self._authority.prune_audit(through))

    @rpc
    async def ListApprovals(
        self, request: pb.ListApprovalsRequest, context: Context
    ) -> pb.ListApprovalsResponse:
        now = self._authority.now()
        infos = [approval_to_pb(a, now) for a in await self._exchange.list_approvals()]
        if not request.all:
            infos = [i for i in infos if i.state == "pending"]
        return pb.ListApprovalsResponse(approvals=infos)

    @rpc
    async def Approve(self, request: pb.ApproveRequest, context: Context) -> pb.ApprovalInfo:
        approval = await self._exchange.approve(
            request.id,
            grant=seconds(request.grant_seconds, self._limits, "grant_seconds"),
            note=request.note,
        )
        return approval_to_pb(approval, self._authority.now())

    @rpc
    async def Deny(self, request: pb.DenyRequest, context: Context) -> pb.ApprovalInfo:
        approval = await self._exchange.deny(request.id, reason=request.reason)
        return approval_to_pb(approval, self._authority.now())

    @rpc
    async def CreateConsoleSignIn(
        self, request: pb.CreateConsoleSignInRequest, context: Context
    ) -> pb.ConsoleSignIn:
        links = self._console.links if self._console is not None else None
        if links is None:
            raise FailedPrecondition(
                "no console is served here (authority serve --console-listen)",
                reason="NO_CONSOLE",
            )
        url, expires = await links.mint(
            request.operator, seconds(request.ttl_seconds, self._limits, "ttl_seconds")
        )
        return pb.ConsoleSignIn(url=url, expires_at=int(expires.timestamp()))

    @rpc
    async def EndConsoleSessions(
        self, request: pb.EndConsoleSessionsRequest, context: Context
    ) -> pb.EndConsoleSessionsResponse:
        links = self._console.links if self._console is not None else None
        if links is None:
            raise FailedPrecondition(
                "no console is served here (authority serve --console-listen)",
                reason="NO_CONSOLE",
            )
        check_length(request.operator, self._limits.max_reason_chars, "operator")
        sessions, dropped = await links.end_sessions(request.operator)
        return pb.EndConsoleSessionsResponse(sessions=sessions, links=dropped)

    @rpc
    async def LoadPolicy(self, request: pb.LoadPolicyRequest, context: Context) -> pb.PolicyInfo:
        files = {f.name: f.content for f in request.files}
        for name, content in files.items():
            if name.endswith(".json"):  # policy tests: the loader parses them
                self._check_json(
                    content, f"policy file {name[:64]!r}", self._limits.max_message_bytes
                )
        return policy_info(await self._policy.load(files, allow_untested=request.allow_untested))

    @rpc
    async def GetPolicy(self, request: pb.GetPolicyRequest, context: Context) -> pb.PolicyInfo:
        return policy_info(self._policy.state())

    @rpc
    async def ExplainPolicy(
        self, request: pb.ExplainPolicyRequest, context: Context
    ) -> pb.ExplainPolicyResponse:
        self._check_json(request.input_json, "input_json")
        return pb.ExplainPolicyResponse(explanation_json=self._policy.explain(request.input_json))

    @rpc
    async def Revoke(self, request: pb.RevokeRequest, context: Context) -> pb.RevokeResponse:
        try:
            kind = RevocationKind(request.kind)
        except ValueError:
            raise InvalidArgument(
                f"kind must be one of {', '.join(k.value for k in RevocationKind)}",
                reason="BAD_REVOCATION_KIND",
            ) from None
        if not request.reason.strip():
            raise InvalidArgument("a revocation needs a reason", reason="NO_REASON")
        stored = await self._authority.revocations.revoke(
            kind, request.target, request.reason, actor="operator", preemptive=request.preemptive
        )
        return pb.RevokeResponse(revocations=[self._feed.event(r) for r in stored])

    @rpc_stream
    async def WatchRevocations(
        self, request: pb.WatchRevocationsRequest, context: Context
    ) -> AsyncIterator[pb.RevocationMessage]:
        async for message in self._feed.stream(sequence(request.since, "since")):
            yield message

    @rpc
    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: Context
    ) -> pb.GetMetricsResponse:
        snapshot = METRICS.snapshot()
        if request.reset:
            METRICS.reset()
        return pb.GetMetricsResponse(metrics_json=json.dumps(snapshot, sort_keys=True))

    @rpc
    async def ListAuthorities(
        self, request: pb.ListAuthoritiesRequest, context: Context
    ) -> pb.ListAuthoritiesResponse:
        return pb.ListAuthoritiesResponse(
            authorities=[authority_to_pb(i) for i in self._authority.ca.authorities()]
        )

    def _check_json(self, text: str, what: str, max_bytes: int | None = None) -> None:
        check_json(
            text,
            max_bytes=max_bytes or self._limits.max_json_bytes,
            max_depth=self._limits.max_json_depth,
            what=what,
        )


class RefuseAdminHandler(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """On the workload endpoints, operator calls get PERMISSION_DENIED, not UNIMPLEMENTED."""

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes] | None:
        method: str = handler_call_details.method
        if not method.startswith(f"/{ADMIN_SERVICE}/"):
            return None

        async def refuse(request: bytes, context: Context) -> bytes:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "operator calls are served only on the admin Unix socket",
                trailing_metadata=((REASON_KEY, "ADMIN_ON_WORKLOAD_ENDPOINT"),),
            )
            return b""

        return grpc.unary_unary_rpc_method_handler(refuse)
