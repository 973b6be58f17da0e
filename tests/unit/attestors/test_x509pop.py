"""``x509pop``: a certificate chaining to a configured CA, and a signature over a fresh nonce.

Keys and certificates are made with cryptography directly (``tests.unit._pki``); the plugin runs
on the SDK's ``FakeHost`` (its clock drives validity) and ``ScriptedContext`` (the workload).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from attestors.api import AttestationRefused, Attestor, ConfigError
from attestors.testing import FakeHost, ScriptedContext
from attestors.x509pop import DOMAIN, NONCE_BYTES, X509PopAttestor, sign_challenge
from authority.attestation import AttestorHost
from authority.clock import FakeClock
from authority.config import Limits
from authority.models import Selector
from authority.store.memory import MemoryStore
from tests.unit._pki import NOW, PrivateKey, ec_key, key_usage, make_ca

CA = tuple[x509.Certificate, PrivateKey]
SAN_DNS = "node-1.example.org"
SAN_URI = "spiffe://example.org/node/1"


def pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def fingerprint(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def node_cert(
    ca: CA,
    key: PrivateKey,
    *,
    common_name: str = "node-1",
    dns: Sequence[str] = (SAN_DNS,),
    uris: Sequence[str] = (SAN_URI,),
    usage: x509.KeyUsage | None = None,
    not_before: dt.datetime = NOW - dt.timedelta(minutes=1),
    not_after: dt.datetime = NOW + dt.timedelta(hours=1),
) -> x509.Certificate:
    """A node certificate as an operator's PKI would issue it."""
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage or key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca[1].public_key()), critical=False
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca[1], hashes.SHA256())


def plugin(*roots: x509.Certificate, host: FakeHost | None = None) -> X509PopAttestor:
    return X509PopAttestor.configure({"ca_bundle": pem(*roots).decode()}, host or FakeHost(NOW))


def holder(key: PrivateKey) -> ScriptedContext:
    """The workload: signs whatever nonce it is sent with ``key``."""
    return ScriptedContext(lambda nonce: sign_challenge(key, nonce))


async def refused(
    attestor: X509PopAttestor, evidence: bytes, ctx: ScriptedContext
) -> AttestationRefused:
    with pytest.raises(AttestationRefused) as info:
        await attestor.attest(evidence, ctx)
    return info.value


# --- success ---------------------------------------------------------------------------------


async def test_a_key_holder_attests_with_every_selector() -> None:
    ca = make_ca()
    key = ec_key()
    leaf = node_cert(ca, key)
    ctx = holder(key)
    attested = await plugin(ca[0]).attest(pem(leaf), ctx)
    assert sorted(attested.selectors) == sorted(
        [
            ("subject_cn", "node-1"),
            ("san_dns", SAN_DNS),
            ("san_uri", SAN_URI),
            ("serial", format(leaf.serial_number, "x")),
            ("fingerprint", fingerprint(leaf)),
            ("ca_fingerprint", fingerprint(ca[0])),
        ]
    )
    # The keys it declares (entry create refuses others) are exactly those it produces.
    assert {k for k, _ in attested.selectors} == X509PopAttestor.selector_kinds
    assert attested.bound_spiffe_id is None
    assert attested.can_reattest is True
    assert len(ctx.payloads) == 1
    assert len(ctx.payloads[0]) == NONCE_BYTES


async def test_an_rsa_key_holder_attests() -> None:
    ca = make_ca()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = node_cert(ca, key, dns=(), uris=())
    attested = await plugin(ca[0]).attest(pem(leaf), holder(key))
    assert ("subject_cn", "node-1") in attested.selectors
    assert not {k for k, _ in attested.selectors} & {"san_dns", "san_uri"}


async def test_a_chain_through_intermediates_attests_with_the_root_as_ca() -> None:
    root = make_ca("root")
    policy = make_ca("policy", issuer=root)
    issuing = make_ca("issuing", issuer=policy)
    key = ec_key()
    leaf = node_cert(issuing, key)
    attested = await plugin(root[0]).attest(pem(leaf, issuing[0], policy[0]), holder(key))
    assert ("ca_fingerprint", fingerprint(root[0])) in attested.selectors
    assert ("fingerprint", fingerprint(leaf)) in attested.selectors


async def test_a_chain_missing_its_intermediates_is_untrusted() -> None:
    root = make_ca("root")
    issuing = make_ca("issuing", issuer=root)
    key = ec_key()
    error = await refused(plugin(root[0]), pem(node_cert(issuing, key)), holder(key))
    assert error.reason == "X509POP_UNTRUSTED"


async def test_an_expired_intermediate_is_refused_as_expired() -> None:
    root = make_ca("root")
    issuing = make_ca(
        "issuing",
        issuer=root,
        not_before=NOW - dt.timedelta(days=2),
        not_after=NOW - dt.timedelta(days=1),
    )
    key = ec_key()
    leaf = node_cert(issuing, key)
    error = await refused(plugin(root[0]), pem(leaf, issuing[0]), holder(key))
    assert error.reason == "X509POP_CERT_EXPIRED"


async def test_each_attestation_draws_a_fresh_nonce() -> None:
    ca = make_ca()
    key = ec_key()
    attestor = plugin(ca[0])
    evidence = pem(node_cert(ca, key))
    ctx = holder(key)
    for _ in range(3):
        await attestor.attest(evidence, ctx)
    assert len(set(ctx.payloads)) == 3


async def test_a_signature_over_the_bare_nonce_is_refused() -> None:
    # The key must sign DOMAIN || nonce: a signature the key made for another protocol over
    # the same bytes does not count.
    ca = make_ca()
    key = ec_key()
    ctx = ScriptedContext(lambda nonce: key.sign(nonce, ec.ECDSA(hashes.SHA256())))
    error = await refused(plugin(ca[0]), pem(node_cert(ca, key)), ctx)
    assert error.reason == "X509POP_BAD_SIGNATURE"
    assert DOMAIN.endswith(b"\x00")


# --- attacks: each refused with its reason ---------------------------------------------------


async def test_a_signature_by_another_key_is_refused() -> None:
    ca = make_ca()
    leaf = node_cert(ca, ec_key())
    error = await refused(plugin(ca[0]), pem(leaf), holder(ec_key()))
    assert error.reason == "X509POP_BAD_SIGNATURE"


async def test_a_certificate_from_another_ca_is_refused() -> None:
    trusted, rogue = make_ca("trusted"), make_ca("trusted")  # same name, other key
    key = ec_key()
    ctx = holder(key)
    error = await refused(plugin(trusted[0]), pem(node_cert(rogue, key)), ctx)
    assert error.reason == "X509POP_UNTRUSTED"
    assert ctx.payloads == []  # no nonce for an untrusted chain


async def test_an_expired_certificate_is_refused() -> None:
    ca = make_ca(not_after=NOW + dt.timedelta(days=30))
    key = ec_key()
    leaf = node_cert(ca, key, not_after=NOW + dt.timedelta(hours=1))
    host = FakeHost(NOW)
    attestor = plugin(ca[0], host=host)
    await attestor.attest(pem(leaf), holder(key))
    host.advance(dt.timedelta(hours=1, seconds=1))
    error = await refused(attestor, pem(leaf), holder(key))
    assert error.reason == "X509POP_CERT_EXPIRED"


async def test_a_certificate_not_yet_valid_is_refused() -> None:
    ca = make_ca()
    key = ec_key()
    leaf = node_cert(ca, key, not_before=NOW + dt.timedelta(minutes=5))
    error = await refused(plugin(ca[0], host=FakeHost(NOW)), pem(leaf), holder(key))
    assert error.reason == "X509POP_CERT_EXPIRED"


async def test_a_signature_replayed_from_an_earlier_attestation_is_refused() -> None:
    ca = make_ca()
    key = ec_key()
    attestor = plugin(ca[0])
    evidence = pem(node_cert(ca, key))
    seen = holder(key)
    await attestor.attest(evidence, seen)  # what an eavesdropper records
    replay = ScriptedContext(seen.responses[0])
    error = await refused(attestor, evidence, replay)
    assert error.reason == "X509POP_BAD_SIGNATURE"
    assert replay.payloads[0] != seen.payloads[0]


@pytest.mark.parametrize(
    "evidence",
    [
        b"",
        b"not a certificate",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE-----\n",
        b"\xff\xfe\x00",
    ],
    ids=["empty", "text", "bad-der", "unterminated", "binary"],
)
async def test_malformed_pem_is_refused(evidence: bytes) -> None:
    ctx = ScriptedContext()
    error = await refused(plugin(make_ca()[0]), evidence, ctx)
    assert error.reason == "X509POP_MALFORMED"
    assert ctx.payloads == []


async def test_a_chain_longer_than_the_limit_is_refused() -> None:
    ca = make_ca()
    key = ec_key()
    leaf = node_cert(ca, key)
    error = await refused(plugin(ca[0]), pem(*[leaf] * 9), holder(key))
    assert error.reason == "X509POP_MALFORMED"


async def test_a_ca_certificate_as_leaf_is_refused() -> None:
    root = make_ca("root")
    intermediate = make_ca("intermediate", issuer=root)
    error = await refused(plugin(root[0]), pem(intermediate[0]), holder(intermediate[1]))
    assert error.reason == "X509POP_CA_CERT"


async def test_the_trust_anchor_itself_as_leaf_is_refused() -> None:
    root = make_ca("root")
    error = await refused(plugin(root[0]), pem(root[0]), holder(root[1]))
    assert error.reason == "X509POP_CA_CERT"


async def test_a_key_usage_without_digital_signature_is_refused() -> None:
    ca = make_ca()
    key = ec_key()
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=True,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    ctx = holder(key)
    error = await refused(plugin(ca[0]), pem(node_cert(ca, key, usage=usage)), ctx)
    assert error.reason == "X509POP_KEY_USAGE"
    assert ctx.payloads == []


# --- configuration ---------------------------------------------------------------------------


def test_a_bundle_file_is_read(tmp_path: Path) -> None:
    ca = make_ca()
    path = tmp_path / "ca.pem"
    path.write_bytes(pem(ca[0]))
    assert isinstance(
        X509PopAttestor.configure({"ca_bundle_path": str(path)}, FakeHost()), X509PopAttestor
    )


@pytest.mark.parametrize(
    "config",
    [{}, {"ca_bundle": "x", "ca_bundle_path": "/x"}],
    ids=["neither", "both"],
)
def test_exactly_one_bundle_source_is_required(config: dict[str, Any]) -> None:
    if "ca_bundle" in config:
        config["ca_bundle"] = pem(make_ca()[0]).decode()
    with pytest.raises(ConfigError, match="exactly one of ca_bundle"):
        X509PopAttestor.configure(config, FakeHost())


def test_a_non_ca_in_the_bundle_is_refused() -> None:
    ca = make_ca("root")
    leaf = node_cert(ca, ec_key(), common_name="just a node")
    with pytest.raises(ConfigError, match="just a node is not a CA"):
        X509PopAttestor.configure({"ca_bundle": pem(ca[0], leaf).decode()}, FakeHost())


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_an_unreadable_bundle_file_is_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "nope.pem" if kind == "missing" else tmp_path
    with pytest.raises(ConfigError, match="cannot load PEM"):
        X509PopAttestor.configure({"ca_bundle_path": str(path)}, FakeHost())


@pytest.mark.parametrize("bundle", ["", "garbage", 42], ids=["empty", "text", "number"])
def test_a_bundle_with_no_certificate_is_refused(bundle: object) -> None:
    with pytest.raises(ConfigError, match="ca_bundle"):
        X509PopAttestor.configure({"ca_bundle": bundle}, FakeHost())


def test_an_unknown_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown configuration keys: trust"):
        X509PopAttestor.configure(
            {"ca_bundle": pem(make_ca()[0]).decode(), "trust": "all"}, FakeHost()
        )


# --- names no selector can hold --------------------------------------------------------------


async def test_a_wildcard_dns_name_is_left_out_and_the_rest_attests() -> None:
    # Through the real host: a selector value with '*' would be refused there, so the plugin
    # must not return one (a wildcard could never match an exact entry selector anyway).
    ca = make_ca()
    key = ec_key()
    leaf = node_cert(ca, key, dns=("*.nodes.example.org", SAN_DNS))
    plugins: dict[str, type[Attestor]] = {"x509pop": X509PopAttestor}
    host = AttestorHost(store=MemoryStore(), clock=FakeClock(NOW), limits=Limits(), plugins=plugins)
    await host.register("nodes", "x509pop", {"ca_bundle": pem(ca[0]).decode()})
    outcome = await host.attest("nodes", pem(leaf), holder(key))
    assert Selector("nodes", f"san_dns:{SAN_DNS}") in outcome.selectors
    assert not [s for s in outcome.selectors if "*" in s.value]
    assert Selector("nodes", "subject_cn:node-1") in outcome.selectors
