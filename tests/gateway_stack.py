"""Real parts for the gateway's tests and benchmark: ``authority serve`` (its Workload API on a
Unix socket, the gateway named in ``gateways``), the MCP test server (``tests/mcp_tools.py``)
and ``authority gateway``, each a process of its own, plus agents attested with join tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from cryptography import x509

from authority._pb import authority_v1_authority_pb2 as pb
from authority.client import SvidFiles, WorkloadClient
from authority.httpserve import client_context
from tests.helpers import (
    ServeProcess,
    authority_command,
    free_port,
    short_socket_dir,
    start_serve,
    wait_until,
)

TD = "spiffe://example.org"
GATEWAY_ID = f"{TD}/gateway"
AUDIENCE = "mcp-gateway"
SERVER = "tools"
UID = os.getuid()
REPO = Path(__file__).resolve().parent.parent

POLICY = """
@id("agents-call-tools") @ttl("300")
permit (principal, action == Action::"tools.call", resource)
when { principal.trust_domain == "example.org" && principal.path like "/agent/*" &&
       resource.kind == "mcp" }
unless { context has tool && context.tool.name == "deploy" };

@id("deploy-with-approval") @ttl("300") @approval("required")
permit (principal, action == Action::"tools.call", resource)
when { principal.trust_domain == "example.org" && principal.path like "/agent/*" &&
       context has tool && context.tool.name == "deploy" };

@id("never-delete")
forbid (principal, action == Action::"tools.call", resource)
when { context has tool && context.tool.name like "delete_*" };
"""


@dataclass
class Stack:
    root: Path
    served: ServeProcess
    bundle_path: Path
    mcp: subprocess.Popen[bytes]
    mcp_url: str
    calls_path: Path
    credential: str
    gateway: subprocess.Popen[bytes] | None = None
    gateway_log: Path | None = None
    gateway_port: int = 0
    config_path: Path | None = None
    agents: dict[str, Path] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.gateway_port}/mcp/{SERVER}"

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.gateway_port}"

    def calls(self) -> list[dict[str, Any]]:
        if not self.calls_path.exists():
            return []
        return [json.loads(line) for line in self.calls_path.read_text().splitlines() if line]

    def tool_calls(self) -> list[dict[str, Any]]:
        return [c for c in self.calls() if "tool" in c]

    def log(self) -> str:
        assert self.gateway_log is not None
        return self.gateway_log.read_text(errors="replace")

    # --- agents ----------------------------------------------------------------------------

    async def agent(self, name: str) -> Path:
        """An agent ``spiffe://example.org/agent/<name>`` attested with a join token; its SVID
        folder."""
        if name in self.agents:
            return self.agents[name]
        spiffe_id = f"{TD}/agent/{name}"
        token = self.served.cli("token", "create", "--spiffe-id", spiffe_id).stdout.strip()
        folder = self.root / "agents" / name
        async with WorkloadClient(self.served.address, self.bundle_path.read_bytes()) as client:
            await client.attest_to_folder("join_token", token.encode(), folder)
        self.agents[name] = folder
        return folder

    def client_tls(self, folder: Path) -> ssl.SSLContext:
        chain, key, bundle = SvidFiles(folder).read()
        return client_context(chain, key, bundle)

    def anonymous_tls(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cadata=self.bundle_path.read_text())
        return context

    def http(self, folder: Path | None, **kwargs: Any) -> httpx2.AsyncClient:
        tls = self.client_tls(folder) if folder is not None else self.anonymous_tls()
        return httpx2.AsyncClient(verify=tls, timeout=30, trust_env=False, **kwargs)

    async def exchange(
        self,
        folder: Path,
        tool: str,
        arguments: dict[str, Any],
        *,
        server: str = SERVER,
        audience: str = AUDIENCE,
        ttl: int = 300,
    ) -> pb.TaskTokenIssued:
        """A task token for this exact call, from the authority's Exchange."""
        async with WorkloadClient.from_svid_dir(
            self.served.address, folder, self.bundle_path
        ) as client:
            reply = await client.exchange(
                pb.ExchangeRequest(
                    intent=pb.Intent(purpose="gateway test"),
                    audience=audience,
                    ttl_seconds=ttl,
                    tool_call=pb.ToolCall(
                        server=server, tool=tool, arguments_json=json.dumps(arguments)
                    ),
                )
            )
        assert reply.WhichOneof("result") == "token", reply
        return reply.token

    async def token(self, folder: Path, tool: str, arguments: dict[str, Any], **kw: Any) -> str:
        return (await self.exchange(folder, tool, arguments, **kw)).token

    # --- the gateway -----------------------------------------------------------------------

    def write_config(self, **extra: Any) -> Path:
        lines = [
            f'listen = "127.0.0.1:{self.gateway_port}"',
            f'audience = "{AUDIENCE}"',
            'trust_domain = "example.org"',
            f'authority = ["{self.served.address}"]',
            f'trust_bundle = "{self.bundle_path}"',
            f'workload_api_socket = "{self.served.admin_socket.parent / "api.sock"}"',
            "stale_after_seconds = 3",
        ]
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
        lines += [
            "",
            "[[servers]]",
            f'name = "{SERVER}"',
            f'url = "{self.mcp_url}"',
            'credential_env = "GATEWAY_TEST_UPSTREAM"',
        ]
        path = self.root / "gateway.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_gateway(self, **extra: Any) -> None:
        self.gateway_port = self.gateway_port or free_port()
        self.config_path = self.write_config(**extra)
        self.gateway_log = self.root / f"gateway-{time.monotonic_ns()}.log"
        env = {**os.environ, "GATEWAY_TEST_UPSTREAM": f"Bearer {self.credential}"}
        with open(self.gateway_log, "wb") as out:
            self.gateway = subprocess.Popen(
                [*authority_command(), "gateway", "--config", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        gateway = self.gateway

        def serving() -> bool:
            if gateway.poll() is not None:
                raise AssertionError(f"the gateway exited:\n{self.log()}")
            return "gateway serving" in self.log()

        wait_until(serving, "the gateway to serve", timeout=30)

    def stop_gateway(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            self.gateway.send_signal(signal.SIGTERM)
            try:
                self.gateway.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.gateway.kill()
                self.gateway.wait()


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, what, timeout=30)


@contextlib.contextmanager
def stack(root: Path, *, gateway_x509_ttl: str = "10m", start: bool = True) -> Iterator[Stack]:
    """The authority, the MCP test server and (``start``) the gateway, stopped at the end."""
    socket_dir = short_socket_dir()
    root.mkdir(parents=True, exist_ok=True)
    authority_toml = root / "authority.toml"
    authority_toml.write_text(f'gateways = ["{GATEWAY_ID}"]\n')
    served = start_serve(
        root / "data",
        socket_dir,
        "--config",
        str(authority_toml),
        "--workload-api-socket",
        str(socket_dir / "api.sock"),
    )
    mcp: subprocess.Popen[bytes] | None = None
    current: Stack | None = None
    try:
        # SVIDs from the Workload API authenticate over mutual TLS once its attestor is registered.
        served.cli("attestor", "register", "unix", "--plugin", "unix")
        served.cli(
            "entry", "create", "--spiffe-id", GATEWAY_ID,
            "--selector", f"unix:uid:{UID}", "--x509-ttl", gateway_x509_ttl,
        )  # fmt: skip
        policy = root / "tools.cedar"
        policy.write_text(POLICY)
        served.cli("policy", "load", "--allow-untested", str(policy))
        bundle_path = root / "bundle.pem"
        bundle_path.write_text(served.cli("bundle", "show").stdout)
        credential = secrets.token_urlsafe(24)
        port = free_port()
        calls = root / "mcp-calls.jsonl"
        with open(root / "mcp.log", "wb") as out:
            mcp = subprocess.Popen(
                [
                    sys.executable, "-m", "tests.mcp_tools", "--port", str(port),
                    "--log", str(calls), "--credential-env", "GATEWAY_TEST_UPSTREAM",
                ],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, "GATEWAY_TEST_UPSTREAM": credential},
            )  # fmt: skip
        _wait_port(port, mcp, "the MCP test server")
        current = Stack(
            root, served, bundle_path, mcp, f"http://127.0.0.1:{port}/mcp", calls, credential
        )
        if start:
            current.start_gateway()
        yield current
    finally:
        if current is not None:
            current.stop_gateway()
        if mcp is not None:
            mcp.terminate()
            mcp.wait(timeout=10)
        served.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


class PerCallToken(httpx2.Auth):
    """An agent's client auth for the SDK: each tools/call request gets a fresh task token for
    exactly that call (from Exchange); other requests carry none."""

    requires_request_body = True

    def __init__(self, stack: Stack, folder: Path) -> None:
        self._stack = stack
        self._folder = folder
        self.minted = 0

    async def async_auth_flow(self, request: httpx2.Request) -> AsyncIterator[httpx2.Request]:  # type: ignore[override]
        if request.method == "POST":
            message = json.loads(request.content or b"{}")
            if isinstance(message, dict) and message.get("method") == "tools/call":
                params = message["params"]
                token = await self._stack.token(
                    self._folder, params["name"], params.get("arguments") or {}
                )
                self.minted += 1
                request.headers["Authorization"] = f"Bearer {token}"
        yield request


def served_certificate(port: int) -> bytes:
    """The DER certificate the server on ``port`` presents now."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    x509.load_der_x509_certificate(der)
    return der
