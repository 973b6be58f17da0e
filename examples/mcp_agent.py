"""An agent calling one MCP tool through the gateway, with a task token for exactly that call.

    export SPIFFE_ENDPOINT_SOCKET=unix:///run/spiffe/api.sock   # or --svid-dir ./svid
    python examples/mcp_agent.py --authority authority.example.org:8081 \\
        --bundle bundle.pem --gateway https://gateway.example.org:8443/mcp/billing \\
        --gateway-spiffe-id spiffe://example.org/gateway \\
        --server billing --tool get_invoice --arguments '{"invoice": "inv-42"}' \\
        --purpose "answer ticket 1234"

Lists the tools the gateway shows this agent, calls one, prints its result and ends the task
(its tokens are revoked). Tokens are never printed; the prompt travels as its digest only.
Each option also reads an environment variable (AUTHORITY_SERVER, AUTHORITY_BUNDLE,
MCP_GATEWAY_URL, MCP_GATEWAY_SPIFFE_ID, ...). With --gateway-spiffe-id, a server at the URL
whose certificate names another SPIFFE ID is refused at the TLS handshake, before anything is
sent to it; without it, any workload of the trust domain could pose as the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from authority.client import FetchedX509Svid, SvidFiles, WorkloadApiClient, read_trust_bundle
from authority.toolclient import (
    ApprovalPending,
    Gateway,
    StaticSvids,
    SvidSource,
    ToolClient,
    ToolClientError,
    describe,
)


def options() -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--authority", action="append", default=None, help="HOST:PORT (repeat)")
    parser.add_argument("--bundle", type=Path, default=env("AUTHORITY_BUNDLE"))
    parser.add_argument("--gateway", default=env("MCP_GATEWAY_URL"), help="the server's URL")
    parser.add_argument("--audience", default=env("MCP_GATEWAY_AUDIENCE", "mcp-gateway"))
    parser.add_argument(
        "--gateway-spiffe-id",
        default=env("MCP_GATEWAY_SPIFFE_ID", ""),
        help="the gateway's SPIFFE ID, checked at the TLS handshake (e.g. spiffe://td/gateway)",
    )
    parser.add_argument("--workload-api", default=env("SPIFFE_ENDPOINT_SOCKET"))
    parser.add_argument("--svid-dir", type=Path, help="a saved SVID instead of the Workload API")
    parser.add_argument("--server", default=env("MCP_SERVER", "tools"))
    parser.add_argument("--tool", required=True)
    parser.add_argument("--arguments", default="{}", help="a JSON object")
    parser.add_argument("--purpose", required=True)
    parser.add_argument("--prompt", default=None, help="sent as its SHA-256 only")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for an approval")
    args = parser.parse_args()
    args.authority = args.authority or env("AUTHORITY_SERVER", "").split(",")
    if not (args.bundle and args.gateway and all(args.authority)):
        parser.error("--authority, --bundle and --gateway are required (or their variables)")
    return args


def svids(args: argparse.Namespace) -> SvidSource:
    if args.svid_dir is None:
        return WorkloadApiClient(args.workload_api)
    chain, key_pem, bundle = SvidFiles(args.svid_dir).read_checked()
    leaf = x509.load_pem_x509_certificates(chain)[0]
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    spiffe_id = uris.get_values_for_type(x509.UniformResourceIdentifier)[0]
    key = load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey), "an SVID key is an EC key"
    return StaticSvids([FetchedX509Svid(spiffe_id, chain, key, bundle)])


async def main() -> int:
    args = options()
    client = ToolClient(
        svids(args),
        authority=args.authority,
        authority_bundle=read_trust_bundle(args.bundle),
        gateways={args.server: Gateway(args.gateway, args.audience, args.gateway_spiffe_id)},
        model="example-agent",
    )
    async with client as tools:
        try:
            listed = await tools.list_tools(args.server)
            print("tools:", ", ".join(t.name for t in listed))
            result = await tools.call_tool(
                args.server,
                args.tool,
                json.loads(args.arguments),
                purpose=args.purpose,
                prompt=args.prompt,
                wait_for_approval=args.wait > 0,
                approval_deadline=args.wait,
            )
        except ApprovalPending as pending:
            print(f"approval {pending.approval_id} is pending: rerun with --wait SECONDS")
            return 3
        except ToolClientError as refused:
            print(f"refused: {refused}", file=sys.stderr)
            return 1
        finally:
            await tools.end_task("example done")
        print("error:" if result.is_error else "result:", describe(result))
        return 1 if result.is_error else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
