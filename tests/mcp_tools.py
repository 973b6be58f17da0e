"""A real MCP server (the official SDK's ``MCPServer``) for the gateway's tests and benchmark.

Run as ``python -m tests.mcp_tools --port N --log FILE --credential-env NAME``: streamable
HTTP on ``http://127.0.0.1:N/mcp``. Every request must carry ``Authorization: Bearer <the
credential>`` (the one the gateway injects); any other is answered 401 and logged as
``{"refused": "credential"}``. Every tool call is logged as one JSON line
(``{"tool": ..., "arguments": ...}``), and a streamed call that is cut as
``{"cancelled": "stream_report"}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from starlette.types import ASGIApp, Receive, Scope, Send


class CallLog:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        with self._lock, self._path.open("a") as out:
            out.write(json.dumps(record, sort_keys=True) + "\n")


def build(log: CallLog) -> MCPServer:
    server = MCPServer("gateway-test-tools")

    def called(tool: str, **arguments: Any) -> None:
        log.write({"tool": tool, "arguments": arguments})

    @server.tool()
    def echo(text: str) -> str:
        called("echo", text=text)
        return text

    @server.tool()
    def refund(invoice: str, amount: float) -> str:
        called("refund", invoice=invoice, amount=amount)
        return f"refunded {amount} on {invoice}"

    @server.tool()
    def deploy(service: str, environment: str) -> str:
        called("deploy", service=service, environment=environment)
        return f"deployed {service} to {environment}"

    @server.tool()
    def delete_invoice(invoice: str) -> str:
        called("delete_invoice", invoice=invoice)
        return f"deleted {invoice}"

    @server.tool()
    def get_invoice(invoice: str) -> str:
        called("get_invoice", invoice=invoice)
        return json.dumps({"invoice": invoice, "amount": 42})

    @server.tool()
    async def stream_report(steps: int, ctx: Context) -> str:
        called("stream_report", steps=steps)
        try:
            for step in range(steps):
                await ctx.report_progress(step + 1, steps, f"step {step + 1}")
                await asyncio.sleep(0.5)
        except asyncio.CancelledError:
            log.write({"cancelled": "stream_report"})
            raise
        log.write({"finished": "stream_report"})
        return f"report of {steps} steps"

    return server


class RequireCredential:
    """401 for any request without the credential the gateway is configured to inject."""

    def __init__(self, app: ASGIApp, credential: str, log: CallLog) -> None:
        self._app = app
        self._expected = f"Bearer {credential}".encode()
        self._log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            values = [v for k, v in scope["headers"] if k == b"authorization"]
            if values != [self._expected]:
                self._log.write({"refused": "credential", "headers": len(values)})
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"bad credential"})
                return
        await self._app(scope, receive, send)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--credential-env", required=True)
    args = parser.parse_args()
    log = CallLog(args.log)
    app = build(log).streamable_http_app()
    wrapped = RequireCredential(app, os.environ[args.credential_env], log)
    uvicorn.run(wrapped, host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
