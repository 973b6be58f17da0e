"""Prometheus metrics for the authority and the node agent (``--metrics-listen HOST:PORT``).

Each process, and each server or agent inside one (the tests run several), has its own
``CollectorRegistry``; nothing is registered in prometheus_client's global one. Labels come only
from small fixed sets (method, code, kind, effect, backend, key slot, task name): never a SPIFFE
ID, task id, jti or entry id, so the number of series does not grow with workloads. A gRPC method
outside the services' descriptors is counted as ``unknown``.

Where the figures come from:

- RPCs: a ``grpc.aio`` server interceptor (the outermost one) on the Workload and Admin
  servers; the code is the call's final status, the latency the handler's wall time (unary
  responses only: a stream's life is not a latency).
- Credentials issued and revocations: the audit records the store's writer committed (what
  happened, counted once, after the commit), with the commit's wall time per batch.
- Policy decisions: Exchange's and Delegate's ``decide`` timed around the call
  (``perf_counter``); the gateways' tools/list filter is not counted.
- Revocation feed lag: from the revocation's time to the moment the feed hands it to a
  subscriber's stream (once per subscriber).
- Gauges (approvals, keys, subscribers, restarts; the agent's SVIDs and streams): read from the
  live objects at scrape time.

The endpoint is a minimal HTTP/1.1 server on the event loop: ``GET /metrics`` and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Final

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from authority import __version__, notify
from authority.audit import AuditEvent
from authority.config import check_metrics_listen, split_host_port
from authority.models import KeyKind, KeyState, RevocationKind

if TYPE_CHECKING:
    from authority.agent import AgentConfig, NodeAgent
    from authority.ca import CertificateAuthority
    from authority.clock import Clock
    from authority.models import Revocation
    from authority.policy.model import Decision, PolicyEngine, PolicyInput
    from authority.revocation import RevocationHub
    from authority.store import Store
    from authority.supervisor import Supervisor

log = logging.getLogger(__name__)

# No ``*_created`` series: a timestamp per counter and histogram doubles what is scraped and
# says nothing a restart's reset does not (prometheus_client's switch is process-wide).
disable_created_metrics()  # type: ignore[no-untyped-call]

NAMESPACE: Final = "authority"
UNKNOWN: Final = "unknown"
OTHER: Final = "other"
# Latency buckets (seconds): an RPC or a commit from 0.5 ms to 10 s.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# A policy decision is in-process: 10 us to 50 ms.
DECISION_BUCKETS: Final = (0.00001, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.005, 0.01, 0.05)
# The revocation feed's delivery lag: 1 ms to 60 s (a replica catching up, a slow subscriber).
LAG_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0)

# Audit kinds -> credential kinds.
ISSUED_KINDS: Final = {
    "x509.issued": "x509_svid",
    "x509.renewed": "x509_svid",
    "jwt.issued": "jwt_svid",
    "task_token.issued": "task_token",
    "task_token.delegated": "delegated",
}
CREDENTIAL_KINDS: Final = ("x509_svid", "jwt_svid", "task_token", "delegated")
EFFECTS: Final = ("allow", "deny", "require_approval")
REVOCATION_KINDS: Final = tuple(str(k) for k in RevocationKind)
KEY_KINDS: Final = {KeyKind.X509: "x509_ca", KeyKind.JWT: "jwt", KeyKind.TASK: "task"}
KEY_SLOTS: Final = {KeyState.ACTIVE: "active", KeyState.PREPARED: "next", KeyState.OLD: "old"}

# The endpoint's own bounds: a request head, how long a client may take to send it, scrapes
# served at once (more connections wait in the kernel's backlog).
MAX_REQUEST_HEAD: Final = 8192
REQUEST_TIMEOUT: Final = 5.0
MAX_SCRAPES: Final = 4
REFRESH_INTERVAL: Final = 1.0  # seconds between two store queries for scrapes


# --- gRPC ------------------------------------------------------------------------------------


def known_methods() -> frozenset[str]:
    """Every full method name the authority's gRPC servers serve."""
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    from authority._pb import authority_v1_authority_pb2 as pb

    names: set[str] = set()
    services = [
        pb.DESCRIPTOR.services_by_name["Workload"],
        pb.DESCRIPTOR.services_by_name["Admin"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    for service in services:
        for method in service.methods:
            names.add(f"/{service.full_name}/{method.name}")
    return frozenset(names)


def method_labels(full_method: str, known: frozenset[str]) -> tuple[str, str]:
    """(service, method) of a call; ("unknown", "unknown") for a name outside ``known``."""
    if full_method not in known:
        return UNKNOWN, UNKNOWN
    service, _, method = full_method[1:].partition("/")
    return service, method


_CODES_BY_VALUE: Final = {code.value[0]: code.name for code in grpc.StatusCode}


def _code_name(context: Any, failure: BaseException | None) -> str:
    code: object = None
    with contextlib.suppress(Exception):
        code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int) and code in _CODES_BY_VALUE:
        return _CODES_BY_VALUE[code]
    if failure is None:
        return "OK"
    if isinstance(failure, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN"


Handler = Any  # grpc.RpcMethodHandler (a namedtuple in grpcio)


class RpcMetrics(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts each call by (service, method, code) and times the unary ones; the method label
    comes only from ``known`` (anything else is ``unknown``), so callers cannot add series."""

    def __init__(self, handled: Counter, seconds: Histogram, known: frozenset[str]) -> None:
        self._handled = handled
        self._seconds = seconds
        self._known = known
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}
        self._children: dict[tuple[str, str, str], Any] = {}

    def _count(self, labels: tuple[str, str], code: str) -> None:
        key = (*labels, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._handled.labels(*key)
        child.inc()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        labels = method_labels(method, self._known)
        if handler is None:  # grpc answers UNIMPLEMENTED
            self._count(labels, "UNIMPLEMENTED")
            return None
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, labels)
        if labels != (UNKNOWN, UNKNOWN):  # bounded: only known names are cached
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: Handler, labels: tuple[str, str]) -> Handler:
        if handler.request_streaming:
            attr = "stream_stream" if handler.response_streaming else "stream_unary"
        else:
            attr = "unary_stream" if handler.response_streaming else "unary_unary"
        inner = getattr(handler, attr)
        if inner is None or not hasattr(handler, "_replace"):
            return handler
        metrics = self
        if inspect.isasyncgenfunction(inner):
            generator: Callable[..., AsyncIterator[Any]] = inner

            async def streamed(request: Any, context: Any) -> AsyncIterator[Any]:
                failure: BaseException | None = None
                try:
                    async for response in generator(request, context):
                        yield response
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    metrics._count(labels, _code_name(context, failure))

            return handler._replace(**{attr: streamed})
        if inspect.iscoroutinefunction(inner):
            coroutine: Callable[..., Awaitable[Any]] = inner
            timer = self._seconds.labels(*labels)

            async def called(request: Any, context: Any) -> Any:
                started = time.perf_counter()
                failure: BaseException | None = None
                try:
                    return await coroutine(request, context)
                except BaseException as exc:
                    failure = exc
                    raise
                finally:
                    timer.observe(time.perf_counter() - started)
                    metrics._count(labels, _code_name(context, failure))

            return handler._replace(**{attr: called})
        return handler  # a synchronous handler: not ours to wrap


# --- policy ------------------------------------------------------------------------------------


class _TimedEngine:
    """A policy engine whose every ``decide`` is counted by effect and timed."""

    def __init__(self, engine: PolicyEngine, decisions: Counter, seconds: Histogram) -> None:
        self._engine = engine
        self._decisions = {effect: decisions.labels(effect) for effect in EFFECTS}
        self._other = decisions.labels(OTHER)
        self._seconds = seconds

    def decide(self, inp: PolicyInput) -> Decision:
        started = time.perf_counter()
        decision = self._engine.decide(inp)
        self._seconds.observe(time.perf_counter() - started)
        self._decisions.get(str(decision.outcome), self._other).inc()
        return decision

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class TimedPolicy:
    """A ``PolicySource`` whose current engine is timed (see ``_TimedEngine``)."""

    def __init__(self, source: Any, decisions: Counter, seconds: Histogram) -> None:
        self._source = source
        self._decisions_metric = decisions
        self._seconds = seconds
        self._cached: tuple[object, _TimedEngine] | None = None

    @property
    def current(self) -> PolicyEngine:
        engine = self._source.current
        cached = self._cached
        if cached is None or cached[0] is not engine:
            cached = self._cached = (
                engine,
                _TimedEngine(engine, self._decisions_metric, self._seconds),
            )
        return cached[1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


# --- collectors read at scrape time ------------------------------------------------------------


class _Collector:
    """A prometheus_client collector from a function (``describe`` gives no names: nothing
    to clash with in a registry of its own)."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._collect()


def _restarts(supervisor: Supervisor) -> Iterator[Metric]:
    family = CounterMetricFamily(
        f"{NAMESPACE}_supervised_task_restarts",
        "Restarts of each supervised task (task names are a fixed set).",
        labels=["task"],
    )
    for name in supervisor.names:
        family.add_metric([name], supervisor.restarts(name))
    yield family


def _webhooks() -> Iterator[Metric]:
    family = CounterMetricFamily(
        f"{NAMESPACE}_webhook_deliveries",
        "Approval notices to webhooks by outcome (delivered, retried: attempts made again, "
        "gave_up, dropped: the queue was full), counted by the notifier (authority.notify).",
        labels=["outcome"],
    )
    for outcome, count in sorted(notify.stats().items()):
        family.add_metric([outcome], count)
    yield family


# --- the endpoint ------------------------------------------------------------------------------


Refresh = Callable[[], Awaitable[None]]


class MetricsEndpoint:
    """``GET /metrics`` on HOST:PORT, on the running event loop; ``refresh`` runs before each
    scrape (figures that need the store)."""

    def __init__(self, registry: CollectorRegistry, refresh: Refresh | None = None) -> None:
        self.registry = registry
        self._refresh = refresh
        self._server: asyncio.Server | None = None
        self._scrapes = asyncio.Semaphore(MAX_SCRAPES)
        self.port = 0

    async def start(self, address: str) -> None:
        host, port = split_host_port(address)
        self._server = await asyncio.start_server(self._handle, host or None, port)
        sockets = self._server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("metrics serving: http://%s:%d/metrics", host or "0.0.0.0", self.port)  # noqa: S104

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def render(self) -> bytes:
        if self._refresh is not None:
            try:
                await self._refresh()
            except Exception as exc:  # the rest is still worth serving
                log.warning("metrics refresh failed: %s", type(exc).__name__)
        return generate_latest(self.registry)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with self._scrapes:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
                except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError):
                    return
                if len(head) > MAX_REQUEST_HEAD:
                    return
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = request_line.split(" ")
                if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
                    await _respond(writer, 405, b"only GET /metrics\n", "text/plain")
                    return
                path = parts[1].split("?", 1)[0]
                if path != "/metrics":
                    await _respond(writer, 404, b"see /metrics\n", "text/plain")
                    return
                body = await self.render()
                await _respond(writer, 200, body, CONTENT_TYPE_LATEST, head_only=parts[0] == "HEAD")
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


_REASONS: Final = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: str,
    *,
    head_only: bool = False,
) -> None:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    writer.write(head if head_only else head + body)
    await writer.drain()


# --- the authority -----------------------------------------------------------------------------


class ServerMetrics:
    """The authority's series, in a registry of its own. Built before the gRPC servers (their
    interceptor), ``bind`` hands it the parts to read, ``start`` serves the endpoint."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.registry = registry = CollectorRegistry()
        ns = NAMESPACE
        self.rpc_handled = Counter(
            "grpc_server_handled",
            "gRPC calls completed on the Workload and Admin servers, by final status code.",
            ["service", "method", "code"],
            namespace=ns,
            registry=registry,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Wall time of unary-response gRPC calls in the handler.",
            ["service", "method"],
            namespace=ns,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.issued = Counter(
            "credentials_issued",
            "Credentials issued (committed to the audit chain), by kind.",
            ["kind"],
            namespace=ns,
            registry=registry,
        )
        self.decisions = Counter(
            "policy_decisions",
            "Policy decisions, by effect.",
            ["effect"],
            namespace=ns,
            registry=registry,
        )
        self.decision_seconds = Histogram(
            "policy_decision_seconds",
            "Time the policy engine took to decide.",
            namespace=ns,
            registry=registry,
            buckets=DECISION_BUCKETS,
        )
        self.approvals_pending = Gauge(
            "approvals_pending",
            "Approvals waiting for an operator's answer.",
            namespace=ns,
            registry=registry,
        )
        self.approvals_oldest = Gauge(
            "approvals_oldest_pending_age_seconds",
            "Age of the oldest pending approval (0 when none).",
            namespace=ns,
            registry=registry,
        )
        self.revocations = Counter(
            "revocations",
            "Revocations committed (cascades included), by kind.",
            ["kind"],
            namespace=ns,
            registry=registry,
        )
        self.revocation_lag = Histogram(
            "revocation_feed_lag_seconds",
            "From a revocation's time to its send to a subscriber of the revocation feed.",
            namespace=ns,
            registry=registry,
            buckets=LAG_BUCKETS,
        )
        self.commit_seconds = Histogram(
            "store_commit_seconds",
            "Wall time of the store writer's commit of one batch.",
            ["backend"],
            namespace=ns,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.info = Gauge(
            "build_info", "The authority's version.", ["version"], namespace=ns, registry=registry
        )
        self.info.labels(__version__).set(1)
        for kind in CREDENTIAL_KINDS:
            self.issued.labels(kind)
        for effect in EFFECTS:
            self.decisions.labels(effect)
        for rkind in REVOCATION_KINDS:
            self.revocations.labels(rkind)
        self._issued = {audit: self.issued.labels(kind) for audit, kind in ISSUED_KINDS.items()}
        self._revoked = {kind: self.revocations.labels(kind) for kind in REVOCATION_KINDS}
        self.interceptor = RpcMetrics(self.rpc_handled, self.rpc_seconds, known_methods())
        self._store: Store | None = None
        self._refreshed = -REFRESH_INTERVAL  # time.monotonic() of the last store query
        self.endpoint = MetricsEndpoint(registry, self._refresh)

    # -- wiring --

    def policy(self, source: Any) -> Any:
        """``source`` (a PolicySource) with its decisions counted and timed."""
        return TimedPolicy(source, self.decisions, self.decision_seconds)

    def bind(
        self,
        *,
        store: Store,
        backend: str,
        ca: CertificateAuthority,
        hub: RevocationHub,
        supervisor: Supervisor,
    ) -> None:
        self._store = store
        commit_timer = self.commit_seconds.labels(backend)

        def committed(seconds: float, events: Sequence[AuditEvent]) -> None:
            commit_timer.observe(seconds)
            self.count_events(events)

        observe = getattr(store, "observe_commits", None)
        if observe is not None:
            observe(committed)
        clock = self.clock
        self.registry.register(_Collector(lambda: _keys(ca, clock)))
        self.registry.register(_Collector(lambda: _subscribers(hub)))
        self.registry.register(_Collector(lambda: _restarts(supervisor)))
        self.registry.register(_Collector(_webhooks))

    def count_events(self, events: Iterable[AuditEvent]) -> None:
        """Issuance and revocations from committed audit records (the writer's thread)."""
        for event in events:
            issued = self._issued.get(event.kind)
            if issued is not None:
                issued.inc()
            elif event.kind == "revocation.created":
                child = self._revoked.get(str(event.details.get("kind", "")))
                if child is None:
                    child = self._other_revocation()
                child.inc()

    def _other_revocation(self) -> Any:
        child = self.revocations.labels(OTHER)
        self._revoked[OTHER] = child
        return child

    def revocation_sent(self, revocation: Revocation) -> None:
        lag = (self.clock.now() - revocation.revoked_at).total_seconds()
        self.revocation_lag.observe(max(0.0, lag))

    async def _refresh(self) -> None:
        """The store's figures, at most once a second (scrapes in a burst share them)."""
        store = self._store
        if store is None or time.monotonic() - self._refreshed < REFRESH_INTERVAL:
            return
        self._refreshed = time.monotonic()
        now = self.clock.now()
        pending, oldest = await store.pending_approvals(now)
        self.approvals_pending.set(pending)
        self.approvals_oldest.set(0.0 if oldest is None else (now - oldest).total_seconds())

    async def start(self, address: str) -> None:
        await self.endpoint.start(address)

    async def stop(self) -> None:
        await self.endpoint.stop()


def _keys(ca: CertificateAuthority, clock: Clock) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        f"{NAMESPACE}_signing_key_expiry_seconds",
        "Seconds until the soonest-expiring signing key of each kind and slot expires "
        "(slot: active, next = prepared, old).",
        labels=["key_kind", "slot"],
    )
    now = clock.now()
    soonest: dict[tuple[str, str], dt.datetime] = {}
    for info in ca.authorities():
        key = (KEY_KINDS.get(info.kind, OTHER), KEY_SLOTS.get(info.state, OTHER))
        if key not in soonest or info.not_after < soonest[key]:
            soonest[key] = info.not_after
    for (kind, slot), not_after in sorted(soonest.items()):
        family.add_metric([kind, slot], (not_after - now).total_seconds())
    yield family


def _subscribers(hub: RevocationHub) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        f"{NAMESPACE}_revocation_subscribers",
        "Open subscriptions to the revocation feed.",
        value=hub.subscribers,
    )


# --- the node agent ----------------------------------------------------------------------------


class AgentMetrics:
    """The node agent's series, read from the agent at scrape time."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self._collect))
        self.registry.register(_Collector(lambda: _restarts(agent.supervisor)))
        self.endpoint = MetricsEndpoint(self.registry)

    def _collect(self) -> Iterator[Metric]:
        agent = self.agent
        now = dt.datetime.now(dt.UTC)
        ns = f"{NAMESPACE}_agent"
        yield GaugeMetricFamily(
            f"{ns}_svid_expiry_seconds",
            "Seconds until the agent's own X.509-SVID expires.",
            value=(agent.own_not_after - now).total_seconds(),
        )
        held = agent.held
        yield GaugeMetricFamily(
            f"{ns}_svids_held", "Workload X.509-SVIDs the agent holds.", value=len(held)
        )
        soonest = min((h.not_after for h in held.values()), default=None)
        if soonest is not None:
            yield GaugeMetricFamily(
                f"{ns}_soonest_svid_expiry_seconds",
                "Seconds until the soonest-expiring held workload SVID expires.",
                value=(soonest - now).total_seconds(),
            )
        yield GaugeMetricFamily(
            f"{ns}_workload_api_streams",
            "Workload API streams open (X.509-SVID and bundle watches).",
            value=agent.workload_streams,
        )
        yield GaugeMetricFamily(
            f"{ns}_sync_connected",
            "1 while the agent follows the authority's sync stream, else 0.",
            value=1.0 if agent.sync_connected else 0.0,
        )
        staleness = agent.feed_staleness
        if staleness is not None:
            yield GaugeMetricFamily(
                f"{ns}_revocation_feed_staleness_seconds",
                "Seconds since the revocation feed was last heard.",
                value=staleness,
            )

    async def start(self, address: str) -> None:
        await self.endpoint.start(address)

    async def stop(self) -> None:
        await self.endpoint.stop()


async def run_agent_with_metrics(
    config: AgentConfig, stop: asyncio.Event, metrics_listen: str
) -> None:
    """``authority agent --metrics-listen``: the node agent, and its metrics endpoint once it
    serves."""
    from authority.agent import NodeAgent

    agent = NodeAgent(config)
    await agent.start()
    metrics = AgentMetrics(agent)
    try:
        await metrics.start(metrics_listen)
        await stop.wait()
    finally:
        await metrics.stop()
        await agent.stop()


__all__ = [
    "AgentMetrics",
    "MetricsEndpoint",
    "RpcMetrics",
    "ServerMetrics",
    "TimedPolicy",
    "check_metrics_listen",
    "known_methods",
    "method_labels",
    "run_agent_with_metrics",
]
