"""authority.notify without a network: the bodies, the signature, the retry schedule, Retry-After,
the queue bound, and the webhook URL rules (authority.config)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from authority import notify
from authority.backoff import Backoff
from authority.clock import FakeClock
from authority.config import Config, WebhookConfig, check_webhook_url
from authority.errors import InvalidArgument
from authority.models import Approval
from authority.notify import Answer, DeliveryError, Notifier, Webhook
from authority.policy import Decision, Outcome
from authority.tokens import Intent

START = dt.datetime(2026, 12, 7, 10, 0, tzinfo=dt.UTC)
SECRET = b"whsec-test"
PURPOSE = "ship fix 42 <!channel> <https://evil.example|click> & more"


def approval(approval_id: str = "apr-1", wait: dt.timedelta = dt.timedelta(minutes=15)) -> Approval:
    return Approval(
        id=approval_id,
        principal="spiffe://example.org/agent/reporter",
        task_id="t1",
        audience="deployer",
        intent_json="{}",
        intent_fingerprint="f" * 64,
        decision_id="dec-1",
        requested_at=START,
        expires_at=START + wait,
    )


INTENT = Intent(
    "deploy",
    "deploy/production",
    PURPOSE,
    environment="production",
    parameters={"mcp.arguments_sha256": "cd" * 32, "ticket": "SECRET-VALUE"},
)
DECISION = Decision(
    outcome=Outcome.REQUIRE_APPROVAL,
    scopes=(),
    ttl_cap=None,
    max_delegation_depth=0,
    reasons=("agents-deploy-production",),
    policy_id="agents",
    policy_version="v1",
    decision_id="dec-1",
    backend="cedar",
)


class Scripted:
    """A Transport answering from a script: an int is a status, a (status, retry-after) pair
    one with that header, None a network error; it records what it was sent."""

    def __init__(self, *script: int | tuple[int, str] | None) -> None:
        self.script = list(script)
        self.sent: list[tuple[str, dict[str, str], bytes]] = []

    async def post(
        self, url: str, headers: Sequence[tuple[str, str]], body: bytes, time_limit: float
    ) -> Answer:
        self.sent.append((url, dict(headers), body))
        step = self.script.pop(0)
        if step is None:
            raise DeliveryError("ConnectError")
        if isinstance(step, tuple):
            return Answer(step[0], step[1])
        return Answer(step)

    async def aclose(self) -> None:
        pass


class Sleeps:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(dt.timedelta(seconds=seconds))


def notifier(
    transport: Scripted,
    *,
    max_attempts: int = 5,
    fmt: str = "json",
    secret: bytes | None = SECRET,
    queue_size: int = 10,
    clock: FakeClock | None = None,
) -> tuple[Notifier, Sleeps]:
    clock = clock or FakeClock(START)
    sleeps = Sleeps(clock)
    hook = Webhook(
        WebhookConfig(
            url="https://hooks.example.com/services/T0/B0/secretpath?key=q",
            format=fmt,
            max_attempts=max_attempts,
        ),
        secret,
    )
    return (
        Notifier(
            [hook],
            console_url="https://console.example.com/",
            clock=clock,
            queue_size=queue_size,
            transport=transport,
            sleep=sleeps,
            rng=random.Random(7),
        ),
        sleeps,
    )


async def run_one(n: Notifier, a: Approval | None = None) -> str:
    n.approval_requested(a or approval(), INTENT, DECISION)
    return await n.deliver(n._queue.get_nowait())


# --- bodies -------------------------------------------------------------------------------------


def test_the_json_body_says_what_is_asked_and_nothing_more() -> None:
    notice = notify.ApprovalNotice.of(approval(), INTENT, DECISION, "https://console.example.com/")
    body = notify.json_body(notice)
    assert body["type"] == "approval.requested"
    got = body["approval"]
    assert got["id"] == "apr-1"
    assert got["url"] == "https://console.example.com/approvals/apr-1"
    assert got["agent"] == "spiffe://example.org/agent/reporter"
    assert (got["action"], got["resource"], got["audience"]) == (
        "deploy",
        "deploy/production",
        "deployer",
    )
    assert got["rules"] == ["agents-deploy-production"]
    assert got["expires_at"] == "2026-12-07T10:15:00Z"
    text = json.dumps(body)
    assert "SECRET-VALUE" not in text
    assert "cd" * 32 not in text
    assert "parameters" not in got


def test_a_long_purpose_is_cut() -> None:
    intent = Intent("deploy", "deploy/production", "x" * 500)
    notice = notify.ApprovalNotice.of(approval(), intent, DECISION, "")
    assert len(notice.purpose) == notify.PURPOSE_CHARS
    assert notice.purpose.endswith("\u2026")
    assert notify.json_body(notice)["approval"]["url"] is None


def test_the_slack_body_escapes_what_the_agent_chose() -> None:
    notice = notify.ApprovalNotice.of(approval(), INTENT, DECISION, "https://console.example.com")
    body = notify.slack_body(notice)
    assert set(body) == {"text", "blocks"}
    assert "https://console.example.com/approvals/apr-1" in body["text"]
    text = json.dumps(body)
    assert "<!channel>" not in text
    assert "<https://evil" not in text
    assert "&lt;!channel&gt;" in text
    assert "&amp; more" in text
    (button,) = body["blocks"][-1]["elements"]
    assert button["url"] == "https://console.example.com/approvals/apr-1"


# --- the signature ------------------------------------------------------------------------------


def test_the_signature_verifies_only_for_its_body_secret_and_time() -> None:
    body = b'{"a":1}'
    header = notify.sign(SECRET, body, 1_800_000_000)
    assert header.startswith("t=1800000000,v1=")
    assert notify.verify_signature(SECRET, header, body, now=1_800_000_100)
    assert not notify.verify_signature(SECRET, header, body + b" ", now=1_800_000_100)
    assert not notify.verify_signature(b"other", header, body, now=1_800_000_100)
    assert not notify.verify_signature(SECRET, header, body, now=1_800_000_000 + 301)
    assert not notify.verify_signature(SECRET, "v1=" + header.split("v1=")[1], body, now=0)


# --- retries ------------------------------------------------------------------------------------


def test_the_backoff_window_doubles_up_to_its_cap() -> None:
    backoff = Backoff(1.0, 8.0, rng=random.Random(1))
    windows = []
    for _ in range(6):
        windows.append(backoff.window())
        assert 0 <= notify.next_delay(backoff, None) < windows[-1]
    assert windows == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    backoff = Backoff(1.0, 1.0, rng=random.Random(1))
    assert notify.next_delay(backoff, 30.0, cap=300.0) == 30.0
    assert notify.next_delay(backoff, 3600.0, cap=300.0) == 300.0
    assert notify.next_delay(backoff, 0.0, cap=300.0) < 1.0


def test_retry_after_reads_seconds_and_http_dates() -> None:
    now = START
    assert notify.retry_after("120", now) == 120.0
    assert notify.retry_after("Mon, 07 Dec 2026 10:01:00 GMT", now) == 60.0
    assert notify.retry_after("Mon, 07 Dec 2026 09:00:00 GMT", now) == 0.0
    assert notify.retry_after("soon", now) is None
    assert notify.retry_after(None, now) is None


@pytest.mark.parametrize(
    ("status", "retried"), [(500, True), (503, True), (429, True), (400, False), (404, False)]
)
def test_what_is_retried(status: int, retried: bool) -> None:
    assert notify.retryable(status) is retried
    assert notify.retryable(None)


async def test_network_errors_and_5xx_are_retried_then_delivered() -> None:
    transport = Scripted(None, 500, 503, 200)
    n, sleeps = notifier(transport)
    before = notify.stats()
    assert await run_one(n) == "delivered"
    assert len(transport.sent) == 4
    assert len(sleeps.waits) == 3
    for wait, window in zip(sleeps.waits, [1.0, 2.0, 4.0], strict=True):
        assert 0 <= wait < window
    after = notify.stats()
    assert after["retried"] - before["retried"] == 3
    assert after["delivered"] - before["delivered"] == 1
    # The same delivery id on every attempt; each attempt signed afresh.
    assert {h[notify.DELIVERY_HEADER] for _, h, _ in transport.sent} == {"apr-1"}


async def test_given_up_after_max_attempts(caplog: pytest.LogCaptureFixture) -> None:
    transport = Scripted(500, 500, 500)
    n, sleeps = notifier(transport, max_attempts=3)
    before = notify.stats()
    with caplog.at_level(logging.INFO, logger="authority.notify"):
        assert await run_one(n) == "gave_up"
    assert len(transport.sent) == 3
    assert len(sleeps.waits) == 2
    assert notify.stats()["gave_up"] - before["gave_up"] == 1
    (line,) = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert "approval=apr-1" in line
    assert "webhook=hooks.example.com" in line
    assert "after 3 attempts" in line
    logged = caplog.text
    assert "secretpath" not in logged
    assert "key=q" not in logged


async def test_a_4xx_is_not_retried() -> None:
    transport = Scripted(404)
    n, sleeps = notifier(transport)
    assert await run_one(n) == "gave_up"
    assert len(transport.sent) == 1
    assert sleeps.waits == []


async def test_429_waits_as_long_as_retry_after_says() -> None:
    transport = Scripted((429, "42"), 200)
    n, sleeps = notifier(transport)
    assert await run_one(n) == "delivered"
    assert sleeps.waits == [42.0]


async def test_no_retry_past_the_approvals_expiry() -> None:
    transport = Scripted((503, "120"), 200)
    n, sleeps = notifier(transport)
    assert await run_one(n, approval(wait=dt.timedelta(seconds=60))) == "gave_up"
    assert len(transport.sent) == 1
    assert sleeps.waits == []


async def test_each_attempt_is_signed_with_the_secret() -> None:
    transport = Scripted((500, "5"), 200)
    clock = FakeClock(START)
    n, _ = notifier(transport, clock=clock)
    await run_one(n)
    for _, headers, body in transport.sent:
        assert notify.verify_signature(
            SECRET, headers[notify.SIGNATURE_HEADER], body, now=clock.now().timestamp()
        )
    first, second = (h[notify.SIGNATURE_HEADER] for _, h, _ in transport.sent)
    assert first != second  # a fresh timestamp on the retry


async def test_no_secret_no_signature() -> None:
    transport = Scripted(200)
    n, _ = notifier(transport, secret=None)
    await run_one(n)
    assert notify.SIGNATURE_HEADER not in transport.sent[0][1]


# --- the queue ----------------------------------------------------------------------------------


async def test_a_full_queue_drops_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    n, _ = notifier(Scripted(), queue_size=2)
    before = notify.stats()
    with caplog.at_level(logging.WARNING, logger="authority.notify"):
        for i in range(5):
            n.approval_requested(approval(f"apr-{i}"), INTENT, DECISION)
    assert n.queued == 2
    assert notify.stats()["dropped"] - before["dropped"] == 3
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(dropped) == 3
    assert "approval=apr-2" in dropped[0]
    assert "webhook=hooks.example.com" in dropped[0]


async def test_queuing_never_raises() -> None:
    n, _ = notifier(Scripted())
    broken = Decision(
        outcome=Outcome.REQUIRE_APPROVAL,
        scopes=(),
        ttl_cap=None,
        max_delegation_depth=0,
        reasons=(),
        policy_id="p",
        policy_version="v",
        decision_id="d",
        backend="cedar",
    )
    n.approval_requested(approval(), INTENT, broken)  # no rules named: still queued
    assert n.queued == 1


# --- the URL rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.slack.com/services/T0/B0/xyz",
        "https://example.com:8443/hook?x=1",
        "http://127.0.0.1:8080/hook",
        "http://[::1]:8080/hook",
        "http://localhost/hook",
    ],
)
def test_webhook_urls_accepted(url: str) -> None:
    assert check_webhook_url(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hook",
        "http://10.0.0.1/hook",
        "ftp://example.com/hook",
        "https:///nohost",
        "https://user:pw@example.com/hook",
        "https://example.com/hook#frag",
        "https://example.com/ho ok",
        "https://example.com:99999/hook",
        "file:///etc/passwd",
    ],
)
def test_webhook_urls_refused(url: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_webhook_url(url)
    assert "/hook" not in caught.value.message  # the path may be the secret


def test_plain_http_elsewhere_only_when_allowed() -> None:
    assert check_webhook_url("http://example.com/hook", allow_http=True)
    config = Config.from_mapping(
        {"webhooks": [{"url": "http://example.com/hook", "allow_http": True}]}
    )
    assert config.webhooks[0].allow_http


def test_webhooks_in_the_configuration() -> None:
    config = Config.from_mapping(
        {
            "console_url": "https://console.example.com",
            "webhooks": [
                {"url": "https://hooks.example.com/a", "format": "slack", "secret_env": "HOOK"},
                {"url": "https://hooks.example.com/b", "timeout": "3s", "max_attempts": 2},
            ],
        }
    )
    slack, generic = config.webhooks
    assert (slack.format, slack.secret_env, slack.max_attempts) == ("slack", "HOOK", 5)
    assert (generic.format, generic.timeout, generic.max_attempts) == (
        "json",
        dt.timedelta(seconds=3),
        2,
    )
    assert "hooks.example.com/a" not in repr(config)  # a Slack URL's path is its secret


@pytest.mark.parametrize(
    "entry",
    [
        {"url": "https://h.example.com/", "format": "xml"},
        {"url": "https://h.example.com/", "max_attempts": 0},
        {"url": "https://h.example.com/", "secret_env": "A", "secret_file": "/x"},
        {"url": "https://h.example.com/", "colour": "red"},
        {"format": "json"},
    ],
)
def test_bad_webhook_entries_are_refused(entry: dict[str, object]) -> None:
    with pytest.raises(InvalidArgument):
        Config.from_mapping({"webhooks": [entry]})


def test_secrets_are_read_at_start() -> None:
    config = Config.from_mapping(
        {"webhooks": [{"url": "https://h.example.com/", "secret_env": "HOOK_SECRET"}]}
    )
    (hook,) = notify.load_webhooks(config, {"HOOK_SECRET": " s3 \n"})
    assert hook.secret == b"s3"
    with pytest.raises(ValueError, match="empty"):
        notify.load_webhooks(config, {})


def test_a_secret_file_others_can_read_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"s3\n")
    secret.chmod(0o600)
    config = Config.from_mapping(
        {"webhooks": [{"url": "https://h.example.com/", "secret_file": str(secret)}]}
    )
    with caplog.at_level(logging.WARNING, logger="authority.notify"):
        (hook,) = notify.load_webhooks(config, {})
        assert hook.secret == b"s3"
        assert not caplog.records
        secret.chmod(0o644)
        notify.load_webhooks(config, {})
    (line,) = [r.getMessage() for r in caplog.records]
    assert "chmod 600" in line
    assert "s3" not in line.replace(str(secret), "")


# --- the job ------------------------------------------------------------------------------------


class Gated(Scripted):
    """Answers 200 once the test opens the gate; counts the posts in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.in_flight = 0
        self.most = 0

    async def post(
        self, url: str, headers: Sequence[tuple[str, str]], body: bytes, time_limit: float
    ) -> Answer:
        self.sent.append((url, dict(headers), body))
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.gate.wait()
        finally:
            self.in_flight -= 1
        return Answer(200)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


async def test_the_job_sends_at_most_max_in_flight_at_once() -> None:
    transport = Gated()
    hook = Webhook(WebhookConfig(url="https://hooks.example.com/x"))
    n = Notifier(
        [hook], console_url="", clock=FakeClock(START), transport=transport, max_in_flight=2
    )
    for i in range(5):
        n.approval_requested(approval(f"apr-{i}"), INTENT, DECISION)
    before = notify.stats()
    job = asyncio.create_task(n.run())
    await until(lambda: transport.in_flight == 2)
    assert n.queued == 3  # the rest wait for a slot
    transport.gate.set()
    await until(lambda: notify.stats()["delivered"] - before["delivered"] == 5)
    assert transport.most == 2
    assert [json.loads(b)["approval"]["id"] for _, _, b in transport.sent] == [
        f"apr-{i}" for i in range(5)
    ]
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job


async def test_stopping_the_job_cancels_the_deliveries_under_way() -> None:
    transport = Gated()
    hook = Webhook(WebhookConfig(url="https://hooks.example.com/x"))
    n = Notifier([hook], console_url="", clock=FakeClock(START), transport=transport)
    n.approval_requested(approval(), INTENT, DECISION)
    job = asyncio.create_task(n.run())
    await until(lambda: transport.in_flight == 1)
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert transport.in_flight == 0  # cancelled, not left running
