"""Prompts in the audit: digests always, full text only where the caller's entry opts in."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc

from authority._pb import authority_v1_authority_pb2 as pb
from tests.helpers import Running
from tests.security._attack import assert_status, rpc_error

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples" / "policies"
PROMPT = "Summarise last week's p99 latency for the checkout service. Secret-ish detail: 42."


async def _setup(authority: Running) -> None:
    files = [
        pb.PolicyFile(name=p.name, content=p.read_text())
        for p in (EXAMPLES / "agents.cedar", EXAMPLES / "agents.tests.json")
    ]
    await authority.admin().stub.LoadPolicy(pb.LoadPolicyRequest(files=files))


async def _agent(authority: Running, name: str, record: bool, folder: Path) -> pb.ExchangeResponse:
    spiffe_id = f"spiffe://example.org/agent/{name}"
    await authority.admin().stub.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id=spiffe_id,
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{spiffe_id}")],
            record_prompts=record,
        )
    )
    holder = await authority.attested(spiffe_id, folder)
    stub = await holder.mtls_stub()
    return await stub.Exchange(
        pb.ExchangeRequest(
            intent=pb.Intent(action="read", resource="metrics/prod", purpose="weekly report"),
            audience="metrics-api",
            task_id=f"task-{name}",
            context=pb.AuditContext(prompt=PROMPT, tool_name="query_metrics"),
        )
    )


async def _decision(authority: Running, task: str) -> dict[str, object]:
    stream = authority.admin().stub.ExportAudit(pb.ExportAuditRequest(task_ids=[task]))
    async for record in stream:
        if record.kind == "policy.decided":
            details: dict[str, object] = json.loads(record.details_json)
            return details
    raise AssertionError(f"no decision recorded for {task}")


async def test_an_opted_in_entry_keeps_the_prompt_text(authority: Running, tmp_path: Path) -> None:
    await _setup(authority)
    response = await _agent(authority, "recorded", True, tmp_path / "a")
    assert response.token.token
    context = (await _decision(authority, "task-recorded"))["context"]
    assert isinstance(context, dict)
    assert context["prompt"] == PROMPT
    assert context["prompt_sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()


async def test_other_entries_keep_only_the_digest(authority: Running, tmp_path: Path) -> None:
    await _setup(authority)
    await _agent(authority, "private", False, tmp_path / "b")
    context = (await _decision(authority, "task-private"))["context"]
    assert isinstance(context, dict)
    assert "prompt" not in context
    assert context["prompt_sha256"] == hashlib.sha256(PROMPT.encode()).hexdigest()
    await authority.server.stop(grace=0.1)  # everything committed; then read the files
    needle = PROMPT.encode()
    for path in authority.data_dir.glob("authority.db*"):
        assert needle not in path.read_bytes(), path.name


async def test_a_digest_that_does_not_match_the_prompt_is_refused(
    authority: Running, tmp_path: Path
) -> None:
    await _setup(authority)
    spiffe_id = "spiffe://example.org/agent/liar"
    holder = await authority.attested(spiffe_id, tmp_path / "c")
    stub = await holder.mtls_stub()
    err = await rpc_error(
        stub.Exchange(
            pb.ExchangeRequest(
                intent=pb.Intent(action="read", resource="metrics/prod", purpose="weekly report"),
                audience="metrics-api",
                context=pb.AuditContext(prompt=PROMPT, prompt_sha256="0" * 64),
            )
        )
    )
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
