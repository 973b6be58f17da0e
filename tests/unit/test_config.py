"""Configuration: durations, overlays of a parsed TOML document, and the hard limits."""

from __future__ import annotations

import dataclasses
import datetime as dt
import tomllib
from pathlib import Path
from typing import Any

import pytest

from authority.config import (
    CaConfig,
    Config,
    Limits,
    format_duration,
    parse_duration,
    split_host_port,
)
from authority.errors import InvalidArgument
from authority.ids import TrustDomain

S = dt.timedelta(seconds=1)


# --- durations -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("90", 90 * S),
        (" 90s ", 90 * S),
        ("250ms", dt.timedelta(milliseconds=250)),
        ("5m", 300 * S),
        ("12h", 12 * 3600 * S),
        ("7d", dt.timedelta(days=7)),
        ("0s", dt.timedelta(0)),
        (90, 90 * S),
        (1.5, dt.timedelta(milliseconds=1500)),
        (dt.timedelta(minutes=2), dt.timedelta(minutes=2)),
    ],
)
def test_parse_duration(value: str | int | float | dt.timedelta, expected: dt.timedelta) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "5 m",
        "5M",
        "1.5h",
        "-5m",
        "5w",
        "m",
        "5mm",
        "1e3",
        "9" * 40 + "d",
        True,
        float("nan"),
        float("inf"),
        None,
        [5],
    ],
)
def test_parse_duration_refuses(value: Any) -> None:
    with pytest.raises(InvalidArgument, match="not a duration"):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.timedelta(days=2), "2d"),
        (dt.timedelta(hours=36), "36h"),
        (dt.timedelta(minutes=5), "5m"),
        (dt.timedelta(seconds=90), "90s"),
        (dt.timedelta(seconds=61), "61s"),
        (dt.timedelta(0), "0s"),
        (dt.timedelta(milliseconds=1500), "1500ms"),
        (dt.timedelta(milliseconds=250), "250ms"),
    ],
)
def test_format_duration(value: dt.timedelta, expected: str) -> None:
    assert format_duration(value) == expected


@pytest.mark.parametrize(
    "text", ["1d", "25h", "90m", "45s", "1500ms", "1ms", "0s", "7d", "3600s", "100000s"]
)
def test_format_inverts_parse(text: str) -> None:
    value = parse_duration(text)
    assert parse_duration(format_duration(value)) == value


# --- limits ----------------------------------------------------------------------------------


def test_default_limits_are_valid_and_minutes_long() -> None:
    limits = Limits()
    assert limits.default_x509_ttl == dt.timedelta(minutes=5)
    assert limits.default_jwt_ttl == dt.timedelta(minutes=5)
    assert limits.min_ttl <= limits.default_x509_ttl <= limits.max_x509_ttl


@pytest.mark.parametrize(
    "field", [f.name for f in dataclasses.fields(Limits)], ids=lambda name: str(name)
)
def test_every_limit_must_be_positive(field: str) -> None:
    current = getattr(Limits(), field)
    zero: Any = dt.timedelta(0) if isinstance(current, dt.timedelta) else 0
    with pytest.raises(InvalidArgument, match=rf"limits\.{field} must be positive"):
        Limits(**{field: zero})


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"default_x509_ttl": dt.timedelta(hours=2)}, "default TTLs"),
        ({"default_jwt_ttl": dt.timedelta(hours=2)}, "default TTLs"),
        ({"max_x509_ttl": dt.timedelta(minutes=1)}, "default TTLs"),
        ({"min_ttl": dt.timedelta(minutes=10)}, "min_ttl"),
        ({"max_attest_rounds": -1}, "positive"),
    ],
)
def test_limits_are_consistent(changes: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        Limits(**changes)


# --- CA config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"key_type": "rsa-2048"}, "key_type"),
        ({"key_type": "ec-p521"}, "key_type"),
        ({"ca_ttl": dt.timedelta(minutes=59)}, "at least 1h"),
        ({"refresh_hint": dt.timedelta(0)}, "refresh_hint"),
        ({"upstream_cert": Path("up.pem")}, "go together"),
        ({"upstream_key": Path("up.key")}, "go together"),
    ],
)
def test_ca_config_validation(changes: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        CaConfig(**changes)


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:8081", ("127.0.0.1", 8081)),
        ("[::1]:0", ("::1", 0)),
        (":443", ("", 443)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_split_host_port(address: str, expected: tuple[str, int]) -> None:
    assert split_host_port(address) == expected


@pytest.mark.parametrize("address", ["127.0.0.1", "host:", "host:http", "host:65536", "host:-1"])
def test_split_host_port_refuses(address: str) -> None:
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        split_host_port(address)


def test_config_validates_addresses_and_socket_mode() -> None:
    with pytest.raises(InvalidArgument, match="HOST:PORT"):
        Config(listen="nowhere")
    with pytest.raises(InvalidArgument, match="admin_socket_mode"):
        Config(admin_socket_mode=0o666)


def test_derived_paths_and_addresses() -> None:
    config = Config(data_dir=Path("/var/lib/a"), listen_mtls="0.0.0.0:9000")
    assert config.admin_socket_path == Path("/var/lib/a/admin.sock")
    assert config.advertised_mtls == ":9000"
    other = Config(admin_socket=Path("/run/a.sock"), advertise_mtls="auth.example.org:443")
    assert other.admin_socket_path == Path("/run/a.sock")
    assert other.advertised_mtls == "auth.example.org:443"


# --- Config.from_mapping ---------------------------------------------------------------------

DOCUMENT = """
trust_domain = "prod.example.org"
data_dir = "/var/lib/authority"
listen = "0.0.0.0:9081"
admin_socket_mode = "0660"
server_dns_names = ["authority.example.org", "localhost"]

[ca]
ca_ttl = "48h"
key_type = "ec-p384"
upstream_cert = "/etc/authority/up.pem"
upstream_key = "/etc/authority/up.key"

[limits]
max_attest_rounds = 3
attest_timeout = "10s"
max_x509_ttl = "2h"
"""


def test_from_mapping_overlays_a_toml_document() -> None:
    config = Config.from_mapping(tomllib.loads(DOCUMENT))
    assert config.trust_domain == TrustDomain("prod.example.org")
    assert config.data_dir == Path("/var/lib/authority")
    assert config.listen == "0.0.0.0:9081"
    assert config.admin_socket_mode == 0o660
    assert config.server_dns_names == ("authority.example.org", "localhost")
    assert config.ca.ca_ttl == dt.timedelta(hours=48)
    assert config.ca.key_type == "ec-p384"
    assert config.ca.upstream_cert == Path("/etc/authority/up.pem")
    assert config.limits.max_attest_rounds == 3
    assert config.limits.attest_timeout == dt.timedelta(seconds=10)
    assert config.limits.max_x509_ttl == dt.timedelta(hours=2)
    # What the document does not name keeps its default.
    assert config.listen_mtls == Config().listen_mtls
    assert config.ca.refresh_hint == CaConfig().refresh_hint
    assert config.limits.max_csr_bytes == Limits().max_csr_bytes


def test_from_mapping_overlays_on_a_base() -> None:
    base = Config.from_mapping(tomllib.loads(DOCUMENT))
    config = Config.from_mapping({"limits": {"max_attest_rounds": 7}}, base)
    assert config.limits.max_attest_rounds == 7
    assert config.limits.attest_timeout == dt.timedelta(seconds=10)  # from the base
    assert config.ca.key_type == "ec-p384"
    assert config.trust_domain == TrustDomain("prod.example.org")


def test_from_mapping_of_nothing_is_the_defaults() -> None:
    assert Config.from_mapping({}) == Config()


def test_trust_domain_may_be_given_as_an_id() -> None:
    config = Config.from_mapping({"trust_domain": "spiffe://example.com"})
    assert config.trust_domain == TrustDomain("example.com")


def test_optional_paths_can_be_cleared() -> None:
    config = Config.from_mapping({"admin_socket": "/run/a.sock"})
    assert Config.from_mapping({"admin_socket": ""}, config).admin_socket is None


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"trust_domian": "example.org"}, "'trust_domian'"),
        ({"ca": {"ttl": "1h"}}, "'ca.ttl'"),
        ({"limits": {"max_rounds": 3}}, "'limits.max_rounds'"),
        ({"limits": {"limits": {}}}, "'limits.limits'"),
    ],
)
def test_unknown_keys_are_refused(data: dict[str, Any], where: str) -> None:
    with pytest.raises(InvalidArgument, match=f"unknown configuration key {where}"):
        Config.from_mapping(data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({"ca": "x"}, r"\[ca\] must be a table"),
        ({"limits": ["x"]}, r"\[limits\] must be a table"),
        ({"trust_domain": "Example.org"}, "lower-case"),
        ({"listen": 8081}, "must be a string"),
        ({"listen": "8081"}, "HOST:PORT"),
        ({"server_dns_names": "localhost"}, "must be a list"),
        ({"admin_socket_mode": "rw"}, "octal"),
        ({"admin_socket_mode": "0644"}, "0600 or 0660"),
        ({"admin_socket_mode": True}, "integer"),
        ({"data_dir": ""}, "must not be empty"),
        ({"data_dir": 5}, "must be a path"),
        ({"ca": {"ca_ttl": "soon"}}, "not a duration"),
        ({"ca": {"ca_ttl": ["1h"]}}, "must be a duration"),
        ({"ca": {"ca_ttl": "30m"}}, "at least 1h"),
        ({"ca": {"key_type": "rsa"}}, "key_type"),
        ({"limits": {"max_attest_rounds": "3"}}, "must be an integer"),
        ({"limits": {"max_attest_rounds": 0}}, "must be positive"),
        ({"limits": {"min_ttl": "1h"}}, "min_ttl"),
        ({"limits": {"attest_timeout": float("nan")}}, "not a duration"),
    ],
)
def test_bad_values_are_refused(data: dict[str, Any], why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        Config.from_mapping(data)


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen = "0.0.0.0:1"  # type: ignore[misc]
