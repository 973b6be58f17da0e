"""``authority serve`` restarted on the same data directory keeps its CA, its entries and the state
of its join tokens; SIGTERM is a clean shutdown."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ServeProcess, short_socket_dir, start_serve

AGENT = "spiffe://example.org/agent/restart"


class Restartable:
    """One data directory, served by one ``authority serve`` at a time."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.socket_dir = short_socket_dir()
        self.current: ServeProcess | None = None

    def start(self) -> ServeProcess:
        assert self.current is None
        self.current = start_serve(self.data_dir, self.socket_dir)
        return self.current

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.current is not None
        code = self.current.stop(sig)
        self.current = None
        return code

    def restart(self) -> ServeProcess:
        assert self.stop() == 0
        return self.start()

    def close(self) -> None:
        if self.current is not None:
            self.current.stop(signal.SIGKILL)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[Restartable]:
    served = Restartable(tmp_path / "data")
    try:
        yield served
    finally:
        served.close()


def _bundle_file(served: ServeProcess, folder: Path) -> Path:
    path = folder / "bundle.pem"
    path.write_text(served.cli("bundle", "show").stdout)
    return path


def _attest(served: ServeProcess, token: str, out: Path, check: bool = True) -> tuple[int, str]:
    bundle = _bundle_file(served, out.parent)
    result = served.cli(
        "workload", "attest", "--server", served.address, "--trust-bundle", str(bundle),
        "--join-token", token, "--out", str(out), check=check,
    )  # fmt: skip
    return result.returncode, result.stderr


def test_restart_keeps_the_ca(restartable: Restartable) -> None:
    served = restartable.start()
    pem = served.cli("bundle", "show", "--format", "pem").stdout
    jwks = json.loads(served.cli("bundle", "show", "--format", "jwks").stdout)
    keys = json.loads(served.cli("ca", "list", "--format", "json").stdout)
    assert "BEGIN CERTIFICATE" in pem
    assert {k["use"] for k in jwks["keys"]} == {"x509-svid", "jwt-svid"}

    served = restartable.restart()

    assert served.cli("bundle", "show", "--format", "pem").stdout == pem
    assert json.loads(served.cli("bundle", "show", "--format", "jwks").stdout) == jwks
    assert json.loads(served.cli("ca", "list", "--format", "json").stdout) == keys


def test_restart_keeps_entries(restartable: Restartable) -> None:
    served = restartable.start()
    created = json.loads(
        served.cli(
            "entry", "create", "--spiffe-id", AGENT, "--selector", f"join_token:spiffe_id:{AGENT}",
            "--x509-ttl", "10m", "--dns-name", "agent.internal", "--format", "json",
        ).stdout
    )  # fmt: skip
    before = json.loads(served.cli("entry", "list", "--format", "json").stdout)
    assert [e["id"] for e in before] == [created["id"]]

    served = restartable.restart()

    assert json.loads(served.cli("entry", "list", "--format", "json").stdout) == before
    shown = json.loads(served.cli("entry", "show", created["id"], "--format", "json").stdout)
    assert shown == created


def test_restart_keeps_unused_join_token_usable(restartable: Restartable, tmp_path: Path) -> None:
    served = restartable.start()
    token = served.cli("token", "create", "--spiffe-id", AGENT).stdout.strip()

    served = restartable.restart()
    code, stderr = _attest(served, token, tmp_path / "svid")

    assert code == 0
    assert f"attested as {AGENT}" in stderr
    assert (tmp_path / "svid" / "svid.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE")


def test_restart_keeps_used_join_token_used(restartable: Restartable, tmp_path: Path) -> None:
    served = restartable.start()
    token = served.cli("token", "create", "--spiffe-id", AGENT).stdout.strip()
    first = tmp_path / "first"
    first.mkdir()
    assert _attest(served, token, first / "svid")[0] == 0

    served = restartable.restart()
    second = tmp_path / "second"
    second.mkdir()
    code, stderr = _attest(served, token, second / "svid", check=False)

    assert code != 0
    assert stderr.startswith("error: PERMISSION_DENIED")
    assert "[JOIN_TOKEN_USED]" in stderr
    assert not (second / "svid").exists()


def test_svid_issued_before_restart_still_authenticates(
    restartable: Restartable, tmp_path: Path
) -> None:
    served = restartable.start()
    token = served.cli("token", "create", "--spiffe-id", AGENT).stdout.strip()
    assert _attest(served, token, tmp_path / "svid")[0] == 0

    served = restartable.restart()
    jwt = served.cli(
        "workload", "jwt", "--server", served.address, "--svid-dir", str(tmp_path / "svid"),
        "--audience", "svc",
    ).stdout.strip()  # fmt: skip

    assert jwt.count(".") == 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero_and_removes_admin_socket(
    restartable: Restartable, sig: signal.Signals
) -> None:
    served = restartable.start()
    socket = served.admin_socket
    assert socket.exists()

    code = restartable.stop(sig)

    assert code == 0, served.log()
    assert not socket.exists()
    assert "Traceback" not in served.log()
