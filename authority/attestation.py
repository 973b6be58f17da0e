"""The attestor host: owns plugin discovery, the challenge loop, its bounds, selector namespacing,
and the wrapping of plugin failures. Plugins see only ``attestors.api``."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from attestors.api import (
    ENTRY_POINT_GROUP,
    AttestationRefused,
    Attested,
    Attestor,
    Challenger,
    ConfigError,
)
from authority.clock import Clock
from authority.config import Limits
from authority.errors import (
    AttestationFailed,
    AuthorityError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from authority.ids import SpiffeId
from authority.models import Selector
from authority.store import Store

log = logging.getLogger(__name__)


def discover_plugins() -> dict[str, type[Attestor]]:
    """Every attestor plugin installed, built-ins included, by entry-point name."""
    found: dict[str, type[Attestor]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception:
            log.exception("attestor plugin %s failed to load", ep.name)
    return found


class _HostServices:
    def __init__(self, store: Store, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    def now(self) -> dt.datetime:
        return self._clock.now()

    async def consume_join_token(self, token_digest: str) -> str:
        try:
            token = await self._store.consume_join_token(token_digest, self._clock.now())
        except Unauthenticated as exc:
            raise AttestationRefused(exc.reason, exc.message) from None
        return token.spiffe_id.uri


@dataclass(frozen=True, slots=True)
class AttestationOutcome:
    attestor: str
    selectors: frozenset[Selector]
    bound_spiffe_id: SpiffeId | None
    can_reattest: bool


class _BoundedChallenger:
    def __init__(self, inner: Challenger, limits: Limits) -> None:
        self._inner = inner
        self._limits = limits
        self.rounds = 0

    async def challenge(self, payload: bytes) -> bytes:
        self.rounds += 1
        if self.rounds > self._limits.max_attest_rounds:
            raise ResourceExhausted(
                f"attestation exceeded {self._limits.max_attest_rounds} challenge rounds"
            )
        response = await self._inner.challenge(payload)
        if len(response) > self._limits.max_evidence_bytes:
            raise ResourceExhausted("challenge response exceeds the evidence size limit")
        return response


class AttestorHost:
    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        limits: Limits,
        plugins: Mapping[str, type[Attestor]] | None = None,
    ) -> None:
        self._limits = limits
        self._services = _HostServices(store, clock)
        self._plugins = dict(plugins) if plugins is not None else discover_plugins()
        self._instances: dict[str, Attestor] = {}

    @property
    def plugins(self) -> list[str]:
        return sorted(self._plugins)

    def instances(self) -> list[str]:
        return sorted(self._instances)

    def register(self, name: str, plugin: str, config: Mapping[str, Any]) -> None:
        """Build and install an instance; the config is validated by the plugin first."""
        Selector(name, "x:y")  # the instance name is a selector type: same rules
        cls = self._plugins.get(plugin)
        if cls is None:
            raise NotFound(f"no attestor plugin {plugin!r} is installed")
        try:
            instance = cls.configure(config, self._services)
        except ConfigError as exc:
            raise InvalidArgument(f"attestor {name}: {exc}", reason="ATTESTOR_CONFIG") from None
        self._instances[name] = instance

    async def attest(
        self, name: str, evidence: bytes, challenger: Challenger
    ) -> AttestationOutcome:
        if len(evidence) > self._limits.max_evidence_bytes:
            raise ResourceExhausted(
                f"evidence exceeds {self._limits.max_evidence_bytes} bytes",
                reason="EVIDENCE_TOO_LARGE",
            )
        instance = self._instances.get(name)
        if instance is None:
            raise InvalidArgument(f"no attestor named {name!r}", reason="UNKNOWN_ATTESTOR")
        bounded = _BoundedChallenger(challenger, self._limits)
        try:
            async with asyncio.timeout(self._limits.attest_timeout.total_seconds()):
                attested = await instance.attest(evidence, bounded)
        except AttestationRefused as exc:
            raise AttestationFailed(f"{name}: {exc.message}", reason=exc.reason) from None
        except AuthorityError:
            raise
        except TimeoutError:
            raise AttestationFailed(
                f"attestation did not finish within {self._limits.attest_timeout}",
                reason="ATTESTATION_TIMEOUT",
            ) from None
        except Exception:
            log.exception("attestor %s raised", name)
            raise Internal("attestation failed inside the attestor") from None
        return self._namespace(name, attested)

    @staticmethod
    def _namespace(name: str, attested: object) -> AttestationOutcome:
        if not isinstance(attested, Attested):
            log.error("attestor %s returned %s, not Attested", name, type(attested).__name__)
            raise Internal("attestation failed inside the attestor")
        try:
            selectors = frozenset(Selector(name, f"{k}:{v}") for k, v in attested.selectors)
            bound = SpiffeId.parse(attested.bound_spiffe_id) if attested.bound_spiffe_id else None
        except AuthorityError:
            log.error("attestor %s returned invalid selectors or identity", name)
            raise Internal("attestation failed inside the attestor") from None
        return AttestationOutcome(name, selectors, bound, attested.can_reattest)
