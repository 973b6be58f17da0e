"""``jwt``: a signed platform token, such as a Kubernetes projected service-account token, a CI
provider's OIDC token, or any OIDC ID token.

The token is checked against the configured keys (a JWK Set, inline or from a file), issuer,
audience, expiry and an algorithm allow-list of asymmetric algorithms only (``none`` and HMAC can
never be configured, so a public key can never be used as an HMAC secret). Every token must carry
``jti``; a ``jti`` is accepted once until the token expires (a replay cache kept by the host,
durable across restarts). Selectors come from configured claims; presets exist for Kubernetes and
GitHub Actions.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import jwt

from attestors.api import (
    MAX_SELECTOR_VALUE_CHARS,
    AttestationRefused,
    AttestContext,
    Attested,
    ConfigError,
    HostServices,
    require_keys,
)

ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEFAULT_ALGORITHMS = ("RS256", "ES256")
MAX_TOKEN_BYTES = 16 * 1024
# Time claims outside [1970, 3000) are refused before any date arithmetic can overflow.
MAX_INSTANT = 32503680000

# selector key -> claim path (segments joined with "/")
PRESETS: dict[str, dict[str, str]] = {
    "kubernetes": {
        "namespace": "kubernetes.io/namespace",
        "service_account": "kubernetes.io/serviceaccount/name",
        "service_account_uid": "kubernetes.io/serviceaccount/uid",
        "pod": "kubernetes.io/pod/name",
        "pod_uid": "kubernetes.io/pod/uid",
        "node": "kubernetes.io/node/name",
    },
    "github": {
        "repository": "repository",
        "repository_owner": "repository_owner",
        "ref": "ref",
        "workflow": "workflow",
        "job_workflow_ref": "job_workflow_ref",
        "environment": "environment",
        "actor": "actor",
        "event_name": "event_name",
    },
    "oidc": {},
}


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for segment in path.split("/"):
        if not isinstance(value, Mapping) or segment not in value:
            return None
        value = value[segment]
    return value


def _instant(claims: Mapping[str, Any], name: str) -> dt.datetime:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AttestationRefused("JWT_INVALID", f"claim {name} must be a number")
    if not 0 <= value < MAX_INSTANT:  # also false for NaN
        raise AttestationRefused("JWT_INVALID", f"claim {name} is out of range")
    return dt.datetime.fromtimestamp(int(value), dt.UTC)


def _selector_value(value: str) -> bool:
    """Whether ``value`` can be a selector value: the host matches selectors exactly, so it
    refuses empty or overlong values, wildcards and control characters."""
    return 0 < len(value) <= MAX_SELECTOR_VALUE_CHARS and not any(
        ch in "*?\x7f" or ch < " " for ch in value
    )


def _selector_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    try:
        Attested(selectors=((key, "x"),))
    except ValueError:
        return False
    return True


def _load_jwks(config: Mapping[str, Any]) -> jwt.PyJWKSet:
    if ("jwks" in config) == ("jwks_path" in config):
        raise ConfigError("give exactly one of jwks (a JWK Set) or jwks_path")
    try:
        if "jwks" in config:
            raw = config["jwks"]
            doc = json.loads(raw) if isinstance(raw, str) else raw
        else:
            doc = json.loads(Path(str(config["jwks_path"])).read_text())
        if not isinstance(doc, Mapping):
            raise ConfigError("jwks: a JWK Set is a JSON object with a keys list")
        keys = jwt.PyJWKSet.from_dict(dict(doc))
    except (OSError, ValueError, TypeError, jwt.PyJWTError) as exc:
        raise ConfigError(f"jwks: not a usable JWK Set: {exc}") from None
    for key in keys.keys:
        if not key.key_id:
            raise ConfigError("jwks: every key needs a kid")
        if key.key_type == "oct":
            raise ConfigError("jwks: symmetric (oct) keys are not allowed")
    return keys


class JwtAttestor:
    plugin_name: ClassVar[str] = "jwt"

    def __init__(
        self,
        *,
        host: HostServices,
        keys: jwt.PyJWKSet,
        issuer: str,
        audience: list[str],
        algorithms: list[str],
        claims: dict[str, str],
        leeway: dt.timedelta,
        max_lifetime: dt.timedelta,
    ) -> None:
        self._host = host
        self._keys = {k.key_id: k for k in keys.keys}
        self._issuer = issuer
        self._audience = audience
        self._algorithms = algorithms
        self._claims = claims
        # "sub", and the configured claims (the kind's preset and selector_claims).
        self.selector_kinds = frozenset({"sub", *claims})
        self._leeway = leeway
        self._max_lifetime = max_lifetime

    @classmethod
    def configure(cls, config: Mapping[str, Any], host: HostServices) -> Self:
        require_keys(
            config,
            allowed={
                "jwks",
                "jwks_path",
                "issuer",
                "audience",
                "algorithms",
                "kind",
                "selector_claims",
                "leeway_seconds",
                "max_lifetime_seconds",
            },
            required={"issuer", "audience"},
        )
        keys = _load_jwks(config)
        issuer = config["issuer"]
        if not isinstance(issuer, str) or not issuer:
            raise ConfigError("issuer must be a non-empty string")
        audience = config["audience"]
        audiences = [audience] if isinstance(audience, str) else audience
        if (
            not isinstance(audiences, list)
            or not audiences
            or not all(isinstance(a, str) and a for a in audiences)
        ):
            raise ConfigError("audience must be a string or a list of strings")
        algorithms = config.get("algorithms", list(DEFAULT_ALGORITHMS))
        if isinstance(algorithms, str):
            algorithms = [algorithms]
        if not isinstance(algorithms, list) or not all(isinstance(a, str) for a in algorithms):
            raise ConfigError("algorithms must be a list of algorithm names")
        bad = sorted(set(algorithms) - ALLOWED_ALGORITHMS)
        if bad or not algorithms:
            allowed = ", ".join(sorted(ALLOWED_ALGORITHMS))
            raise ConfigError(f"algorithms: {bad or 'empty'} not allowed; choose from {allowed}")
        kind = config.get("kind", "oidc")
        if not isinstance(kind, str) or kind not in PRESETS:
            raise ConfigError(f"kind must be one of {sorted(PRESETS)}")
        claims = dict(PRESETS[kind])
        extra = config.get("selector_claims", {})
        if not isinstance(extra, Mapping) or not all(
            _selector_key(k) and isinstance(v, str) and v for k, v in extra.items()
        ):
            raise ConfigError(
                "selector_claims must map selector keys (lower-case identifiers) to claim paths"
            )
        claims.update(extra)
        try:
            leeway = dt.timedelta(seconds=int(config.get("leeway_seconds", 30)))
            max_lifetime = dt.timedelta(seconds=int(config.get("max_lifetime_seconds", 86400)))
        except (TypeError, ValueError, OverflowError):
            raise ConfigError("leeway_seconds and max_lifetime_seconds must be integers") from None
        if not dt.timedelta(0) <= leeway <= dt.timedelta(minutes=5):
            raise ConfigError("leeway_seconds must be between 0 and 300")
        if max_lifetime <= dt.timedelta(0):
            raise ConfigError("max_lifetime_seconds must be positive")
        return cls(
            host=host,
            keys=keys,
            issuer=issuer,
            audience=list(audiences),
            algorithms=list(algorithms),
            claims=claims,
            leeway=leeway,
            max_lifetime=max_lifetime,
        )

    def _verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AttestationRefused(
                "JWT_MALFORMED", "the token is not a JWS compact JWT"
            ) from None
        alg = header.get("alg")
        if alg not in self._algorithms:
            raise AttestationRefused("JWT_ALGORITHM", f"algorithm {alg!r} is not allowed")
        key = self._keys.get(header.get("kid", ""))
        if key is None:
            raise AttestationRefused("JWT_UNKNOWN_KID", "the token's kid is not a configured key")
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                # Time claims are checked against the host's clock in attest(), not the wall clock.
                options={
                    "require": ["exp", "iat", "iss", "aud", "sub", "jti"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidAudienceError:
            raise AttestationRefused("JWT_AUDIENCE", "the token is not for this audience") from None
        except jwt.InvalidIssuerError:
            raise AttestationRefused("JWT_ISSUER", "the token's issuer is not trusted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AttestationRefused("JWT_MISSING_CLAIM", str(exc)) from None
        except jwt.InvalidAlgorithmError:
            # The header's algorithm is allowed, but it is not the one the key is for.
            raise AttestationRefused(
                "JWT_ALGORITHM", f"algorithm {alg!r} is not the algorithm of key {key.key_id!r}"
            ) from None
        except jwt.InvalidSignatureError:
            raise AttestationRefused(
                "JWT_SIGNATURE", "the token's signature does not verify"
            ) from None
        except jwt.PyJWTError as exc:
            raise AttestationRefused("JWT_INVALID", f"the token is invalid: {exc}") from None

    async def attest(self, evidence: bytes, ctx: AttestContext) -> Attested:
        if len(evidence) > MAX_TOKEN_BYTES:
            raise AttestationRefused("JWT_MALFORMED", "the token is too large")
        try:
            token = evidence.decode("ascii").strip()
        except UnicodeDecodeError:
            raise AttestationRefused("JWT_MALFORMED", "the token is not ASCII") from None
        claims = self._verify(token)
        now = self._host.now()
        exp = _instant(claims, "exp")
        iat = _instant(claims, "iat")
        if exp + self._leeway <= now:
            raise AttestationRefused("JWT_EXPIRED", "the token has expired")
        nbf = _instant(claims, "nbf") if "nbf" in claims else iat
        if iat - self._leeway > now or nbf - self._leeway > now:
            raise AttestationRefused("JWT_NOT_YET_VALID", "the token is not valid yet")
        if exp - iat > self._max_lifetime:
            raise AttestationRefused("JWT_LIFETIME", "the token lives longer than allowed")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise AttestationRefused("JWT_MISSING_CLAIM", "jti must be a non-empty string")
        sub = claims["sub"]
        if not isinstance(sub, str) or not _selector_value(sub):
            raise AttestationRefused(
                "JWT_INVALID", "sub must be 1..2048 printable characters, without wildcards"
            )
        if not await self._host.claim_once(f"jti:{jti}", exp + self._leeway):
            raise AttestationRefused("JWT_REPLAYED", "this token was already used to attest")
        selectors: list[tuple[str, str]] = [("sub", sub)]
        for key, path in sorted(self._claims.items()):
            value = _claim(claims, path)
            values = value if isinstance(value, list) else [value]
            # A value no selector can hold is left out: no entry could match it.
            selectors += [
                (key, str(v)) for v in values if v is not None and _selector_value(str(v))
            ]
        return Attested(selectors=tuple(selectors), can_reattest=True)
