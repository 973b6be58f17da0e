"""The trust bundle: X.509 authorities and JWT keys, as PEM and as the SPIFFE JWK Set."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from authority.errors import InvalidArgument
from authority.ids import TrustDomain


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, Any]:
    jwk: dict[str, Any] = ECAlgorithm.to_jwk(key, as_dict=True)
    return jwk


def jwk_thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url): the key id used for every authority key."""
    jwk = public_jwk(key)
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"], "y": jwk["y"]},
        separators=(",", ":"),
        sort_keys=True,
    )
    return b64url(hashlib.sha256(canonical.encode()).digest())


@dataclass(frozen=True, slots=True)
class TrustBundle:
    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...]
    jwt_authorities: Mapping[str, ec.EllipticCurvePublicKey]  # kid -> key
    sequence: int
    refresh_hint: dt.timedelta

    def pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.x509_authorities)

    def x509_der(self) -> list[bytes]:
        return [c.public_bytes(serialization.Encoding.DER) for c in self.x509_authorities]

    def jwks(self) -> dict[str, Any]:
        keys: list[dict[str, Any]] = []
        for cert in self.x509_authorities:
            pub = cert.public_key()
            if isinstance(pub, ec.EllipticCurvePublicKey):
                jwk = public_jwk(pub)
            elif isinstance(pub, rsa.RSAPublicKey):  # an upstream RSA root
                jwk = RSAAlgorithm.to_jwk(pub, as_dict=True)
            else:
                continue  # no JWK form here; the root is still in the PEM bundle
            jwk["use"] = "x509-svid"
            jwk["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
            keys.append(jwk)
        for kid, key in sorted(self.jwt_authorities.items()):
            jwk = public_jwk(key)
            jwk["use"] = "jwt-svid"
            jwk["kid"] = kid
            keys.append(jwk)
        return {
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": int(self.refresh_hint.total_seconds()),
        }

    def jwks_json(self) -> bytes:
        return json.dumps(self.jwks(), separators=(",", ":"), sort_keys=True).encode()


def parse_jwks(data: bytes) -> dict[str, ec.EllipticCurvePublicKey]:
    """The ``jwt-svid`` keys of a SPIFFE JWK Set, by kid (for clients and tests)."""
    try:
        doc = json.loads(data)
        out: dict[str, ec.EllipticCurvePublicKey] = {}
        for jwk in doc["keys"]:
            if jwk.get("use") != "jwt-svid":
                continue
            key = ECAlgorithm.from_jwk(jwk)
            kid = jwk["kid"]
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise InvalidArgument("JWT authority is not a public EC key")
            if not isinstance(kid, str) or not kid or kid in out:
                raise InvalidArgument("each JWT authority needs a kid of its own")
            out[kid] = key
        return out
    except (ValueError, KeyError, TypeError, AttributeError, InvalidKeyError) as exc:
        raise InvalidArgument(f"not a SPIFFE JWK Set: {exc}") from None


def load_pem_certificates(data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise InvalidArgument(f"not a PEM certificate bundle: {exc}") from None
    return certs
