"""Exchange: a workload trades its SVID for a task token, decided now by policy-as-code.

Every exchange is decided at request time by the running policy (allow / deny /
require-approval); nothing is inferred from an earlier decision. The decision, with its full
input (the intent, the prompt digest and tool call the agent gave for audit), goes into the
audit chain in the same transaction as what it caused: the token's lineage record, the pending
approval, or nothing at all for a denial.

- A token is bound to the caller's X.509-SVID (``cnf`` x5t#S256) and lives no longer than the
  policy's cap, the caller's request, the SVID, an approval's grant, and 15 minutes.
- Elevation: a require-approval decision creates a pending approval bound to the exact intent
  and audience; an operator approves it (for a limited time) or denies it; the agent collects
  its token by exchanging again with the approval id. An approval yields one token.
- Delegation: the holder of a task token names another workload by its X.509-SVID; the child
  token is bound to that certificate, carries the chain in ``act``, and may only narrow: the
  same or a smaller scope and resource, the same audience, an earlier expiry, one less depth.
- EndTask ends the task: no token is issued for it again, and its tokens are listed for
  revocation.
- MCP tool calls: an Exchange that carries a tool call gets the intent the authority derives
  from it (action ``tools.call``, resource ``mcp/<server>/<tool>``, the parameter
  ``mcp.arguments_sha256`` computed from the arguments) and the policy sees the arguments
  (``tool``); an Exchange without one may not ask for that action, that resource kind or a
  parameter under ``mcp.``, so every tool-call token carries a digest the authority computed.
  Its approval is bound to the digest with the rest of the intent; its delegation keeps the
  exact resource and the digest.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from authority import toolcall
from authority.audit import AuditEvent, bounded, digest
from authority.ca import CertificateAuthority
from authority.clock import Clock
from authority.config import Limits, format_duration
from authority.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from authority.metrics import METRICS
from authority.models import (
    Approval,
    ApprovalState,
    RevocationKind,
    TaskTokenRecord,
    check_length,
)
from authority.policy import (
    Decision,
    Outcome,
    PolicyEngine,
    PolicyInput,
    Requested,
    resource_environment,
    resource_kind,
)
from authority.policy.model import ToolFact
from authority.service import OPERATOR, Authority, Caller
from authority.store import Store
from authority.tokens import (
    HARD_MAX_TTL,
    Intent,
    TaskToken,
    check_task_id,
    mint,
    resource_within,
    verify,
    x5t_s256,
)

log = logging.getLogger(__name__)

_HEX64 = frozenset("0123456789abcdef")
MAX_PROMPT_CHARS = 64 * 1024
_EXCHANGE = METRICS.samples("exchange.handler")  # wall time of one Exchange in the authority
RISK_WINDOW = 600.0  # seconds of denials that raise a principal's risk
RISK_PER_DENIAL = 10  # eight denials in ten minutes reach 80
# A task seen open here is taken as open for this long without a store read. A task revoked
# meanwhile (and so ended) is in the revoked set for longer (HARD_MAX_TTL and more), and a task
# in it is always read from the store; EndTask here forgets the task at once.
OPEN_TASK_SECONDS = 60.0
_OPEN_TASKS_MAX = 10_000


# Told of a pending approval this process created: the approval, its intent, the decision.
ApprovalHook = Callable[[Approval, Intent, Decision], None]


class PolicySource(Protocol):
    """Where the running policy comes from (reloaded without restart)."""

    @property
    def current(self) -> PolicyEngine: ...


@dataclass(frozen=True, slots=True)
class AuditContext:
    """What the agent tells us for the record: digests and names, never content."""

    prompt_digest: str = ""
    tool_name: str = ""
    tool_args_digest: str = ""
    model: str = ""
    prompt: str = ""  # the text itself: audited only where the caller's entry allows it

    def __post_init__(self) -> None:
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"a prompt is at most {MAX_PROMPT_CHARS} characters")
        if self.prompt:
            computed = digest(self.prompt)
            if self.prompt_digest and self.prompt_digest != computed:
                raise InvalidArgument("prompt_sha256 is not the SHA-256 of the prompt given")
            object.__setattr__(self, "prompt_digest", computed)
        for name in ("prompt_digest", "tool_args_digest"):
            value = getattr(self, name)
            if value and (len(value) != 64 or not set(value) <= _HEX64):
                raise InvalidArgument(f"{name} must be a lower-case SHA-256 hex digest")
        if len(self.tool_name) > 128 or len(self.model) > 128:
            raise InvalidArgument("tool_name and model are at most 128 characters")

    def as_details(self, *, with_prompt: bool = False) -> dict[str, str]:
        """For the audit: digests and names; the prompt's text only ``with_prompt``."""
        details = {
            k: v
            for k, v in (
                ("prompt_sha256", self.prompt_digest),
                ("tool", self.tool_name),
                ("tool_args_sha256", self.tool_args_digest),
                ("model", self.model),
            )
            if v
        }
        if with_prompt and self.prompt:
            details["prompt"] = self.prompt
        return details


TOOL_CALL_MISMATCH = "TOOL_CALL_MISMATCH"  # the intent or audit context names another call
TOOL_CALL_REQUIRED = "TOOL_CALL_REQUIRED"  # tools.call / mcp/... asked for without a tool call
RESERVED_PARAMETER = "RESERVED_PARAMETER"  # a parameter under mcp. named by the caller


def _reserved_parameters(parameters: Mapping[str, str]) -> None:
    reserved = sorted(k for k in parameters if k.startswith(toolcall.PARAMETER_PREFIX))
    if reserved:
        raise InvalidArgument(
            f"parameter {bounded(reserved[0], 64)!r}: names under "
            f"{toolcall.PARAMETER_PREFIX!r} are set by the authority only",
            reason=RESERVED_PARAMETER,
        )


def check_plain_intent(intent: Intent) -> Intent:
    """An intent asked for without a tool call: not one only a tool call may have."""
    if intent.action == toolcall.ACTION or resource_kind(intent.resource) == toolcall.RESOURCE_KIND:
        raise InvalidArgument(
            f"action {toolcall.ACTION!r} and resources under {toolcall.RESOURCE_KIND + '/'!r} "
            "are for MCP tool calls: send the call (ExchangeRequest.tool_call), and the "
            "authority derives the intent from it",
            reason=TOOL_CALL_REQUIRED,
        )
    _reserved_parameters(intent.parameters)
    return intent


def tool_call_intent(
    call: toolcall.ToolCall,
    *,
    action: str,
    resource: str,
    purpose: str,
    environment: str,
    parameters: Mapping[str, str],
) -> Intent:
    """The intent of an Exchange for ``call``: the action and resource derived from it (those
    the request names, if any, must be the same), the request's parameters plus the digest of
    the arguments (the request may not name one under ``mcp.``)."""
    if action and action != toolcall.ACTION:
        raise InvalidArgument(
            f"a tool call's action is {toolcall.ACTION!r}, not {bounded(action, 64)!r}",
            reason=TOOL_CALL_MISMATCH,
        )
    if resource and resource != call.resource:
        raise InvalidArgument(
            f"the tool call's resource is {call.resource!r}, not {bounded(resource, 300)!r}",
            reason=TOOL_CALL_MISMATCH,
        )
    _reserved_parameters(parameters)
    return Intent(
        action=toolcall.ACTION,
        resource=call.resource,
        purpose=purpose,
        environment=environment,
        parameters={**parameters, **call.parameters()},
    )


def tool_call_context(call: toolcall.ToolCall, context: AuditContext) -> AuditContext:
    """The audit context of a tool call's Exchange: its tool name and argument digest are the
    call's (given ones must be the same)."""
    if context.tool_name and context.tool_name != call.tool:
        raise InvalidArgument(
            f"context.tool_name {bounded(context.tool_name, 128)!r} is not the call's tool "
            f"{call.tool!r}",
            reason=TOOL_CALL_MISMATCH,
        )
    if context.tool_args_digest and context.tool_args_digest != call.digest:
        raise InvalidArgument(
            "context.tool_args_sha256 is not the digest of the call's arguments",
            reason=TOOL_CALL_MISMATCH,
        )
    return dataclasses.replace(context, tool_name=call.tool, tool_args_digest=call.digest)


@dataclass(frozen=True, slots=True)
class ExchangeRequest:
    """An Exchange as the use case takes it. With ``tool_call``, ``intent`` and ``context``
    must be those ``tool_call_intent`` and ``tool_call_context`` derive (checked again)."""

    intent: Intent
    audience: str
    ttl: dt.timedelta | None = None
    task_id: str = ""
    approval_id: str = ""
    context: AuditContext = field(default_factory=AuditContext)
    tool_call: toolcall.ToolCall | None = None

    def __post_init__(self) -> None:
        call = self.tool_call
        if call is None:
            check_plain_intent(self.intent)
            return
        derived = tool_call_intent(
            call,
            action=self.intent.action,
            resource=self.intent.resource,
            purpose=self.intent.purpose,
            environment=self.intent.environment,
            parameters={
                k: v for k, v in self.intent.parameters.items() if k != toolcall.ARGUMENTS_PARAMETER
            },
        )
        if dict(derived.parameters) != dict(self.intent.parameters):
            raise InvalidArgument(
                "the intent's argument digest is not that of the call", reason=TOOL_CALL_MISMATCH
            )
        object.__setattr__(self, "context", tool_call_context(call, self.context))

    @property
    def tool(self) -> ToolFact | None:
        """What the policy sees of the call."""
        call = self.tool_call
        if call is None:
            return None
        return ToolFact(call.server, call.tool, call.arguments, call.digest)


TOOL_CALL_REFUSALS = frozenset(
    {toolcall.BAD_TOOL_CALL, TOOL_CALL_MISMATCH, TOOL_CALL_REQUIRED, RESERVED_PARAMETER}
)


@dataclass(frozen=True, slots=True)
class AskedToolCall:
    """A tool call as the caller sent it: names and the arguments' JSON text, unchecked."""

    server: str
    tool: str
    arguments_json: str | bytes = ""

    def known(self) -> dict[str, str]:
        """For a refusal's record: the names that are valid, the arguments' digest when they
        parse; never the arguments themselves."""
        out: dict[str, str] = {}
        for name, value, check in (
            ("server", self.server, toolcall.check_server),
            ("tool", self.tool, toolcall.check_tool),
        ):
            with contextlib.suppress(InvalidArgument):
                out[name] = check(value)
        with contextlib.suppress(InvalidArgument):
            out["arguments_sha256"] = toolcall.arguments_digest(
                toolcall.parse_arguments(self.arguments_json)
            )
        return out


@dataclass(frozen=True, slots=True)
class AskedExchange:
    """An Exchange as sent (the API's request), before anything is derived from its tool call.
    ``ExchangeService.exchange`` derives the ``ExchangeRequest`` (``request``) and records a
    refusal for a tool-call reason: there the caller is known."""

    action: str
    resource: str
    purpose: str
    audience: str
    environment: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)
    ttl: dt.timedelta | None = None
    task_id: str = ""
    approval_id: str = ""
    context: AuditContext = field(default_factory=AuditContext)
    tool_call: AskedToolCall | None = None

    def request(self) -> ExchangeRequest:
        """The Exchange with its intent and audit context (a tool call's derived from it);
        ``InvalidArgument`` when they are not valid."""
        asked = self.tool_call
        context = self.context
        call = None
        if asked is None:
            intent = Intent(
                action=self.action,
                resource=self.resource,
                purpose=self.purpose,
                environment=self.environment,
                parameters=dict(self.parameters),
            )
        else:
            call = toolcall.ToolCall.from_json(asked.server, asked.tool, asked.arguments_json)
            intent = tool_call_intent(
                call,
                action=self.action,
                resource=self.resource,
                purpose=self.purpose,
                environment=self.environment,
                parameters=dict(self.parameters),
            )
            context = tool_call_context(call, context)
        return ExchangeRequest(
            intent=intent,
            audience=self.audience,
            ttl=self.ttl,
            task_id=self.task_id,
            approval_id=self.approval_id,
            context=context,
            tool_call=call,
        )


@dataclass(frozen=True, slots=True)
class ExchangeOutcome:
    """A token, or a pending approval (``decision`` is None when an exchange only polled an
    approval that is still pending)."""

    decision: Decision | None
    token: TaskToken | None = None
    approval: Approval | None = None


ENVIRONMENT_MISMATCH = "ENVIRONMENT_MISMATCH"


def _environment(intent: Intent) -> str:
    """The environment of the intent's resource, derived from its name (its second segment):
    what a policy sees and the token carries. A caller may name it, but only that one."""
    derived = resource_environment(intent.resource)
    if intent.environment and intent.environment != derived:
        raise InvalidArgument(
            f"environment {bounded(intent.environment, 64)!r} is not that of resource "
            f"{intent.resource!r}: "
            f"the environment is derived from the resource name ({derived!r}); "
            "leave it empty or name that one",
            reason=ENVIRONMENT_MISMATCH,
        )
    return derived


def _check_audience(audience: str, limits: Limits) -> str:
    if (
        not audience
        or len(audience) > limits.max_audience_chars
        or any(c.isspace() for c in audience)
    ):
        raise InvalidArgument("a task token needs exactly one audience", reason="BAD_AUDIENCE")
    return audience


def _delegated_tool(parent: Intent, action: str, resource: str) -> ToolFact | None:
    """A tool-call token is passed on for exactly its call: the same action and resource (a
    tool is a leaf), the digest copied with the parent's parameters. The delegate's policy
    sees the call by its digest (the authority keeps no arguments: ``arguments`` absent)."""
    if parent.action != toolcall.ACTION:
        return None
    called = toolcall.parse_resource(parent.resource)
    digest_ = parent.parameters.get(toolcall.ARGUMENTS_PARAMETER, "")
    if called is None or not digest_:
        raise PermissionDenied("the token's tool call is malformed", reason="DELEGATION_WIDENS")
    if action != parent.action or resource != parent.resource:
        raise PermissionDenied(
            "a tool-call token is delegated only for its own call (the same action and resource)",
            reason="DELEGATION_WIDENS",
        )
    return ToolFact(called[0], called[1], None, digest_)


class ExchangeService:
    def __init__(
        self,
        *,
        authority: Authority,
        ca: CertificateAuthority,
        store: Store,
        policy: PolicySource,
        clock: Clock,
        limits: Limits,
        on_approval: ApprovalHook | None = None,
    ) -> None:
        """``on_approval``: told of each approval this Exchange created, once it is stored (the
        webhooks: authority.notify); it must not block, and what it raises is logged only."""
        self._authority = authority
        self._ca = ca
        self._store = store
        self._policy = policy
        self._clock = clock
        self._limits = limits
        self._on_approval = on_approval
        self._denials: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=16)
        )
        # task id -> (its principal, time.monotonic() when it was last known open)
        self._open_tasks: dict[str, tuple[str, float]] = {}

    # --- the decision ------------------------------------------------------------------

    def risk(self, principal: str) -> int:
        """The principal's risk as a direct exchange would see it now (no denial counted)."""
        return self._risk(principal, 0)

    def _risk(self, principal: str, depth: int) -> int:
        """A host-computed risk: recent denials of this principal, and delegation depth."""
        cutoff = time.monotonic() - RISK_WINDOW
        recent = [t for t in self._denials.get(principal, ()) if t >= cutoff]
        return min(100, RISK_PER_DENIAL * len(recent) + 10 * depth)

    async def _refused(
        self,
        caller: Caller,
        exc: InvalidArgument,
        *,
        subject: str,
        task_id: str,
        audience: str,
        context: AuditContext,
        details: Mapping[str, object],
    ) -> None:
        """Record an Exchange refused before any decision (nothing else is recorded: no
        decision was made): the caller, the reason, the message cut, ``details``, the audience
        and the audit context's digests and names (never a prompt)."""
        cap = self._limits.max_refusal_field_chars
        refused = AuditEvent(
            "exchange.refused",
            self._clock.now(),
            actor=caller.spiffe_id.uri,
            subject=subject,
            task_id=task_id,
            details={
                "reason": exc.reason,
                "message": bounded(exc.message, 2 * cap),
                **details,
                "audience": audience,
                "context": context.as_details(),
                "caller": {
                    "identity_id": caller.identity.id,
                    "svid_serial": format(caller.certificate.serial_number, "x"),
                },
            },
        )
        await self._store.append_audit([refused])
        log.info(
            "exchange refused: principal=%s resource=%s reason=%s",
            caller.spiffe_id.uri,
            bounded(subject, cap),
            exc.reason,
        )

    async def _asked_request(
        self, caller: Caller, asked: AskedExchange, audience: str, task_id: str
    ) -> ExchangeRequest:
        """The request derived from what was sent; one refused for its tool call (or for
        asking what only a tool call may) is recorded."""
        try:
            return asked.request()
        except InvalidArgument as exc:
            if exc.reason not in TOOL_CALL_REFUSALS:
                raise
            cap = self._limits.max_refusal_field_chars
            call = asked.tool_call.known() if asked.tool_call is not None else {}
            if asked.tool_call is None:
                subject = bounded(asked.resource, cap)
            elif "server" in call and "tool" in call:
                subject = toolcall.resource(call["server"], call["tool"])
            else:
                subject = ""
            details: dict[str, object] = {
                # what the caller named (not its purpose, parameters or arguments)
                "asked": {
                    "action": bounded(asked.action, cap),
                    "resource": bounded(asked.resource, cap),
                },
            }
            if asked.tool_call is not None:
                details["tool_call"] = call
            await self._refused(
                caller,
                exc,
                subject=subject,
                task_id=task_id,
                audience=audience,
                context=asked.context,
                details=details,
            )
            raise

    async def _derived_intent(
        self, caller: Caller, request: ExchangeRequest, audience: str, task_id: str
    ) -> Intent:
        """The intent with its resource's environment; one that names another is refused, and
        the refusal recorded (nothing else is: no decision was made)."""
        try:
            environment = _environment(request.intent)
        except InvalidArgument as exc:
            cap = self._limits.max_refusal_field_chars  # the named environment is unbounded
            claimed = request.intent.as_claim()  # as the caller gave it, its environment cut
            claimed["environment"] = bounded(request.intent.environment, cap)
            await self._refused(
                caller,
                exc,
                subject=request.intent.resource,
                task_id=task_id,
                audience=audience,
                context=request.context,
                details={
                    "intent": claimed,
                    "derived": {"environment": resource_environment(request.intent.resource)},
                },
            )
            raise
        return dataclasses.replace(request.intent, environment=environment)

    def _decide(
        self,
        caller: Caller,
        intent: Intent,
        audience: str,
        *,
        depth: int,
        approved: bool,
        named_environment: str = "",
        tool: ToolFact | None = None,
    ) -> tuple[Decision, PolicyInput]:
        """Every fact in the input is the authority's (the caller's identity and attestation,
        time, risk, depth, approval; the resource's kind and environment follow from its name);
        what the caller only says (purpose, parameters, the environment it named) goes under
        ``requested``."""
        identity = caller.identity
        inp = PolicyInput(
            principal=caller.spiffe_id.uri,
            action=intent.action,
            resource=intent.resource,
            audience=audience,
            time=self._clock.now(),
            risk=self._risk(caller.spiffe_id.uri, depth),
            delegation_depth=depth,
            approved=approved,
            attributes={
                "attestor": identity.attestor,
                "entry_id": identity.entry_id or "",
                "admin": "true" if identity.admin else "false",
            },
            requested=Requested(
                purpose=intent.purpose,
                environment=named_environment,
                parameters=dict(intent.parameters),
            ),
            tool=tool,
        )
        decision = self._policy.current.decide(inp)
        if decision.outcome is Outcome.DENY:
            self._denials[caller.spiffe_id.uri].append(time.monotonic())
        return decision, inp

    def _decision_event(
        self,
        caller: Caller,
        task_id: str,
        decision: Decision,
        inp: PolicyInput,
        context: AuditContext,
        kind: str = "policy.decided",
    ) -> AuditEvent:
        return AuditEvent(
            kind,
            self._clock.now(),
            actor=caller.spiffe_id.uri,
            subject=inp.resource,
            task_id=task_id,
            decision_id=decision.decision_id,
            details={
                # The input as `authority policy explain --input` takes it (a tool call's
                # argument values left out: their digest stays), and what the authority
                # derived from the resource name.
                "input": inp.to_json(with_arguments=False),
                "resource_facts": {
                    "kind": inp.resource_kind,
                    "environment": inp.resource_environment,
                },
                "context": context.as_details(
                    with_prompt=self._authority.records_prompts(caller.identity)
                ),
                # What links this decision to the attestation behind the caller's SVID.
                "caller": {
                    "identity_id": caller.identity.id,
                    "svid_serial": format(caller.certificate.serial_number, "x"),
                },
                "outcome": str(decision.outcome),
                "reasons": list(decision.reasons),
                "ttl_cap_s": None if decision.ttl_cap is None else decision.ttl_cap.total_seconds(),
                "max_delegation_depth": decision.max_delegation_depth,
                "policy": {
                    "id": decision.policy_id,
                    "version": decision.policy_version,
                    "backend": decision.backend,
                },
            },
        )

    # --- exchange ----------------------------------------------------------------------

    async def exchange(
        self, caller: Caller, request: ExchangeRequest | AskedExchange
    ) -> ExchangeOutcome:
        """``request`` as sent (``AskedExchange``, the API's) or already derived."""
        started = time.perf_counter()
        try:
            return await self._exchange(caller, request)
        finally:
            _EXCHANGE.add(time.perf_counter() - started)

    async def _exchange(
        self, caller: Caller, request: ExchangeRequest | AskedExchange
    ) -> ExchangeOutcome:
        audience = _check_audience(request.audience, self._limits)
        task_id = check_task_id(request.task_id) if request.task_id else f"task-{uuid.uuid4()}"
        if isinstance(request, AskedExchange):
            request = await self._asked_request(caller, request, audience, task_id)
        named_environment = request.intent.environment  # the caller's word, for the policy
        # The intent as decided and frozen into the token: with the resource's own environment.
        intent = await self._derived_intent(caller, request, audience, task_id)
        request = dataclasses.replace(request, intent=intent)
        if request.ttl is not None and request.ttl <= dt.timedelta(0):
            raise InvalidArgument("ttl must be positive", reason="BAD_TTL")
        approval = await self._approval_for(caller, request) if request.approval_id else None
        if approval is not None:
            task_id = approval.task_id  # an approval is collected in the task it was asked for
        await self._check_task(task_id, caller.spiffe_id.uri)
        if approval is not None and approval.state is ApprovalState.PENDING:
            return ExchangeOutcome(None, approval=approval)  # still waiting for the operator
        decision, inp = self._decide(
            caller,
            intent,
            audience,
            depth=0,
            approved=approval is not None,
            named_environment=named_environment,
            tool=request.tool,
        )
        event = self._decision_event(caller, task_id, decision, inp, request.context)
        if decision.outcome is Outcome.DENY:
            await self._store.append_audit([event])
            raise PermissionDenied(
                f"denied by policy {decision.policy_id}@{decision.policy_version} "
                f"(decision {decision.decision_id}): {'; '.join(decision.reasons)}",
                reason="POLICY_DENIED",
            )
        if decision.outcome is Outcome.REQUIRE_APPROVAL:
            pending = await self._request_approval(
                caller, task_id, intent, audience, decision, event
            )
            return ExchangeOutcome(decision, approval=pending)
        token = await self._issue(
            caller=caller,
            subject=caller.spiffe_id.uri,
            actors=(),
            intent=intent,
            audience=audience,
            task_id=task_id,
            requested_ttl=request.ttl,
            decision=decision,
            may_delegate=decision.max_delegation_depth,
            cnf=x5t_s256(caller.certificate.public_bytes(Encoding.DER)),
            holder_not_after=caller.certificate.not_valid_after_utc,
            parent=None,
            approval=approval,
            events=[event],
            context=request.context,
        )
        return ExchangeOutcome(decision, token=token)

    async def _check_task(self, task_id: str, principal: str) -> None:
        """The task is open to this principal: not another's, not ended (EndTask also revokes
        it, but TASK_ENDED says why), not revoked."""
        revoked = self._authority.revocations.revoked.has(
            RevocationKind.TASK, task_id, self._clock.now()
        )
        known = self._open_tasks.get(task_id)
        if known is not None and not revoked and time.monotonic() - known[1] < OPEN_TASK_SECONDS:
            owner, ended = known[0], False
        else:
            task = await self._store.get_task(task_id)
            owner = task.principal if task is not None else principal
            ended = task is not None and task.ended_at is not None
            if task is not None and not ended:
                self._task_open(task_id, owner)
        if owner != principal:
            raise PermissionDenied(
                f"task {task_id!r} belongs to another principal", reason="TASK_NOT_YOURS"
            )
        if ended:
            raise FailedPrecondition(f"task {task_id!r} has ended", reason="TASK_ENDED")
        if revoked:
            raise FailedPrecondition(f"task {task_id!r} is revoked", reason="TASK_REVOKED")

    def _task_open(self, task_id: str, principal: str) -> None:
        if len(self._open_tasks) >= _OPEN_TASKS_MAX:
            self._open_tasks.clear()  # a miss costs one store read, nothing more
        self._open_tasks[task_id] = (principal, time.monotonic())

    async def _issue(
        self,
        *,
        caller: Caller,
        subject: str,
        actors: Sequence[str],
        intent: Intent,
        audience: str,
        task_id: str,
        requested_ttl: dt.timedelta | None,
        decision: Decision,
        may_delegate: int,
        cnf: str,
        holder_not_after: dt.datetime,
        parent: TaskToken | None,
        approval: Approval | None,
        events: list[AuditEvent],
        context: AuditContext,
    ) -> TaskToken:
        now = self._clock.now()
        limits = [now + HARD_MAX_TTL, now + (requested_ttl or self._limits.default_task_ttl)]
        limits.append(holder_not_after)
        if decision.ttl_cap is not None:
            limits.append(now + decision.ttl_cap)
        if approval is not None and approval.grant_expires_at is not None:
            limits.append(approval.grant_expires_at)
        if parent is not None:
            limits.append(parent.expires_at)
        expires = min(limits).replace(microsecond=0)
        if expires - now < dt.timedelta(seconds=1):
            raise FailedPrecondition("the token would expire at once", reason="TTL_EXHAUSTED")
        key, kid, alg = self._ca.task_signing_key()
        token = mint(
            key=key,
            key_id=kid,
            algorithm=alg,
            issuer=self._ca.issuer,
            subject=subject,
            audience=audience,
            now=now,
            expires_at=expires,
            jti=secrets.token_urlsafe(16),
            task_id=task_id,
            intent=intent,
            cnf_x5t=cnf,
            actors=actors,
            decision_id=decision.decision_id,
            may_delegate=max(0, may_delegate),
            parent_jti=parent.jti if parent else "",
            # a delegated token carries its parent's: one approval, one call, whoever makes it
            approval_id=approval.id if approval else (parent.approval_id if parent else ""),
        )
        record = TaskTokenRecord(
            jti=token.jti,
            task_id=task_id,
            subject=subject,
            holder=token.holder,
            audience=audience,
            scope=" ".join(token.scopes),
            resource=intent.resource,
            parent_jti=token.parent_jti,
            depth=token.depth,
            issued_at=token.issued_at,
            expires_at=token.expires_at,
            decision_id=decision.decision_id,
            cnf_x5t=cnf,
        )
        issued = AuditEvent(
            "task_token.delegated" if parent else "task_token.issued",
            now,
            actor=caller.spiffe_id.uri,
            subject=token.holder,
            task_id=task_id,
            decision_id=decision.decision_id,
            details={
                "jti": token.jti,
                "token_sha256": digest(token.token),
                "audience": audience,
                "scope": " ".join(token.scopes),
                "intent": intent.as_claim(),
                "expires_at": token.expires_at.isoformat(),
                "cnf_x5t#S256": cnf,
                "act": list(actors),
                "parent_jti": token.parent_jti,
                "may_delegate": token.may_delegate,
                "approval_id": approval.id if approval else "",
                "kid": kid,
                **context.as_details(),
            },
        )
        await self._store.record_task_token(
            record, consume_approval=approval.id if approval else "", audit=[*events, issued]
        )
        if parent is None:
            # The transaction checked the task open and the subject's: it stays known open.
            self._task_open(task_id, subject)
        log.info(
            "task token issued: jti=%s task=%s holder=%s scope=%s aud=%s exp=%s decision=%s",
            token.jti,
            task_id,
            token.holder,
            intent.action,
            audience,
            token.expires_at.isoformat(),
            decision.decision_id,
        )
        return token

    # --- approvals ---------------------------------------------------------------------

    async def _request_approval(
        self,
        caller: Caller,
        task_id: str,
        intent: Intent,
        audience: str,
        decision: Decision,
        event: AuditEvent,
    ) -> Approval:
        now = self._clock.now()
        approval = Approval(
            id=f"apr-{uuid.uuid4()}",
            principal=caller.spiffe_id.uri,
            task_id=task_id,
            audience=audience,
            intent_json=json.dumps(intent.as_claim(), sort_keys=True, separators=(",", ":")),
            intent_fingerprint=intent.fingerprint(audience),
            decision_id=decision.decision_id,
            requested_at=now,
            expires_at=now + self._limits.approval_wait,
        )
        requested = AuditEvent(
            "approval.requested",
            now,
            actor=caller.spiffe_id.uri,
            subject=approval.id,
            task_id=task_id,
            decision_id=decision.decision_id,
            details={
                "intent": intent.as_claim(),
                "audience": audience,
                "expires_at": approval.expires_at.isoformat(),
            },
        )
        await self._store.create_approval(approval, audit=[event, requested])
        log.info(
            "approval requested: id=%s principal=%s task=%s",
            approval.id,
            approval.principal,
            task_id,
        )
        if self._on_approval is not None:
            try:
                self._on_approval(approval, intent, decision)
            except Exception:
                log.exception("approval hook failed: id=%s", approval.id)
        return approval

    async def _approval_for(self, caller: Caller, request: ExchangeRequest) -> Approval:
        """The approval presented with an exchange, for exactly this intent: approved (usable)
        or still pending; anything else is refused."""
        approval = await self._store.get_approval(request.approval_id)
        if approval is None or approval.principal != caller.spiffe_id.uri:
            raise NotFound(f"no approval {request.approval_id!r}", reason="APPROVAL_NOT_FOUND")
        if approval.intent_fingerprint != request.intent.fingerprint(request.audience):
            raise PermissionDenied(
                "the approval was given for another intent", reason="APPROVAL_OTHER_INTENT"
            )
        state = approval.effective_state(self._clock.now())
        if state in ("approved", "pending"):
            return approval
        reasons = {
            "denied": "APPROVAL_DENIED",
            "expired": "APPROVAL_EXPIRED",
            "used": "APPROVAL_USED",
        }
        raise PermissionDenied(f"approval {approval.id} is {state}", reason=reasons[state])

    async def approval_status(self, caller: Caller, approval_id: str) -> Approval:
        approval = await self._store.get_approval(approval_id)
        if approval is None or approval.principal != caller.spiffe_id.uri:
            raise NotFound(f"no approval {approval_id!r}", reason="APPROVAL_NOT_FOUND")
        return approval

    async def list_approvals(self) -> list[Approval]:
        return await self._store.list_approvals()

    async def approve(
        self, approval_id: str, *, grant: dt.timedelta | None, note: str, by: str = OPERATOR
    ) -> Approval:
        check_length(note, self._limits.max_reason_chars, "the note")
        grant = grant or self._limits.default_approval_grant
        if not dt.timedelta(seconds=1) <= grant <= self._limits.max_approval_grant:
            raise InvalidArgument(
                "an approval lasts between 1s and "
                f"{format_duration(self._limits.max_approval_grant)}",
                reason="BAD_GRANT",
            )
        return await self._decide_approval(approval_id, ApprovalState.APPROVED, grant, note, by)

    async def deny(self, approval_id: str, *, reason: str, by: str = OPERATOR) -> Approval:
        if not reason.strip():
            raise InvalidArgument("a denial needs a reason", reason="NO_REASON")
        check_length(reason, self._limits.max_reason_chars, "the reason")
        return await self._decide_approval(approval_id, ApprovalState.DENIED, None, reason, by)

    async def _decide_approval(
        self,
        approval_id: str,
        state: ApprovalState,
        grant: dt.timedelta | None,
        note: str,
        by: str,
    ) -> Approval:
        current = await self._store.get_approval(approval_id)
        if current is None:
            raise NotFound(f"no approval {approval_id!r}", reason="APPROVAL_NOT_FOUND")
        now = self._clock.now()
        decided = dataclasses.replace(
            current,
            state=state,
            decided_at=now,
            decided_by=by,
            note=note[:500],
            grant_expires_at=now + grant if grant is not None else None,
        )
        event = AuditEvent(
            f"approval.{state}",
            now,
            actor=by,
            subject=approval_id,
            task_id=current.task_id,
            decision_id=current.decision_id,
            details={
                "principal": current.principal,
                "note": decided.note,
                "grant_expires_at": (
                    decided.grant_expires_at.isoformat() if decided.grant_expires_at else None
                ),
            },
        )
        await self._store.decide_approval(decided, now, audit=[event])
        log.info("approval %s: id=%s by=%s", state, approval_id, by)
        return decided

    # --- delegation ---------------------------------------------------------------------

    async def verify_own(self, caller: Caller, token: str) -> TaskToken:
        """A task token the caller holds: valid now, issued here, bound to the caller's SVID."""
        parsed = verify(
            token,
            keys=self._ca.task_keys(),
            issuer=self._ca.issuer,
            audience=None,
            now=self._clock.now(),
        )
        if parsed.cnf_x5t != x5t_s256(caller.certificate.public_bytes(Encoding.DER)):
            raise PermissionDenied(
                "the token is bound to another certificate", reason="TOKEN_CNF_MISMATCH"
            )
        if await self._store.get_task_token(parsed.jti) is None:
            raise PermissionDenied("the token is not known here", reason="TOKEN_UNKNOWN")
        if self._authority.revocations.revoked.token_revoked(parsed, self._clock.now()):
            raise PermissionDenied("the token is revoked", reason="TOKEN_REVOKED")
        return parsed

    async def delegate(
        self,
        caller: Caller,
        *,
        parent_token: str,
        delegate_certificate_der: bytes,
        action: str = "",
        resource: str = "",
        ttl: dt.timedelta | None = None,
        context: AuditContext | None = None,
    ) -> TaskToken:
        context = context or AuditContext()
        parent = await self.verify_own(caller, parent_token)
        if parent.may_delegate <= 0:
            raise PermissionDenied(
                "this token may not be delegated further", reason="DELEGATION_DEPTH"
            )
        action = action or parent.intent.action
        resource = resource or parent.intent.resource
        tool = _delegated_tool(parent.intent, action, resource)
        if action not in parent.scopes:
            raise PermissionDenied(
                f"delegation only narrows: {action!r} is not in {' '.join(parent.scopes)!r}",
                reason="DELEGATION_WIDENS",
            )
        if not resource_within(resource, parent.intent.resource):
            raise PermissionDenied(
                "delegation only narrows: the resource is outside the parent's",
                reason="DELEGATION_WIDENS",
            )
        if ttl is not None and ttl <= dt.timedelta(0):
            raise InvalidArgument("ttl must be positive", reason="BAD_TTL")
        try:
            cert = x509.load_der_x509_certificate(delegate_certificate_der)
        except ValueError:
            raise InvalidArgument("the delegate's SVID is not a DER certificate") from None
        delegate = await self._authority.authenticate(cert.public_bytes(Encoding.PEM))
        intent = Intent(
            action=action,
            resource=resource,
            purpose=parent.intent.purpose,
            environment=resource_environment(resource),  # the child's resource's own
            parameters=dict(parent.intent.parameters),
        )
        depth = parent.depth + 1
        decision, inp = self._decide(
            delegate, intent, parent.audience, depth=depth, approved=False, tool=tool
        )
        event = self._decision_event(delegate, parent.task_id, decision, inp, context)
        if decision.outcome is not Outcome.ALLOW:
            await self._store.append_audit([event])
            why = "; ".join(decision.reasons) or str(decision.outcome)
            raise PermissionDenied(
                f"delegation denied by policy {decision.policy_id}@{decision.policy_version} "
                f"(decision {decision.decision_id}): {why}",
                reason="POLICY_DENIED",
            )
        return await self._issue(
            caller=caller,
            subject=parent.subject,
            actors=(delegate.spiffe_id.uri, *parent.actors),
            intent=intent,
            audience=parent.audience,
            task_id=parent.task_id,
            requested_ttl=ttl,
            decision=decision,
            may_delegate=min(parent.may_delegate - 1, decision.max_delegation_depth),
            cnf=x5t_s256(delegate_certificate_der),
            holder_not_after=cert.not_valid_after_utc,
            parent=parent,
            approval=None,
            events=[event],
            context=context,
        )

    # --- end of a task ------------------------------------------------------------------

    async def end_task(self, caller: Caller, task_id: str, reason: str = "") -> list[str]:
        check_length(reason, self._limits.max_reason_chars, "the reason")
        task = await self._store.get_task(check_task_id(task_id))
        if task is None or task.principal != caller.spiffe_id.uri:
            raise NotFound(f"no task {task_id!r}", reason="TASK_NOT_FOUND")
        now = self._clock.now()
        event = AuditEvent(
            "task.ended",
            now,
            actor=caller.spiffe_id.uri,
            subject=task_id,
            task_id=task_id,
            details={"reason": reason},
        )
        jtis = await self._store.end_task(task_id, now, reason, audit=[event])
        self._open_tasks.pop(task_id, None)
        await self._authority.revocations.revoke_task_tokens(
            task_id, reason or "task ended", actor=caller.spiffe_id.uri
        )
        log.info("task ended: task=%s tokens=%d", task_id, len(jtis))
        return jtis
