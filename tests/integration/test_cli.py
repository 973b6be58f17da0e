"""The ``authority`` command, run for real against ``authority serve`` in a subprocess."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import click
import grpc
import jwt
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authority.cli import main as cli_main
from tests.helpers import ServeProcess, authority_command, free_port
from tests.security._attack import pem, self_made_ca

TD = "example.org"
AGENT = f"spiffe://{TD}/agent/cli"
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{43}")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*authority_command(), *args],
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit non-zero, nothing on stdout, exactly one line on stderr, starting with ``error:``."""
    assert result.returncode != 0, result
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def json_out(served: ServeProcess, *args: str) -> Any:
    return json.loads(served.cli(*args, "--format", "json").stdout)


def create_entry(served: ServeProcess, spiffe_id: str, *extra: str) -> dict[str, Any]:
    created: dict[str, Any] = json_out(
        served, "entry", "create", "--spiffe-id", spiffe_id,
        "--selector", f"join_token:spiffe_id:{spiffe_id}", *extra,
    )  # fmt: skip
    return created


def bundle_file(served: ServeProcess, folder: Path) -> Path:
    path = folder / "bundle.pem"
    path.write_text(served.cli("bundle", "show").stdout)
    return path


def attest(served: ServeProcess, spiffe_id: str, out: Path) -> None:
    token = served.cli("token", "create", "--spiffe-id", spiffe_id).stdout.strip()
    served.cli(
        "workload", "attest", "--server", served.address,
        "--trust-bundle", str(bundle_file(served, out.parent)), "--join-token", "-",
        "--out", str(out), stdin=token + "\n",
    )  # fmt: skip


def leaf(folder: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((folder / "svid.pem").read_bytes())[0]


# --- entries -----------------------------------------------------------------------------------


def test_entry_create_list_show_delete_json(served: ServeProcess) -> None:
    served.cli("attestor", "register", "local", "--plugin", "unix")
    created = create_entry(
        served, AGENT, "--selector", "local:uid:1000", "--x509-ttl", "10m",
        "--jwt-ttl", "2m", "--dns-name", "agent.internal", "--admin",
    )  # fmt: skip
    assert created["spiffe_id"] == AGENT
    assert sorted((s["type"], s["value"]) for s in created["selectors"]) == [
        ("join_token", f"spiffe_id:{AGENT}"),
        ("local", "uid:1000"),
    ]
    assert int(created["x509_ttl_seconds"]) == 600
    assert int(created["jwt_ttl_seconds"]) == 120
    assert created["dns_names"] == ["agent.internal"]
    assert created["admin"] is True
    assert abs(int(created["created_at"]) - dt.datetime.now(dt.UTC).timestamp()) < 60
    other = create_entry(served, f"spiffe://{TD}/agent/other")

    listed = json_out(served, "entry", "list")
    assert sorted(e["id"] for e in listed) == sorted([created["id"], other["id"]])
    assert json_out(served, "entry", "show", created["id"]) == created

    deleted = served.cli("entry", "delete", created["id"])
    assert deleted.stdout == ""
    assert created["id"] in deleted.stderr
    assert [e["id"] for e in json_out(served, "entry", "list")] == [other["id"]]
    gone = served.cli("entry", "show", created["id"], check=False)
    assert_one_error_line(gone, "NOT_FOUND")


def test_entry_text_output(served: ServeProcess) -> None:
    created = create_entry(served, AGENT, "--x509-ttl", "10m")
    text = served.cli("entry", "show", created["id"]).stdout
    assert f"Entry ID     : {created['id']}" in text
    assert f"SPIFFE ID    : {AGENT}" in text
    assert "X509-SVID TTL: 10m" in text
    assert served.cli("entry", "list").stdout.startswith("Found 1 entries")


def test_entry_ttls_are_reflected_in_issued_svids(served: ServeProcess, tmp_path: Path) -> None:
    create_entry(served, AGENT, "--x509-ttl", "10m", "--jwt-ttl", "2m")
    out = tmp_path / "svid"
    attest(served, AGENT, out)

    cert = leaf(out)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    # 10 minutes, plus the ~10 s the authority backdates notBefore by.
    assert dt.timedelta(minutes=10) <= lifetime <= dt.timedelta(minutes=10, seconds=15)
    remaining = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=9) < remaining <= dt.timedelta(minutes=10)

    token = served.cli(
        "workload", "jwt", "--server", served.address, "--svid-dir", str(out), "--audience", "svc"
    ).stdout.strip()
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] in range(119, 121)
    assert claims["sub"] == AGENT


def test_default_ttl_without_entry(served: ServeProcess, tmp_path: Path) -> None:
    """The control for the TTL test: a bare join token gets the 5-minute default."""
    out = tmp_path / "svid"
    attest(served, AGENT, out)
    cert = leaf(out)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(minutes=5) <= lifetime <= dt.timedelta(minutes=5, seconds=15)


# --- tokens, bundle, CA ------------------------------------------------------------------------


def test_token_create_prints_only_the_token(served: ServeProcess) -> None:
    result = served.cli("token", "create", "--spiffe-id", AGENT, "--ttl", "1h")

    assert result.stdout.endswith("\n")
    assert result.stdout.count("\n") == 1
    token = result.stdout.strip()
    assert TOKEN_RE.fullmatch(token), result.stdout
    assert result.stderr == ""
    assert token not in served.log()  # a secret is never logged
    again = served.cli("token", "create", "--spiffe-id", AGENT).stdout.strip()
    assert again != token


def test_bundle_show_pem_and_jwks(served: ServeProcess, tmp_path: Path) -> None:
    pem = served.cli("bundle", "show", "--format", "pem").stdout
    jwks = json.loads(served.cli("bundle", "show", "--format", "jwks").stdout)

    certs = x509.load_pem_x509_certificates(pem.encode())
    assert len(certs) == 1
    ca_cert = certs[0]
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = ca_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://{TD}"]

    by_use: dict[str, list[dict[str, Any]]] = {}
    for key in jwks["keys"]:
        by_use.setdefault(key["use"], []).append(key)
    assert set(by_use) == {"x509-svid", "jwt-svid"}
    (x509_key,) = by_use["x509-svid"]
    assert "kid" not in x509_key
    assert x509.load_der_x509_certificate(base64.b64decode(x509_key["x5c"][0])) == ca_cert
    assert all(k.get("kid") for k in by_use["jwt-svid"])
    assert isinstance(jwks["spiffe_sequence"], int)
    assert jwks["spiffe_sequence"] >= 1
    assert isinstance(jwks["spiffe_refresh_hint"], int)
    assert jwks["spiffe_refresh_hint"] > 0

    # The same bundle from the workload endpoint, verified against itself.
    trust = tmp_path / "trust.pem"
    trust.write_text(pem)
    remote = served.cli(
        "bundle", "show", "--server", served.address, "--trust-bundle", str(trust)
    ).stdout
    assert remote == pem


def _states(authorities: list[dict[str, Any]]) -> dict[str, list[str]]:
    """kind -> the states of its keys, sorted."""
    found: dict[str, list[str]] = {}
    for a in authorities:
        found.setdefault(a["kind"], []).append(a["state"])
    return {kind: sorted(states) for kind, states in found.items()}


def _each(kinds: set[str], *states: str) -> dict[str, list[str]]:
    return {kind: sorted(states) for kind in kinds}


def _ids(authorities: list[dict[str, Any]], state: str) -> set[str]:
    return {a["key_id"] for a in authorities if a["state"] == state}


def _sequence(served: ServeProcess) -> int:
    jwks = json.loads(served.cli("bundle", "show", "--format", "jwks").stdout)
    sequence = jwks["spiffe_sequence"]
    assert isinstance(sequence, int)
    return sequence


def _x509_authorities(served: ServeProcess) -> int:
    return len(x509.load_pem_x509_certificates(served.cli("bundle", "show").stdout.encode()))


def test_ca_rotate_then_list(served: ServeProcess) -> None:
    """Two steps: the first publishes new keys, the second activates them; the keys they
    replace stay in the bundle as old. Per kind of signing key."""
    before = json_out(served, "ca", "list")
    kinds = set(_states(before))
    assert {"x509", "jwt"} <= kinds
    assert _states(before) == _each(kinds, "active")
    sequence = _sequence(served)

    published = json_out(served, "ca", "rotate")
    assert json_out(served, "ca", "list") == published
    assert _states(published) == _each(kinds, "active", "prepared")
    assert _ids(published, "active") == _ids(before, "active")
    assert _sequence(served) > sequence
    assert _x509_authorities(served) == 2  # published before it signs anything

    activated = json_out(served, "ca", "rotate")
    listed = json_out(served, "ca", "list")

    assert listed == activated
    assert _states(listed) == _each(kinds, "active", "old")
    assert _ids(listed, "old") == _ids(before, "active")
    assert _ids(listed, "active") == _ids(published, "prepared")
    assert _x509_authorities(served) == 2  # during the overlap both are trusted
    text = served.cli("ca", "list").stdout.splitlines()
    assert len(text) == 2 * len(kinds)
    assert {line.split()[1] for line in text} == {"old", "active"}


def test_ca_rotate_immediate_then_list(served: ServeProcess) -> None:
    before = json_out(served, "ca", "list")
    kinds = set(_states(before))

    rotated = json_out(served, "ca", "rotate", "--immediate")
    listed = json_out(served, "ca", "list")

    assert listed == rotated
    assert _states(listed) == _each(kinds, "active", "old")
    assert _ids(listed, "old") == _ids(before, "active")
    assert not _ids(listed, "active") & _ids(before, "active")


# --- workload ----------------------------------------------------------------------------------


def test_workload_renew(served: ServeProcess, tmp_path: Path) -> None:
    create_entry(served, AGENT, "--x509-ttl", "10m")
    out = tmp_path / "svid"
    attest(served, AGENT, out)
    first = leaf(out)
    first_key = (out / "svid.key").read_bytes()

    result = served.cli("workload", "renew", "--server", served.address, "--svid-dir", str(out))

    assert result.stdout == ""
    assert result.stderr.startswith(f"renewed {AGENT} until ")
    second = leaf(out)
    assert second.serial_number != first.serial_number
    assert (out / "svid.key").read_bytes() != first_key  # a fresh key, kept on the workload
    assert (out / "svid.key").stat().st_mode & 0o777 == 0o600
    assert second.public_key() != first.public_key()
    lifetime = second.not_valid_after_utc - second.not_valid_before_utc
    assert dt.timedelta(minutes=10) <= lifetime <= dt.timedelta(minutes=10, seconds=15)
    # The renewed SVID authenticates.
    token = served.cli(
        "workload", "jwt", "--server", served.address, "--svid-dir", str(out), "--audience", "svc"
    ).stdout.strip()
    assert jwt.decode(token, options={"verify_signature": False})["sub"] == AGENT


# --- errors ------------------------------------------------------------------------------------


def test_error_unknown_entry(served: ServeProcess) -> None:
    for command in ("show", "delete"):
        result = served.cli("entry", command, "no-such-entry", check=False)
        assert_one_error_line(result, "NOT_FOUND", "[NOT_FOUND]")


def test_error_invalid_spiffe_id(served: ServeProcess) -> None:
    result = served.cli(
        "entry", "create", "--spiffe-id", "spiffe://Example.org/x", "--selector", "a:b",
        check=False,
    )  # fmt: skip
    assert_one_error_line(result, "INVALID_ARGUMENT", "[INVALID_SPIFFE_ID]")
    token = served.cli("token", "create", "--spiffe-id", "spiffe://example.org/a/../b", check=False)
    assert_one_error_line(token, "INVALID_ARGUMENT", "[INVALID_SPIFFE_ID]")


def test_error_bad_selector(served: ServeProcess) -> None:
    result = served.cli(
        "entry", "create", "--spiffe-id", AGENT, "--selector", "no-colon", check=False
    )
    assert_one_error_line(result, "selector")
    assert json_out(served, "entry", "list") == []


def test_error_used_join_token(served: ServeProcess, tmp_path: Path) -> None:
    token = served.cli("token", "create", "--spiffe-id", AGENT).stdout.strip()
    bundle = bundle_file(served, tmp_path)
    args = ["workload", "attest", "--server", served.address, "--trust-bundle", str(bundle),
            "--join-token", token]  # fmt: skip
    served.cli(*args, "--out", str(tmp_path / "one"))
    result = served.cli(*args, "--out", str(tmp_path / "two"), check=False)
    assert_one_error_line(result, "PERMISSION_DENIED", "[JOIN_TOKEN_USED]")
    assert token not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("entry", "list"),
        ("entry", "show", "x"),
        ("token", "create", "--spiffe-id", AGENT),
        ("bundle", "show"),
        ("ca", "list"),
        ("ca", "rotate"),
    ],
)
def test_error_no_admin_socket(tmp_path: Path, args: tuple[str, ...]) -> None:
    missing = tmp_path / "nothing.sock"
    env = {**os.environ, "AUTHORITY_ADMIN_SOCKET": str(missing)}
    assert_one_error_line(run(*args, env=env), "no admin socket", str(missing))


def test_error_server_unreachable(tmp_path: Path) -> None:
    _, ca_cert = self_made_ca()
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pem(ca_cert))
    result = run(
        "bundle", "show", "--server", f"127.0.0.1:{free_port()}", "--trust-bundle", str(bundle)
    )
    assert_one_error_line(result, "UNAVAILABLE")


def test_error_wrong_trust_bundle(served: ServeProcess, tmp_path: Path) -> None:
    """The CLI verifies the server: a bundle from another CA means no connection."""
    _, ca_cert = self_made_ca()
    bundle = tmp_path / "other.pem"
    bundle.write_bytes(pem(ca_cert))
    result = served.cli(
        "bundle", "show", "--server", served.address, "--trust-bundle", str(bundle), check=False
    )
    assert_one_error_line(result, "UNAVAILABLE")


# --- help --------------------------------------------------------------------------------------


def _command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [prefix]
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            paths += _command_paths(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


COMMAND_PATHS = _command_paths(cli_main)


def test_command_tree_is_complete() -> None:
    names = {" ".join(p) for p in COMMAND_PATHS}
    expected = {
        "entry create", "entry list", "entry show", "entry delete", "token create",
        "bundle show", "ca rotate", "ca list", "workload attest", "workload jwt",
        "workload renew", "serve",
    }  # fmt: skip
    assert expected <= names


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "authority")
def test_help(path: tuple[str, ...]) -> None:
    result = run(*path, "--help")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith(f"Usage: authority {' '.join(path)}".rstrip())
    assert "Options:" in result.stdout


# --- health and reflection ---------------------------------------------------------------------


def _health(channel: grpc.Channel, service: str) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10
    )
    return int(reply.status)


def test_health_on_admin_socket(served: ServeProcess) -> None:
    with grpc.insecure_channel(f"unix:{served.admin_socket}") as channel:
        assert _health(channel, "") == health_pb2.HealthCheckResponse.SERVING
        assert _health(channel, "authority.v1.Admin") == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            _health(channel, "authority.v1.Nothing")
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND


def test_health_on_tls_port(served: ServeProcess) -> None:
    bundle = served.cli("bundle", "show").stdout.encode()
    creds = grpc.ssl_channel_credentials(root_certificates=bundle)
    with grpc.secure_channel(served.address, creds) as channel:
        assert _health(channel, "") == health_pb2.HealthCheckResponse.SERVING
        assert _health(channel, "authority.v1.Workload") == health_pb2.HealthCheckResponse.SERVING


def _services(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    assert len(replies) == 1
    return {s.name for s in replies[0].list_services_response.service}


REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
HEALTH = "grpc.health.v1.Health"


def test_reflection_lists_services(served: ServeProcess) -> None:
    with grpc.insecure_channel(f"unix:{served.admin_socket}") as channel:
        assert _services(channel) == {"authority.v1.Admin", HEALTH, REFLECTION}
    bundle = served.cli("bundle", "show").stdout.encode()
    creds = grpc.ssl_channel_credentials(root_certificates=bundle)
    # Reflection is off on the workload endpoint (reflection_on_public = false): it describes
    # nothing there, the operator service least of all.
    with (
        grpc.secure_channel(served.address, creds) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        _services(channel)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
