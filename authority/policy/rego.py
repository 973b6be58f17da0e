"""The Rego backend, for operators who already write OPA policies: the embedded regorus interpreter.

``regorus`` is an optional dependency (the ``rego`` extra, pinned in ``requirements-rego.txt``). Its
wheels on PyPI (``gordon-to-regorus``) are built by a single maintainer's fork of microsoft/regorus;
the engine is replaceable behind :class:`~authority.policy.PolicyEngine`. Do not use ``regopy``: it
gives wrong answers and crashes on idiomatic Rego.

The policy
----------
Policies are Rego v1. One of them declares ``package authority`` and a rule ``decision`` whose value
is an object::

    {"allow": bool, "require_approval": bool,
     "ttl_seconds": positive integer (optional), "delegation": integer >= 0 (optional),
     "reasons": [string] (optional)}

Unknown keys are refused (a misspelt ``ttl`` must not silently lift a cap).

The input document
------------------
The same facts the Cedar backend gives its policies. Facts come from the authority, never from
the requester; what the caller merely says is kept under ``input.requested``.

Derived by the authority: ``principal`` (the SPIFFE ID of the caller's X.509-SVID),
``principal_trust_domain``, ``principal_path``, ``resource_kind`` (the resource name's first
segment) and ``resource_environment`` (its second segment, or ``""``; a request that names another
environment is refused before any policy runs), ``time`` (UTC, ``YYYY-MM-DDThh:mm:ss.SSSZ``),
``hour`` (UTC), ``weekday`` (0 = Monday), ``risk``, ``delegation_depth``, ``approved`` and
``attributes`` (an object of strings about the caller's attestation).

An MCP tool call (absent otherwise: ``not input.tool`` holds) is ``input.tool``: ``server``,
``name`` (the resource is ``mcp/<server>/<name>``), ``arguments`` (the call's JSON object as it
is), ``arguments_sha256`` (what the token is bound to) and ``discovery`` (true only for a
gateway's listing question, with empty ``arguments``). A rule that tests an argument is
undefined in discovery, so a permit that tests arguments needs a discovery rule of its own for
the tool to be listed, and a forbid over arguments does not fire there. ``arguments`` is absent
when the authority does not hold them (a delegated tool-call token is decided on its digest).

Asked for (what a granted token is bound to): ``action``, ``resource``, ``audience``.

Said by the caller, checked against nothing: ``input.requested.purpose``,
``input.requested.environment`` (the one the caller named, ``""`` when none) and
``input.requested.parameters`` (an object of strings). A parameter named ``approved`` is
``input.requested.parameters.approved``, never ``input.approved``.

Rego treats a missing field as undefined, so a ``forbid``-style rule that reads a field this
document does not have never fires. Loading refuses policies that read the fields moved under
``requested`` (``input.purpose``, ``input.environment``, ``input.parameters``) for that reason.

Semantics (the same as Cedar's)
-------------------------------
``allow`` false -> DENY (reasons from the policy, else default deny). ``allow`` true and
``require_approval`` true -> REQUIRE_APPROVAL unless ``approved``, then ALLOW. ``ttl_seconds`` is
the cap (none when absent); ``delegation`` the further delegations allowed (0 when absent).
Undefined ``decision``, a value that is not such an object, or an evaluation error -> DENY with a
reason.

The interpreter objects of regorus may be used only on the thread that created them. Loading parses
the files once (for the loading thread); another thread that decides parses them once for itself.
Each decision evaluates on a clone of its thread's interpreter (a cheap copy of the parsed
policies), so no evaluation sees another's input.
"""

from __future__ import annotations

import importlib
import threading
import weakref
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from authority.errors import FailedPrecondition, InvalidArgument
from authority.policy._host import (
    POLICY_INVALID,
    EngineBase,
    Facts,
    PolicySource,
    Verdict,
    derive_facts,
    error_text,
    refuse_moved_fields,
    request_context,
    source_version,
)
from authority.policy.model import PolicyInput

PACKAGE = "data.authority"
RULE = "data.authority.decision"
BACKEND_UNAVAILABLE = "POLICY_BACKEND_UNAVAILABLE"
_KEYS = frozenset({"allow", "require_approval", "ttl_seconds", "delegation", "reasons"})
_MAX_INT = 10**9


def _regorus() -> ModuleType:
    try:
        return importlib.import_module("regorus")
    except ImportError as exc:
        raise FailedPrecondition(
            "the rego policy backend needs the regorus interpreter: install the 'rego' extra "
            "(pip install 'agent-authority[rego]', pinned in requirements-rego.txt) or use Cedar",
            reason=BACKEND_UNAVAILABLE,
        ) from exc


def rego_available() -> bool:
    try:
        _regorus()
    except FailedPrecondition:
        return False
    return True


def input_document(inp: PolicyInput, facts: Facts) -> dict[str, object]:
    return {
        "principal": inp.principal,
        "principal_trust_domain": facts.principal_trust_domain,
        "principal_path": facts.principal_path,
        "action": inp.action,
        "resource": inp.resource,
        "resource_kind": facts.resource_kind,
        "resource_environment": facts.resource_environment,
        **request_context(inp, facts),
    }


# A well-formed input evaluated once at load: it catches a missing `decision` rule and errors that
# regorus reports only when a rule runs (an unknown function, for one).
_PROBE = PolicyInput.from_json(
    {
        "principal": "spiffe://example.org/probe",
        "action": "read",
        "resource": "probe/policy-load",
        "requested": {"purpose": "policy load check"},
        "time": "2000-01-03T00:00:00+00:00",
    }
)


def _integer(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"decision.{name} must be a number")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"decision.{name} must be a whole number")
    number = int(value)
    if not minimum <= number <= _MAX_INT:
        raise ValueError(f"decision.{name} must be within {minimum}..{_MAX_INT}")
    return number


def parse_decision(value: object) -> Verdict:
    """The ``decision`` value as a verdict; raises ValueError (the caller denies) when malformed."""
    if value is None:
        return Verdict.deny(f"{RULE} is undefined for this input")
    if not isinstance(value, Mapping):
        raise ValueError(f"decision must be an object, not {type(value).__name__}")
    unknown = sorted(str(key) for key in set(value) - _KEYS)
    if unknown:
        raise ValueError(f"decision has unknown key(s): {', '.join(unknown)}")
    allow, require = value.get("allow"), value.get("require_approval")
    if not isinstance(allow, bool) or not isinstance(require, bool):
        raise ValueError("decision.allow and decision.require_approval must be booleans")
    ttl = None if "ttl_seconds" not in value else _integer(value["ttl_seconds"], "ttl_seconds", 1)
    depth = 0 if "delegation" not in value else _integer(value["delegation"], "delegation", 0)
    raw_reasons = value.get("reasons", [])
    if not isinstance(raw_reasons, list) or not all(isinstance(r, str) for r in raw_reasons):
        raise ValueError("decision.reasons must be a list of strings")
    reasons = tuple(sorted(str(r) for r in raw_reasons))
    if not allow:
        return Verdict.deny(*reasons)
    return Verdict(True, require, ttl, depth, reasons)


def _named_reasons(value: object) -> list[str]:
    """The policy names a decision object gives as its reasons (for explain)."""
    reasons = value.get("reasons") if isinstance(value, Mapping) else None
    if not isinstance(reasons, list):
        return []
    return sorted(str(reason) for reason in reasons if isinstance(reason, str))


def _add_sources(engine: Any, sources: Sequence[PolicySource]) -> str | None:
    """Parse the sources into ``engine``; the first error's text, or None."""
    for source in sources:
        try:
            engine.add_policy(source.name, source.text)
        except (RuntimeError, ValueError) as exc:
            return f"{source.name}: {error_text(exc)}"
    return None


def _probe_failure(engine: Any) -> str | None:
    """Evaluate the decision rule once, on a clone, for the well-formed probe input."""
    probe = engine.clone()
    probe.set_input(input_document(_PROBE, derive_facts(_PROBE)))
    try:
        probe.eval_rule(RULE)
    except (RuntimeError, ValueError) as exc:
        text = error_text(exc)
        return (
            "package authority defines no rule `decision`"
            if "not a valid rule path" in text
            else text
        )
    return None


# regorus interpreters are "unsendable": one may be used, and must be dropped, only on the thread
# that created it. Each thread therefore keeps its own, here: a module-level thread-local (never
# deallocated itself) whose per-thread dict CPython clears on that thread when it exits.
_per_thread = threading.local()


def _thread_cache() -> dict[int, tuple[weakref.ref[RegoEngine], Any]]:
    cache: dict[int, tuple[weakref.ref[RegoEngine], Any]] | None = getattr(
        _per_thread, "engines", None
    )
    if cache is None:
        cache = {}
        _per_thread.engines = cache
    return cache


class RegoEngine(EngineBase):
    """A Rego policy set, parsed once per thread that decides with it (at load for the loading
    thread); each decision evaluates on a clone of that thread's interpreter."""

    backend = "rego"

    def __init__(self, sources: Sequence[PolicySource], *, policy_id: str) -> None:
        super().__init__(
            policy_id=policy_id, policy_version=source_version([s.text for s in sources])
        )
        for source in sources:
            refuse_moved_fields(
                source, root="input", comment="#", resource_env="input.resource_environment"
            )
        self._sources = tuple(sources)
        engine = self._build()
        failure = _probe_failure(engine)
        if failure is not None:
            del engine  # see _build: dropped here, on its own thread
            raise InvalidArgument(
                f"policy fails on a well-formed probe input: {failure}", reason=POLICY_INVALID
            )
        _thread_cache()[id(self)] = (weakref.ref(self), engine)

    def _build(self) -> Any:
        # An interpreter must be dropped on the thread that made it. Raising while a frame holds
        # one would leave it to the traceback's reference cycle, which the garbage collector may
        # break on any thread: errors are raised only once the interpreter is gone.
        engine: Any = _regorus().Engine()
        failure = _add_sources(engine, self._sources)
        if failure is None and PACKAGE not in list(engine.get_packages()):
            failure = "no policy declares `package authority`"
        if failure is not None:
            del engine
            raise InvalidArgument(failure, reason=POLICY_INVALID)
        return engine

    def _thread_engine(self) -> Any:
        cache = _thread_cache()
        entry = cache.get(id(self))
        if entry is not None and entry[0]() is self:
            return entry[1]
        # A miss: drop (on this, their own thread) the interpreters of engines gone since.
        for key in [key for key, (ref, _) in cache.items() if ref() is None]:
            del cache[key]
        engine = self._build()
        cache[id(self)] = (weakref.ref(self), engine)
        return engine

    def _evaluate(self, inp: PolicyInput, facts: Facts) -> tuple[Verdict, dict[str, object]]:
        document = input_document(inp, facts)
        engine = self._thread_engine().clone()
        engine.set_input(document)
        value: object = engine.eval_rule(RULE)
        trace: dict[str, object] = {
            "rego_input": document,
            "rego_decision": value,
            "matched": _named_reasons(value),
        }
        try:
            return parse_decision(value), trace
        except ValueError as exc:
            return Verdict.deny(f"rego decision is malformed: {exc}"), trace
