"""The Cedar backend (default), on ``cedarpy``: policies parsed once at load, evaluated in-process.

The request the host builds
---------------------------
Facts come from the authority, never from the requester. What the caller merely says is kept
under ``context.requested`` so that no policy can take it for a fact.

Derived by the authority:

- principal ``Workload::"<spiffe id>"`` (authenticated by the caller's X.509-SVID) with
  attributes ``trust_domain`` (``example.org``) and ``path`` (``/agent/reporter``), so policies
  match ``principal.trust_domain == "example.org"`` or ``principal.path like "/agent/*"``;
- resource attributes ``kind`` (the resource name's first segment, or the whole name when it has
  none: ``metrics`` for ``metrics/prod``) and ``environment`` (its second segment, or ``""``:
  ``prod`` for ``metrics/prod/cpu``). Both come from the resource name; a request that names
  another environment than its resource's is refused before any policy runs;
- ``context.time`` (UTC as ``YYYY-MM-DDThh:mm:ss.SSSZ``, usable with Cedar's ``datetime()``),
  ``context.hour`` (0-23, UTC) and ``context.weekday`` (0 = Monday), from the authority's clock;
- ``context.risk`` (0..100: the caller's recent denials and the delegation depth),
  ``context.delegation_depth`` (0 for a direct exchange), ``context.approved`` (true only when an
  operator's approval of exactly this intent is presented) and ``context.attributes`` (a record
  of strings about the caller's attestation: ``attestor``, ``entry_id``, ``admin``).

An MCP tool call (absent otherwise: ``context has tool`` is false) is the record ``context.tool``:
``server``, ``name`` (the intent's resource is ``mcp/<server>/<name>``), ``arguments_sha256``
(what the token is bound to), ``discovery`` (true only for a gateway's listing question, with
empty ``arguments``) and ``arguments``, the call's JSON object mapped to Cedar values:

- strings -> String, booleans -> Bool, objects -> records, arrays -> sets (order and duplicates
  are lost, as Cedar sets have neither; test membership with ``contains``);
- integers (and numbers JSON holds as whole, ``1.0`` being ``1``) -> Long;
- other numbers -> ``decimal`` when Cedar's decimal holds them exactly (at most 4 digits after
  the point, within its range): compare with ``.lessThan(decimal("500.0"))`` and the like;
  a number it cannot hold exactly (``0.12345``, ``1e-7``, ``1e300``) denies the request, with
  the argument's path as the reason, rather than becoming a value of another type;
- ``null`` members of objects are left out (``has`` is false), ``null`` items of arrays too;
- an object member whose name starts with ``__`` denies the request: Cedar's JSON reads
  ``__entity`` and ``__extn`` as an entity reference or an extension value, which no argument
  may forge.

``arguments`` is absent when the authority does not hold the arguments (a delegated tool-call
token is decided on its digest): a policy that reads them errors, so its permit does not grant.
A permit that tests arguments should also hold in discovery (``context.tool.discovery ||
context.tool.arguments.amount < 500``) for the tool to be listed; in discovery the arguments
are empty, so a ``forbid`` that reads one must guard it with ``has`` (an erroring forbid
denies).

Asked for (what a granted token is bound to):

- action ``Action::"<action>"`` (exactly one: ``read``, ``write``, ``deploy``, ...);
- resource ``Resource::"<resource>"``;
- ``context.audience``.

Said by the caller, checked against nothing (``context.requested``):

- ``context.requested.purpose`` (never empty from an Exchange),
  ``context.requested.environment`` (the environment the caller named, ``""`` when none: it is
  the resource's or the request was refused) and ``context.requested.parameters`` (a record of
  strings: test with ``has`` before reading one). A parameter named ``approved`` or
  ``environment`` is only ever ``context.requested.parameters.<name>``, never a fact.

Annotations the host resolves (validated at load: a bad value refuses the whole policy set)
-----------------------------------------------------------------------------------------
- ``@id("name")``: the name used in reasons and audit (unique within the set); a policy without one
  is named ``<file>[<index in file>]``.
- ``@ttl("120")``: a TTL cap in seconds (positive integer) on what the permit grants.
- ``@approval("required")``: the permit grants only with an operator approval.
- ``@delegation("2")``: how many further delegations a token granted by the permit allows.
  ``@ttl``, ``@approval`` and ``@delegation`` are refused on a ``forbid``. Other annotations
  (``@description`` ...) are kept and ignored.

Semantics
---------
1. Any matching ``forbid`` -> DENY; reasons are the forbids' names.
2. No matching ``permit`` -> DENY (default deny; Cedar's "no decision" is a deny).
3. The determining permits are all the permits that match (Cedar's diagnostics). If at least one of
   them lacks ``@approval("required")`` -> ALLOW. If every one carries it -> REQUIRE_APPROVAL when
   ``context.approved`` is false, ALLOW when it is true.
4. ``ttl_cap`` is the smallest ``@ttl`` among the determining permits (None when none carries one);
   ``max_delegation_depth`` is the smallest ``@delegation`` among them (0 when none carries one).
   Both are reported on REQUIRE_APPROVAL too (what an approval would grant); on DENY they are
   None and 0.
5. Errors fail closed. Cedar skips a policy whose evaluation errors (a missing attribute, a type
   error); the host turns an erroring ``forbid`` into DENY (the forbid might have applied), while an
   erroring ``permit`` simply does not grant. An error the host cannot attribute to a policy denies.
"""

from __future__ import annotations

import decimal
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cedarpy

from authority.errors import InvalidArgument
from authority.policy._host import (
    POLICY_INVALID,
    EngineBase,
    Facts,
    PolicySource,
    Verdict,
    error_text,
    refuse_moved_fields,
    request_context,
    source_version,
)
from authority.policy.model import PolicyInput, ToolFact

PRINCIPAL_TYPE = "Workload"
ACTION_TYPE = "Action"
RESOURCE_TYPE = "Resource"

_HOST_ANNOTATIONS = ("ttl", "approval", "delegation")
_EVAL_ERROR = re.compile(r"error while evaluating policy `([^`]+)`")
_POSITIVE_INT = re.compile(r"[1-9][0-9]{0,8}")
_NON_NEGATIVE_INT = re.compile(r"0|[1-9][0-9]{0,8}")
_ENTITY_CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class CedarPolicyMeta:
    """One policy of the set, as the host reads it from its annotations."""

    name: str
    effect: str  # "permit" | "forbid"
    ttl_seconds: int | None
    approval_required: bool
    delegation: int | None


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason=POLICY_INVALID)


def _statements(text: str) -> Iterator[tuple[int, str]]:
    """Top-level statements (up to each ``;`` outside strings and comments) with their offsets."""
    start = i = 0
    in_string = False
    while i < len(text):
        char = text[i]
        if in_string:
            if char == "\\":
                i += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif text.startswith("//", i):
            newline = text.find("\n", i)
            i = len(text) if newline < 0 else newline
            continue
        elif char == ";":
            yield start, text[start : i + 1]
            start = i + 1
        i += 1
    if text[start:].strip():
        yield start, text[start:]


def _first_code_offset(text: str, start: int) -> int:
    """The offset of the first character after ``start`` that is neither blank nor a comment."""
    i = start
    while i < len(text):
        if text[i].isspace():
            i += 1
        elif text.startswith("//", i):
            newline = text.find("\n", i)
            i = len(text) if newline < 0 else newline
        else:
            return i
    return start


def _parse_error(source: PolicySource, exc: Exception) -> InvalidArgument:
    """Cedar's message names no line; find the first statement that fails to parse on its own."""
    message = error_text(exc)
    for offset, statement in _statements(source.text):
        try:
            cedarpy.PolicySet.from_str(statement)
        except ValueError as statement_exc:
            line = source.text.count("\n", 0, _first_code_offset(source.text, offset)) + 1
            return _invalid(f"{source.name}: line {line}: {error_text(statement_exc)}")
    return _invalid(f"{source.name}: {message}")


def _read_meta(body: Mapping[str, object], default_name: str) -> CedarPolicyMeta:
    effect = body.get("effect")
    raw = body.get("annotations") or {}
    if effect not in ("permit", "forbid") or not isinstance(raw, Mapping):
        raise _invalid(f"{default_name}: unexpected policy shape from Cedar")
    annotations = {str(k): "" if v is None else str(v) for k, v in raw.items()}
    name = annotations.get("id", default_name)
    if not name:
        raise _invalid(f"{default_name}: @id must not be empty")
    if effect == "forbid":
        misplaced = [a for a in _HOST_ANNOTATIONS if a in annotations]
        if misplaced:
            raise _invalid(f"{name}: @{misplaced[0]} has no meaning on a forbid policy")
    ttl: int | None = None
    if "ttl" in annotations:
        if not _POSITIVE_INT.fullmatch(annotations["ttl"]):
            raise _invalid(f'{name}: @ttl must be a positive number of seconds, like @ttl("120")')
        ttl = int(annotations["ttl"])
    approval = False
    if "approval" in annotations:
        if annotations["approval"] != "required":
            raise _invalid(f'{name}: the only @approval value is "required"')
        approval = True
    delegation: int | None = None
    if "delegation" in annotations:
        if not _NON_NEGATIVE_INT.fullmatch(annotations["delegation"]):
            raise _invalid(f"{name}: @delegation must be a non-negative integer")
        delegation = int(annotations["delegation"])
    return CedarPolicyMeta(name, str(effect), ttl, approval, delegation)


def _compile(
    sources: Sequence[PolicySource],
) -> tuple[cedarpy.PolicySet, dict[str, CedarPolicyMeta]]:
    counts: list[int] = []
    for source in sources:
        refuse_moved_fields(
            source, root="context", comment="//", resource_env="resource.environment"
        )
        try:
            counts.append(len(cedarpy.PolicySet.from_str(source.text)))
        except ValueError as exc:
            raise _parse_error(source, exc) from exc
    # Joined with newlines so that a file ending in a comment cannot swallow the next file.
    combined = "\n".join(source.text for source in sources)
    try:
        policy_set = cedarpy.PolicySet.from_str(combined)
        est = json.loads(cedarpy.policies_to_json_str(combined))
    except ValueError as exc:
        raise _invalid(f"policy set: {error_text(exc)}") from exc
    if est.get("templates"):
        raise _invalid("policy templates (?principal / ?resource slots) are not supported")
    static: Mapping[str, Mapping[str, object]] = est.get("staticPolicies", {})
    # Cedar numbers the policies of a text policy0, policy1, ... in order of appearance.
    expected_ids = {f"policy{i}" for i in range(sum(counts))}
    if set(static) != expected_ids or len(policy_set) != len(expected_ids):
        raise _invalid("policy set: Cedar did not number the policies as expected")
    metas: dict[str, CedarPolicyMeta] = {}
    names: dict[str, str] = {}
    index = 0
    for source, count in zip(sources, counts, strict=True):
        for k in range(count):
            policy_id = f"policy{index}"
            meta = _read_meta(static[policy_id], f"{source.name}[{k}]")
            if meta.name in names:
                raise _invalid(f"@id({meta.name!r}) is used by more than one policy")
            names[meta.name] = policy_id
            metas[policy_id] = meta
            index += 1
    return policy_set, metas


# Cedar's decimal: at most 4 digits after the point, a 64-bit integer of ten-thousandths.
_DECIMAL_DIGITS = 4
_DECIMAL_MAX = decimal.Decimal(2**63 - 1).scaleb(-_DECIMAL_DIGITS)
_DECIMAL_MIN = decimal.Decimal(-(2**63)).scaleb(-_DECIMAL_DIGITS)
_EXACT_INTEGER = 2**53


class CedarValueError(ValueError):
    """An argument Cedar cannot be given as the value it is (the request is denied)."""


def _where(path: Sequence[str]) -> str:
    shown = ".".join(path) or "arguments"
    return shown if len(shown) <= 80 else shown[:80] + "..."


def _cedar_number(value: float, path: Sequence[str]) -> object:
    if value.is_integer() and abs(value) <= _EXACT_INTEGER:
        return int(value)  # JSON's 1.0 is 1, as the digest has it
    exact = decimal.Decimal(repr(value))
    exponent = exact.as_tuple().exponent
    if (
        not isinstance(exponent, int)
        or exponent < -_DECIMAL_DIGITS
        or not _DECIMAL_MIN <= exact <= _DECIMAL_MAX
    ):
        raise CedarValueError(
            f"tool argument {_where(path)} is a number Cedar's decimal cannot hold exactly "
            f"(at most {_DECIMAL_DIGITS} digits after the point)"
        )
    text = format(exact, "f")
    return {"__extn": {"fn": "decimal", "arg": text if "." in text else text + ".0"}}


def cedar_value(value: Any, path: tuple[str, ...] = ("arguments",)) -> object:
    """A JSON value of a tool call's arguments as a Cedar value in Cedar's JSON form."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return _cedar_number(value, path)
    if isinstance(value, Mapping):
        record: dict[str, object] = {}
        for key, item in value.items():
            if key.startswith("__"):
                raise CedarValueError(
                    f"tool argument {_where((*path, key[:32]))}: a member name starting with "
                    "'__' is Cedar's JSON escape and cannot be given to a policy"
                )
            if item is not None:
                record[key] = cedar_value(item, (*path, key))
        return record
    if isinstance(value, list):
        return [cedar_value(item, (*path, "[]")) for item in value if item is not None]
    raise CedarValueError(f"tool argument {_where(path)} is not a JSON value")


def cedar_tool(tool: ToolFact) -> dict[str, object]:
    """``context.tool``: the tool call's JSON form with its arguments as Cedar values."""
    record = tool.to_json(with_arguments=False)
    if tool.arguments is not None:
        record["arguments"] = cedar_value(tool.arguments)
    return record


class CedarEngine(EngineBase):
    """A compiled Cedar policy set. Immutable once built; safe to share between threads."""

    backend = "cedar"

    def __init__(self, sources: Sequence[PolicySource], *, policy_id: str) -> None:
        super().__init__(
            policy_id=policy_id, policy_version=source_version([s.text for s in sources])
        )
        self._policies, self._metas = _compile(sources)
        # (principal, resource) -> the entities parsed by Cedar
        self._entity_cache: dict[tuple[str, str], cedarpy.Entities] = {}

    @property
    def policies(self) -> Mapping[str, CedarPolicyMeta]:
        """Cedar's policy ids (``policy0`` ...) to what the host read from each policy."""
        return dict(self._metas)

    def _evaluate(self, inp: PolicyInput, facts: Facts) -> tuple[Verdict, dict[str, object]]:
        request: dict[str, object] = {
            "principal": {"type": PRINCIPAL_TYPE, "id": inp.principal},
            "action": {"type": ACTION_TYPE, "id": inp.action},
            "resource": {"type": RESOURCE_TYPE, "id": inp.resource},
            "context": request_context(inp, facts),
        }
        if inp.tool is not None:
            context = request["context"]
            assert isinstance(context, dict)
            context["tool"] = cedar_tool(inp.tool)  # CedarValueError: denied, by _run
        entities, parsed = self._entities(inp, facts)
        result = cedarpy.is_authorized(request, self._policies, parsed)
        determining = [str(policy_id) for policy_id in result.diagnostics.reasons]
        errors = [str(error) for error in result.diagnostics.errors]
        trace: dict[str, object] = {
            "request": request,
            "entities": entities,
            "cedar_decision": result.decision.value,
            "matched": sorted(self._name(p) for p in determining),
            "errors": errors,
        }
        return self._verdict(result.allowed, determining, errors), trace

    def _entities(
        self, inp: PolicyInput, facts: Facts
    ) -> tuple[list[dict[str, object]], cedarpy.Entities]:
        """The principal and resource entities; Cedar parses them once per (principal, resource),
        the two inputs their attributes derive from."""
        entities: list[dict[str, object]] = [
            {
                "uid": {"type": PRINCIPAL_TYPE, "id": inp.principal},
                "attrs": {
                    "trust_domain": facts.principal_trust_domain,
                    "path": facts.principal_path,
                },
                "parents": [],
            },
            {
                "uid": {"type": RESOURCE_TYPE, "id": inp.resource},
                "attrs": {
                    "kind": facts.resource_kind,
                    "environment": facts.resource_environment,
                },
                "parents": [],
            },
        ]
        key = (inp.principal, inp.resource)
        parsed = self._entity_cache.get(key)
        if parsed is None:
            parsed = cedarpy.Entities.from_json_str(json.dumps(entities))
            if len(self._entity_cache) >= _ENTITY_CACHE_SIZE:
                self._entity_cache.clear()  # a miss costs one parse, nothing more
            self._entity_cache[key] = parsed
        return entities, parsed

    def _name(self, policy_id: str) -> str:
        meta = self._metas.get(policy_id)
        return policy_id if meta is None else meta.name

    def _verdict(self, allowed: bool, determining: Sequence[str], errors: Sequence[str]) -> Verdict:
        for error in errors:
            match = _EVAL_ERROR.search(error)
            meta = self._metas.get(match.group(1)) if match else None
            if meta is None:
                return Verdict.deny(f"cedar evaluation error: {error}")
            if meta.effect == "forbid":
                return Verdict.deny(f"forbid {meta.name} failed to evaluate: {error}")
        metas = [self._metas[policy_id] for policy_id in determining]
        names = tuple(sorted(meta.name for meta in metas))
        if not allowed:
            return Verdict.deny(*names)
        if not metas or any(meta.effect != "permit" for meta in metas):
            return Verdict.deny("cedar allowed without a determining permit")
        ttls = [m.ttl_seconds for m in metas if m.ttl_seconds is not None]
        depths = [m.delegation for m in metas if m.delegation is not None]
        return Verdict(
            allow=True,
            require_approval=all(meta.approval_required for meta in metas),
            ttl_seconds=min(ttls) if ttls else None,
            delegation=min(depths) if depths else 0,
            reasons=names,
        )
