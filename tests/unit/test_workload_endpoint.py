"""Where the project's own client finds a SPIFFE Workload API: an explicit socket, else
``SPIFFE_ENDPOINT_SOCKET`` as the SPIFFE Workload Endpoint standard spells it."""

from __future__ import annotations

import pytest

from authority.client import workload_api_target


@pytest.mark.parametrize(
    ("value", "target"),
    [
        ("unix:///run/spiffe/api.sock", "unix:/run/spiffe/api.sock"),
        ("unix:/run/spiffe/api.sock", "unix:/run/spiffe/api.sock"),
        ("tcp://127.0.0.1:8000", "127.0.0.1:8000"),
        ("tcp://[::1]:8000", "[::1]:8000"),
    ],
)
def test_the_standard_forms_are_understood(
    value: str, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", value)
    assert workload_api_target() == target


def test_an_explicit_socket_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///elsewhere.sock")
    assert workload_api_target("/tmp/mine.sock") == "unix:/tmp/mine.sock"
    assert workload_api_target("unix:///tmp/mine.sock") == "unix:/tmp/mine.sock"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "relative/path.sock",
        "unix://host/run/api.sock",  # an authority part
        "unix:relative.sock",
        "unix:///run/api.sock?x=1",
        "unix:///run/api.sock#frag",
        "tcp://localhost:8000",  # a host name, not an IP
        "tcp://127.0.0.1",  # no port
        "tcp://127.0.0.1:8000/path",
        "tcp://user@127.0.0.1:8000",
        "http://127.0.0.1:8000",
    ],
)
def test_malformed_endpoints_are_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", value)
    with pytest.raises(ValueError, match=r"SPIFFE_ENDPOINT_SOCKET|no Workload API socket"):
        workload_api_target()
