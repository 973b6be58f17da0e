"""authority/prom.py: labels come only from fixed sets, whatever callers send or do."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from authority import notify, prom
from authority.audit import AuditEvent
from authority.clock import FakeClock
from authority.config import Config, check_metrics_listen
from authority.errors import InvalidArgument
from authority.policy.model import Decision, Outcome
from authority.prom import (
    MetricsEndpoint,
    RpcMetrics,
    ServerMetrics,
    known_methods,
    method_labels,
)
from authority.prom_cli import summarize

NOW = dt.datetime(2026, 12, 7, tzinfo=dt.UTC)


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


class _Context:
    """A servicer context that was given no code (the call ended as its handler did)."""

    def code(self) -> None:
        return None


def _series(registry: CollectorRegistry, name: str) -> set[frozenset[tuple[str, str]]]:
    return {
        frozenset(sample.labels.items())
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == name
    }


def _interceptor() -> tuple[CollectorRegistry, RpcMetrics]:
    registry = CollectorRegistry()
    handled = Counter("h", "h", ["service", "method", "code"], registry=registry)
    seconds = Histogram("s", "s", ["service", "method"], registry=registry)
    return registry, RpcMetrics(handled, seconds, known_methods())


async def _answer(request: bytes, context: Any) -> bytes:
    return request


def _continuation(
    handler: grpc.RpcMethodHandler | None,  # type: ignore[type-arg]
) -> Callable[[grpc.HandlerCallDetails], Awaitable[Any]]:
    async def continuation(details: grpc.HandlerCallDetails) -> Any:
        return handler

    return continuation


def test_a_known_method_is_its_own_labels() -> None:
    known = known_methods()
    assert method_labels("/authority.v1.Workload/Exchange", known) == (
        "authority.v1.Workload",
        "Exchange",
    )
    assert method_labels("/authority.v1.Admin/Revoke", known) == ("authority.v1.Admin", "Revoke")
    assert method_labels("/grpc.health.v1.Health/Check", known) == (
        "grpc.health.v1.Health",
        "Check",
    )


@pytest.mark.parametrize(
    "method",
    ["/authority.v1.Workload/Nope", "/x/y", "spiffe://example.org/w/1", "", "/authority.v1.Admin/"],
)
def test_an_unknown_method_is_unknown(method: str) -> None:
    assert method_labels(method, known_methods()) == ("unknown", "unknown")


async def test_unknown_method_names_do_not_create_series() -> None:
    """A thousand made-up names, served (a generic handler answers any name) or not: one
    ``unknown`` series per code, and nothing cached per name."""
    registry, interceptor = _interceptor()
    handler = grpc.unary_unary_rpc_method_handler(_answer)
    for n in range(1000):
        details = _Details(f"/evil.Service/Method{n}")
        wrapped = await interceptor.intercept_service(_continuation(handler), details)  # type: ignore[arg-type]
        assert await wrapped.unary_unary(b"x", _Context()) == b"x"
        assert await interceptor.intercept_service(_continuation(None), details) is None  # type: ignore[arg-type]
    assert _series(registry, "h_total") == {
        frozenset({("service", "unknown"), ("method", "unknown"), ("code", "OK")}),
        frozenset({("service", "unknown"), ("method", "unknown"), ("code", "UNIMPLEMENTED")}),
    }
    assert _series(registry, "s_count") == {
        frozenset({("service", "unknown"), ("method", "unknown")})
    }
    assert not interceptor._wrapped


async def test_a_failed_call_is_counted_by_its_code() -> None:
    registry, interceptor = _interceptor()

    async def refuse(request: bytes, context: Any) -> bytes:
        raise RuntimeError("boom")

    handler = grpc.unary_unary_rpc_method_handler(refuse)
    wrapped = await interceptor.intercept_service(
        _continuation(handler),
        _Details("/authority.v1.Workload/Exchange"),  # type: ignore[arg-type]
    )
    with pytest.raises(RuntimeError):
        await wrapped.unary_unary(b"x", _Context())
    assert _series(registry, "h_total") == {
        frozenset(
            {("service", "authority.v1.Workload"), ("method", "Exchange"), ("code", "UNKNOWN")}
        )
    }


async def test_a_response_stream_is_counted_not_timed() -> None:
    registry, interceptor = _interceptor()

    async def stream(request: bytes, context: Any) -> Any:
        yield request
        yield request

    handler = grpc.unary_stream_rpc_method_handler(stream)
    wrapped = await interceptor.intercept_service(
        _continuation(handler),
        _Details("/authority.v1.Workload/WatchRevocations"),  # type: ignore[arg-type]
    )
    assert [m async for m in wrapped.unary_stream(b"x", _Context())] == [b"x", b"x"]
    assert len(_series(registry, "h_total")) == 1
    assert _series(registry, "s_count") == set()


def _event(audit_kind: str, **details: object) -> AuditEvent:
    return AuditEvent(audit_kind, NOW, subject="spiffe://example.org/w/1", details=details)


def test_audit_records_count_by_kind_only() -> None:
    metrics = ServerMetrics(FakeClock(NOW))
    metrics.count_events(
        [
            _event("attest.succeeded"),
            _event("x509.issued", entry_id="e1"),
            _event("x509.renewed"),
            _event("jwt.issued"),
            _event("task_token.issued"),
            _event("task_token.delegated"),
            _event("revocation.created", kind="jti"),
            _event("revocation.created", kind="subject"),
            _event("revocation.created", kind="made-up"),
            _event("revocation.created", kind="spiffe://example.org/w/2"),
        ]
    )
    registry = metrics.registry
    value = registry.get_sample_value
    assert value("authority_credentials_issued_total", {"kind": "x509_svid"}) == 2
    assert value("authority_credentials_issued_total", {"kind": "jwt_svid"}) == 1
    assert value("authority_credentials_issued_total", {"kind": "task_token"}) == 1
    assert value("authority_credentials_issued_total", {"kind": "delegated"}) == 1
    assert value("authority_revocations_total", {"kind": "jti"}) == 1
    assert value("authority_revocations_total", {"kind": "other"}) == 2
    kinds = {dict(s)["kind"] for s in _series(registry, "authority_revocations_total")}
    assert kinds == {"jti", "task", "subject", "entry", "attestor", "key", "other"}


class _Engine:
    policy_id = "p"

    def __init__(self) -> None:
        self.outcome = Outcome.ALLOW

    def decide(self, inp: object) -> Decision:
        scopes = ("read:x",) if self.outcome is Outcome.ALLOW else ()
        reasons = ("forbidden",) if self.outcome is Outcome.DENY else ()
        return Decision(self.outcome, scopes, None, 0, reasons, "p", "1", "d", "cedar")


class _Source:
    def __init__(self) -> None:
        self.current = _Engine()


def test_decisions_are_counted_by_effect_and_timed() -> None:
    metrics = ServerMetrics(FakeClock(NOW))
    source = _Source()
    timed = metrics.policy(source)
    for outcome in (Outcome.ALLOW, Outcome.DENY, Outcome.DENY, Outcome.REQUIRE_APPROVAL):
        source.current.outcome = outcome
        assert timed.current.decide(None).outcome is outcome
    assert timed.current.policy_id == "p"  # everything else is the engine's
    value = metrics.registry.get_sample_value
    assert value("authority_policy_decisions_total", {"effect": "allow"}) == 1
    assert value("authority_policy_decisions_total", {"effect": "deny"}) == 2
    assert value("authority_policy_decisions_total", {"effect": "require_approval"}) == 1
    assert value("authority_policy_decision_seconds_count") == 4


def test_two_servers_in_one_process_have_registries_of_their_own() -> None:
    one, two = ServerMetrics(FakeClock(NOW)), ServerMetrics(FakeClock(NOW))
    one.count_events([_event("jwt.issued")])
    assert (
        one.registry.get_sample_value("authority_credentials_issued_total", {"kind": "jwt_svid"})
        == 1
    )
    assert (
        two.registry.get_sample_value("authority_credentials_issued_total", {"kind": "jwt_svid"})
        == 0
    )


@pytest.mark.parametrize(
    "address", ["127.0.0.1:9464", "[::1]:9464", "localhost:9464", "127.0.0.2:1"]
)
def test_loopback_metrics_addresses_are_taken(address: str) -> None:
    check_metrics_listen(address, allow_remote=False)
    assert Config(metrics_listen=address).metrics_listen == address


@pytest.mark.parametrize(
    "address", ["0.0.0.0:9464", ":9464", "10.0.0.1:9464", "metrics.example:80"]
)
def test_other_metrics_addresses_need_allow_remote(address: str) -> None:
    with pytest.raises(InvalidArgument, match="not a loopback address"):
        Config(metrics_listen=address)
    assert Config(metrics_listen=address, metrics_allow_remote=True).metrics_allow_remote


async def _get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    reply = await reader.read()
    writer.close()
    await writer.wait_closed()
    return reply


async def test_the_endpoint_serves_metrics_and_nothing_else() -> None:
    metrics = ServerMetrics(FakeClock(NOW))
    endpoint = MetricsEndpoint(metrics.registry)
    await endpoint.start("127.0.0.1:0")
    try:
        ok = await _get(endpoint.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"authority_build_info" in ok
        missing = await _get(endpoint.port, b"GET /admin HTTP/1.1\r\n\r\n")
        assert missing.startswith(b"HTTP/1.1 404 ")
        posted = await _get(endpoint.port, b"POST /metrics HTTP/1.1\r\n\r\n")
        assert posted.startswith(b"HTTP/1.1 405 ")
    finally:
        await endpoint.stop()


def test_the_metrics_command_summarises_each_family() -> None:
    text = """# TYPE authority_credentials_issued_total counter
authority_credentials_issued_total{kind="x509_svid"} 7.0
authority_credentials_issued_total{kind="jwt_svid"} 2.0
# TYPE authority_approvals_pending gauge
authority_approvals_pending 3.0
# TYPE authority_store_commit_seconds histogram
authority_store_commit_seconds_bucket{backend="sqlite",le="0.001"} 9.0
authority_store_commit_seconds_bucket{backend="sqlite",le="0.01"} 10.0
authority_store_commit_seconds_bucket{backend="sqlite",le="+Inf"} 10.0
authority_store_commit_seconds_count{backend="sqlite"} 10.0
authority_store_commit_seconds_sum{backend="sqlite"} 0.005
"""
    assert summarize(text) == [
        "authority_credentials_issued (counter): 9 in all",
        "  kind=x509_svid: 7",
        "  kind=jwt_svid: 2",
        "authority_approvals_pending (gauge): 3",
        "authority_store_commit_seconds (histogram): 10 observations",
        "  backend=sqlite: n=10 mean=0.50ms p50<=1.00ms p99<=10.00ms",
    ]


def test_webhook_outcomes_are_counted_by_outcome(monkeypatch: pytest.MonkeyPatch) -> None:
    counts = {"delivered": 3, "retried": 2, "gave_up": 1, "dropped": 0}
    monkeypatch.setattr(notify, "STATS", dict(counts))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(prom._Collector(prom._webhooks))
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    family = families["authority_webhook_deliveries"]
    got = {s.labels["outcome"]: s.value for s in family.samples if s.name.endswith("_total")}
    assert got == counts
