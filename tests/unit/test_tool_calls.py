"""The tool-call rules of Exchange requests and the gateway's records, without a server."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from authority import toolcall
from authority.errors import InvalidArgument
from authority.exchange import (
    AuditContext,
    ExchangeRequest,
    check_plain_intent,
    tool_call_context,
    tool_call_intent,
)
from authority.tokens import Intent
from authority.tool_calls import ToolCallRecord

CALL = toolcall.ToolCall("billing", "refund", {"amount": 10, "invoice": "inv-1"})
NOW = dt.datetime(2026, 12, 7, 10, 0, tzinfo=dt.UTC)


def derived(**overrides: Any) -> Intent:
    values: dict[str, Any] = {
        "action": "",
        "resource": "",
        "purpose": "refund",
        "environment": "",
        "parameters": {},
    }
    values.update(overrides)
    return tool_call_intent(CALL, **values)


def test_the_intent_is_derived_from_the_call() -> None:
    intent = derived(parameters={"ticket": "7"})
    assert (intent.action, intent.resource) == ("tools.call", "mcp/billing/refund")
    assert dict(intent.parameters) == {"ticket": "7", "mcp.arguments_sha256": CALL.digest}
    assert derived(action="tools.call", resource="mcp/billing/refund") == derived()


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"action": "read"}, "TOOL_CALL_MISMATCH"),
        ({"resource": "mcp/billing/get_invoice"}, "TOOL_CALL_MISMATCH"),
        ({"parameters": {"mcp.arguments_sha256": "0" * 64}}, "RESERVED_PARAMETER"),
        ({"parameters": {"mcp.other": "x"}}, "RESERVED_PARAMETER"),
    ],
)
def test_a_contradicting_intent_is_refused(overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        derived(**overrides)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("action", "resource", "parameters", "reason"),
    [
        ("tools.call", "metrics/prod", {}, "TOOL_CALL_REQUIRED"),
        ("read", "mcp/billing/refund", {}, "TOOL_CALL_REQUIRED"),
        ("read", "mcp", {}, "TOOL_CALL_REQUIRED"),
        ("read", "metrics/prod", {"mcp.arguments_sha256": "0" * 64}, "RESERVED_PARAMETER"),
    ],
)
def test_tool_call_intents_need_a_tool_call(
    action: str, resource: str, parameters: dict[str, str], reason: str
) -> None:
    intent = Intent(action=action, resource=resource, purpose="p", parameters=parameters)
    with pytest.raises(InvalidArgument) as caught:
        check_plain_intent(intent)
    assert caught.value.reason == reason
    with pytest.raises(InvalidArgument):
        ExchangeRequest(intent=intent, audience="a")
    plain = Intent(action="read", resource="metrics/mcp", purpose="p", parameters={"mcpx": "1"})
    assert check_plain_intent(plain) is plain


def test_a_request_with_a_call_must_carry_its_digest() -> None:
    request = ExchangeRequest(intent=derived(), audience="gw", tool_call=CALL)
    assert request.context.tool_name == "refund"
    assert request.context.tool_args_digest == CALL.digest
    assert request.tool is not None
    assert request.tool.arguments_sha256 == CALL.digest
    forged = Intent(
        action="tools.call",
        resource="mcp/billing/refund",
        purpose="refund",
        parameters={"mcp.arguments_sha256": "0" * 64},
    )
    with pytest.raises(InvalidArgument) as caught:
        ExchangeRequest(intent=forged, audience="gw", tool_call=CALL)
    assert caught.value.reason == "TOOL_CALL_MISMATCH"


def test_the_audit_context_is_the_calls() -> None:
    assert tool_call_context(CALL, AuditContext(tool_name="refund")).tool_args_digest == (
        CALL.digest
    )
    for context in (
        AuditContext(tool_name="other"),
        AuditContext(tool_args_digest="0" * 64),
    ):
        with pytest.raises(InvalidArgument) as caught:
            tool_call_context(CALL, context)
        assert caught.value.reason == "TOOL_CALL_MISMATCH"


def record(**overrides: Any) -> ToolCallRecord:
    values: dict[str, Any] = {
        "caller": "spiffe://example.org/agent/reporter",
        "task_id": "t1",
        "jti": "abc_DEF-1",
        "server": "billing",
        "tool": "refund",
        "arguments_sha256": CALL.digest,
        "decision": "forwarded",
        "reason": "",
        "upstream_status": 200,
        "duration_us": 10,
        "outcome": "ok",
        "request_id": "1",
    }
    values.update(overrides)
    return ToolCallRecord.from_fields(at_us=int(NOW.timestamp() * 1_000_000), **values)


def test_a_record_becomes_one_audit_event_with_the_digest_only() -> None:
    event = record().event("spiffe://example.org/gateway/mcp", NOW)
    assert event.kind == "tool.call"
    assert event.actor == "spiffe://example.org/agent/reporter"
    assert event.subject == "mcp/billing/refund"
    assert event.task_id == "t1"
    assert event.details["arguments_sha256"] == CALL.digest
    assert event.details["at"] == NOW.isoformat()
    assert "inv-1" not in event.details_json
    refused = record(decision="refused", tool="no such", jti="", task_id="", outcome="")
    assert refused.event("g", NOW).subject == "billing"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"decision": "dropped"}, "BAD_TOOL_RECORD"),
        ({"jti": ""}, "BAD_TOOL_RECORD"),  # forwarded without a token
        ({"jti": "a b"}, "BAD_TOOL_RECORD"),
        ({"arguments_sha256": "ABC"}, "BAD_TOOL_RECORD"),
        ({"upstream_status": 99}, "BAD_TOOL_RECORD"),
        ({"duration_us": -1}, "BAD_TOOL_RECORD"),
        ({"outcome": "great"}, "BAD_TOOL_RECORD"),
        ({"reason": "x" * 65}, "BAD_TOOL_RECORD"),
        ({"server": "Billing"}, "BAD_TOOL_CALL"),
        ({"tool": "a b"}, "BAD_TOOL_CALL"),
        ({"task_id": "bad task"}, "BAD_TOOL_RECORD"),
        ({"caller": "nobody"}, "INVALID_SPIFFE_ID"),
        ({"request_id": "x" * 129}, "TOO_LONG"),
    ],
)
def test_bad_records_are_refused(overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        record(**overrides)
    assert caught.value.reason == reason


def test_gateways_are_spiffe_ids_in_the_configuration() -> None:
    from authority.config import Config

    config = Config.from_mapping({"gateways": ["spiffe://example.org/gateway/mcp"]})
    assert config.gateways == ("spiffe://example.org/gateway/mcp",)
    assert Config().gateways == ()
    with pytest.raises(InvalidArgument) as caught:
        Config.from_mapping({"gateways": ["gateway/mcp"]})
    assert caught.value.reason == "INVALID_SPIFFE_ID"
