"""Validating a JWT-SVID against a trust bundle (SPIFFE JWT-SVID, section 3 and 4).

Shared by the authority's ValidateJWTSVID and the node agent's, which checks locally against
the bundle it holds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import jwt

from authority.bundle import TrustBundle
from authority.errors import InvalidArgument
from authority.ids import SpiffeId

_JWT_SVID_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_MAX_JWT_SVID_CHARS = 16 * 1024


def check_jwt_svid(
    token: str,
    audience: str,
    bundle: TrustBundle,
    now: dt.datetime,
    is_revoked: Callable[[str], bool],
) -> tuple[SpiffeId, dict[str, Any]]:
    """A ``kid`` in the bundle, the algorithm allowed for that key, the signature, ``exp`` (and
    ``nbf``) against ``now``, ``audience`` among ``aud``, ``sub`` a SPIFFE ID of the bundle's
    trust domain for which ``is_revoked`` is false. Returns the SPIFFE ID and the claims;
    INVALID_ARGUMENT with a precise reason otherwise."""
    if not audience:
        raise InvalidArgument("an audience is required", reason="NO_AUDIENCE")
    if not token:
        raise InvalidArgument("a JWT-SVID is required", reason="JWT_SVID_MISSING")
    if len(token) > _MAX_JWT_SVID_CHARS:
        raise InvalidArgument("the JWT-SVID is too large", reason="JWT_SVID_MALFORMED")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidArgument("not a JWS compact token", reason="JWT_SVID_MALFORMED") from None
    if header.get("typ", "JWT") not in ("JWT", "JOSE"):
        raise InvalidArgument("the token is not a JWT-SVID", reason="JWT_SVID_TYPE")
    kid = header.get("kid")
    key = bundle.jwt_authorities.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise InvalidArgument("the token's key is not in the bundle", reason="JWT_SVID_KEY")
    alg = header.get("alg")
    allowed = _JWT_SVID_ALGORITHMS.get(key.curve.name)
    if allowed is None or alg != allowed:
        raise InvalidArgument(
            f"algorithm {alg!r} is not allowed for this key", reason="JWT_SVID_ALGORITHM"
        )
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[allowed],
            audience=audience,
            options={
                "require": ["sub", "aud", "exp"],
                "verify_exp": False,  # checked below, against the injected clock
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidAudienceError:
        raise InvalidArgument(
            "the token is not for this audience", reason="JWT_SVID_AUDIENCE"
        ) from None
    except jwt.InvalidSignatureError:
        raise InvalidArgument(
            "the token's signature does not verify", reason="JWT_SVID_SIGNATURE"
        ) from None
    except jwt.PyJWTError as exc:
        raise InvalidArgument(
            f"the token is not a valid JWT-SVID: {exc}", reason="JWT_SVID_MALFORMED"
        ) from None
    seconds = now.timestamp()
    exp, nbf = claims["exp"], claims.get("nbf", 0)
    if not isinstance(exp, int | float) or isinstance(exp, bool) or seconds >= exp:
        raise InvalidArgument("the token has expired", reason="JWT_SVID_EXPIRED")
    if not isinstance(nbf, int | float) or isinstance(nbf, bool) or seconds < nbf:
        raise InvalidArgument("the token is not valid yet", reason="JWT_SVID_NOT_YET_VALID")
    sub = claims["sub"]
    try:
        spiffe_id = SpiffeId.parse(sub if isinstance(sub, str) else "")
    except InvalidArgument:
        raise InvalidArgument(
            "the token's sub is not a SPIFFE ID", reason="JWT_SVID_SUBJECT"
        ) from None
    if not spiffe_id.member_of(bundle.trust_domain):
        raise InvalidArgument(
            f"{spiffe_id} is not in trust domain {bundle.trust_domain}",
            reason="JWT_SVID_SUBJECT",
        )
    if is_revoked(spiffe_id.uri):
        raise InvalidArgument(f"{spiffe_id} is revoked", reason="JWT_SVID_REVOKED")
    return spiffe_id, claims
