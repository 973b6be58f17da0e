"""The authority's nouns: registration entries, join tokens, attested identities, signing keys.

Each model checks its invariants in its constructor, so an instance is valid by existing.
Verbs (issuing, attesting, storing) live elsewhere.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from authority.errors import InvalidArgument
from authority.ids import MAX_ID_BYTES, SpiffeId

# <type>:<value>; the type names an attestor instance, the value is "<key>:<value>" by convention.
_SELECTOR_TYPE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
# A selector value is "<key>:<value>" (see attestors.api): a key of up to 64 characters, and a
# value long enough for a whole SPIFFE ID, as in ``join_token:spiffe_id:<ID>``.
MAX_SELECTOR_VALUE = 64 + 1 + MAX_ID_BYTES
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    type: str
    value: str

    def __post_init__(self) -> None:
        if not _SELECTOR_TYPE.fullmatch(self.type):
            raise InvalidArgument(f"selector type {self.type[:64]!r} is not a valid attestor name")
        if not self.value or len(self.value) > MAX_SELECTOR_VALUE:
            raise InvalidArgument(f"selector value must be 1..{MAX_SELECTOR_VALUE} characters")
        if any(ch in "*?\x7f" or ch < " " for ch in self.value):
            raise InvalidArgument(
                "selector values are exact: wildcards and control characters are refused"
            )

    @classmethod
    def parse(cls, text: str) -> Selector:
        kind, sep, value = text.partition(":")
        if not sep:
            raise InvalidArgument(f"selector {text[:64]!r} must be TYPE:VALUE")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def check_dns_name(name: str) -> str:
    """Return the DNS name lower-cased, or raise: no wildcards, IPs or trailing dots."""
    lowered = name.lower()
    if len(lowered) > 253 or not lowered:
        raise InvalidArgument(f"DNS name {name!r} must be 1..253 characters")
    labels = lowered.split(".")
    if not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise InvalidArgument(f"DNS name {name!r} is not a valid host name (no wildcards)")
    if all(label.isdigit() for label in labels):
        raise InvalidArgument(f"DNS name {name!r} looks like an IP address")
    return lowered


@dataclass(frozen=True, slots=True)
class RegistrationEntry:
    """Selectors -> SPIFFE ID. Matches a workload that presents every one of its selectors."""

    id: str
    spiffe_id: SpiffeId
    selectors: frozenset[Selector]
    x509_ttl: dt.timedelta
    jwt_ttl: dt.timedelta
    dns_names: tuple[str, ...] = ()
    admin: bool = False
    created_at: dt.datetime = field(default_factory=lambda: dt.datetime.fromtimestamp(0, dt.UTC))
    # Keep the full prompt text an agent sends with Exchange in the audit (otherwise: digest only).
    record_prompts: bool = False
    # A node entry: served only by the node agent holding this SPIFFE ID, which matches the
    # selectors on its own machine. None: served by the authority (Attest, its Workload API).
    parent_id: SpiffeId | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise InvalidArgument("entry id is empty")
        if self.parent_id is not None and self.parent_id == self.spiffe_id:
            raise InvalidArgument("an entry cannot be its own parent")
        if not self.selectors:
            raise InvalidArgument("an entry needs at least one selector")
        if not self.spiffe_id.path:
            raise InvalidArgument("an entry's SPIFFE ID must have a path")
        if self.x509_ttl <= dt.timedelta(0) or self.jwt_ttl <= dt.timedelta(0):
            raise InvalidArgument("TTLs must be positive")
        for name in self.dns_names:
            if check_dns_name(name) != name:
                raise InvalidArgument(f"DNS name {name!r} must be lower case")

    def matches(self, presented: frozenset[Selector]) -> bool:
        return self.selectors <= presented


def token_digest(secret: str) -> str:
    """The identifier of a secret (a join token): safe to store and log."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A single-use, expiring join token. Only its digest is ever stored."""

    token_id: str  # sha256 hex of the secret
    spiffe_id: SpiffeId
    expires_at: dt.datetime
    created_at: dt.datetime
    used_at: dt.datetime | None = None

    def __post_init__(self) -> None:
        if len(self.token_id) != 64 or not set(self.token_id) <= _HEX:
            raise InvalidArgument("token id must be a sha256 hex digest")


@dataclass(frozen=True, slots=True)
class Identity:
    """One SPIFFE identity granted by one attestation: what renewals are checked against."""

    id: str
    spiffe_id: SpiffeId
    entry_id: str | None  # None when the credential itself carried the identity (join token)
    attestor: str
    selectors: frozenset[Selector]
    attested_at: dt.datetime
    x509_ttl: dt.timedelta
    jwt_ttl: dt.timedelta
    dns_names: tuple[str, ...] = ()
    admin: bool = False
    # Issued through a node agent: the agent's SPIFFE ID (revoking the agent reaches it).
    parent_id: SpiffeId | None = None


@dataclass(frozen=True, slots=True)
class IssuedX509:
    """The record of one issued X.509-SVID (no key material; the serial identifies it)."""

    serial: str  # hex
    identity_id: str
    spiffe_id: SpiffeId
    not_after: dt.datetime


class KeyKind(StrEnum):
    X509 = "x509"
    JWT = "jwt"
    TASK = "task"  # task tokens: a key of their own, never in the SPIFFE bundle


class KeyState(StrEnum):
    PREPARED = "prepared"
    ACTIVE = "active"
    OLD = "old"


@dataclass(frozen=True, slots=True)
class AuthorityKeyInfo:
    """Public metadata of one signing key of the trust domain (its private half is in a vault)."""

    kind: KeyKind
    key_id: str
    state: KeyState
    not_before: dt.datetime
    not_after: dt.datetime
    # x509 only: the CA certificate (DER), then the upstream chain above it (DER), if any.
    certificate: bytes = b""
    upstream_chain: tuple[bytes, ...] = ()
    tainted: bool = False
    # The replica that holds the private key ("" on a single authority): each replica of a
    # trust domain signs with its own keys; the bundle is the union of all replicas' keys.
    replica: str = ""
    # JWT and task-token keys: the public key (SubjectPublicKeyInfo, DER), so that the other
    # replicas can publish and check it without the private half.
    public_key: bytes = b""

    def __post_init__(self) -> None:
        if self.not_after <= self.not_before:
            raise InvalidArgument("a key's not_after must follow its not_before")
        if (self.kind is KeyKind.X509) != bool(self.certificate):
            raise InvalidArgument("x509 keys, and only they, carry a certificate")


@dataclass(frozen=True, slots=True)
class AttestorInstance:
    """An operator-registered attestor: a plugin, its configuration, and the name that prefixes
    every selector it produces. The configuration is kept as canonical JSON."""

    name: str
    plugin: str
    config_json: str
    created_at: dt.datetime
    updated_at: dt.datetime

    def __post_init__(self) -> None:
        if not _SELECTOR_TYPE.fullmatch(self.name):
            raise InvalidArgument(
                f"attestor name {self.name[:64]!r} must be 1..64 lower-case letters, digits, "
                "'_', '.', '-'"
            )
        if not _SELECTOR_TYPE.fullmatch(self.plugin):
            raise InvalidArgument(f"plugin name {self.plugin[:64]!r} is not valid")
        if canonical_config(self.config) != self.config_json:
            raise InvalidArgument("config_json must be canonical JSON (use canonical_config)")

    @property
    def config(self) -> dict[str, Any]:
        value = json.loads(self.config_json)
        assert isinstance(value, dict)
        return value


def check_length(value: str, limit: int, what: str) -> str:
    """``value`` if it has at most ``limit`` characters; else INVALID_ARGUMENT (TOO_LONG),
    whose message names the length, never the value."""
    if len(value) > limit:
        raise InvalidArgument(
            f"{what} has {len(value)} characters; at most {limit} are allowed", reason="TOO_LONG"
        )
    return value


# A JSON string (escapes and all) or one bracket: what ``json_depth`` counts with.
_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in ``text``, counted without parsing it."""
    depth = deepest = 0
    for match in _JSON_TOKENS.finditer(text):
        part = match.group()
        if part in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif part in ("]", "}"):
            depth -= 1
    return deepest


def check_json(text: str, *, max_bytes: int, max_depth: int, what: str) -> str:
    """A JSON document from a request, its size and nesting checked before anything parses
    it (a deep one would exhaust the parser's recursion, a large one memory)."""
    if len(text) > max_bytes or len(text.encode()) > max_bytes:
        raise InvalidArgument(f"{what} exceeds {max_bytes} bytes", reason="JSON_TOO_LARGE")
    if json_depth(text) > max_depth:
        raise InvalidArgument(
            f"{what} nests deeper than {max_depth} levels", reason="JSON_TOO_DEEP"
        )
    return text


def parse_json(text: str, *, max_bytes: int, max_depth: int, what: str) -> Any:
    """``check_json``, then the document parsed."""
    check_json(text, max_bytes=max_bytes, max_depth=max_depth, what=what)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(f"{what} is not JSON: {exc}") from None


def canonical_config(config: object) -> str:
    """A JSON object, canonically encoded; anything else is refused."""
    if not isinstance(config, dict):
        raise InvalidArgument("an attestor configuration must be a JSON object")
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"the configuration is not JSON-compatible: {exc}") from None


@dataclass(frozen=True, slots=True)
class TaskTokenRecord:
    """What the store keeps of an issued task token (never the token itself): enough to find
    every token of a task and every descendant of a token."""

    jti: str
    task_id: str
    subject: str
    holder: str
    audience: str
    scope: str
    resource: str
    parent_jti: str  # "" for a direct exchange
    depth: int
    issued_at: dt.datetime
    expires_at: dt.datetime
    decision_id: str
    cnf_x5t: str


class ApprovalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    USED = "used"  # a token was minted under it: an approval grants one token


@dataclass(frozen=True, slots=True)
class Approval:
    """An elevation waiting for (or given) an operator's answer, bound to one exact intent.

    ``expires_at`` bounds the wait; once approved, ``grant_expires_at`` bounds the privilege:
    tokens minted under it live no longer than that."""

    id: str
    principal: str
    task_id: str
    audience: str
    intent_json: str  # the frozen intent (canonical JSON), shown to the operator
    intent_fingerprint: str  # sha256 of intent + audience: what the approval is for
    decision_id: str
    requested_at: dt.datetime
    expires_at: dt.datetime
    state: ApprovalState = ApprovalState.PENDING
    decided_at: dt.datetime | None = None
    decided_by: str = ""
    note: str = ""
    grant_expires_at: dt.datetime | None = None

    def effective_state(self, now: dt.datetime) -> str:
        if self.state is ApprovalState.PENDING and now >= self.expires_at:
            return "expired"
        if (
            self.state is ApprovalState.APPROVED
            and self.grant_expires_at is not None
            and now >= self.grant_expires_at
        ):
            return "expired"
        return str(self.state)


@dataclass(frozen=True, slots=True)
class HeldSvid:
    """A live X.509-SVID the authority signed for a node agent's workload (the operators'
    console shows what each agent holds). ``signed_at`` is notAfter less the identity's TTL."""

    agent: str  # the node agent's SPIFFE ID
    spiffe_id: str
    serial: str
    signed_at: dt.datetime
    not_after: dt.datetime


@dataclass(frozen=True, slots=True)
class TaskRecord:
    task_id: str
    principal: str
    created_at: dt.datetime
    ended_at: dt.datetime | None = None
    end_reason: str = ""


class RevocationKind(StrEnum):
    JTI = "jti"  # one task token (its descendants get events of their own)
    TASK = "task"  # every token of a task
    SUBJECT = "subject"  # a SPIFFE ID: its SVIDs, its tokens, what it delegated
    ENTRY = "entry"  # what was issued through a registration entry
    ATTESTOR = "attestor"  # what was issued through an attestor instance
    KEY = "key"  # everything a signing key signed


@dataclass(frozen=True, slots=True)
class Revocation:
    """A durable revocation. ``seq`` only grows; it is kept until ``expires_at``, when
    everything it covers has expired, and forgotten after."""

    kind: RevocationKind
    target: str
    reason: str
    revoked_at: dt.datetime
    expires_at: dt.datetime
    actor: str = ""
    seq: int = 0  # assigned by the store

    def __post_init__(self) -> None:
        if not self.target or len(self.target) > 2048:
            raise InvalidArgument("a revocation names a target of 1..2048 characters")
        if len(self.reason) > 500:
            raise InvalidArgument("a revocation reason is at most 500 characters")
