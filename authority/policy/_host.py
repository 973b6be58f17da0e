"""What both backends share: sources and their version, the derived facts, and the one place where a
backend's raw verdict becomes an :class:`Outcome` (so the two backends cannot drift apart on it)."""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from authority.errors import InvalidArgument
from authority.ids import SpiffeId
from authority.policy.model import DEFAULT_DENY_REASON, Decision, Outcome, PolicyInput

POLICY_INVALID = "POLICY_INVALID"
_BACKTRACE_MARKER = "Stack backtrace:"
MAX_REASON_CHARS = 1000


@dataclass(frozen=True, slots=True)
class PolicySource:
    """One policy file's text; ``name`` (the file name) appears in compiler messages."""

    name: str
    text: str


def source_version(texts: Sequence[str]) -> str:
    """sha256 (first 16 hex digits) of the policy texts, in order, each framed by its length."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()[:16]


# Where each field of an older input shape went: facts the caller only says moved under
# ``requested``; the resource's environment is derived from its name.
_MOVED_FIELDS = ("purpose", "environment", "parameters")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|`[^`]*`')


def refuse_moved_fields(
    source: PolicySource, *, root: str, comment: str, resource_env: str
) -> None:
    """Refuse a policy that reads ``<root>.purpose``, ``<root>.environment`` or
    ``<root>.parameters``: those fields are gone (a Cedar policy reading one would fail at each
    decision; a Rego one would silently never match, and a forbid written so would never fire).
    Comments and the text of strings are skipped; a comment marker inside a string only hides a
    match."""
    names = "|".join(_MOVED_FIELDS)
    dotted = re.compile(rf"\b{re.escape(root)}\s*\.\s*({names})\b")
    indexed = re.compile(rf"\b{re.escape(root)}\s*\[\s*\"({names})\"\s*\]")
    for number, line in enumerate(source.text.splitlines(), start=1):
        code = line.split(comment, 1)[0]
        match = dotted.search(_STRING.sub('""', code)) or indexed.search(code)
        if match is None:
            continue
        name = match.group(1)
        instead = f"{root}.requested.{name}"
        if name == "environment":
            instead = f"{resource_env} (derived from the resource name) or {instead}"
        raise InvalidArgument(
            f"{source.name}: line {number}: {root}.{name} is no longer in the input; use "
            f"{instead} (what the caller says is under {root}.requested)",
            reason=POLICY_INVALID,
        )


def error_text(exc: BaseException) -> str:
    """An engine's error message, trimmed of the Rust backtrace some builds append."""
    text = str(exc).split(_BACKTRACE_MARKER, 1)[0].strip()
    text = text or type(exc).__name__
    if len(text) > MAX_REASON_CHARS:
        text = text[:MAX_REASON_CHARS] + "..."
    return text


@dataclass(frozen=True, slots=True)
class Facts:
    """Values the host derives from an input so that policies need not parse strings."""

    principal_trust_domain: str
    principal_path: str
    resource_kind: str
    resource_environment: str
    time: str
    hour: int
    weekday: int


def derive_facts(inp: PolicyInput) -> Facts:
    """Raises :class:`~authority.errors.InvalidSpiffeId` when the principal is not a SPIFFE ID."""
    sid = SpiffeId.parse(inp.principal)
    utc = inp.time.astimezone(dt.UTC)
    return Facts(
        principal_trust_domain=sid.trust_domain.name,
        principal_path=sid.path,
        resource_kind=inp.resource_kind,
        resource_environment=inp.resource_environment,
        # Millisecond precision and a literal Z: the form Cedar's datetime() and Rego's
        # time.parse_rfc3339_ns() both accept.
        time=utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z",
        hour=utc.hour,
        weekday=utc.weekday(),
    )


def request_context(inp: PolicyInput, facts: Facts) -> dict[str, object]:
    """What both backends give a policy beside principal, action and resource: Cedar as its
    ``context`` record, Rego in its input document. ``audience`` is asked for (a granted token
    is bound to it); ``requested`` is what the caller says (purpose, environment, parameters);
    every other key is the authority's own fact, ``tool`` among them (an MCP tool call: server,
    name, arguments, arguments_sha256, discovery), present only for a tool call."""
    context: dict[str, object] = {
        "audience": inp.audience,
        "time": facts.time,
        "hour": facts.hour,
        "weekday": facts.weekday,
        "risk": inp.risk,
        "delegation_depth": inp.delegation_depth,
        "approved": inp.approved,
        "attributes": dict(inp.attributes),
        "requested": inp.requested.to_json(),
    }
    if inp.tool is not None:  # absent unless the intent is an MCP tool call
        context["tool"] = inp.tool.to_json()
    return context


@dataclass(frozen=True, slots=True)
class Verdict:
    """A backend's answer before the host applies the approval rule."""

    allow: bool
    require_approval: bool
    ttl_seconds: int | None
    delegation: int
    reasons: tuple[str, ...]

    @classmethod
    def deny(cls, *reasons: str) -> Verdict:
        return cls(False, False, None, 0, reasons)


def _is_engine_failure(exc: BaseException) -> bool:
    """An error to turn into DENY. pyo3 raises a Rust panic as ``PanicException``, which derives
    from BaseException: a failed decision, not a request to exit."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


class EngineBase:
    """``decide`` for every backend: evaluate, resolve the outcome, never raise."""

    backend: str = ""

    def __init__(self, *, policy_id: str, policy_version: str) -> None:
        self.policy_id = policy_id
        self.policy_version = policy_version

    def _evaluate(self, inp: PolicyInput, facts: Facts) -> tuple[Verdict, dict[str, object]]:
        """The backend's verdict and a trace of its working (for explain)."""
        raise NotImplementedError

    def _run(self, inp: PolicyInput) -> tuple[Decision, dict[str, object]]:
        try:
            facts = derive_facts(inp)
        except Exception as exc:
            trace: dict[str, object] = {}
            verdict = Verdict.deny(f"invalid principal: {error_text(exc)}")
        else:
            try:
                verdict, trace = self._evaluate(inp, facts)
            except BaseException as exc:
                if not _is_engine_failure(exc):
                    raise
                reason = f"{self.backend} evaluation error: {error_text(exc)}"
                verdict, trace = Verdict.deny(reason), {"error": reason}
        try:
            return self._resolve(inp, verdict), trace
        except Exception as exc:  # a verdict that cannot be a Decision: deny, do not raise
            reason = f"{self.backend} produced an invalid decision: {error_text(exc)}"
            return self._resolve(inp, Verdict.deny(reason)), {"error": reason}

    def _resolve(self, inp: PolicyInput, verdict: Verdict) -> Decision:
        if not verdict.allow:
            outcome = Outcome.DENY
        elif verdict.require_approval and not inp.approved:
            outcome = Outcome.REQUIRE_APPROVAL
        else:
            outcome = Outcome.ALLOW
        denied = outcome is Outcome.DENY
        reasons = verdict.reasons
        if denied and not reasons:
            reasons = (DEFAULT_DENY_REASON,)
        return Decision(
            outcome=outcome,
            scopes=(inp.action,) if outcome is Outcome.ALLOW else (),
            ttl_cap=(
                None
                if denied or verdict.ttl_seconds is None
                else dt.timedelta(seconds=verdict.ttl_seconds)
            ),
            max_delegation_depth=0 if denied else verdict.delegation,
            reasons=reasons,
            policy_id=self.policy_id,
            policy_version=self.policy_version,
            decision_id=str(uuid.uuid4()),
            backend=self.backend,
        )

    def decide(self, inp: PolicyInput) -> Decision:
        return self._run(inp)[0]

    def explain(self, inp: PolicyInput) -> dict[str, object]:
        decision, trace = self._run(inp)
        return {
            "decision": decision.to_json(),
            "input": inp.to_json(),
            "backend": self.backend,
            "policy_id": self.policy_id,
            "policy_version": self.policy_version,
            **trace,
        }
