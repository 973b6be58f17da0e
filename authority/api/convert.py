"""protobuf <-> domain, in one place."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authority._pb import authority_v1_authority_pb2 as pb
from authority.audit import AuditRecord, Checkpoint
from authority.bundle import TrustBundle, parse_jwks
from authority.config import Limits
from authority.errors import InvalidArgument
from authority.exchange import (
    AskedExchange,
    AskedToolCall,
    AuditContext,
    ExchangeOutcome,
)
from authority.ids import TrustDomain
from authority.models import (
    Approval,
    AttestorInstance,
    AuthorityKeyInfo,
    RegistrationEntry,
    Selector,
)
from authority.policy_admin import PolicyState
from authority.service import AttestResult
from authority.svid import JwtSvid, X509Svid
from authority.tokens import Intent, TaskToken
from authority.tool_calls import MAX_RECORDS, TOO_MANY_RECORDS, ToolCallRecord


def ts(when: dt.datetime) -> int:
    return int(when.timestamp())


# The largest sequence number a request may name: SQLite's INTEGER is a signed 64-bit int.
MAX_SEQ = 2**63 - 1


def seconds(value: int, limits: Limits, field: str = "ttl_seconds") -> dt.timedelta | None:
    """A request's ``*_seconds`` (0: unset) as a duration, within 0..max_request_seconds (the
    use case then applies its own, narrower bounds)."""
    if not 0 <= value <= limits.max_request_seconds:
        raise InvalidArgument(
            f"{field} must be between 0 and {limits.max_request_seconds}", reason="OUT_OF_RANGE"
        )
    return dt.timedelta(seconds=value) if value else None


def sequence(value: int, field: str) -> int:
    """A request's sequence number (``after_seq``, ``through_seq``, ``since``...), 0..MAX_SEQ."""
    if not 0 <= value <= MAX_SEQ:
        raise InvalidArgument(f"{field} must be between 0 and {MAX_SEQ}", reason="OUT_OF_RANGE")
    return value


_bundle_cache: list[tuple[TrustBundle, pb.Bundle]] = []


def bundle_to_pb(bundle: TrustBundle) -> pb.Bundle:
    """Built once per bundle (the CA makes a new one on every change)."""
    if _bundle_cache and _bundle_cache[0][0] is bundle:
        return _bundle_cache[0][1]
    message = _bundle_message(bundle)
    _bundle_cache[:] = [(bundle, message)]
    return message


def bundle_from_pb(message: pb.Bundle) -> TrustBundle:
    """A bundle as the authority sent it (a node agent's copy); INVALID_ARGUMENT if malformed."""
    try:
        authorities = tuple(x509.load_der_x509_certificate(d) for d in message.x509_authorities)
    except ValueError as exc:
        raise InvalidArgument(f"a bundle authority does not parse: {exc}") from None
    return TrustBundle(
        trust_domain=TrustDomain(message.trust_domain),
        x509_authorities=authorities,
        jwt_authorities=parse_jwks(message.jwks_json),
        sequence=message.sequence,
        refresh_hint=dt.timedelta(seconds=message.refresh_hint_seconds),
    )


def _bundle_message(bundle: TrustBundle) -> pb.Bundle:
    return pb.Bundle(
        trust_domain=bundle.trust_domain.name,
        x509_authorities=bundle.x509_der(),
        jwks_json=bundle.jwks_json(),
        sequence=bundle.sequence,
        refresh_hint_seconds=int(bundle.refresh_hint.total_seconds()),
    )


def svid_to_pb(svid: X509Svid, entry_id: str | None) -> pb.X509SVID:
    return pb.X509SVID(
        spiffe_id=svid.spiffe_id.uri,
        cert_chain=[c.public_bytes(serialization.Encoding.DER) for c in svid.chain],
        expires_at=ts(svid.expires_at),
        entry_id=entry_id or "",
    )


def selector_to_pb(selector: Selector) -> pb.Selector:
    return pb.Selector(type=selector.type, value=selector.value)


def selectors_from_pb(selectors: list[pb.Selector]) -> list[Selector]:
    return [Selector(s.type, s.value) for s in selectors]


def jwt_svid_to_pb(svid: JwtSvid) -> pb.FetchJWTSVIDResponse:
    return pb.FetchJWTSVIDResponse(
        spiffe_id=svid.spiffe_id.uri, token=svid.token, expires_at=ts(svid.expires_at)
    )


def entry_to_pb(entry: RegistrationEntry) -> pb.RegistrationEntry:
    return pb.RegistrationEntry(
        id=entry.id,
        spiffe_id=entry.spiffe_id.uri,
        selectors=[selector_to_pb(s) for s in sorted(entry.selectors)],
        x509_ttl_seconds=int(entry.x509_ttl.total_seconds()),
        jwt_ttl_seconds=int(entry.jwt_ttl.total_seconds()),
        dns_names=list(entry.dns_names),
        admin=entry.admin,
        created_at=ts(entry.created_at),
        record_prompts=entry.record_prompts,
        parent_id=entry.parent_id.uri if entry.parent_id else "",
    )


def authority_to_pb(info: AuthorityKeyInfo) -> pb.Authority:
    return pb.Authority(
        kind=str(info.kind),
        key_id=info.key_id,
        state=str(info.state),
        not_before=ts(info.not_before),
        not_after=ts(info.not_after),
        x509_certificate=info.certificate,
    )


def attestor_to_pb(record: AttestorInstance) -> pb.AttestorInstance:
    return pb.AttestorInstance(
        name=record.name,
        plugin=record.plugin,
        config_json=record.config_json,
        created_at=ts(record.created_at),
        updated_at=ts(record.updated_at),
    )


# An audit record's text fields, in the order a fragmented record fills its messages.
_AUDIT_TEXT = ("kind", "actor", "subject", "task_id", "decision_id", "details_json")


def audit_record_messages(record: AuditRecord, fragment_bytes: int) -> Iterator[pb.AuditRecord]:
    """The messages that carry ``record``: one, or for a record whose text exceeds
    ``fragment_bytes`` (UTF-8 takes at most 4 bytes a character) several, its text fields cut
    in order, each message but the last marked ``continued`` (see AuditRecordAssembler)."""
    budget = max(1, fragment_bytes // 4)
    remaining = {name: str(getattr(record, name)) for name in _AUDIT_TEXT}
    while True:
        left = budget
        text: dict[str, str] = {}
        for name in _AUDIT_TEXT:
            text[name], remaining[name] = remaining[name][:left], remaining[name][left:]
            left -= len(text[name])
        continued = any(remaining.values())
        yield pb.AuditRecord(
            seq=record.seq,
            time_us=record.time_us,
            prev_hash=record.prev_hash,
            hash=record.hash,
            continued=continued,
            **text,
        )
        if not continued:
            return


class AuditRecordAssembler:
    """Joins the messages of an ExportAudit stream back into records (a large one arrives in
    fragments: the text fields of each continue in the next)."""

    def __init__(self) -> None:
        self._parts: list[pb.AuditRecord] = []

    def add(self, msg: pb.AuditRecord) -> AuditRecord | None:
        """The record ``msg`` completes, or None while its fragments are still coming."""
        if self._parts and self._parts[0].seq != msg.seq:
            raise ValueError(f"record {self._parts[0].seq} ended without its last fragment")
        self._parts.append(msg)
        if msg.continued:
            return None
        parts, self._parts = self._parts, []
        text = {name: "".join(getattr(m, name) for m in parts) for name in _AUDIT_TEXT}
        return AuditRecord(
            seq=msg.seq, time_us=msg.time_us, prev_hash=msg.prev_hash, hash=msg.hash, **text
        )

    def finish(self) -> None:
        """At the end of the stream: a record left incomplete is an error."""
        if self._parts:
            raise ValueError(f"the export ended inside record {self._parts[0].seq}")


def checkpoint_to_pb(checkpoint: Checkpoint) -> pb.AuditCheckpoint:
    return pb.AuditCheckpoint(seq=checkpoint.seq, hash=checkpoint.hash, jws=checkpoint.jws)


def checkpoint_from_pb(msg: pb.AuditCheckpoint) -> Checkpoint:
    return Checkpoint(msg.seq, msg.hash, msg.jws)


def intent_from_pb(msg: pb.Intent) -> Intent:
    return Intent(
        action=msg.action,
        resource=msg.resource,
        purpose=msg.purpose,
        environment=msg.environment,
        parameters=dict(msg.parameters),
    )


def exchange_request_from_pb(msg: pb.ExchangeRequest, limits: Limits) -> AskedExchange:
    """An Exchange as sent: the service derives its intent and audit context from the tool call
    (and records a refusal, knowing the caller)."""
    call = msg.tool_call
    return AskedExchange(
        action=msg.intent.action,
        resource=msg.intent.resource,
        purpose=msg.intent.purpose,
        environment=msg.intent.environment,
        parameters=dict(msg.intent.parameters),
        audience=msg.audience,
        ttl=seconds(msg.ttl_seconds, limits),
        task_id=msg.task_id,
        approval_id=msg.approval_id,
        context=audit_context_from_pb(msg.context),
        tool_call=(
            AskedToolCall(call.server, call.tool, call.arguments_json)
            if msg.HasField("tool_call")
            else None
        ),
    )


def tool_call_records_from_pb(messages: Sequence[pb.ToolCallRecord]) -> list[ToolCallRecord]:
    """A gateway's records, each checked; the first bad one refuses the request, named by its
    place (its reason kept). More than MAX_RECORDS: refused before any is read."""
    if len(messages) > MAX_RECORDS:
        raise InvalidArgument(
            f"at most {MAX_RECORDS} records in one request", reason=TOO_MANY_RECORDS
        )
    records: list[ToolCallRecord] = []
    for number, msg in enumerate(messages):
        try:
            records.append(
                ToolCallRecord.from_fields(
                    at_us=msg.at_us,
                    caller=msg.caller,
                    task_id=msg.task_id,
                    jti=msg.jti,
                    server=msg.server,
                    tool=msg.tool,
                    arguments_sha256=msg.arguments_sha256,
                    decision=msg.decision,
                    reason=msg.reason,
                    upstream_status=msg.upstream_status,
                    duration_us=msg.duration_us,
                    outcome=msg.outcome,
                    request_id=msg.request_id,
                )
            )
        except InvalidArgument as exc:
            raise InvalidArgument(f"record {number}: {exc.message}", reason=exc.reason) from None
    return records


def audit_context_from_pb(msg: pb.AuditContext) -> AuditContext:
    return AuditContext(
        prompt_digest=msg.prompt_sha256,
        tool_name=msg.tool_name,
        tool_args_digest=msg.tool_args_sha256,
        model=msg.model,
        prompt=msg.prompt,
    )


def task_token_to_pb(token: TaskToken) -> pb.TaskTokenIssued:
    return pb.TaskTokenIssued(
        token=token.token,
        jti=token.jti,
        task_id=token.task_id,
        expires_at=ts(token.expires_at),
        scopes=list(token.scopes),
        may_delegate=token.may_delegate,
    )


def approval_to_pb(approval: Approval, now: dt.datetime) -> pb.ApprovalInfo:
    return pb.ApprovalInfo(
        id=approval.id,
        state=approval.effective_state(now),
        principal=approval.principal,
        task_id=approval.task_id,
        audience=approval.audience,
        intent_json=approval.intent_json,
        requested_at=ts(approval.requested_at),
        expires_at=ts(approval.expires_at),
        decided_by=approval.decided_by,
        note=approval.note,
        grant_expires_at=ts(approval.grant_expires_at) if approval.grant_expires_at else 0,
        decision_id=approval.decision_id,
    )


def exchange_response(outcome: ExchangeOutcome, now: dt.datetime) -> pb.ExchangeResponse:
    decision_id = outcome.decision.decision_id if outcome.decision else ""
    if outcome.token is not None:
        return pb.ExchangeResponse(token=task_token_to_pb(outcome.token), decision_id=decision_id)
    assert outcome.approval is not None
    return pb.ExchangeResponse(
        pending=approval_to_pb(outcome.approval, now),
        decision_id=decision_id or outcome.approval.decision_id,
    )


def attest_params(first: pb.AttestRequest | None) -> pb.AttestParams:
    """The first message of an Attest stream, checked: it must carry params with an attestor."""
    if first is None or first.WhichOneof("step") != "params":
        raise InvalidArgument("the first Attest message must carry params")
    if not first.params.attestor:
        raise InvalidArgument("params.attestor is required")
    return first.params


def attest_response(result: AttestResult, bundle: TrustBundle) -> pb.AttestResponse:
    return pb.AttestResponse(
        result=pb.AttestResult(
            svids=[svid_to_pb(s, e) for s, e in zip(result.svids, result.entry_ids, strict=True)],
            bundle=bundle_to_pb(bundle),
            selectors=sorted(str(s) for s in result.selectors),
        )
    )


def policy_info(state: PolicyState) -> pb.PolicyInfo:
    return pb.PolicyInfo(
        policy_id=state.policy_id,
        version=state.version,
        backend=state.backend,
        loaded_at=state.loaded_at_epoch,
        files=list(state.files),
        tests_passed=state.tests_passed,
        tests_total=state.tests_total,
    )
