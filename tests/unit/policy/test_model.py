"""PolicyInput and Decision check their invariants on construction; the JSON form round-trips."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from typing import Any

import pytest

from authority.errors import InvalidArgument
from authority.policy import (
    Decision,
    Outcome,
    PolicyInput,
    resource_environment,
    resource_kind,
)
from tests.unit.policy._support import AGENT, MONDAY_10, make_input


def test_a_valid_input_is_frozen_and_its_maps_are_copied() -> None:
    params = {"query": "cpu"}
    inp = make_input(parameters=params)
    params["query"] = "changed"
    assert inp.requested.parameters == {"query": "cpu"}
    with pytest.raises(TypeError):
        inp.requested.parameters["x"] = "y"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        inp.action = "write"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        inp.requested.environment = "sandbox"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("resource", "kind", "environment"),
    [
        ("metrics/prod", "metrics", "prod"),
        ("deploy/sandbox/web", "deploy", "sandbox"),
        ("deploy", "deploy", ""),
    ],
)
def test_the_resources_kind_and_environment_are_derived_from_its_name(
    resource: str, kind: str, environment: str
) -> None:
    inp = make_input(resource=resource, requested_environment="somewhere-else")
    assert (inp.resource_kind, inp.resource_environment) == (kind, environment)
    assert (resource_kind(resource), resource_environment(resource)) == (kind, environment)
    assert inp.requested.environment == "somewhere-else"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("principal", "", "principal must not be empty"),
        ("action", "", "action must not be empty"),
        ("resource", "", "resource must not be empty"),
        ("purpose", None, "requested purpose must be a string"),
        ("requested_environment", 3, "requested environment must be a string"),
        ("audience", None, "audience must be a string"),
        ("time", dt.datetime(2026, 1, 5, 10, 0), "timezone-aware"),
        ("risk", -1, "risk must be within 0..100"),
        ("risk", 101, "risk must be within 0..100"),
        ("risk", True, "risk must be an integer"),
        ("delegation_depth", -1, "non-negative"),
        ("approved", "yes", "approved must be a boolean"),
        ("parameters", {"n": 1}, "requested parameters must map strings to strings"),
        ("requested", {"purpose": "p"}, "requested must be a Requested"),
        ("attributes", ["a"], "attributes must be a mapping"),
    ],
)
def test_an_invalid_input_is_refused(field: str, value: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        make_input(**{field: value})
    assert info.value.reason == "POLICY_INPUT_INVALID"


def test_input_json_defaults_and_round_trip() -> None:
    inp = PolicyInput.from_json(
        {
            "principal": AGENT,
            "action": "read",
            "resource": "metrics/prod",
            "time": "2026-01-05T10:00:00+00:00",
        }
    )
    assert inp == make_input(purpose="", audience="")
    assert inp.time == MONDAY_10
    assert PolicyInput.from_json(inp.to_json()) == inp
    full = make_input(
        requested_environment="prod",
        parameters={"approved": "true"},
        attributes={"attestor": "join_token"},
        approved=True,
    )
    document = full.to_json()
    assert document["requested"] == {
        "purpose": "weekly report",
        "environment": "prod",
        "parameters": {"approved": "true"},
    }
    assert "environment" not in document
    assert "purpose" not in document
    assert PolicyInput.from_json(json.loads(json.dumps(document))) == full


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "must be a JSON object"),
        ({"principal": AGENT, "action": "read", "resource": "r"}, "lacks required field"),
        (
            {"principal": AGENT, "action": "read", "resource": "r", "time": "x", "purpse": ""},
            "unknown policy input field",
        ),
        ({"principal": AGENT, "action": "read", "resource": "r", "time": "noon"}, "ISO 8601"),
        (
            {"principal": AGENT, "action": "read", "resource": "r", "time": "x", "purpose": "p"},
            "unknown policy input field.*purpose.*goes under requested",
        ),
        (
            {"principal": AGENT, "action": "read", "resource": "r", "time": "x", "environment": ""},
            "unknown policy input field.*derived from its name",
        ),
        (
            {"principal": AGENT, "action": "read", "resource": "r", "time": "x", "kind": "r"},
            "unknown policy input field",
        ),
        (
            {
                "principal": AGENT,
                "action": "read",
                "resource": "r",
                "time": "2026-01-05T10:00:00Z",
                "requested": {"purpose": "p", "approved": True},
            },
            "unknown requested field.*approved",
        ),
        (
            {
                "principal": AGENT,
                "action": "read",
                "resource": "r",
                "time": "2026-01-05T10:00:00Z",
                "requested": "p",
            },
            "requested must be a JSON object",
        ),
        ({"principal": AGENT, "action": "read", "resource": "r", "time": 5}, "ISO 8601"),
        (
            {"principal": AGENT, "action": "read", "resource": "r", "time": "2026-01-05T10:00"},
            "timezone-aware",
        ),
    ],
)
def test_input_json_errors(document: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        PolicyInput.from_json(document)
    assert info.value.reason == "POLICY_INPUT_INVALID"


def _decision(**overrides: Any) -> Decision:
    values: dict[str, Any] = {
        "outcome": Outcome.ALLOW,
        "scopes": ("read",),
        "ttl_cap": dt.timedelta(seconds=60),
        "max_delegation_depth": 0,
        "reasons": ("p",),
        "policy_id": "test",
        "policy_version": "0" * 16,
        "decision_id": str(uuid.uuid4()),
        "backend": "cedar",
    }
    values.update(overrides)
    return Decision(**values)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"scopes": ()}, "at least one scope"),
        ({"outcome": Outcome.DENY, "scopes": ("read",)}, "only an ALLOW"),
        ({"outcome": Outcome.DENY, "scopes": (), "reasons": ()}, "always says why"),
        ({"ttl_cap": dt.timedelta(0)}, "positive"),
        ({"max_delegation_depth": -1}, "negative"),
        ({"outcome": "allow"}, "must be an Outcome"),
    ],
)
def test_decision_invariants(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _decision(**overrides)


def test_decision_json() -> None:
    decision = _decision()
    document = decision.to_json()
    assert document["outcome"] == "allow"
    assert document["ttl_cap_seconds"] == 60
    assert document["scopes"] == ["read"]
    assert _decision(ttl_cap=None).to_json()["ttl_cap_seconds"] is None
