"""Issue 14 end to end, every part real and a process of its own: ``authority serve`` with the
example tool policy (examples/policies/tools.cedar), a node agent (``authority agent``) whose
Workload API gives both the gateway and the agent their SVIDs, the MCP test server
(``tests/mcp_tools.py``, built on the official SDK) reachable only through ``authority gateway``,
and an agent using ``authority.toolclient`` (the official MCP client underneath).

One agent's afternoon: it lists the tools (it sees only those the policy could let it call),
calls an allowed one (the result comes back, and the task's audit trace reads prompt ->
decision -> token -> tool call), asks for a refund the policy denies (refused at the authority;
and a token for a small refund replayed with the large amount is refused 403 by the gateway:
the MCP server's own log never sees either), and deploys to production (pending -> approved with
the CLI -> the call goes through once; the approval is spent, and never covers other arguments).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pytest

from authority._pb import authority_v1_authority_pb2 as pb
from authority.client import WorkloadApiClient, WorkloadClient
from authority.httpserve import client_context
from authority.keyvault import private_key_pem
from authority.toolclient import (
    ApprovalPending,
    AuthorityRefused,
    Gateway,
    ToolClient,
    ToolClientError,
    describe,
)
from tests.helpers import (
    ServeProcess,
    authority_command,
    free_port,
    interrupt,
    short_socket_dir,
    start_serve,
    wait_until,
)

TD = "spiffe://example.org"
NODE_ID = f"{TD}/node/edge1"
GATEWAY_ID = f"{TD}/gateway/mcp"
AGENT_ID = f"{TD}/agent/billing-bot"
AUDIENCE = "mcp-gateway"
UID = os.getuid()
REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "examples" / "policies" / "tools.cedar"

pytestmark = pytest.mark.timeout(180)


@dataclass
class World:
    root: Path
    served: ServeProcess
    bundle: bytes
    node_socket: Path
    gateway_url: str
    calls_path: Path
    credential: str
    logs: list[Path]

    def upstream_calls(self) -> list[dict[str, Any]]:
        if not self.calls_path.exists():
            return []
        lines = self.calls_path.read_text().splitlines()
        return [c for c in map(json.loads, filter(None, lines)) if "tool" in c]

    def tools(self, api: WorkloadApiClient) -> ToolClient:
        return ToolClient(
            api,
            spiffe_id=AGENT_ID,
            authority=[self.served.address],
            authority_bundle=self.bundle,
            gateways={
                name: Gateway(f"{self.gateway_url}/mcp/{name}", audience=AUDIENCE)
                for name in ("billing", "deploy")
            },
            model="test-model-1",
        )


def _process(args: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, **kwargs)


def _listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    if proc.poll() is not None:
        raise AssertionError("the MCP server exited")
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _log_has(proc: subprocess.Popen[bytes], log: Path, text: str, what: str) -> None:
    def seen() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited:\n{log.read_text(errors='replace')}")
        return text in log.read_text(errors="replace")

    wait_until(seen, what, timeout=60)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    socket_dir = short_socket_dir()
    config = tmp_path / "authority.toml"
    config.write_text(f'gateways = ["{GATEWAY_ID}"]\n')
    served = start_serve(tmp_path / "data", socket_dir, "--config", str(config))
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    try:
        served.cli("policy", "load", str(POLICY))  # refused unless its tests pass
        bundle_path = tmp_path / "bundle.pem"
        bundle_path.write_text(served.cli("bundle", "show").stdout)
        for spiffe_id in (GATEWAY_ID, AGENT_ID):  # both served by the node agent alone
            served.cli(
                "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", NODE_ID,
                "--selector", f"unix:uid:{UID}",
            )  # fmt: skip
        join = served.cli("token", "create", "--spiffe-id", NODE_ID).stdout.strip()
        node_socket = socket_dir / "node.sock"
        logs.append(tmp_path / "node-agent.log")
        node = _process(
            [
                *authority_command(), "agent", "--server", served.address,
                "--trust-bundle", str(bundle_path), "--data-dir", str(tmp_path / "node"),
                "--workload-api-socket", str(node_socket), "--join-token", "-",
            ],
            logs[-1],
            stdin=subprocess.PIPE,
        )  # fmt: skip
        procs.append(node)
        assert node.stdin is not None
        node.stdin.write(join.encode() + b"\n")
        node.stdin.close()
        wait_until(node_socket.exists, "the node agent's Workload API", timeout=60)

        credential = "upstream-" + os.urandom(12).hex()
        mcp_port, gateway_port = free_port(), free_port()
        calls_path = tmp_path / "mcp-calls.jsonl"
        logs.append(tmp_path / "mcp.log")
        mcp = _process(
            [
                sys.executable, "-m", "tests.mcp_tools", "--port", str(mcp_port),
                "--log", str(calls_path), "--credential-env", "E2E_UPSTREAM",
            ],
            logs[-1],
            env={**os.environ, "E2E_UPSTREAM": credential},
        )  # fmt: skip
        procs.append(mcp)
        wait_until(lambda: _listening(mcp, mcp_port), "the MCP server", timeout=60)
        gateway_toml = tmp_path / "gateway.toml"
        upstream = f"http://127.0.0.1:{mcp_port}/mcp"
        gateway_toml.write_text(
            "\n".join(
                [
                    f'listen = "127.0.0.1:{gateway_port}"',
                    f'audience = "{AUDIENCE}"',
                    'trust_domain = "example.org"',
                    f'spiffe_id = "{GATEWAY_ID}"',
                    f'authority = ["{served.address}"]',
                    f'trust_bundle = "{bundle_path}"',
                    f'workload_api_socket = "{node_socket}"',
                    *(
                        f'[[servers]]\nname = "{name}"\nurl = "{upstream}"\n'
                        'credential_env = "E2E_UPSTREAM"'
                        for name in ("billing", "deploy")
                    ),
                ]
            )
            + "\n"
        )
        logs.append(tmp_path / "gateway.log")
        gateway = _process(
            [*authority_command(), "gateway", "--config", str(gateway_toml)],
            logs[-1],
            env={**os.environ, "E2E_UPSTREAM": f"Bearer {credential}"},
        )
        procs.append(gateway)
        _log_has(gateway, logs[-1], "gateway serving", "the gateway")
        yield World(
            tmp_path,
            served,
            bundle_path.read_bytes(),
            node_socket,
            f"https://127.0.0.1:{gateway_port}",
            calls_path,
            credential,
            [*logs, served.log_path],
        )
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                interrupt(proc) if proc is not procs[1] else proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=20)
        served.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


def _trace(world: World, task_id: str) -> list[dict[str, Any]]:
    out = world.served.cli("audit", "trace", task_id, "--format", "json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def _agent_svid(api: WorkloadApiClient) -> tuple[bytes, bytes]:
    svids = await api.fetch_x509_svids()
    mine = next(s for s in svids if s.spiffe_id == AGENT_ID)
    return mine.chain_pem, private_key_pem(mine.key)


async def test_an_agent_calls_tools_through_the_gateway_as_the_policy_allows(
    world: World,
) -> None:
    async with WorkloadApiClient(world.node_socket) as api, world.tools(api) as tools:
        # It sees only the tools the policy could let it call, per server name.
        assert {t.name for t in await tools.list_tools("billing")} == {"get_invoice", "refund"}
        assert {t.name for t in await tools.list_tools("deploy")} == {"deploy"}

        # An allowed call: the result comes back, and the trace reads in order.
        result = await tools.call_tool(
            "billing",
            "get_invoice",
            {"invoice": "inv-7"},
            purpose="answer ticket 7",
            prompt="What does invoice inv-7 say?",
        )
        assert "inv-7" in describe(result)
        task_id = tools.task_id
        assert task_id

        def traced() -> bool:
            return any(r.get("kind") == "tool.call" for r in _trace(world, task_id))

        wait_until(traced, "the gateway's record of the call in the trace", timeout=10)
        kinds = [r["kind"] for r in _trace(world, task_id)]
        decided = kinds.index("policy.decided")
        issued = kinds.index("task_token.issued")
        called = kinds.index("tool.call")
        assert decided < issued < called, kinds
        records = _trace(world, task_id)
        decision = records[decided]["details"]
        assert decision["context"]["prompt_sha256"]  # the prompt as its digest, never its text
        assert "What does invoice" not in json.dumps(records)
        call = records[called]["details"]
        assert (call["server"], call["tool"], call["decision"]) == (
            "billing",
            "get_invoice",
            "forwarded",
        )
        assert call["upstream_status"] == 200
        assert call["outcome"] == "ok"
        assert records[called]["actor"] == AGENT_ID
        verified = world.served.cli("audit", "verify")
        assert verified.returncode == 0

        # A refund the policy denies: refused at the authority, never at the MCP server.
        with pytest.raises(AuthorityRefused) as denied:
            await tools.call_tool(
                "billing", "refund", {"invoice": "inv-7", "amount": 900}, purpose="goodwill"
            )
        assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert not [c for c in world.upstream_calls() if c["arguments"].get("amount") == 900]

        # A small refund is allowed ...
        await tools.call_tool(
            "billing", "refund", {"invoice": "inv-7", "amount": 20}, purpose="duplicate charge"
        )
        assert [
            c["arguments"]["amount"] for c in world.upstream_calls() if c["tool"] == "refund"
        ] == [20]

    # ... and its token, replayed by the agent for the large amount, is refused 403 by the
    # gateway: never forwarded.
    async with WorkloadApiClient(world.node_socket) as api:
        chain, key = await _agent_svid(api)
    async with WorkloadClient(
        world.served.address, world.bundle, svid_chain_pem=chain, svid_key_pem=key
    ) as client:
        reply = await client.exchange(
            pb.ExchangeRequest(
                intent=pb.Intent(purpose="duplicate charge"),
                audience=AUDIENCE,
                tool_call=pb.ToolCall(
                    server="billing",
                    tool="refund",
                    arguments_json=json.dumps({"invoice": "inv-7", "amount": 20}),
                ),
            )
        )
    small = reply.token.token
    body = {
        "jsonrpc": "2.0",
        "id": 9,
        "method": "tools/call",
        "params": {"name": "refund", "arguments": {"invoice": "inv-7", "amount": 900}},
    }
    async with httpx2.AsyncClient(
        verify=client_context(chain, key, world.bundle), timeout=30, trust_env=False
    ) as http:
        answer = await http.post(
            f"{world.gateway_url}/mcp/billing",
            json=body,
            headers={
                "Authorization": f"Bearer {small}",
                "Accept": "application/json, text/event-stream",
            },
        )
    assert answer.status_code == 403
    assert 'error="insufficient_scope"' in answer.headers["www-authenticate"]
    assert not [c for c in world.upstream_calls() if c["arguments"].get("amount") == 900]
    assert world.credential not in answer.text


async def test_a_production_deploy_waits_for_an_operator_and_goes_through_once(
    world: World,
) -> None:
    production = {"service": "web", "environment": "production"}
    async with WorkloadApiClient(world.node_socket) as api, world.tools(api) as tools:
        with pytest.raises(ApprovalPending) as pending:
            await tools.call_tool("deploy", "deploy", production, purpose="ship fix 42")
        approval_id = pending.value.approval_id
        assert not [c for c in world.upstream_calls() if c["tool"] == "deploy"]
        listed = world.served.cli("approvals", "list").stdout
        assert approval_id in listed

        world.served.cli("approve", approval_id, "--for", "10m", "--note", "change 42")
        result = await tools.call_tool(
            "deploy", "deploy", production, purpose="ship fix 42", approval_id=approval_id
        )
        assert "production" in describe(result)
        deploys = [c for c in world.upstream_calls() if c["tool"] == "deploy"]
        assert [c["arguments"] for c in deploys] == [production]

        # The approval is spent: another call with it, for other arguments or the same, is
        # refused by the authority, and nothing more reaches the MCP server.
        other = {"service": "db", "environment": "production"}
        with pytest.raises(ToolClientError) as refused:
            await tools.call_tool(
                "deploy", "deploy", other, purpose="ship fix 42", approval_id=approval_id
            )
        assert "APPROVAL_" in str(refused.value)
    async with WorkloadApiClient(world.node_socket) as api, world.tools(api) as again:
        with pytest.raises(ToolClientError) as spent:
            await again.call_tool(
                "deploy", "deploy", production, purpose="ship fix 42", approval_id=approval_id
            )
        assert "APPROVAL_USED" in str(spent.value)
    deploys = [c for c in world.upstream_calls() if c["tool"] == "deploy"]
    assert len(deploys) == 1
