"""A third-party attestor plugin, packaged as its own distribution, installed next to a running
authority and put to work through the CLI without restarting it.

The server starts with an empty directory on its ``PYTHONPATH``; the plugin
(``tests/plugins/sample_attestor``) is then pip-installed into that directory, registered with
``authority attestor register``, and a workload attests through it over server TLS.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from cryptography import x509

from authority._pb import authority_v1_authority_pb2 as pb
from authority.api.status import REASON_KEY
from authority.client import AdminClient, WorkloadClient, der_chain_to_pem, new_key
from tests.helpers import (
    ServeProcess,
    authority_command,
    free_port,
    short_socket_dir,
    wait_serving,
)

PLUGIN_SOURCE = Path(__file__).parents[1] / "plugins" / "sample_attestor"
SECRET = b"agent-7 holds this secret"
DIGEST = hashlib.sha256(SECRET).hexdigest()
AGENT = "spiffe://example.org/agent-7"


def start_serve_with_env(data_dir: Path, socket_dir: Path, env: dict[str, str]) -> ServeProcess:
    """``tests.helpers.start_serve``, with the server's environment given."""
    port, mtls_port = free_port(), free_port()
    admin_socket = socket_dir / "admin.sock"
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"serve-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *authority_command(),
                "serve",
                "--data-dir",
                str(data_dir),
                "--listen",
                f"127.0.0.1:{port}",
                "--listen-mtls",
                f"127.0.0.1:{mtls_port}",
                "--admin-socket",
                str(admin_socket),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    served = ServeProcess(
        proc, data_dir, admin_socket, f"127.0.0.1:{port}", f"127.0.0.1:{mtls_port}", log_path
    )
    try:
        wait_serving(served)
    except BaseException:
        served.stop()
        raise
    return served


def pip_install(source: Path, target: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-input",
            "--disable-pip-version-check",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, (
        "installing the sample plugin failed (--no-build-isolation needs setuptools in this "
        f"environment):\n{result.stdout}\n{result.stderr}"
    )


def cli_json(served: ServeProcess, *args: str) -> Any:
    return json.loads(served.cli(*args, "--format", "json").stdout)


async def bundle_pem(served: ServeProcess) -> bytes:
    async with AdminClient(served.admin_socket) as admin:
        bundle = await admin.stub.GetBundle(pb.GetBundleRequest())
    return der_chain_to_pem(list(bundle.x509_authorities))


async def attest(served: ServeProcess, attestor: str, evidence: bytes) -> pb.AttestResult:
    async with WorkloadClient(served.address, await bundle_pem(served)) as client:
        return await client.attest(attestor, evidence, new_key())


async def refusal(served: ServeProcess, attestor: str, evidence: bytes) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await attest(served, attestor, evidence)
    return info.value


def reason_of(error: grpc.aio.AioRpcError) -> str:
    metadata = cast("grpc.aio.Metadata | None", error.trailing_metadata())
    value = metadata.get(REASON_KEY) if metadata is not None else None
    return str(value or "")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The empty directory the server will find the plugin in, once it is installed."""
    folder = tmp_path / "site"
    folder.mkdir()
    return folder


@pytest.fixture
def served_with_site(tmp_path: Path, site: Path) -> Iterator[ServeProcess]:
    socket_dir = short_socket_dir()
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    served = start_serve_with_env(tmp_path / "data", socket_dir, {**os.environ, "PYTHONPATH": path})
    try:
        yield served
    finally:
        served.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


def test_a_plugin_installed_while_serving_attests_without_a_restart(
    served_with_site: ServeProcess, site: Path, tmp_path: Path
) -> None:
    served = served_with_site
    pid = served.proc.pid
    assert list(site.iterdir()) == []

    # Not installed yet: unknown to the running server.
    before = cli_json(served, "attestor", "list")
    assert "sample" not in before["plugins"]
    missing = served.cli(
        "attestor", "register", "sample1", "--plugin", "sample", "--set", f"secret_digest={DIGEST}",
        check=False,
    )  # fmt: skip
    assert missing.returncode != 0
    assert "sample" in missing.stderr

    # Install the separate distribution (from a copy: a build writes into its source tree).
    source = tmp_path / "sample_attestor"
    shutil.copytree(PLUGIN_SOURCE, source)
    pip_install(source, site)
    assert (site / "sample_attestor" / "__init__.py").exists()

    registered = cli_json(
        served,
        "attestor", "register", "sample1", "--plugin", "sample",
        "--set", f"secret_digest={DIGEST}",
        "--set", "workload_name=agent-7",
    )  # fmt: skip
    assert registered["name"] == "sample1"
    assert registered["plugin"] == "sample"
    assert json.loads(registered["config_json"]) == {
        "secret_digest": DIGEST,
        "workload_name": "agent-7",
    }

    listed = cli_json(served, "attestor", "list")
    assert "sample" in listed["plugins"]
    assert {"join_token", "x509pop", "jwt", "unix"} <= set(listed["plugins"])
    assert [a["plugin"] for a in listed["attestors"] if a["name"] == "sample1"] == ["sample"]
    shown = cli_json(served, "attestor", "show", "sample1")
    assert shown["config_json"] == registered["config_json"]

    # The plugin's own validation reaches the operator.
    bad = served.cli(
        "attestor", "register", "sample2", "--plugin", "sample",
        "--set", "secret_digest=not-hex", "--set", "workload_name=agent-8",
        check=False,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "secret_digest" in bad.stderr

    served.cli("entry", "create", "--spiffe-id", AGENT, "--selector", "sample1:name:agent-7")

    result = asyncio.run(attest(served, "sample1", SECRET))
    assert [svid.spiffe_id for svid in result.svids] == [AGENT]
    assert "sample1:name:agent-7" in result.selectors
    leaf = x509.load_der_x509_certificate(result.svids[0].cert_chain[0])
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [AGENT]

    error = asyncio.run(refusal(served, "sample1", b"a guess"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(error) == "SAMPLE_MISMATCH"

    # All of it on the server started before the plugin existed.
    assert served.proc.poll() is None
    assert served.proc.pid == pid
    assert "Traceback" not in served.log()
