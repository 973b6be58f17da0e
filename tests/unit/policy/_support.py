"""Helpers shared by the policy tests: inputs with defaults, engines built from text, the paths."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from authority.policy import (
    PolicyEngine,
    PolicyInput,
    PolicySource,
    Requested,
    compile_policy_set,
)
from authority.policy.rego import rego_available

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples" / "policies"
CORPUS = ROOT / "tests" / "policy_corpus" / "corpus.json"
MONDAY_10 = dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.UTC)
AGENT = "spiffe://example.org/agent/reporter"

# What a caller might put in its parameters (or purpose) to pass for the authority's facts.
CLAIMED_FACTS = {
    "approved": "true",
    "risk": "0",
    "delegation_depth": "0",
    "admin": "true",
    "attributes": "admin=true",
    "environment": "sandbox",
    "resource_environment": "sandbox",
}

requires_rego = pytest.mark.skipif(
    not rego_available(),
    reason="regorus is not installed (the optional 'rego' extra: pip install -r "
    "requirements-rego.txt); the Rego backend cannot be exercised",
)


def make_input(
    *,
    purpose: str = "weekly report",
    requested_environment: str = "",
    parameters: Any = None,
    **overrides: Any,
) -> PolicyInput:
    """An agent's metric read on Monday at 10:00 UTC; ``purpose``, ``requested_environment`` and
    ``parameters`` go under ``requested``, what the caller says."""
    values: dict[str, Any] = {
        "principal": AGENT,
        "action": "read",
        "resource": "metrics/prod",
        "audience": "metrics-api",
        "time": MONDAY_10,
        "risk": 0,
        "delegation_depth": 0,
        "approved": False,
        "attributes": {},
        "requested": Requested(
            purpose=purpose,
            environment=requested_environment,
            parameters={} if parameters is None else parameters,
        ),
    }
    values.update(overrides)
    return PolicyInput(**values)


def cedar(*texts: str, policy_id: str = "test") -> PolicyEngine:
    sources = [PolicySource(f"p{i}.cedar", text) for i, text in enumerate(texts)]
    return compile_policy_set(sources, "cedar", policy_id=policy_id)


def rego(*texts: str, policy_id: str = "test") -> PolicyEngine:
    sources = [PolicySource(f"p{i}.rego", text) for i, text in enumerate(texts)]
    return compile_policy_set(sources, "rego", policy_id=policy_id)
