"""``x509pop``: proof that the workload holds the private key of a certificate issued by a CA the
operator trusts.

Evidence: the workload's certificate chain (PEM, leaf first). The host checks the chain against the
configured CA bundle with cryptography's path validation, then challenges the workload with a fresh
32-byte nonce; the workload signs ``DOMAIN || nonce`` with the certificate's key (ECDSA-SHA256, or
RSA-PSS-SHA256). A nonce lives for one stream, so a signature cannot be replayed.

Selectors: ``subject_cn``, ``san_dns``, ``san_uri``, ``serial`` (hex), ``fingerprint`` (SHA-256 of
the leaf), ``ca_fingerprint`` (SHA-256 of the trust anchor that validated it).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from attestors.api import (
    MAX_SELECTOR_VALUE_CHARS,
    AttestationRefused,
    AttestContext,
    Attested,
    ConfigError,
    HostServices,
    require_keys,
)

DOMAIN = b"agent-authority x509pop v1\x00"
NONCE_BYTES = 32
MAX_CHAIN = 8


def sign_challenge(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, nonce: bytes) -> bytes:
    """What a workload sends back: its signature over the domain-separated nonce."""
    message = DOMAIN + nonce
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    return key.sign(
        message,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
        hashes.SHA256(),
    )


def _verify_signature(cert: x509.Certificate, nonce: bytes, signature: bytes) -> None:
    key = cert.public_key()
    message = DOMAIN + nonce
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(
                signature,
                message,
                padding.PSS(
                    mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH
                ),
                hashes.SHA256(),
            )
        else:
            raise AttestationRefused("X509POP_KEY_TYPE", "the certificate key must be EC or RSA")
    except InvalidSignature:
        raise AttestationRefused(
            "X509POP_BAD_SIGNATURE", "the nonce signature does not verify with the certificate key"
        ) from None


def _selector_value(value: str) -> bool:
    """Whether ``value`` can be a selector value: the host matches selectors exactly, so it
    refuses empty or overlong values, wildcards (``*.example.org``) and control characters."""
    return 0 < len(value) <= MAX_SELECTOR_VALUE_CHARS and not any(
        ch in "*?\x7f" or ch < " " for ch in value
    )


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


class X509PopAttestor:
    plugin_name: ClassVar[str] = "x509pop"
    selector_kinds: ClassVar[frozenset[str]] = frozenset(
        {"serial", "fingerprint", "ca_fingerprint", "subject_cn", "san_dns", "san_uri"}
    )

    def __init__(self, roots: list[x509.Certificate], host: HostServices) -> None:
        self._roots = roots
        self._store = Store(roots)
        self._host = host

    @classmethod
    def configure(cls, config: Mapping[str, Any], host: HostServices) -> Self:
        require_keys(config, allowed={"ca_bundle", "ca_bundle_path"}, required=set())
        if ("ca_bundle" in config) == ("ca_bundle_path" in config):
            raise ConfigError("give exactly one of ca_bundle (PEM text) or ca_bundle_path")
        try:
            if "ca_bundle" in config:
                pem = str(config["ca_bundle"]).encode()
            else:
                pem = Path(str(config["ca_bundle_path"])).read_bytes()
            roots = x509.load_pem_x509_certificates(pem)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"ca_bundle: cannot load PEM certificates: {exc}") from None
        for root in roots:
            try:
                bc = root.extensions.get_extension_for_class(x509.BasicConstraints).value
            except x509.ExtensionNotFound:
                bc = None
            if bc is None or not bc.ca:
                raise ConfigError(f"ca_bundle: {root.subject.rfc4514_string()} is not a CA")
        return cls(roots, host)

    def _chain(self, evidence: bytes) -> tuple[x509.Certificate, list[x509.Certificate]]:
        try:
            certs = x509.load_pem_x509_certificates(evidence)
        except ValueError:
            raise AttestationRefused(
                "X509POP_MALFORMED", "evidence must be a PEM certificate chain, leaf first"
            ) from None
        if len(certs) > MAX_CHAIN:
            raise AttestationRefused("X509POP_MALFORMED", f"the chain is longer than {MAX_CHAIN}")
        leaf, *intermediates = certs
        return leaf, intermediates

    def _validate(
        self, leaf: x509.Certificate, intermediates: list[x509.Certificate]
    ) -> list[x509.Certificate]:
        now = self._host.now()
        builder = (
            PolicyBuilder()
            .store(self._store)
            .time(now)
            .max_chain_depth(MAX_CHAIN)
            # Node certificates often carry no SAN (required by the web-PKI client profile);
            # the leaf's CA flag and key usage are checked below instead.
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.permit_all(),
            )
        )
        try:
            verified = builder.build_client_verifier().verify(leaf, intermediates)
        except VerificationError as exc:
            # cryptography says "cert is not valid at validation time" for any certificate of
            # the chain outside its validity window; the leaf's own window is checked directly.
            text = str(exc)
            if (
                not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc
                or "not valid at validation time" in text
                or "expired" in text
            ):
                raise AttestationRefused(
                    "X509POP_CERT_EXPIRED", "the certificate is expired or not yet valid"
                ) from None
            raise AttestationRefused(
                "X509POP_UNTRUSTED", "the certificate does not chain to a configured CA"
            ) from None
        try:
            bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
            if bc.ca:
                raise AttestationRefused("X509POP_CA_CERT", "a CA certificate cannot attest")
        except x509.ExtensionNotFound:
            pass
        try:
            usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
            if not usage.digital_signature:
                raise AttestationRefused(
                    "X509POP_KEY_USAGE", "the certificate's key may not make signatures"
                )
        except x509.ExtensionNotFound:
            pass
        return list(verified.chain)

    async def attest(self, evidence: bytes, ctx: AttestContext) -> Attested:
        leaf, intermediates = self._chain(evidence)
        chain = self._validate(leaf, intermediates)
        nonce = secrets.token_bytes(NONCE_BYTES)
        signature = await ctx.challenge(nonce)
        _verify_signature(leaf, nonce, signature)
        selectors: list[tuple[str, str]] = [
            ("serial", format(leaf.serial_number, "x")),
            ("fingerprint", _fingerprint(leaf)),
            ("ca_fingerprint", _fingerprint(chain[-1])),
        ]
        for attr in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            selectors.append(("subject_cn", str(attr.value)))
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            selectors += [("san_dns", n) for n in san.get_values_for_type(x509.DNSName)]
            selectors += [
                ("san_uri", u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            ]
        except x509.ExtensionNotFound:
            pass
        # A value no selector can hold (a wildcard DNS name, say) is left out: no entry could
        # match it, and the host would refuse the whole attestation over it.
        kept = tuple((key, value) for key, value in selectors if _selector_value(value))
        return Attested(selectors=kept, can_reattest=True)
