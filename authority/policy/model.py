"""The nouns of the policy engine: what is asked, what is decided, and the engine Protocol.

A :class:`PolicyInput` checks its own invariants on construction (a malformed input is the caller's
error, raised at the edge as :class:`~authority.errors.InvalidArgument`); a :class:`Decision` checks
its own (scopes only on ALLOW, reasons always on DENY). Engines never raise from ``decide``: any
error inside evaluation becomes a DENY that carries the error text as its reason.

Facts come from the authority, never from the requester. Every field a policy can test is either
derived by the authority (the caller's identity and attestation, time, risk, delegation depth,
approval, the resource's kind and environment from its name) or what the caller merely says,
kept apart in :class:`Requested`, so that no policy can take a claim for a fact. Action, resource
and audience are what is asked for, and a granted token is bound to them.

An MCP tool call adds :class:`ToolFact`: the server, the tool, the call's exact arguments (the
token is bound to their digest, so what the policy reads is what the token allows) or, for a
gateway's discovery question ("could this caller ever call this tool?"), ``discovery`` true and
no arguments.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from authority import toolcall
from authority.errors import InvalidArgument

MAX_RISK = 100
INPUT_INVALID = "POLICY_INPUT_INVALID"
DEFAULT_DENY_REASON = "default-deny: no policy permits this request"

_INPUT_REQUIRED = ("principal", "action", "resource", "time")
# Fields of the JSON form before caller-supplied facts moved under ``requested``: named in the
# error so that an old tests file says how to fix itself.
_MOVED_TO_REQUESTED = frozenset({"purpose", "environment", "parameters"})


class Outcome(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    REQUIRE_APPROVAL = "require_approval"


def resource_kind(resource: str) -> str:
    """A resource's kind: its first segment (``metrics`` for ``metrics/prod``)."""
    return resource.split("/", 1)[0]


def resource_environment(resource: str) -> str:
    """A resource's environment: its second segment (``prod`` for ``metrics/prod/cpu``), or
    empty when it has none. The authority derives it; a requester never sets it."""
    parts = resource.split("/")
    return parts[1] if len(parts) > 1 else ""


def _frozen_str_map(name: str, value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{name} must be a mapping of strings", reason=INPUT_INVALID)
    copy: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise InvalidArgument(
                f"{name} must map strings to strings (bad entry {key!r})", reason=INPUT_INVALID
            )
        copy[key] = item
    return types.MappingProxyType(copy)


def _json_object(
    name: str, obj: object, known: frozenset[str], hint: str = ""
) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise InvalidArgument(f"{name} must be a JSON object", reason=INPUT_INVALID)
    unknown = sorted(map(str, set(obj) - known))
    if unknown:
        raise InvalidArgument(
            f"unknown {name} field(s): {', '.join(unknown)}{hint}", reason=INPUT_INVALID
        )
    return obj


@dataclass(frozen=True, slots=True)
class Requested:
    """What the caller says about its intent beyond the action, resource and audience it asks
    for. The authority checks none of it against anything, so a policy sees it apart from the
    facts the authority derives: under ``context.requested`` (Cedar) or ``input.requested``
    (Rego). ``environment`` is the one the caller named (empty when it named none); the
    resource's own environment is derived from the resource name."""

    purpose: str = ""
    environment: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("purpose", "environment"):
            if not isinstance(getattr(self, name), str):
                raise InvalidArgument(f"requested {name} must be a string", reason=INPUT_INVALID)
        object.__setattr__(
            self, "parameters", _frozen_str_map("requested parameters", self.parameters)
        )

    @classmethod
    def from_json(cls, obj: object) -> Requested:
        values = _json_object("requested", obj, frozenset(f.name for f in dataclasses.fields(cls)))
        return cls(**values)

    def to_json(self) -> dict[str, object]:
        return {
            "purpose": self.purpose,
            "environment": self.environment,
            "parameters": dict(self.parameters),
        }


_TOOL_FIELDS = frozenset({"server", "name", "arguments", "arguments_sha256", "discovery"})


@dataclass(frozen=True, slots=True)
class ToolFact:
    """The MCP tool call an intent is for: the authority's own fact, derived from the call the
    Exchange carries (the intent's resource is ``mcp/<server>/<name>`` and its parameter
    ``mcp.arguments_sha256`` is ``arguments_sha256``).

    ``arguments`` is the parsed JSON object of the call; None when the authority does not hold
    them (a delegation passes the call on by its digest alone), so a policy that reads them
    finds them missing. ``discovery`` is true for a gateway's listing question: no call is
    made, ``arguments`` is the empty object and ``arguments_sha256`` empty; a permit that
    tests arguments should hold when ``discovery`` is true for the tool to be listed."""

    server: str
    name: str
    arguments: Mapping[str, Any] | None = field(default_factory=dict)
    arguments_sha256: str = ""
    discovery: bool = False

    def __post_init__(self) -> None:
        try:
            toolcall.check_server(self.server)
            toolcall.check_tool(self.name)
            if self.arguments is not None:
                object.__setattr__(
                    self,
                    "arguments",
                    types.MappingProxyType(toolcall.check_arguments(dict(self.arguments))),
                )
        except InvalidArgument as exc:
            raise InvalidArgument(f"tool: {exc.message}", reason=INPUT_INVALID) from None
        if not isinstance(self.discovery, bool):
            raise InvalidArgument("tool.discovery must be a boolean", reason=INPUT_INVALID)
        digest = self.arguments_sha256
        if not isinstance(digest, str) or (
            digest and (len(digest) != 64 or not set(digest) <= set("0123456789abcdef"))
        ):
            raise InvalidArgument(
                "tool.arguments_sha256 is a lower-case SHA-256 hex digest or empty",
                reason=INPUT_INVALID,
            )
        if self.discovery and (self.arguments or digest):
            raise InvalidArgument(
                "a discovery question carries no arguments and no digest", reason=INPUT_INVALID
            )
        if not self.discovery and self.arguments is not None:
            computed = toolcall.arguments_digest(self.arguments)
            if digest and digest != computed:
                raise InvalidArgument(
                    "tool.arguments_sha256 is not the digest of tool.arguments",
                    reason=INPUT_INVALID,
                )
            object.__setattr__(self, "arguments_sha256", computed)
        if not self.discovery and not self.arguments_sha256:
            raise InvalidArgument(
                "a tool call without arguments needs their digest", reason=INPUT_INVALID
            )

    @property
    def resource(self) -> str:
        return toolcall.resource(self.server, self.name)

    @classmethod
    def discovering(cls, server: str, name: str) -> ToolFact:
        return cls(server, name, {}, "", True)

    @classmethod
    def from_json(cls, obj: object) -> ToolFact:
        """``server`` and ``name`` required; ``arguments`` (an object; null or absent with a
        digest given: not known) defaults to ``{}``; ``arguments_sha256`` is computed from them
        when absent and must match when given; ``discovery`` defaults to false."""
        values = dict(_json_object("tool", obj, _TOOL_FIELDS))
        missing = [name for name in ("server", "name") if name not in values]
        if missing:
            raise InvalidArgument(f"tool lacks {', '.join(missing)}", reason=INPUT_INVALID)
        if "arguments" not in values and values.get("arguments_sha256"):
            values["arguments"] = None  # a call known by its digest alone
        if isinstance(values.get("arguments", {}), list | str | int | float):
            raise InvalidArgument("tool.arguments must be a JSON object", reason=INPUT_INVALID)
        return cls(**values)

    def to_json(self, *, with_arguments: bool = True) -> dict[str, object]:
        """The JSON form; ``with_arguments`` false leaves the argument values out (the audit
        keeps their digest only)."""
        out: dict[str, object] = {"server": self.server, "name": self.name}
        if with_arguments and self.arguments is not None:
            out["arguments"] = _plain(self.arguments)
        out["arguments_sha256"] = self.arguments_sha256
        out["discovery"] = self.discovery
        return out


def _plain(value: Any) -> Any:
    """A JSON value with its read-only mappings turned back into dicts."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class PolicyInput:
    """One intent to decide on. Time is passed in; nothing here reads a clock.

    The authority's facts: ``principal`` (the caller, authenticated by its SVID), ``time``,
    ``risk``, ``delegation_depth``, ``approved``, ``attributes`` (of the caller's attestation),
    and the resource's kind and environment, derived from its name (properties, never given).
    What is asked for, and a granted token bound to: ``action``, ``resource``, ``audience``.
    What the caller merely says: ``requested``. An MCP tool call: ``tool`` (None otherwise);
    its resource must then be the tool's, ``mcp/<server>/<name>``."""

    principal: str
    action: str
    resource: str
    time: dt.datetime
    audience: str = ""
    risk: int = 0
    delegation_depth: int = 0
    approved: bool = False
    attributes: Mapping[str, str] = field(default_factory=dict)
    requested: Requested = field(default_factory=Requested)
    tool: ToolFact | None = None

    def __post_init__(self) -> None:
        for name in ("principal", "action", "resource", "audience"):
            if not isinstance(getattr(self, name), str):
                raise InvalidArgument(f"{name} must be a string", reason=INPUT_INVALID)
        for name in ("principal", "action", "resource"):
            if not getattr(self, name):
                raise InvalidArgument(f"{name} must not be empty", reason=INPUT_INVALID)
        if not isinstance(self.time, dt.datetime) or self.time.utcoffset() is None:
            raise InvalidArgument("time must be a timezone-aware datetime", reason=INPUT_INVALID)
        if isinstance(self.risk, bool) or not isinstance(self.risk, int):
            raise InvalidArgument("risk must be an integer", reason=INPUT_INVALID)
        if not 0 <= self.risk <= MAX_RISK:
            raise InvalidArgument(f"risk must be within 0..{MAX_RISK}", reason=INPUT_INVALID)
        depth = self.delegation_depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise InvalidArgument(
                "delegation_depth must be a non-negative integer", reason=INPUT_INVALID
            )
        if not isinstance(self.approved, bool):
            raise InvalidArgument("approved must be a boolean", reason=INPUT_INVALID)
        object.__setattr__(self, "attributes", _frozen_str_map("attributes", self.attributes))
        if not isinstance(self.requested, Requested):
            raise InvalidArgument("requested must be a Requested", reason=INPUT_INVALID)
        if self.tool is not None:
            if not isinstance(self.tool, ToolFact):
                raise InvalidArgument("tool must be a ToolFact", reason=INPUT_INVALID)
            if self.resource != self.tool.resource or self.action != toolcall.ACTION:
                raise InvalidArgument(
                    f"a tool call's intent is action {toolcall.ACTION!r} on resource "
                    f"{self.tool.resource!r}",
                    reason=INPUT_INVALID,
                )

    @property
    def resource_kind(self) -> str:
        return resource_kind(self.resource)

    @property
    def resource_environment(self) -> str:
        return resource_environment(self.resource)

    # JSON form: used by policy tests, the shared corpus and `authority policy explain --input`.

    @classmethod
    def from_json(cls, obj: object) -> PolicyInput:
        """Build from a JSON object. ``principal``, ``action``, ``resource`` and ``time`` (ISO 8601
        with an offset) are required; the other fields default to empty / 0 / false, and
        ``requested`` (``purpose``, ``environment``, ``parameters``) to empty. Unknown keys are
        refused so that a misspelt field cannot silently take its default; the resource's kind
        and environment are derived, never given."""
        known = frozenset(f.name for f in dataclasses.fields(cls))
        values: dict[str, Any] = dict(
            _json_object(
                "policy input",
                obj,
                known,
                hint=(
                    " (what the caller says goes under requested: purpose, environment, "
                    "parameters; the resource's environment is derived from its name)"
                    if isinstance(obj, Mapping) and _MOVED_TO_REQUESTED & set(obj)
                    else ""
                ),
            )
        )
        missing = [name for name in _INPUT_REQUIRED if name not in values]
        if missing:
            raise InvalidArgument(
                f"policy input lacks required field(s): {', '.join(missing)}", reason=INPUT_INVALID
            )
        raw_time = values["time"]
        if not isinstance(raw_time, str):
            raise InvalidArgument("time must be an ISO 8601 string", reason=INPUT_INVALID)
        try:
            values["time"] = dt.datetime.fromisoformat(raw_time)
        except ValueError as exc:
            raise InvalidArgument(f"time is not ISO 8601: {exc}", reason=INPUT_INVALID) from exc
        if "requested" in values:
            values["requested"] = Requested.from_json(values["requested"])
        if values.get("tool") is not None:
            values["tool"] = ToolFact.from_json(values["tool"])
        return cls(**values)

    def to_json(self, *, with_arguments: bool = True) -> dict[str, object]:
        """The JSON form ``from_json`` reads; ``with_arguments`` false leaves a tool call's
        argument values out (for the audit: their digest stays)."""
        out: dict[str, object] = {
            "principal": self.principal,
            "action": self.action,
            "resource": self.resource,
            "audience": self.audience,
            "time": self.time.isoformat(),
            "risk": self.risk,
            "delegation_depth": self.delegation_depth,
            "approved": self.approved,
            "attributes": dict(self.attributes),
            "requested": self.requested.to_json(),
        }
        if self.tool is not None:
            out["tool"] = self.tool.to_json(with_arguments=with_arguments)
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    """What the engine decided, and under which policy. ``decision_id`` is fresh per decision."""

    outcome: Outcome
    scopes: tuple[str, ...]
    ttl_cap: dt.timedelta | None
    max_delegation_depth: int
    reasons: tuple[str, ...]
    policy_id: str
    policy_version: str
    decision_id: str
    backend: str

    def __post_init__(self) -> None:
        if not isinstance(self.outcome, Outcome):
            raise ValueError("outcome must be an Outcome")
        if self.outcome is Outcome.ALLOW and not self.scopes:
            raise ValueError("an ALLOW decision grants at least one scope")
        if self.outcome is not Outcome.ALLOW and self.scopes:
            raise ValueError("only an ALLOW decision carries scopes")
        if self.outcome is Outcome.DENY and not self.reasons:
            raise ValueError("a DENY decision always says why")
        if self.ttl_cap is not None and self.ttl_cap <= dt.timedelta(0):
            raise ValueError("a TTL cap must be positive")
        if self.max_delegation_depth < 0:
            raise ValueError("max_delegation_depth must not be negative")

    def to_json(self) -> dict[str, object]:
        return {
            "outcome": str(self.outcome),
            "scopes": list(self.scopes),
            "ttl_cap_seconds": (
                None if self.ttl_cap is None else int(self.ttl_cap.total_seconds())
            ),
            "max_delegation_depth": self.max_delegation_depth,
            "reasons": list(self.reasons),
            "policy_id": self.policy_id,
            "policy_version": self.policy_version,
            "decision_id": self.decision_id,
            "backend": self.backend,
        }


class PolicyEngine(Protocol):
    """A loaded, compiled policy set. ``decide`` does no I/O and never raises."""

    backend: str
    policy_id: str
    policy_version: str

    def decide(self, inp: PolicyInput) -> Decision: ...


@runtime_checkable
class ExplainingPolicyEngine(PolicyEngine, Protocol):
    """An engine that can also show its working (for ``authority policy explain``)."""

    def explain(self, inp: PolicyInput) -> dict[str, object]: ...
