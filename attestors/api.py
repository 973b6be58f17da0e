"""The attestor plugin SDK: all a plugin may depend on.

A plugin is a class registered under the entry-point group ``authority.attestors``. The host builds
an instance from an operator-supplied config mapping (``configure``), then calls ``attest`` once per
attestation with the workload's evidence and an ``AttestContext``: extra challenge rounds, and
the kernel's word on the caller when it came over the local socket. The plugin returns
selector values as ``(key, value)`` pairs; the host prefixes them with the instance name, so a
plugin can never mint another attestor's selectors. Refusals are ``AttestationRefused`` with a
stable reason; anything else a plugin raises is reported to the workload as a generic internal
error.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self

ENTRY_POINT_GROUP = "authority.attestors"
_REASON = re.compile(r"^[A-Z][A-Z0-9_]{2,63}$")
_KEY = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
# The longest selector value a plugin may return: a whole SPIFFE ID (2048 bytes) fits.
MAX_SELECTOR_VALUE_CHARS = 2048


class AttestorError(Exception):
    """Base of the errors a plugin raises on purpose."""


class ConfigError(AttestorError):
    """The instance configuration is invalid; the message says which key and why."""


class AttestationRefused(AttestorError):
    """The evidence does not prove what it claims. ``reason`` is a stable upper-case code."""

    def __init__(self, reason: str, message: str) -> None:
        if not _REASON.fullmatch(reason):
            raise ValueError(f"reason {reason!r} must be an UPPER_SNAKE code")
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is at the other end of the local Unix socket, as the kernel says (``SO_PEERCRED``).

    ``pidfd`` pins the process (``SO_PEERPIDFD``, or ``pidfd_open`` right after accept) and is
    owned by the host; ``connected_at`` is CLOCK_BOOTTIME seconds when the connection was seen.
    """

    pid: int
    uid: int
    gid: int
    pidfd: int | None
    connected_at: float


class AttestContext(Protocol):
    """One attestation's channel to the workload, lent by the host."""

    async def challenge(self, payload: bytes) -> bytes:
        """Send ``payload`` to the workload and return its response (bounded by the host)."""
        ...

    @property
    def peer(self) -> PeerCredentials | None:
        """The caller's kernel credentials on the local socket; None on network endpoints."""
        ...


class HostServices(Protocol):
    """What the host lends one plugin instance: time, and the state that must be shared."""

    def now(self) -> dt.datetime: ...

    async def consume_join_token(self, token_digest: str) -> str:
        """Mark a join token used; return the SPIFFE ID it is bound to. Raises
        AttestationRefused (JOIN_TOKEN_UNKNOWN, JOIN_TOKEN_USED, JOIN_TOKEN_EXPIRED)."""
        ...

    async def claim_once(self, key: str, expires_at: dt.datetime) -> bool:
        """True the first time ``key`` is claimed before ``expires_at``, False for a replay.

        Durable across restarts; keys are private to the instance (the host namespaces them)."""
        ...


@dataclass(frozen=True, slots=True)
class Attested:
    """What a plugin proved: selector values, and optionally an identity the credential carried."""

    selectors: tuple[tuple[str, str], ...]
    bound_spiffe_id: str | None = None
    can_reattest: bool = True

    def __post_init__(self) -> None:
        for key, value in self.selectors:
            if not _KEY.fullmatch(key):
                raise ValueError(f"selector key {key!r} is not a lower-case identifier")
            if not value or len(value) > MAX_SELECTOR_VALUE_CHARS:
                raise ValueError(
                    f"selector values must be 1..{MAX_SELECTOR_VALUE_CHARS} characters"
                )


class Attestor(Protocol):
    """A plugin. Optionally it declares ``selector_kinds``, the selector keys an instance can
    produce (a class attribute, or an instance attribute when the keys follow the configuration):
    the host then refuses registration entries whose selectors of this instance name another key,
    which no workload could ever match. A plugin that declares none accepts any key."""

    plugin_name: ClassVar[str]

    @classmethod
    def configure(cls, config: Mapping[str, Any], host: HostServices) -> Self:
        """Validate ``config`` and build an instance; raise ConfigError naming the bad key."""
        ...

    async def attest(self, evidence: bytes, ctx: AttestContext) -> Attested: ...


def declared_selector_kinds(plugin: object) -> frozenset[str] | None:
    """The selector keys ``plugin`` (a class or an instance) declares it can produce, or None
    when it declares none (or something that is not a collection of strings): any key."""
    kinds = getattr(plugin, "selector_kinds", None)
    if not isinstance(kinds, set | frozenset | tuple | list) or not all(
        isinstance(k, str) for k in kinds
    ):
        return None
    return frozenset(kinds)


def require_keys(config: Mapping[str, Any], allowed: set[str], required: set[str]) -> None:
    """Refuse unknown and missing configuration keys with a clear message."""
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
    missing = sorted(required - set(config))
    if missing:
        raise ConfigError(f"missing configuration keys: {', '.join(missing)}")
