"""The tool-call fact (``PolicyInput.tool``): its JSON form, and what each backend makes of it
(Cedar's ``context.tool`` with arguments as Cedar values, Rego's ``input.tool``)."""

from __future__ import annotations

from typing import Any

import pytest

from authority import toolcall
from authority.errors import InvalidArgument
from authority.policy import (
    Outcome,
    PolicyEngine,
    PolicyInput,
    load_policy_set,
    run_policy_tests,
)
from authority.policy.cedar import CedarValueError, cedar_value
from authority.policy.loader import load_policy_tests
from authority.policy.model import ToolFact
from authority.policy.rego import rego_available
from tests.unit.policy._support import (
    AGENT,
    EXAMPLES,
    MONDAY_10,
    cedar,
    make_input,
    rego,
    requires_rego,
)


def tool_input(tool: ToolFact | None, **overrides: Any) -> PolicyInput:
    if tool is None:
        return make_input(**overrides)
    return make_input(action="tools.call", resource=tool.resource, tool=tool, **overrides)


def call(
    arguments: dict[str, Any] | None, server: str = "billing", name: str = "refund"
) -> ToolFact:
    return ToolFact(server, name, arguments)


# --- the fact and its JSON form ------------------------------------------------------------------


def test_the_digest_is_computed_from_the_arguments() -> None:
    fact = call({"amount": 10, "invoice": "inv-1"})
    assert fact.arguments_sha256 == toolcall.arguments_digest({"invoice": "inv-1", "amount": 10})
    assert fact.resource == "mcp/billing/refund"
    assert not fact.discovery


def test_json_round_trip_with_and_without_arguments() -> None:
    for fact in (
        call({"amount": 10, "lines": [1, {"a": None}], "ok": True}),
        ToolFact("billing", "refund", None, "ab" * 32),
        ToolFact.discovering("deploy", "deploy"),
    ):
        inp = tool_input(fact)
        assert PolicyInput.from_json(inp.to_json()) == inp


def test_the_audited_form_keeps_the_digest_not_the_values() -> None:
    inp = tool_input(call({"card": "4111 1111 1111 1111"}))
    audited = inp.to_json(with_arguments=False)
    tool = audited["tool"]
    assert isinstance(tool, dict)
    assert "arguments" not in tool
    assert tool["arguments_sha256"] == inp.tool.arguments_sha256 if inp.tool else False
    assert "4111" not in repr(audited)


@pytest.mark.parametrize(
    ("tool", "why"),
    [
        ({"name": "refund"}, "lacks server"),
        ({"server": "billing", "name": "refund", "arguments": [1]}, "JSON object"),
        ({"server": "Billing!", "name": "refund"}, "server's name"),
        ({"server": "billing", "name": "a b"}, "tool's name"),
        (
            {"server": "billing", "name": "refund", "arguments": {}, "arguments_sha256": "0" * 64},
            "not the digest",
        ),
        (
            {"server": "billing", "name": "refund", "discovery": True, "arguments": {"a": 1}},
            "no arguments",
        ),
        ({"server": "billing", "name": "refund", "arguments": {"n": 2**60}}, r"2\*\*53"),
        ({"server": "billing", "name": "refund", "colour": 1}, "unknown tool field"),
    ],
)
def test_malformed_tool_facts_are_refused(tool: dict[str, Any], why: str) -> None:
    document = tool_input(None).to_json()
    document.update(action="tools.call", resource="mcp/billing/refund", tool=tool)
    with pytest.raises(InvalidArgument, match=why) as caught:
        PolicyInput.from_json(document)
    assert caught.value.reason == "POLICY_INPUT_INVALID"


def test_the_intent_must_be_the_calls() -> None:
    with pytest.raises(InvalidArgument, match=r"tools\.call"):
        make_input(action="read", resource="mcp/billing/refund", tool=call({}))
    with pytest.raises(InvalidArgument, match="mcp/billing/refund"):
        make_input(action="tools.call", resource="mcp/billing/other", tool=call({}))


# --- Cedar values --------------------------------------------------------------------------------


def test_cedar_values() -> None:
    assert cedar_value({"n": 3, "w": 2.0, "s": "x", "b": False, "r": {"k": [1, None, "y"]}}) == {
        "n": 3,
        "w": 2,  # JSON's 2.0 is 2, as in the digest
        "s": "x",
        "b": False,
        "r": {"k": [1, "y"]},  # null items and members are left out
    }
    assert cedar_value({"d": 499.5, "e": -0.0001, "n": None}) == {
        "d": {"__extn": {"fn": "decimal", "arg": "499.5"}},
        "e": {"__extn": {"fn": "decimal", "arg": "-0.0001"}},
    }


@pytest.mark.parametrize(
    "arguments",
    [
        {"x": 0.12345},
        {"x": 1e-7},
        {"x": 1e300},
        {"__entity": {"type": "Workload", "id": AGENT}},
        {"a": {"__extn": {"fn": "decimal", "arg": "1.0"}}},
    ],
)
def test_values_cedar_cannot_hold_as_they_are_are_refused(arguments: dict[str, Any]) -> None:
    with pytest.raises(CedarValueError):
        cedar_value(arguments)


REFUND_CEDAR = """
@id("refund-small")
permit (principal, action == Action::"tools.call", resource == Resource::"mcp/billing/refund")
when { context.tool.discovery || context.tool.arguments.amount < 500 };

@id("no-forged-entity")
permit (principal, action == Action::"tools.call", resource == Resource::"mcp/billing/lookup")
when { context.tool.arguments.who == Workload::"spiffe://example.org/agent/reporter" };

@id("decimal-ok")
permit (principal, action == Action::"tools.call", resource == Resource::"mcp/billing/tip")
when { context.tool.arguments.rate.lessThan(decimal("0.2")) };

@id("plain-read")
permit (principal, action == Action::"read", resource) when { !(context has tool) };
"""

REFUND_REGO = """
package authority

permits contains "refund-small" if {
    input.action == "tools.call"
    input.resource == "mcp/billing/refund"
    input.tool.discovery
}

permits contains "refund-small" if {
    input.action == "tools.call"
    input.resource == "mcp/billing/refund"
    input.tool.arguments.amount < 500
}

permits contains "plain-read" if {
    input.action == "read"
    not input.tool
}

decision := {"allow": true, "require_approval": false, "reasons": reasons} if {
    count(permits) > 0
} else := {"allow": false, "require_approval": false}

reasons := sort([p | some p in permits])
"""


def _outcomes(engine: PolicyEngine) -> list[Outcome]:
    inputs = [
        tool_input(call({"amount": 499})),
        tool_input(call({"amount": 500})),
        tool_input(call({})),  # no amount: the permit errors (Cedar) / is undefined (Rego)
        tool_input(call({"amount": "1"})),  # a string: no comparison with a number holds
        tool_input(ToolFact.discovering("billing", "refund")),
        tool_input(ToolFact("billing", "refund", None, "ab" * 32)),  # delegated: by digest
        tool_input(None),  # a metric read: no tool fact
    ]
    return [engine.decide(inp).outcome for inp in inputs]


EXPECTED = [
    Outcome.ALLOW,
    Outcome.DENY,
    Outcome.DENY,
    Outcome.DENY,
    Outcome.ALLOW,
    Outcome.DENY,
    Outcome.ALLOW,
]


def test_cedar_sees_the_call() -> None:
    assert _outcomes(cedar(REFUND_CEDAR)) == EXPECTED


@requires_rego
def test_rego_sees_the_call() -> None:
    assert _outcomes(rego(REFUND_REGO)) == EXPECTED


def test_cedar_arguments_cannot_forge_an_entity() -> None:
    engine = cedar(REFUND_CEDAR)
    forged = tool_input(
        call({"who": {"__entity": {"type": "Workload", "id": AGENT}}}, name="lookup")
    )
    decision = engine.decide(forged)  # never raises
    assert decision.outcome is Outcome.DENY
    assert "'__'" in " ".join(decision.reasons)


def test_cedar_decimals_and_numbers_it_cannot_hold() -> None:
    engine = cedar(REFUND_CEDAR)
    assert engine.decide(tool_input(call({"rate": 0.15}, name="tip"))).outcome is Outcome.ALLOW
    assert engine.decide(tool_input(call({"rate": 0.25}, name="tip"))).outcome is Outcome.DENY
    precise = engine.decide(tool_input(call({"rate": 0.12345}, name="tip")))
    assert precise.outcome is Outcome.DENY
    assert "arguments.rate" in " ".join(precise.reasons)
    assert "0.12345" not in " ".join(precise.reasons)  # the path, never the value


def test_cedar_context_has_no_tool_outside_a_tool_call() -> None:
    explained = cedar(REFUND_CEDAR).explain(tool_input(None))  # type: ignore[attr-defined]
    assert "tool" not in explained["request"]["context"]


def test_a_forbid_over_arguments_must_guard_them_in_discovery() -> None:
    """An erroring forbid denies (Cedar host rule): guarded with ``has``, it does not fire in
    discovery, and still fires on the call."""
    permit = (
        'permit (principal, action == Action::"tools.call", resource) when { context has tool };\n'
    )
    unguarded = cedar(
        permit + "forbid (principal, action, resource) when { context.tool.arguments.amount > 9 };"
    )
    guarded = cedar(
        permit + "forbid (principal, action, resource) when { context has tool && "
        "context.tool.arguments has amount && context.tool.arguments.amount > 9 };"
    )
    discovery = tool_input(ToolFact.discovering("billing", "refund"))
    assert unguarded.decide(discovery).outcome is Outcome.DENY
    assert guarded.decide(discovery).outcome is Outcome.ALLOW
    assert guarded.decide(tool_input(call({"amount": 10}))).outcome is Outcome.DENY
    assert guarded.decide(tool_input(call({"amount": 9}))).outcome is Outcome.ALLOW


def test_time_is_the_inputs() -> None:
    assert tool_input(call({})).time == MONDAY_10


# --- the example policy for a small tool set -----------------------------------------------------

TOOLS_TESTS = EXAMPLES / "tools.tests.json"


@pytest.mark.parametrize("suffix", [".cedar", ".rego"])
def test_the_tools_example_passes_its_own_tests(suffix: str) -> None:
    if suffix == ".rego" and not rego_available():
        pytest.skip("regorus is not installed")
    results = run_policy_tests(load_policy_set([EXAMPLES / f"tools{suffix}"]), [TOOLS_TESTS])
    assert len(results) >= 20
    assert [r.name for r in results if not r.passed] == []
    names = " ".join(r.name for r in results)
    assert "discovery" in names
    assert "approval" in names


@requires_rego
def test_the_tools_example_decides_alike_in_both_backends() -> None:
    both = [load_policy_set([EXAMPLES / f"tools{suffix}"]) for suffix in (".cedar", ".rego")]
    for case in load_policy_tests(TOOLS_TESTS):
        a, b = (engine.decide(case.input) for engine in both)
        assert (a.outcome, a.ttl_cap, a.max_delegation_depth, set(a.reasons)) == (
            b.outcome,
            b.ttl_cap,
            b.max_delegation_depth,
            set(b.reasons),
        ), case.name
