from __future__ import annotations

from pathlib import Path

from authority._pb import authority_v1_authority_pb2 as pb
from tests.helpers import Running, ServeProcess


async def test_attest_then_jwt_in_process(authority: Running, tmp_path: Path) -> None:
    holder = await authority.attested("spiffe://example.org/agent/one", tmp_path / "svid")
    jwt = await holder.fetch_jwt(["svc-a"])
    assert jwt.spiffe_id == "spiffe://example.org/agent/one"
    assert jwt.token.count(".") == 2
    info = await holder.tls_stub.GetServerInfo(pb.GetServerInfoRequest())
    assert info.mtls_address == f":{authority.mtls_port}"


def test_cli_attest_then_jwt(served: ServeProcess, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(served.cli("bundle", "show").stdout)
    token = served.cli(
        "token", "create", "--spiffe-id", "spiffe://example.org/agent/cli"
    ).stdout.strip()
    out = tmp_path / "svid"
    served.cli(
        "workload",
        "attest",
        "--server",
        served.address,
        "--trust-bundle",
        str(bundle),
        "--join-token",
        token,
        "--out",
        str(out),
    )
    assert (out / "svid.key").stat().st_mode & 0o777 == 0o600
    jwt = served.cli(
        "workload", "jwt", "--server", served.address, "--svid-dir", str(out), "--audience", "svc"
    ).stdout
    assert jwt.strip().count(".") == 2
    assert "\n" not in jwt.strip()
