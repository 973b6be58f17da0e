"""Intent-scoped task tokens: minted by the authority, verified by relying services.

A task token is a JWS with its own ``typ`` (``task+jwt``), so that no other token (a JWT-SVID,
an ID token) can pass for one. Claim names follow the OAuth Transaction Tokens and Token
Exchange drafts where the meaning is the same:

- ``iss`` the authority (the trust domain's ID), ``sub`` the principal whose intent it is,
  ``aud`` exactly one relying service, ``iat``/``nbf``/``exp``, ``jti``;
- ``txn`` the task id; ``scope`` the exact actions granted, space-separated (one, in practice);
- ``tctx`` the frozen intent: action, resource, purpose, environment, parameters;
- ``purp`` the purpose (as the Transaction Tokens draft names it);
- ``cnf`` ``{"x5t#S256": ...}``: the SHA-256 thumbprint of the holder's X.509-SVID (RFC 8705);
- ``act`` the delegation chain, RFC 8693 nesting: the outermost ``act.sub`` is the current holder;
- ``decision_id`` the policy decision that allowed it; ``del`` how many further delegations it
  allows; ``parent`` the jti it was delegated from;
- ``apr`` the approval it was collected with (an operator's elevation), when it was: a relying
  service that enforces single use (the MCP gateway does) admits one call per approval.

Tokens are signed with task-token keys of their own (never the JWT-SVID keys), published in a
separate JWK Set.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from authority.errors import InvalidArgument, PermissionDenied, Unauthenticated

TASK_TOKEN_TYP = "task+jwt"  # noqa: S105 - a media type, not a secret
ALGORITHMS = ("ES256", "ES384")
HARD_MAX_TTL = dt.timedelta(minutes=15)
DEFAULT_LEEWAY = dt.timedelta(seconds=5)
_ACTION = re.compile(r"^[a-z][a-z0-9_.:-]{0,63}$")
_RESOURCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,255}$")
_TASK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
MAX_PARAMETERS = 16
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat", "nbf", "jti", "txn", "scope", "tctx", "cnf")


def x5t_s256(cert_der: bytes) -> str:
    """RFC 8705 certificate thumbprint: base64url(SHA-256(DER)), unpadded."""
    return base64.urlsafe_b64encode(hashlib.sha256(cert_der).digest()).rstrip(b"=").decode()


def check_action(action: str) -> str:
    if not _ACTION.fullmatch(action):
        raise InvalidArgument(
            f"action {action!r} must be a lower-case identifier", reason="BAD_INTENT"
        )
    return action


def _shown(value: str) -> str:
    """An invalid value as an error message may quote it: at most its first 80 characters."""
    return repr(value) if len(value) <= 80 else f"{value[:80]!r}... ({len(value)} characters)"


def check_resource(resource: str) -> str:
    if not _RESOURCE.fullmatch(resource) or ".." in resource.split("/"):
        raise InvalidArgument(
            f"resource {_shown(resource)} is not a valid resource name", reason="BAD_INTENT"
        )
    return resource


def check_task_id(task_id: str) -> str:
    if not _TASK.fullmatch(task_id):
        raise InvalidArgument(f"task id {_shown(task_id)} is not valid", reason="BAD_INTENT")
    return task_id


def resource_within(child: str, parent: str) -> bool:
    """Delegation narrows: the same resource, or one below it in the path."""
    return child == parent or child.startswith(parent.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class Intent:
    """One action on one resource for one purpose: what a task token authorises."""

    action: str
    resource: str
    purpose: str
    environment: str = ""
    parameters: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_action(self.action)
        check_resource(self.resource)
        if not self.purpose.strip() or len(self.purpose) > 512:
            raise InvalidArgument("purpose must be 1..512 characters", reason="BAD_INTENT")
        if len(self.parameters) > MAX_PARAMETERS:
            raise InvalidArgument(f"at most {MAX_PARAMETERS} parameters", reason="BAD_INTENT")
        for key, value in self.parameters.items():
            if (
                not isinstance(key, str)
                or not isinstance(value, str)
                or len(key) > 64
                or len(value) > 512
            ):
                raise InvalidArgument("parameters are short strings", reason="BAD_INTENT")

    def as_claim(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "resource": self.resource,
            "purpose": self.purpose,
            "environment": self.environment,
            "parameters": dict(sorted(self.parameters.items())),
        }

    def fingerprint(self, audience: str) -> str:
        """What an approval is bound to: the intent and its audience, canonically hashed."""
        body = json.dumps(
            {**self.as_claim(), "audience": audience}, sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(body.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TaskToken:
    """A verified (or freshly minted) task token's claims. Its ``repr`` (what a handler that logs
    the verified token prints) leaves the token itself out."""

    token: str = field(repr=False)
    jti: str
    issuer: str
    subject: str
    audience: str
    issued_at: dt.datetime
    expires_at: dt.datetime
    task_id: str
    scopes: tuple[str, ...]
    intent: Intent
    cnf_x5t: str
    actors: tuple[str, ...]  # the delegation chain, current holder first; empty if direct
    decision_id: str
    may_delegate: int
    parent_jti: str
    key_id: str
    approval_id: str = ""  # the approval it was collected with ("apr"), if any

    @property
    def holder(self) -> str:
        """Who may present it: the current actor, or the subject when not delegated."""
        return self.actors[0] if self.actors else self.subject

    @property
    def depth(self) -> int:
        return len(self.actors)


def _act_claim(actors: Sequence[str]) -> dict[str, Any] | None:
    claim: dict[str, Any] | None = None
    for actor in reversed(actors):
        claim = {"sub": actor, **({"act": claim} if claim else {})}
    return claim


def _actors(act: object) -> tuple[str, ...]:
    chain: list[str] = []
    while isinstance(act, Mapping):
        sub = act.get("sub")
        if not isinstance(sub, str) or not sub:
            raise Unauthenticated("the act claim is malformed", reason="TOKEN_MALFORMED")
        chain.append(sub)
        act = act.get("act")
        if len(chain) > 16:
            raise Unauthenticated("the act chain is too deep", reason="TOKEN_MALFORMED")
    if act is not None:
        raise Unauthenticated("the act claim is malformed", reason="TOKEN_MALFORMED")
    return tuple(chain)


def mint(
    *,
    key: ec.EllipticCurvePrivateKey,
    key_id: str,
    algorithm: str,
    issuer: str,
    subject: str,
    audience: str,
    now: dt.datetime,
    expires_at: dt.datetime,
    jti: str,
    task_id: str,
    intent: Intent,
    cnf_x5t: str,
    actors: Sequence[str],
    decision_id: str,
    may_delegate: int,
    parent_jti: str = "",
    approval_id: str = "",
) -> TaskToken:
    if expires_at - now > HARD_MAX_TTL + dt.timedelta(seconds=1):
        raise InvalidArgument("a task token lives at most 15 minutes")
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "iat": int(now.timestamp()),
        "nbf": int(now.timestamp()),
        "exp": int(expires_at.timestamp()),
        "jti": jti,
        "txn": task_id,
        "scope": intent.action,
        "tctx": intent.as_claim(),
        "purp": intent.purpose,
        "cnf": {"x5t#S256": cnf_x5t},
        "decision_id": decision_id,
        "del": may_delegate,
    }
    act = _act_claim(actors)
    if act is not None:
        claims["act"] = act
    if parent_jti:
        claims["parent"] = parent_jti
    if approval_id:
        claims["apr"] = approval_id
    token = jwt.encode(
        claims, key, algorithm=algorithm, headers={"kid": key_id, "typ": TASK_TOKEN_TYP}
    )
    return TaskToken(
        token=token,
        jti=jti,
        issuer=issuer,
        subject=subject,
        audience=audience,
        issued_at=dt.datetime.fromtimestamp(claims["iat"], dt.UTC),
        expires_at=dt.datetime.fromtimestamp(claims["exp"], dt.UTC),
        task_id=task_id,
        scopes=(intent.action,),
        intent=intent,
        cnf_x5t=cnf_x5t,
        actors=tuple(actors),
        decision_id=decision_id,
        may_delegate=may_delegate,
        parent_jti=parent_jti,
        key_id=key_id,
        approval_id=approval_id,
    )


def verify(
    token: str,
    *,
    keys: Mapping[str, ec.EllipticCurvePublicKey],
    issuer: str,
    audience: str | None,
    now: dt.datetime,
    leeway: dt.timedelta = DEFAULT_LEEWAY,
) -> TaskToken:
    """Check a task token: type, algorithm allow-list, key, signature, issuer, audience (when
    given), time. Binding (cnf), scope and revocation are the caller's to check next."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise Unauthenticated("not a JWS compact token", reason="TOKEN_MALFORMED") from None
    if header.get("typ") != TASK_TOKEN_TYP:
        raise Unauthenticated(
            f"token type {header.get('typ')!r} is not a task token", reason="TOKEN_TYPE"
        )
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise Unauthenticated(f"algorithm {alg!r} is not allowed", reason="TOKEN_ALGORITHM")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise Unauthenticated("the token's key is unknown", reason="TOKEN_UNKNOWN_KEY")
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[alg],
            issuer=issuer,
            audience=audience,
            options={
                "require": list(REQUIRED_CLAIMS),
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": audience is not None,
            },
        )
    except jwt.InvalidAudienceError:
        raise Unauthenticated(
            "the token is for another audience", reason="TOKEN_AUDIENCE"
        ) from None
    except jwt.InvalidIssuerError:
        raise Unauthenticated("the token's issuer is not trusted", reason="TOKEN_ISSUER") from None
    except jwt.InvalidSignatureError:
        raise Unauthenticated(
            "the token's signature does not verify", reason="TOKEN_SIGNATURE"
        ) from None
    except jwt.PyJWTError as exc:
        raise Unauthenticated(f"the token is invalid: {exc}", reason="TOKEN_MALFORMED") from None
    try:
        aud = claims["aud"]
        if not isinstance(aud, str):
            raise Unauthenticated("a task token has exactly one audience", reason="TOKEN_AUDIENCE")
        exp = _numeric_date(claims["exp"])
        nbf = _numeric_date(claims["nbf"])
        iat = _numeric_date(claims["iat"])
        if now >= exp + leeway:
            raise Unauthenticated("the token has expired", reason="TOKEN_EXPIRED")
        if now + leeway < nbf:
            raise Unauthenticated("the token is not valid yet", reason="TOKEN_NOT_YET_VALID")
        if exp - iat > HARD_MAX_TTL + dt.timedelta(seconds=1):
            raise Unauthenticated("the token lives longer than allowed", reason="TOKEN_LIFETIME")
        tctx = claims["tctx"]
        scope = claims["scope"]
        if not isinstance(tctx, Mapping) or not isinstance(scope, str):
            raise TypeError("tctx must be an object and scope a string")
        intent = Intent(
            action=str(tctx["action"]),
            resource=str(tctx["resource"]),
            purpose=str(tctx["purpose"]),
            environment=str(tctx.get("environment", "")),
            parameters={str(k): str(v) for k, v in dict(tctx.get("parameters", {})).items()},
        )
        scopes = tuple(scope.split())
        cnf = claims["cnf"]
        x5t = cnf.get("x5t#S256") if isinstance(cnf, Mapping) else None
        if not isinstance(x5t, str) or not x5t:
            raise Unauthenticated(
                "the token is not bound to a certificate", reason="TOKEN_MALFORMED"
            )
        return TaskToken(
            token=token,
            jti=str(claims["jti"]),
            issuer=str(claims["iss"]),
            subject=str(claims["sub"]),
            audience=aud,
            issued_at=iat,
            expires_at=exp,
            task_id=str(claims["txn"]),
            scopes=scopes,
            intent=intent,
            cnf_x5t=x5t,
            actors=_actors(claims.get("act")),
            decision_id=str(claims.get("decision_id", "")),
            may_delegate=int(claims.get("del", 0)),
            parent_jti=str(claims.get("parent", "")),
            key_id=str(kid),
            approval_id=str(claims.get("apr", "")),
        )
    except (KeyError, TypeError, ValueError, InvalidArgument):
        raise Unauthenticated(
            "the token's claims are malformed", reason="TOKEN_MALFORMED"
        ) from None


def _numeric_date(value: object) -> dt.datetime:
    """An RFC 7519 NumericDate: a JSON number of seconds, within what a datetime holds."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("a NumericDate is a number")
    try:
        return dt.datetime.fromtimestamp(int(value), dt.UTC)
    except (OverflowError, OSError) as exc:  # also ValueError (NaN, year out of range)
        raise ValueError("a NumericDate out of range") from exc


def check_binding(token: TaskToken, presenter_cert_der: bytes | None) -> None:
    """The presenter must hold the certificate the token is bound to (RFC 8705)."""
    if presenter_cert_der is None:
        raise Unauthenticated("the token must be presented over mutual TLS", reason="TOKEN_UNBOUND")
    if x5t_s256(presenter_cert_der) != token.cnf_x5t:
        raise PermissionDenied(
            "the token is bound to another certificate", reason="TOKEN_CNF_MISMATCH"
        )


def check_scope(token: TaskToken, action: str, resource: str | None = None) -> None:
    """Exactly the action granted; nothing is implied (read does not cover write)."""
    if action not in token.scopes:
        raise PermissionDenied(
            f"the token grants {' '.join(token.scopes)!r}, not {action!r}", reason="TOKEN_SCOPE"
        )
    if resource is not None and not resource_within(resource, token.intent.resource):
        raise PermissionDenied("the token is for another resource", reason="TOKEN_RESOURCE")
