"""The gateway's SVID rotates under load: short-lived X.509-SVIDs (30 s) from the authority's
Workload API, a client calling all along on one kept-alive connection, past the second
rotation. No call fails, new connections see each new certificate, the open connection
keeps the one it began with, and the gateway's links to the authority (keys, revocation
feed, ListCallableTools, RecordToolCalls) follow the new SVID.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from tests.gateway_stack import SERVER, served_certificate, stack
from tests.integration.test_gateway_attacks import _headers, _list_message, _message


def _peer_serial(response: Any) -> int:
    stream = response.extensions["network_stream"]
    ssl_object = stream.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    return int(x509.load_der_x509_certificate(der).serial_number)


async def test_calls_go_on_across_two_rotations_of_the_gateways_svid(tmp_path: Path) -> None:
    with stack(tmp_path / "rotation", gateway_x509_ttl="30s") as gw:
        folder = await gw.agent("steady")
        args = {"text": "steady"}
        token = await gw.token(folder, "echo", args)
        first = x509.load_der_x509_certificate(served_certificate(gw.gateway_port))
        served = {first.serial_number}
        calls = failures = 0
        kept_serials: set[int] = set()
        deadline = time.monotonic() + 80
        async with gw.http(folder) as http:
            while len(served) < 3:  # the first certificate and two rotations
                assert time.monotonic() < deadline, f"only {len(served)} certificates seen"
                response = await http.post(
                    gw.url, json=_message("echo", args), headers=_headers(token, name="echo")
                )
                calls += 1
                if response.status_code != 200:
                    failures += 1
                    print(response.status_code, response.text)
                kept_serials.add(_peer_serial(response))
                listing = await http.post(
                    gw.url,
                    json=_list_message(),
                    headers=_headers(method="tools/list"),
                )
                assert listing.status_code == 200, listing.text
                assert "echo" in json.dumps(listing.json())
                now = x509.load_der_x509_certificate(
                    await asyncio.to_thread(served_certificate, gw.gateway_port)
                )
                served.add(now.serial_number)
                await asyncio.sleep(0.2)
        assert failures == 0, f"{failures} of {calls} calls failed"
        assert kept_serials == {first.serial_number}, "the open connection was not kept"
        assert calls > 20
        # A new connection after the rotations verifies the new certificate and is admitted.
        async with gw.http(folder) as http:
            response = await http.post(
                gw.url, json=_message("echo", args), headers=_headers(token, name="echo")
            )
        assert response.status_code == 200
        assert _peer_serial(response) != first.serial_number
        echoed = [c for c in gw.tool_calls() if c["arguments"] == args]
        assert len(echoed) == calls + 1
        assert gw.log().count("gateway SVID") >= 3
        assert "lost" not in gw.log(), gw.log()
        assert f"/mcp/{SERVER}" in gw.url
