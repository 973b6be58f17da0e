"""MCP tool calls on the authority's side, through the real server: Exchange with a tool call
(the intent and the argument digest derived by the authority, the arguments seen by policy),
approvals bound to the arguments and used once, delegation keeping the digest, and the
gateway RPCs (ListCallableTools, RecordToolCalls) with the audit trace they leave.

The example policy examples/policies/tools.cedar (with its tests) is loaded as an operator
would; the trust domain is example.org; agents and the gateway attest with join tokens."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from authority import audit_cli, toolcall
from authority._pb import authority_v1_authority_pb2 as pb
from authority.audit import AuditRecord
from tests.helpers import Running, running_authority
from tests.helpers import test_config as make_config
from tests.integration.test_exchange import Agent, attest_agent, claims_of, issued_tokens
from tests.security._attack import assert_status, count_rows, rpc_error

TD = "example.org"
REPORTER = f"spiffe://{TD}/agent/reporter"
HELPER = f"spiffe://{TD}/agent/helper"
GATEWAY = f"spiffe://{TD}/gateway/mcp"
WEB = f"spiffe://{TD}/svc/web"
AUDIENCE = "mcp-gateway"
PURPOSE = "customer ticket 7"
POLICIES = Path(__file__).resolve().parents[2] / "examples" / "policies"
PROMPT_SHA256 = "cd" * 32


@pytest.fixture
async def authority(tmp_path: Path, socket_dir: Path) -> AsyncIterator[Running]:
    """A real authority whose configuration names one MCP gateway, with the tools policy."""
    config = dataclasses.replace(make_config(tmp_path / "data", socket_dir), gateways=(GATEWAY,))
    async with running_authority(config) as running:
        files = [
            pb.PolicyFile(name=name, content=(POLICIES / name).read_text())
            for name in ("tools.cedar", "tools.tests.json")
        ]
        info = await running.admin().stub.LoadPolicy(pb.LoadPolicyRequest(files=files))
        assert (info.policy_id, info.backend) == ("tools", "cedar")
        yield running


@pytest.fixture
async def reporter(authority: Running, tmp_path: Path) -> Agent:
    return await attest_agent(authority, REPORTER, tmp_path / "reporter")


@pytest.fixture
async def gateway(authority: Running, tmp_path: Path) -> Agent:
    return await attest_agent(authority, GATEWAY, tmp_path / "gateway")


def tool_request(
    server: str,
    tool: str,
    arguments: dict[str, Any] | str,
    *,
    task_id: str = "",
    approval_id: str = "",
    action: str = "",
    resource: str = "",
    parameters: dict[str, str] | None = None,
    context: pb.AuditContext | None = None,
) -> pb.ExchangeRequest:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return pb.ExchangeRequest(
        intent=pb.Intent(
            action=action, resource=resource, purpose=PURPOSE, parameters=parameters or {}
        ),
        audience=AUDIENCE,
        task_id=task_id,
        approval_id=approval_id,
        context=context or pb.AuditContext(prompt_sha256=PROMPT_SHA256, model="test-model"),
        tool_call=pb.ToolCall(server=server, tool=tool, arguments_json=text),
    )


async def exchange(agent: Agent, request: pb.ExchangeRequest) -> pb.ExchangeResponse:
    return await (await agent.stub()).Exchange(request)


async def refused(agent: Agent, request: pb.ExchangeRequest) -> grpc.aio.AioRpcError:
    return await rpc_error(exchange(agent, request))


def digest(arguments: dict[str, Any]) -> str:
    return toolcall.arguments_digest(arguments)


async def records_of(authority: Running, task_id: str) -> list[AuditRecord]:
    return await audit_cli.trace(authority.admin(), task_id)


# --- Exchange with a tool call ------------------------------------------------------------------


async def test_tool_call_tokens_carry_the_digest_the_authority_computed(
    authority: Running, reporter: Agent
) -> None:
    task = "ticket-7"
    arguments = {"invoice": "inv-1", "note": "caf\u00e9", "lines": [1, 2.0]}
    got = await exchange(reporter, tool_request("billing", "get_invoice", arguments, task_id=task))
    assert got.WhichOneof("result") == "token"
    claims = claims_of(got.token.token)
    assert claims["scope"] == toolcall.ACTION
    assert claims["aud"] == AUDIENCE
    assert claims["tctx"]["resource"] == "mcp/billing/get_invoice"
    assert claims["tctx"]["parameters"] == {toolcall.ARGUMENTS_PARAMETER: digest(arguments)}
    assert got.token.may_delegate == 1
    assert 0 < claims["exp"] - claims["iat"] <= 60

    # Key order and 2.0 for 2 do not change the call: one digest (RFC 8785).
    same = '{"lines": [1, 2], "note": "caf\\u00e9", "invoice": "inv-1"}'
    again = await exchange(reporter, tool_request("billing", "get_invoice", same, task_id=task))
    assert claims_of(again.token.token)["tctx"]["parameters"] == claims["tctx"]["parameters"]

    # The intent may name the derived action and resource, and parameters of its own.
    named = await exchange(
        reporter,
        tool_request(
            "billing",
            "refund",
            {"invoice": "inv-1", "amount": 499},
            task_id=task,
            action="tools.call",
            resource="mcp/billing/refund",
            parameters={"ticket": "7"},
        ),
    )
    assert claims_of(named.token.token)["tctx"]["parameters"] == {
        "ticket": "7",
        toolcall.ARGUMENTS_PARAMETER: digest({"invoice": "inv-1", "amount": 499}),
    }

    # Denied by the arguments, and never for a delete_*.
    err = await refused(reporter, tool_request("billing", "refund", {"amount": 500}, task_id=task))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    err = await refused(reporter, tool_request("billing", "refund", {"amount": 1.5}, task_id=task))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    err = await refused(
        reporter, tool_request("billing", "delete_invoice", {"invoice": "inv-1"}, task_id=task)
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    assert "tools-never-delete" in (err.details() or "")

    # The audit holds the call's tool and digest, never the argument values.
    records = await records_of(authority, task)
    decided = [r for r in records if r.kind == "policy.decided"]
    assert [r.details["outcome"] for r in decided] == ["allow", "allow", "allow"] + ["deny"] * 3
    first = decided[0].details
    assert first["input"]["tool"] == {
        "server": "billing",
        "name": "get_invoice",
        "arguments_sha256": digest(arguments),
        "discovery": False,
    }
    assert first["context"]["tool"] == "get_invoice"
    assert first["context"]["tool_args_sha256"] == digest(arguments)
    every = json.dumps([r.details for r in records])
    assert "inv-1" not in every
    assert "caf" not in every


async def test_the_intent_of_a_tool_call_comes_only_from_a_tool_call(
    authority: Running, reporter: Agent
) -> None:
    stub = await reporter.stub()

    async def plain(action: str, resource: str, **parameters: str) -> grpc.aio.AioRpcError:
        request = pb.ExchangeRequest(
            intent=pb.Intent(
                action=action, resource=resource, purpose=PURPOSE, parameters=parameters
            ),
            audience=AUDIENCE,
        )
        return await rpc_error(stub.Exchange(request))

    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert_status(await plain("tools.call", "mcp/billing/refund"), invalid, "TOOL_CALL_REQUIRED")
    assert_status(await plain("tools.call", "metrics/prod"), invalid, "TOOL_CALL_REQUIRED")
    assert_status(await plain("read", "mcp/billing/refund"), invalid, "TOOL_CALL_REQUIRED")
    assert_status(await plain("read", "mcp"), invalid, "TOOL_CALL_REQUIRED")
    reserved = await plain("read", "metrics/prod", **{"mcp.arguments_sha256": "00" * 32})
    assert_status(reserved, invalid, "RESERVED_PARAMETER")
    assert_status(
        await plain("read", "metrics/prod", **{"mcp.x": "1"}), invalid, "RESERVED_PARAMETER"
    )

    call = {"amount": 10}
    cases: list[tuple[pb.ExchangeRequest, str]] = [
        (tool_request("billing", "refund", call, action="read"), "TOOL_CALL_MISMATCH"),
        (
            tool_request("billing", "refund", call, resource="mcp/billing/get_invoice"),
            "TOOL_CALL_MISMATCH",
        ),
        (
            tool_request("billing", "refund", call, parameters={"mcp.arguments_sha256": "0" * 64}),
            "RESERVED_PARAMETER",
        ),
        (
            tool_request(
                "billing", "refund", call, context=pb.AuditContext(tool_args_sha256="0" * 64)
            ),
            "TOOL_CALL_MISMATCH",
        ),
        (
            tool_request("billing", "refund", call, context=pb.AuditContext(tool_name="other")),
            "TOOL_CALL_MISMATCH",
        ),
        (tool_request("billing", "refund", "[1, 2]"), "BAD_TOOL_CALL"),
        (tool_request("billing", "refund", '{"a": 1, "a": 2}'), "BAD_TOOL_CALL"),
        (tool_request("billing", "refund", '{"a": NaN}'), "BAD_TOOL_CALL"),
        (tool_request("billing", "refund", '{"n": 9007199254740993}'), "BAD_TOOL_CALL"),
        (tool_request("Billing", "refund", call), "BAD_TOOL_CALL"),
        (tool_request("billing", "re fund", call), "BAD_TOOL_CALL"),
    ]
    for request, reason in cases:
        assert_status(await rpc_error(stub.Exchange(request)), invalid, reason)
    assert issued_tokens(authority.data_dir) == 0


SECRET = "zebra-7f3c-not-for-the-audit"  # an argument value that must never be recorded


def plain_request(
    action: str, resource: str, *, task_id: str, **parameters: str
) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(
        intent=pb.Intent(action=action, resource=resource, purpose=PURPOSE, parameters=parameters),
        audience=AUDIENCE,
        task_id=task_id,
        context=pb.AuditContext(prompt_sha256=PROMPT_SHA256, model="test-model"),
    )


def refused_cases() -> list[tuple[pb.ExchangeRequest, str, dict[str, str]]]:
    """Exchanges refused before any decision for their tool call, each in a task of its own:
    (request, reason, the tool_call details its record should hold)."""
    call = {"note": SECRET, "amount": 10}
    known = {"server": "billing", "tool": "refund", "arguments_sha256": digest(call)}
    names = {"server": "billing", "tool": "refund"}
    cases: list[tuple[pb.ExchangeRequest, str, dict[str, str]]] = []

    def add(request: pb.ExchangeRequest, reason: str, details: dict[str, str]) -> None:
        request.task_id = f"refused-{len(cases)}"
        cases.append((request, reason, details))

    add(tool_request("billing", "refund", call, action="read"), "TOOL_CALL_MISMATCH", known)
    add(
        tool_request("billing", "refund", call, resource="mcp/billing/get_invoice"),
        "TOOL_CALL_MISMATCH",
        known,
    )
    add(
        tool_request(
            "billing",
            "refund",
            call,
            context=pb.AuditContext(prompt_sha256=PROMPT_SHA256, tool_name="other"),
        ),
        "TOOL_CALL_MISMATCH",
        known,
    )
    add(
        tool_request("billing", "refund", call, parameters={"mcp.arguments_sha256": "0" * 64}),
        "RESERVED_PARAMETER",
        known,
    )
    add(tool_request("billing", "refund", f'["{SECRET}"]'), "BAD_TOOL_CALL", names)
    add(
        tool_request("billing", "refund", f'{{"note": "{SECRET}", "note": 2}}'),
        "BAD_TOOL_CALL",
        names,
    )
    add(
        tool_request("billing", "refund", f'{{"note": "{SECRET}", "n": NaN}}'),
        "BAD_TOOL_CALL",
        names,
    )
    add(tool_request("billing", "refund", f'{{"note": "{SECRET}"'), "BAD_TOOL_CALL", names)
    add(
        tool_request("Billing", "refund", call),
        "BAD_TOOL_CALL",
        {"tool": "refund", "arguments_sha256": digest(call)},
    )
    add(
        tool_request("billing", "re fund", call),
        "BAD_TOOL_CALL",
        {"server": "billing", "arguments_sha256": digest(call)},
    )
    add(plain_request("tools.call", "mcp/billing/refund", task_id=""), "TOOL_CALL_REQUIRED", {})
    add(plain_request("read", "mcp/billing/refund", task_id=""), "TOOL_CALL_REQUIRED", {})
    add(
        plain_request("read", "metrics/prod", task_id="", **{"mcp.x": SECRET}),
        "RESERVED_PARAMETER",
        {},
    )
    return cases


async def test_an_exchange_refused_for_its_tool_call_is_recorded_once(
    authority: Running, reporter: Agent
) -> None:
    cases = refused_cases()
    for request, reason, _ in cases:
        err = await refused(reporter, request)
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, reason)
    assert issued_tokens(authority.data_dir) == 0
    assert count_rows(authority.data_dir, "audit", "kind = 'policy.decided'") == 0
    assert count_rows(authority.data_dir, "audit", "kind = 'exchange.refused'") == len(cases)
    for request, reason, tool_call in cases:
        (record,) = await records_of(authority, request.task_id)
        assert record.kind == "exchange.refused"
        assert record.actor == REPORTER
        details = record.details
        assert details["reason"] == reason, request.task_id
        assert details["message"]
        assert details["audience"] == AUDIENCE
        assert details["context"]["prompt_sha256"] == PROMPT_SHA256
        assert details["caller"]["identity_id"]
        if request.HasField("tool_call"):
            assert details["tool_call"] == tool_call, request.task_id
            if "server" in tool_call and "tool" in tool_call:
                assert record.subject == "mcp/billing/refund"
        else:
            assert "tool_call" not in details
            assert record.subject == request.intent.resource

    # A tool call naming another environment than its resource's: one record, that reason.
    other = tool_request("billing", "refund", {"amount": 10}, task_id="refused-environment")
    other.intent.environment = "sandbox"
    err = await refused(reporter, other)
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "ENVIRONMENT_MISMATCH")
    (record,) = await records_of(authority, "refused-environment")
    assert record.details["reason"] == "ENVIRONMENT_MISMATCH"
    assert count_rows(authority.data_dir, "audit", "kind = 'exchange.refused'") == len(cases) + 1


async def test_a_refused_tool_calls_arguments_never_reach_the_audit(
    authority: Running, reporter: Agent
) -> None:
    for request, reason, _ in refused_cases():
        assert_status(await refused(reporter, request), grpc.StatusCode.INVALID_ARGUMENT, reason)
    exported = io.StringIO()
    count = await audit_cli.export_to(authority.admin(), exported)
    text = exported.getvalue()
    assert count > 0
    assert "exchange.refused" in text
    assert SECRET not in text
    assert SECRET[:12] not in text


# --- approvals: bound to the arguments, one token ------------------------------------------------


async def test_an_approval_is_for_these_arguments_and_yields_one_token(
    authority: Running, reporter: Agent
) -> None:
    admin = authority.admin().stub
    task = "release-1.4.2"
    production = {"environment": "production", "version": "1.4.2"}
    other = {"environment": "production", "version": "6.6.6"}

    asked = await exchange(reporter, tool_request("deploy", "deploy", production, task_id=task))
    assert asked.WhichOneof("result") == "pending"
    approval_id = asked.pending.id
    intent = json.loads(asked.pending.intent_json)
    assert intent["parameters"] == {toolcall.ARGUMENTS_PARAMETER: digest(production)}
    await admin.Approve(pb.ApproveRequest(id=approval_id, grant_seconds=300, note="change 42"))

    # The approval for `production` cannot collect a token for other arguments.
    err = await refused(reporter, tool_request("deploy", "deploy", other, approval_id=approval_id))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "APPROVAL_OTHER_INTENT")

    before = issued_tokens(authority.data_dir)
    collected = await exchange(
        reporter, tool_request("deploy", "deploy", production, approval_id=approval_id)
    )
    assert collected.WhichOneof("result") == "token"
    claims = claims_of(collected.token.token)
    assert claims["txn"] == task
    assert claims["tctx"]["parameters"] == {toolcall.ARGUMENTS_PARAMETER: digest(production)}
    assert issued_tokens(authority.data_dir) == before + 1

    # Used: a second Exchange with it is refused, and nothing more is issued.
    err = await refused(
        reporter, tool_request("deploy", "deploy", production, approval_id=approval_id)
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "APPROVAL_USED")
    assert issued_tokens(authority.data_dir) == before + 1

    # Staging needs no approval; other arguments for production ask for one of their own.
    staging = await exchange(
        reporter, tool_request("deploy", "deploy", {"environment": "staging"}, task_id=task)
    )
    assert staging.WhichOneof("result") == "token"
    fresh = await exchange(reporter, tool_request("deploy", "deploy", other, task_id=task))
    assert fresh.WhichOneof("result") == "pending"
    assert fresh.pending.id != approval_id


# --- delegation keeps the call ------------------------------------------------------------------


async def test_a_delegated_tool_call_token_keeps_its_call_and_digest(
    authority: Running, reporter: Agent, tmp_path: Path
) -> None:
    helper = await attest_agent(authority, HELPER, tmp_path / "helper")
    arguments = {"invoice": "inv-9"}
    parent = await exchange(reporter, tool_request("billing", "get_invoice", arguments))
    token = parent.token.token

    child = await reporter.delegate(token, helper)
    child_claims = claims_of(child.token.token)
    assert child_claims["tctx"] == claims_of(token)["tctx"]
    assert child_claims["tctx"]["parameters"] == {toolcall.ARGUMENTS_PARAMETER: digest(arguments)}
    assert child_claims["act"] == {"sub": HELPER}

    # Not for another (or a "narrower") resource: a tool is a leaf.
    for resource in ("mcp/billing/get_invoice/x", "mcp/billing"):
        err = await rpc_error(reporter.delegate(token, helper, resource=resource))
        assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "DELEGATION_WIDENS")

    # A refund token may not be delegated at all (its permit has no @delegation).
    refund = await exchange(reporter, tool_request("billing", "refund", {"amount": 5}))
    err = await rpc_error(reporter.delegate(refund.token.token, helper))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "DELEGATION_DEPTH")


# --- ListCallableTools --------------------------------------------------------------------------


def _forged_svid(spiffe_id: str) -> bytes:
    """A certificate that looks like an SVID of this trust domain but was never issued here."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "forger")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(minutes=10))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


async def test_list_callable_tools(
    authority: Running, reporter: Agent, gateway: Agent, tmp_path: Path
) -> None:
    stub = await gateway.stub()

    async def listed(caller: bytes, server: str, tools: list[str]) -> list[str]:
        answer = await stub.ListCallableTools(
            pb.ListCallableToolsRequest(
                caller_svid=caller, server=server, audience=AUDIENCE, tools=tools
            )
        )
        return list(answer.tools)

    billing = ["refund", "delete_invoice", "get_invoice", "export_all", "refund"]
    assert await listed(reporter.cert_der, "billing", billing) == [
        "refund",
        "get_invoice",
        "refund",
    ]
    deploy = ["deploy", "delete_release", "rollback"]
    assert await listed(reporter.cert_der, "deploy", deploy) == ["deploy"]
    assert await listed(reporter.cert_der, "deploy", []) == []
    many = [f"tool_{i}" for i in range(500)] + ["get_invoice", "delete_x", "refund"]
    assert await listed(reporter.cert_der, "billing", many) == ["get_invoice", "refund"]
    web = await attest_agent(authority, WEB, tmp_path / "web")
    assert await listed(web.cert_der, "billing", billing) == []  # not an agent: nothing
    # Discovery is not audited as decisions, and hidden tools are not the caller's denials.
    assert count_rows(authority.data_dir, "audit", "kind = 'policy.decided'") == 0
    got = await exchange(reporter, tool_request("billing", "get_invoice", {}, task_id="risk"))
    decided = [r for r in await records_of(authority, "risk") if r.kind == "policy.decided"]
    assert got.WhichOneof("result") == "token"
    assert decided[0].details["input"]["risk"] == 0

    # Refusals.
    err = await rpc_error(
        (await reporter.stub()).ListCallableTools(
            pb.ListCallableToolsRequest(
                caller_svid=reporter.cert_der, server="billing", audience=AUDIENCE, tools=["x"]
            )
        )
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "NOT_A_GATEWAY")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    assert_status(
        await rpc_error(listed(b"not a certificate", "billing", ["refund"])),
        invalid,
        "CALLER_SVID_INVALID",
    )
    assert_status(
        await rpc_error(listed(b"", "billing", ["refund"])), invalid, "CALLER_SVID_INVALID"
    )
    assert_status(
        await rpc_error(listed(_forged_svid(REPORTER), "billing", ["refund"])),
        grpc.StatusCode.UNAUTHENTICATED,
        "CALLER_SVID_INVALID",
    )
    assert_status(
        await rpc_error(listed(reporter.cert_der, "billing", ["bad name"])),
        invalid,
        "BAD_TOOL_CALL",
    )
    assert_status(
        await rpc_error(listed(reporter.cert_der, "Billing", ["refund"])), invalid, "BAD_TOOL_CALL"
    )
    too_many = [f"t{i}" for i in range(1001)]
    assert_status(
        await rpc_error(listed(reporter.cert_der, "billing", too_many)), invalid, "TOO_MANY_TOOLS"
    )

    # A revoked caller is listed nothing: refused as its own calls would be.
    await authority.admin().stub.Revoke(
        pb.RevokeRequest(kind="subject", target=REPORTER, reason="compromised")
    )
    err = await rpc_error(listed(reporter.cert_der, "billing", ["get_invoice"]))
    assert err.code() is grpc.StatusCode.PERMISSION_DENIED, err.details()


# --- RecordToolCalls and the trace ----------------------------------------------------------------


def record(
    *,
    task_id: str,
    jti: str,
    tool: str,
    arguments_sha256: str,
    decision: str = "forwarded",
    **fields: Any,
) -> pb.ToolCallRecord:
    values: dict[str, Any] = {
        "caller": REPORTER,
        "task_id": task_id,
        "jti": jti,
        "server": "billing",
        "tool": tool,
        "arguments_sha256": arguments_sha256,
        "decision": decision,
        "upstream_status": 200 if decision == "forwarded" else 0,
        "duration_us": 1234,
        "at_us": int(time.time() * 1_000_000),
        "outcome": "ok" if decision == "forwarded" else "",
        "request_id": "7",
    }
    values.update(fields)
    return pb.ToolCallRecord(**values)


async def test_record_tool_calls_and_trace_them(
    authority: Running, reporter: Agent, gateway: Agent
) -> None:
    task = "ticket-8"
    arguments = {"invoice": "inv-8", "amount": 120}
    got = await exchange(reporter, tool_request("billing", "refund", arguments, task_id=task))
    jti = got.token.jti
    stub = await gateway.stub()
    answer = await stub.RecordToolCalls(
        pb.RecordToolCallsRequest(
            records=[
                record(task_id=task, jti=jti, tool="refund", arguments_sha256=digest(arguments)),
                record(
                    task_id=task,
                    jti=jti,
                    tool="refund",
                    arguments_sha256=digest({"amount": 9000}),
                    decision="refused",
                    reason="TOOL_ARGUMENTS_MISMATCH",
                ),
                # Refused for its tool's name (or before any token): kept, under the server.
                record(
                    task_id="",
                    jti="",
                    tool="no such/tool",
                    arguments_sha256="",
                    decision="refused",
                    reason="BAD_TOOL_CALL",
                ),
            ]
        )
    )
    assert answer.recorded == 3
    unnamed = count_rows(
        authority.data_dir, "audit", "kind = 'tool.call' AND subject = 'billing' AND task_id = ''"
    )
    assert unnamed == 1
    assert (await stub.RecordToolCalls(pb.RecordToolCallsRequest())).recorded == 0

    trace = await records_of(authority, task)
    kinds = [r.kind for r in trace]
    assert (
        kinds.index("policy.decided") < kinds.index("task_token.issued") < kinds.index("tool.call")
    )
    assert kinds[-2:] == ["tool.call", "tool.call"]
    decided = trace[kinds.index("policy.decided")]
    assert decided.details["context"]["prompt_sha256"] == PROMPT_SHA256
    forwarded, refused_call = trace[-2:]
    assert forwarded.actor == REPORTER
    assert forwarded.subject == "mcp/billing/refund"
    assert forwarded.task_id == task
    assert forwarded.details["gateway"] == GATEWAY
    assert forwarded.details["jti"] == jti
    assert forwarded.details["arguments_sha256"] == digest(arguments)
    assert forwarded.details["decision"] == "forwarded"
    assert forwarded.details["upstream_status"] == 200
    assert forwarded.details["outcome"] == "ok"
    assert refused_call.details["reason"] == "TOOL_ARGUMENTS_MISMATCH"
    lines = [audit_cli.record_line(r) for r in trace]
    assert "inv-8" not in "\n".join(lines)
    assert jti in audit_cli.record_line(forwarded)

    verified = await audit_cli.verify_live(authority.admin())
    assert verified.ok, verified.problem

    # Refusals: not a gateway, a bad record (named by its place), too many.
    err = await rpc_error(
        (await reporter.stub()).RecordToolCalls(
            pb.RecordToolCallsRequest(
                records=[record(task_id=task, jti=jti, tool="refund", arguments_sha256="")]
            )
        )
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "NOT_A_GATEWAY")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    bad: list[tuple[pb.ToolCallRecord, str]] = [
        (record(task_id=task, jti=jti, tool="refund", arguments_sha256="xyz"), "BAD_TOOL_RECORD"),
        (
            record(task_id=task, jti=jti, tool="refund", arguments_sha256="", decision="maybe"),
            "BAD_TOOL_RECORD",
        ),
        (record(task_id="", jti="", tool="refund", arguments_sha256=""), "BAD_TOOL_RECORD"),
        (
            record(task_id=task, jti=jti, tool="refund", arguments_sha256="", outcome="fine"),
            "BAD_TOOL_RECORD",
        ),
        (
            record(task_id=task, jti=jti, tool="refund", arguments_sha256="", at_us=0),
            "BAD_TOOL_RECORD",
        ),
        (
            record(task_id=task, jti=jti, tool="bad name", arguments_sha256=""),
            "BAD_TOOL_CALL",
        ),
        (
            record(task_id="", jti="", tool="x" * 129, arguments_sha256="", decision="refused"),
            "TOO_LONG",
        ),
        (
            record(task_id=task, jti=jti, tool="refund", arguments_sha256="", caller="nope"),
            "INVALID_SPIFFE_ID",
        ),
        (
            record(task_id=task, jti=jti, tool="refund", arguments_sha256="", request_id="x" * 129),
            "TOO_LONG",
        ),
        (
            record(task_id=task, jti=jti, tool="refund", arguments_sha256="", reason="a b"),
            "BAD_TOOL_RECORD",
        ),
    ]
    audit_before = count_rows(authority.data_dir, "audit")
    for bad_record, reason in bad:
        good = record(task_id=task, jti=jti, tool="refund", arguments_sha256="")
        err = await rpc_error(
            stub.RecordToolCalls(pb.RecordToolCallsRequest(records=[good, bad_record]))
        )
        assert_status(err, invalid, reason)
        assert (err.details() or "").startswith("record 1:"), err.details()
    many = [record(task_id=task, jti=jti, tool="refund", arguments_sha256="")] * 501
    err = await rpc_error(stub.RecordToolCalls(pb.RecordToolCallsRequest(records=many)))
    assert_status(err, invalid, "TOO_MANY_RECORDS")
    assert count_rows(authority.data_dir, "audit") == audit_before  # all or nothing
