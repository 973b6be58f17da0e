"""What MCP gateways ask of the authority: which tools a caller could call, and the record of
the calls they handled.

Only the gateways the configuration names (``gateways``: SPIFFE IDs, matched against the
gateway's own X.509-SVID over mutual TLS) may ask; anyone else is PERMISSION_DENIED
(``NOT_A_GATEWAY``).

- ``callable_tools``: the gateway passes on the X.509-SVID its own caller presented (the leaf,
  DER). The authority checks it as it checks its own mutual-TLS peers (path validation to the
  current bundle at the authority's time, then: an SVID it issued and recorded, one URI SAN
  matching the record, entry and attestor still there, nothing revoked) and evaluates the
  running policy once per tool with ``tool.discovery`` true and empty arguments: a tool is
  listed unless the decision is DENY (an approval-required tool is listed: it can be called,
  once approved). These answers grant nothing: they are neither audited as decisions nor
  counted as the caller's denials.
- ``record``: one ``tool.call`` audit record per call the gateway handled, under the call's task
  (so ``audit trace TASK`` shows prompt, decision, token and call in order). The arguments'
  digest is kept, never their values (a record carries no values to keep).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from authority import toolcall
from authority.audit import AuditEvent
from authority.clock import Clock
from authority.config import Limits
from authority.errors import InvalidArgument, PermissionDenied, Unauthenticated
from authority.exchange import PolicySource
from authority.ids import SpiffeId
from authority.models import check_length
from authority.policy import Outcome, PolicyInput, Requested
from authority.policy.model import ToolFact
from authority.service import Authority, Caller
from authority.store import Store as AuthorityStore
from authority.tokens import check_task_id

log = logging.getLogger(__name__)

NOT_A_GATEWAY = "NOT_A_GATEWAY"
CALLER_SVID_INVALID = "CALLER_SVID_INVALID"
BAD_TOOL_RECORD = "BAD_TOOL_RECORD"
TOO_MANY_TOOLS = "TOO_MANY_TOOLS"
TOO_MANY_RECORDS = "TOO_MANY_RECORDS"
MAX_TOOLS = 1000  # tool names in one ListCallableTools
MAX_RECORDS = 500  # records in one RecordToolCalls
MAX_SVID_BYTES = 16 * 1024
MAX_JTI_CHARS = 64
MAX_REASON_CHARS = 64
MAX_REQUEST_ID_CHARS = 128
MAX_TOOL_CHARS = 128
MAX_DURATION_US = 24 * 3600 * 1_000_000
RECORD_FUTURE = dt.timedelta(minutes=5)  # a record's time may be this far ahead of ours
RECORD_PAST = dt.timedelta(days=7)  # ... and this far behind
DECISIONS = frozenset({"forwarded", "refused"})
OUTCOMES = frozenset({"ok", "error", "cut", "unreachable", ""})
_JTI = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_REASON = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
AUDIT_KIND = "tool.call"


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason=BAD_TOOL_RECORD)


@dataclass(frozen=True, slots=True)
class ToolCallRecord:
    """One call a gateway handled, checked on construction (INVALID_ARGUMENT
    ``BAD_TOOL_RECORD``, or the contract's ``BAD_TOOL_CALL`` for names, ``TOO_LONG``)."""

    caller: str  # the caller's SPIFFE ID, "" when the gateway could not tell
    task_id: str
    jti: str
    server: str
    tool: str
    arguments_sha256: str
    decision: str  # "forwarded" | "refused"
    reason: str
    upstream_status: int
    duration_us: int
    at: dt.datetime
    outcome: str
    request_id: str

    def __post_init__(self) -> None:
        if self.caller:
            SpiffeId.parse(self.caller)
        if self.task_id:
            try:
                check_task_id(self.task_id)
            except InvalidArgument as exc:
                raise _bad(exc.message) from None
        if self.jti and not _JTI.fullmatch(self.jti):
            raise _bad(f"a jti is 1..{MAX_JTI_CHARS} base64url characters")
        toolcall.check_server(self.server)
        if self.decision not in DECISIONS:
            raise _bad(f"decision is one of {', '.join(sorted(DECISIONS))}")
        if self.decision == "forwarded":
            toolcall.check_tool(self.tool)
        else:  # a refused call may have been refused for its tool's name: kept, bounded
            check_length(self.tool, MAX_TOOL_CHARS, "tool")
        if self.arguments_sha256 and not _HEX64.fullmatch(self.arguments_sha256):
            raise _bad("arguments_sha256 is a lower-case SHA-256 hex digest or empty")
        if self.decision == "forwarded" and not (self.tool and self.jti and self.task_id):
            raise _bad("a forwarded call names its tool, its token's jti and its task")
        if self.reason and not _REASON.fullmatch(self.reason):
            raise _bad(f"a reason is 1..{MAX_REASON_CHARS} letters, digits, '_', '.', ':', '-'")
        if not (self.upstream_status == 0 or 100 <= self.upstream_status <= 599):
            raise _bad("upstream_status is 0 (not forwarded) or an HTTP status")
        if not 0 <= self.duration_us <= MAX_DURATION_US:
            raise _bad(f"duration_us is within 0..{MAX_DURATION_US}")
        if self.outcome not in OUTCOMES:
            raise _bad(f"outcome is one of {', '.join(repr(o) for o in sorted(OUTCOMES))}")
        check_length(self.request_id, MAX_REQUEST_ID_CHARS, "request_id")

    @classmethod
    def from_fields(cls, *, at_us: int, **fields: object) -> ToolCallRecord:
        """``at_us`` (Unix microseconds, > 0) as the record's time."""
        if not 0 < at_us < 2**62:
            raise _bad("at_us is a positive number of Unix microseconds")
        at = dt.datetime.fromtimestamp(0, dt.UTC) + dt.timedelta(microseconds=at_us)
        return cls(at=at, **fields)  # type: ignore[arg-type]

    def resource(self) -> str:
        """The call's resource when its tool has a valid name, else its server's name."""
        valid = toolcall.TOOL_NAME.fullmatch(self.tool) and self.tool not in (".", "..")
        return toolcall.resource(self.server, self.tool) if valid else self.server

    def event(self, gateway: str, now: dt.datetime) -> AuditEvent:
        return AuditEvent(
            AUDIT_KIND,
            now,
            actor=self.caller,
            subject=self.resource(),
            task_id=self.task_id,
            details={
                "gateway": gateway,
                "jti": self.jti,
                "server": self.server,
                "tool": self.tool,
                "arguments_sha256": self.arguments_sha256,
                "decision": self.decision,
                "reason": self.reason,
                "upstream_status": self.upstream_status,
                "duration_us": self.duration_us,
                "outcome": self.outcome,
                "request_id": self.request_id,
                "at": self.at.isoformat(),
            },
        )


class RiskSource(Protocol):
    """A principal's current risk (the Exchange's): what a discovery question sees."""

    def risk(self, principal: str) -> int: ...


class ToolGateways:
    """The gateway-facing use cases: ``callable_tools`` and ``record``."""

    def __init__(
        self,
        *,
        authority: Authority,
        store: AuthorityStore,
        policy: PolicySource,
        clock: Clock,
        limits: Limits,
        gateways: Iterable[SpiffeId],
        risk: RiskSource,
    ) -> None:
        self._authority = authority
        self._store = store
        self._policy = policy
        self._clock = clock
        self._limits = limits
        self._gateways = frozenset(gateways)
        self._risk = risk

    def check_gateway(self, caller: Caller) -> None:
        if caller.spiffe_id not in self._gateways:
            raise PermissionDenied(
                f"{caller.spiffe_id} is not a configured MCP gateway (gateways)",
                reason=NOT_A_GATEWAY,
            )

    async def identify(self, svid_der: bytes) -> Caller:
        """The workload behind an X.509-SVID leaf another party verified: it must chain to the
        current bundle at our time, and pass every check a mutual-TLS caller of ours passes."""
        if not svid_der:
            raise InvalidArgument("caller_svid is required", reason=CALLER_SVID_INVALID)
        if len(svid_der) > MAX_SVID_BYTES:
            raise InvalidArgument(
                f"caller_svid is at most {MAX_SVID_BYTES} bytes", reason=CALLER_SVID_INVALID
            )
        try:
            leaf = x509.load_der_x509_certificate(svid_der)
        except ValueError:
            raise InvalidArgument(
                "caller_svid is not a DER certificate", reason=CALLER_SVID_INVALID
            ) from None
        roots = list(self._authority.ca.bundle().x509_authorities)
        verifier = (
            PolicyBuilder().store(Store(roots)).time(self._clock.now()).build_client_verifier()
        )
        try:
            verifier.verify(leaf, self._authority.ca.x509_intermediates())
        except (VerificationError, ValueError) as exc:
            raise Unauthenticated(
                f"the caller's SVID does not verify against this trust domain's bundle: {exc}",
                reason=CALLER_SVID_INVALID,
            ) from None
        return await self._authority.authenticate(leaf.public_bytes(Encoding.PEM))

    async def callable_tools(
        self,
        gateway: Caller,
        *,
        caller_svid: bytes,
        server: str,
        audience: str,
        tools: Sequence[str],
    ) -> list[str]:
        self.check_gateway(gateway)
        if len(tools) > MAX_TOOLS:
            raise InvalidArgument(
                f"at most {MAX_TOOLS} tool names in one request", reason=TOO_MANY_TOOLS
            )
        toolcall.check_server(server)
        for name in tools:
            toolcall.check_tool(name)
        if (
            not audience
            or len(audience) > self._limits.max_audience_chars
            or any(c.isspace() for c in audience)
        ):
            raise InvalidArgument("the gateway's audience is required", reason="BAD_AUDIENCE")
        caller = await self.identify(caller_svid)
        engine = self._policy.current
        identity = caller.identity
        principal = caller.spiffe_id.uri
        now = self._clock.now()
        risk = self._risk.risk(principal)
        attributes = {
            "attestor": identity.attestor,
            "entry_id": identity.entry_id or "",
            "admin": "true" if identity.admin else "false",
        }

        def decide_all() -> dict[str, bool]:
            decided: dict[str, bool] = {}
            for name in tools:
                if name in decided:
                    continue
                fact = ToolFact.discovering(server, name)
                decision = engine.decide(
                    PolicyInput(
                        principal=principal,
                        action=toolcall.ACTION,
                        resource=fact.resource,
                        audience=audience,
                        time=now,
                        risk=risk,
                        attributes=attributes,
                        requested=Requested(),
                        tool=fact,
                    )
                )
                decided[name] = decision.outcome is not Outcome.DENY
            return decided

        # Up to MAX_TOOLS decisions (about 0.2 s for 1000): in a thread, not on the loop.
        decided = await asyncio.to_thread(decide_all) if len(tools) > 16 else decide_all()
        listed = [name for name in tools if decided[name]]
        log.info(
            "callable tools: gateway=%s caller=%s server=%s asked=%d listed=%d policy=%s@%s",
            gateway.spiffe_id.uri,
            principal,
            server,
            len(tools),
            len(listed),
            engine.policy_id,
            engine.policy_version,
        )
        return listed

    async def record(self, gateway: Caller, records: Sequence[ToolCallRecord]) -> int:
        self.check_gateway(gateway)
        if len(records) > MAX_RECORDS:
            raise InvalidArgument(
                f"at most {MAX_RECORDS} records in one request", reason=TOO_MANY_RECORDS
            )
        now = self._clock.now()
        for number, record in enumerate(records):
            if not now - RECORD_PAST <= record.at <= now + RECORD_FUTURE:
                raise _bad(
                    f"record {number}: at_us is more than {RECORD_PAST.days} days ago or "
                    "ahead of the authority's clock"
                )
        if not records:
            return 0
        await self._store.append_audit([r.event(gateway.spiffe_id.uri, now) for r in records])
        log.info("tool calls recorded: gateway=%s records=%d", gateway.spiffe_id.uri, len(records))
        return len(records)


__all__ = [
    "AUDIT_KIND",
    "CALLER_SVID_INVALID",
    "MAX_RECORDS",
    "MAX_TOOLS",
    "NOT_A_GATEWAY",
    "ToolCallRecord",
    "ToolGateways",
]
