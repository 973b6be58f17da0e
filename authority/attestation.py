"""The attestor host: plugin discovery, the instances operators register, the challenge loop and
its bounds, selector namespacing, and the wrapping of plugin failures.

Plugins see only ``attestors.api``. Selectors a plugin returns are prefixed with its instance
name, so no plugin can mint another's. A plugin may report an identity bound to the credential
(``bound_spiffe_id``) only if the host itself bound it during that attestation (a join token the
host consumed): a plugin cannot name an identity of its own accord.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from attestors.api import (
    ENTRY_POINT_GROUP,
    AttestationRefused,
    AttestContext,
    Attested,
    Attestor,
    ConfigError,
    PeerCredentials,
    declared_selector_kinds,
)
from authority.audit import AuditEvent
from authority.clock import Clock
from authority.config import Limits, format_duration
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
from authority.models import AttestorInstance, Selector, canonical_config, parse_json
from authority.store import Store

log = logging.getLogger(__name__)

# SPIFFE IDs bound by host services during the attestation running in this task.
_bound_by_host: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar(
    "bound_by_host", default=None
)


def discover_plugins() -> dict[str, type[Attestor]]:
    """Every attestor plugin installed, built-ins included, by entry-point name."""
    importlib.invalidate_caches()
    found: dict[str, type[Attestor]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found[ep.name] = ep.load()
        except Exception:
            log.exception("attestor plugin %s failed to load", ep.name)
    return found


class _InstanceServices:
    """HostServices for one instance: its claims are namespaced by the instance name."""

    def __init__(self, store: Store, clock: Clock, name: str) -> None:
        self._store = store
        self._clock = clock
        self._name = name

    def now(self) -> dt.datetime:
        return self._clock.now()

    async def consume_join_token(self, token_digest: str) -> str:
        now = self._clock.now()
        event = AuditEvent(
            "join_token.consumed",
            now,
            actor=self._name,
            details={"token_id": token_digest},
        )
        try:
            token = await self._store.consume_join_token(token_digest, now, audit=[event])
        except Unauthenticated as exc:
            raise AttestationRefused(exc.reason, exc.message) from None
        bound = _bound_by_host.get()
        if bound is not None:
            bound.add(token.spiffe_id.uri)
        return token.spiffe_id.uri

    async def claim_once(self, key: str, expires_at: dt.datetime) -> bool:
        if expires_at.tzinfo is None:
            raise ValueError("expires_at must be timezone-aware")
        return await self._store.claim_once(
            f"attestor:{self._name}", key, expires_at, self._clock.now()
        )


@dataclass(frozen=True, slots=True)
class AttestationOutcome:
    attestor: str
    selectors: frozenset[Selector]
    bound_spiffe_id: SpiffeId | None
    can_reattest: bool


class _BoundedContext:
    """The context a plugin sees: rounds and response sizes bounded by the host."""

    def __init__(self, inner: AttestContext, limits: Limits) -> None:
        self._inner = inner
        self._limits = limits
        self.rounds = 0

    @property
    def peer(self) -> PeerCredentials | None:
        return self._inner.peer

    async def challenge(self, payload: bytes) -> bytes:
        self.rounds += 1
        if self.rounds > self._limits.max_attest_rounds:
            raise ResourceExhausted(
                f"attestation exceeded {self._limits.max_attest_rounds} challenge rounds",
                reason="TOO_MANY_ROUNDS",
            )
        response = await self._inner.challenge(payload)
        if len(response) > self._limits.max_evidence_bytes:
            raise ResourceExhausted(
                "challenge response exceeds the evidence size limit", reason="EVIDENCE_TOO_LARGE"
            )
        return response


@dataclass(frozen=True, slots=True)
class _Running:
    record: AttestorInstance
    plugin: Attestor


def parse_config(config_json: str, limits: Limits) -> dict[str, Any]:
    """An attestor's configuration from a request: a JSON object, bounded in size and depth."""
    if not config_json.strip():
        return {}
    value = parse_json(
        config_json,
        max_bytes=limits.max_json_bytes,
        max_depth=limits.max_json_depth,
        what="the configuration",
    )
    if not isinstance(value, dict):
        raise InvalidArgument("the configuration must be a JSON object")
    return value


class AttestorHost:
    def __init__(
        self,
        *,
        store: Store,
        clock: Clock,
        limits: Limits,
        plugins: Mapping[str, type[Attestor]] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._limits = limits
        self._fixed_plugins = plugins is not None
        self._plugins = dict(plugins) if plugins is not None else discover_plugins()
        self._running: dict[str, _Running] = {}

    async def load(self) -> None:
        """Build every stored instance. One that no longer builds (plugin gone, config now
        invalid) is logged and left out, so it refuses attestations rather than the server
        refusing to start."""
        for record in await self._store.list_attestors():
            try:
                self._running[record.name] = _Running(record, self._build(record))
            except AuthorityError as exc:
                log.error("attestor %s is unavailable: %s", record.name, exc)

    def plugins(self) -> list[str]:
        return sorted(self._plugins)

    def instances(self) -> list[AttestorInstance]:
        return [self._running[name].record for name in sorted(self._running)]

    def get(self, name: str) -> AttestorInstance:
        running = self._running.get(name)
        if running is None:
            raise NotFound(f"no attestor named {name[:64]!r}", reason="ATTESTOR_NOT_FOUND")
        return running.record

    def is_registered(self, name: str) -> bool:
        return name in self._running

    def selector_kinds(self, name: str) -> frozenset[str] | None:
        """The selector keys the running instance ``name`` can produce; None when its plugin
        declares none (any key). NotFound (ATTESTOR_NOT_FOUND) when it is not running."""
        self.get(name)
        return declared_selector_kinds(self._running[name].plugin)

    def _plugin_class(self, plugin: str) -> type[Attestor]:
        cls = self._plugins.get(plugin)
        if cls is None and not self._fixed_plugins:
            # A plugin installed since the server started is found without a restart.
            self._plugins = discover_plugins()
            cls = self._plugins.get(plugin)
        if cls is None:
            raise NotFound(
                f"no attestor plugin {plugin[:64]!r} is installed "
                f"(have: {', '.join(self.plugins())})",
                reason="PLUGIN_NOT_FOUND",
            )
        return cls

    def _build(self, record: AttestorInstance) -> Attestor:
        cls = self._plugin_class(record.plugin)
        services = _InstanceServices(self._store, self._clock, record.name)
        try:
            return cls.configure(record.config, services)
        except ConfigError as exc:
            raise InvalidArgument(
                f"attestor {record.name}: {exc}", reason="ATTESTOR_CONFIG"
            ) from None
        except Exception:
            log.exception("attestor plugin %s raised while configuring", record.plugin)
            raise InvalidArgument(
                f"attestor {record.name}: the plugin rejected its configuration",
                reason="ATTESTOR_CONFIG",
            ) from None

    async def register(self, name: str, plugin: str, config: Mapping[str, Any]) -> AttestorInstance:
        """Validate (the plugin builds an instance from the config), persist, then serve."""
        now = self._clock.now()
        record = AttestorInstance(name, plugin, canonical_config(dict(config)), now, now)
        built = self._build(record)
        await self._store.create_attestor(
            record, audit=[self._event("attestor.registered", record)]
        )
        self._running[name] = _Running(record, built)
        log.info("attestor registered: name=%s plugin=%s", name, plugin)
        return record

    async def update(self, name: str, config: Mapping[str, Any]) -> AttestorInstance:
        current = self.get(name)
        record = AttestorInstance(
            name,
            current.plugin,
            canonical_config(dict(config)),
            current.created_at,
            self._clock.now(),
        )
        built = self._build(record)
        await self._store.update_attestor(record, audit=[self._event("attestor.updated", record)])
        self._running[name] = _Running(record, built)
        log.info("attestor updated: name=%s plugin=%s", name, current.plugin)
        return record

    async def unregister(self, name: str) -> None:
        record = self.get(name)
        await self._store.delete_attestor(
            name, audit=[self._event("attestor.unregistered", record)]
        )
        self._running.pop(name, None)
        log.info("attestor unregistered: name=%s", name)

    def _event(self, kind: str, record: AttestorInstance) -> AuditEvent:
        return AuditEvent(
            kind,
            self._clock.now(),
            actor="operator",
            subject=record.name,
            details={"plugin": record.plugin, "config": record.config},
        )

    async def attest(self, name: str, evidence: bytes, ctx: AttestContext) -> AttestationOutcome:
        if len(evidence) > self._limits.max_evidence_bytes:
            raise ResourceExhausted(
                f"evidence exceeds {self._limits.max_evidence_bytes} bytes",
                reason="EVIDENCE_TOO_LARGE",
            )
        running = self._running.get(name)
        if running is None:
            raise InvalidArgument(f"no attestor named {name[:64]!r}", reason="UNKNOWN_ATTESTOR")
        bounded = _BoundedContext(ctx, self._limits)
        bound: set[str] = set()
        token = _bound_by_host.set(bound)
        try:
            async with asyncio.timeout(self._limits.attest_timeout.total_seconds()):
                attested = await running.plugin.attest(evidence, bounded)
        except AttestationRefused as exc:
            raise AttestationFailed(f"{name}: {exc.message}", reason=exc.reason) from None
        except AuthorityError:
            raise
        except TimeoutError:
            raise AttestationFailed(
                f"attestation did not finish within {format_duration(self._limits.attest_timeout)}",
                reason="ATTESTATION_TIMEOUT",
            ) from None
        except Exception:
            log.exception("attestor %s raised", name)
            raise Internal("attestation failed inside the attestor") from None
        finally:
            _bound_by_host.reset(token)
        return self._namespace(name, attested, bound)

    @staticmethod
    def _namespace(name: str, attested: object, bound_by_host: set[str]) -> AttestationOutcome:
        if not isinstance(attested, Attested):
            log.error("attestor %s returned %s, not Attested", name, type(attested).__name__)
            raise Internal("attestation failed inside the attestor")
        try:
            selectors = frozenset(Selector(name, f"{k}:{v}") for k, v in attested.selectors)
            bound = SpiffeId.parse(attested.bound_spiffe_id) if attested.bound_spiffe_id else None
        except AuthorityError:
            log.error("attestor %s returned invalid selectors or identity", name)
            raise Internal("attestation failed inside the attestor") from None
        if bound is not None and bound.uri not in bound_by_host:
            log.error("attestor %s named an identity the host did not bind: refused", name)
            raise Internal("attestation failed inside the attestor")
        return AttestationOutcome(name, selectors, bound, attested.can_reattest)
