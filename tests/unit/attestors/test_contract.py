"""What every installed attestor plugin owes the host, checked on each one discovered through the
``authority.attestors`` entry points: its name, strict configuration, and refusing garbage
with ``AttestationRefused`` (anything else would reach the workload as an internal error)."""

from __future__ import annotations

import json
import os
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestors.api import (
    ENTRY_POINT_GROUP,
    AttestationRefused,
    Attestor,
    ConfigError,
    PeerCredentials,
)
from attestors.testing import FakeHost, ScriptedContext
from tests.unit._pki import make_ca

_CA_PEM = make_ca()[0].public_bytes(serialization.Encoding.PEM).decode()
_JWK = json.loads(
    jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
)

# A minimal valid configuration for each plugin; a plugin installed without one fails the suite.
CONFIGS: dict[str, dict[str, Any]] = {
    "join_token": {},
    "x509pop": {"ca_bundle": _CA_PEM},
    "jwt": {
        "jwks": {"keys": [{**_JWK, "kid": "k1"}]},
        "issuer": "https://issuer.example",
        "audience": "agent-authority",
    },
    "unix": {},
    # The test distribution in tests/plugins, if it is installed here.
    "sample": {"secret_digest": "0" * 64, "workload_name": "agent"},
}

GARBAGE = {
    "empty": b"",
    "nul": b"\x00",
    "binary": bytes(range(256)),
    "not-utf8": b"\xff\xfe\xfd",
    "text": b"hello, attestor",
    "dots": b"a.b.c",
    "jwt-shaped": b"eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJ4In0.c2ln",
    "jwt-bad-header": b"eyJhbGciOlsiRVMyNTYiXSwia2lkIjpbMV19.e30.",
    "pem-shaped": b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    "json": b'{"token": null, "uid": 0}',
    "large": b"A" * (64 * 1024),
}
NO_SUCH_PID = 2**31 - 1
PEERS = {
    "network": None,
    "gone-process": PeerCredentials(NO_SUCH_PID, os.getuid(), os.getgid(), None, 0.0),
}


def discovered() -> list[EntryPoint]:
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


PLUGINS = [pytest.param(ep, id=ep.name) for ep in discovered()]


def plugin_class(ep: EntryPoint) -> type[Attestor]:
    cls: type[Attestor] = ep.load()
    assert isinstance(cls, type), f"{ep.value} is not a class"
    return cls


def config_for(ep: EntryPoint) -> dict[str, Any]:
    if ep.name not in CONFIGS:
        pytest.fail(f"plugin {ep.name!r} has no minimal configuration in CONFIGS")
    return dict(CONFIGS[ep.name])


def test_the_builtins_are_discovered() -> None:
    assert {"join_token", "x509pop", "jwt", "unix"} <= {ep.name for ep in discovered()}


@pytest.mark.parametrize("ep", PLUGINS)
def test_the_plugin_name_is_the_entry_point_name(ep: EntryPoint) -> None:
    assert plugin_class(ep).plugin_name == ep.name


@pytest.mark.parametrize("ep", PLUGINS)
def test_a_minimal_configuration_builds(ep: EntryPoint) -> None:
    cls = plugin_class(ep)
    assert isinstance(cls.configure(config_for(ep), FakeHost()), cls)


@pytest.mark.parametrize("ep", PLUGINS)
def test_an_unknown_key_is_a_config_error(ep: EntryPoint) -> None:
    config = {**config_for(ep), "no_such_key": True}
    with pytest.raises(ConfigError, match="no_such_key"):
        plugin_class(ep).configure(config, FakeHost())


@pytest.mark.parametrize("wrong", [None, 0, True, [], {}, [[]], {"a": {}}])
@pytest.mark.parametrize("ep", PLUGINS)
def test_a_wrongly_typed_value_is_a_config_error(ep: EntryPoint, wrong: object) -> None:
    # Only ConfigError: anything else would be a plugin bug the operator cannot act on.
    cls = plugin_class(ep)
    for key in config_for(ep):
        with pytest.raises(ConfigError):
            cls.configure({**config_for(ep), key: wrong}, FakeHost())


@pytest.mark.parametrize("peer", PEERS.values(), ids=PEERS.keys())
@pytest.mark.parametrize("evidence", GARBAGE.values(), ids=GARBAGE.keys())
@pytest.mark.parametrize("ep", PLUGINS)
async def test_garbage_evidence_is_refused(
    ep: EntryPoint, evidence: bytes, peer: PeerCredentials | None
) -> None:
    attestor = plugin_class(ep).configure(config_for(ep), FakeHost())
    ctx = ScriptedContext(b"garbage", peer=peer)
    # Any other exception escapes pytest.raises and fails the test.
    with pytest.raises(AttestationRefused):
        await attestor.attest(evidence, ctx)
