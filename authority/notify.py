"""Notifications: a pending approval posted to the configured webhooks, so that someone is told
an agent is waiting (issue 15).

What is sent, and what never is. A notice carries the approval's id, the agent's SPIFFE ID, its
task, the intent's action, resource and environment, its purpose (the agent's own words, cut to
``PURPOSE_CHARS``), the audience, the policy rules that asked for review, when the request
expires and the console's link to it. Never a token (there is none while it is pending), never
the prompt nor its digest, never the intent's parameters (a tool call's argument digest, or
values a caller chose), never argument values.

Bodies. ``json``: ``{"type": "approval.requested", "approval": {...}}`` (``json_body``).
``slack``: a Slack incoming-webhook message, ``text`` (the notification's fallback) and
``blocks``; what the agent chose is escaped for Slack's mrkdwn (``&``, ``<``, ``>``), so a
purpose cannot make a link or a mention (``<!channel>``) (``slack_body``).

Signature (when the webhook has a secret): Stripe's scheme. The header
``Authority-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``; a
receiver recomputes it over the raw body and refuses a ``t`` older than a few minutes
(``verify_signature``). ``Authority-Delivery: <approval id>`` is the same on every attempt, for
a receiver to drop a retry it already took.

Delivery never slows or fails the Exchange: ``Notifier.approval_requested`` only puts one
delivery per webhook on a bounded queue (``limits.notify_queue``; when it is full the delivery
is dropped, logged and counted). A supervised job (``Notifier.run``) sends them, at most
``MAX_IN_FLIGHT`` at once. An attempt that fails on the network, or is answered 5xx or 429, is
tried again after ``authority.backoff.Backoff`` (full jitter over a doubling window from
``BACKOFF_INITIAL`` to ``BACKOFF_CAP`` seconds), or after the answer's ``Retry-After`` when that
is longer (honoured up to ``RETRY_AFTER_CAP``); after the webhook's ``max_attempts``, or when
the approval would expire before the next attempt, it is given up. Any other 4xx ends it at once
(given up). Each outcome is one log line naming the approval and the webhook's host (never its
path or query: a Slack webhook's path is its secret), and a count in ``STATS``.

Replicas: the replica whose Exchange created the approval notifies (an in-process hook at its
creation, not a store listener), so an approval is posted once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import hashlib
import hmac
import json
import logging
import os
import random
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import h11
import httpcore2

from authority.backoff import Backoff
from authority.clock import Clock
from authority.config import Config, WebhookConfig
from authority.logs import RateLimitedLog
from authority.metrics import METRICS
from authority.models import Approval
from authority.policy import Decision
from authority.tokens import Intent

log = logging.getLogger(__name__)

# Counts of outcomes since the process started (read by authority.prom): one per delivery
# (a notice to one webhook) for delivered, gave_up and dropped; one per retry for retried.
OUTCOMES: Final = ("delivered", "retried", "gave_up", "dropped")
STATS: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
_DELIVERY = METRICS.samples("notify.delivery")  # queued to delivered, retries included

PURPOSE_CHARS: Final = 200
SIGNATURE_HEADER: Final = "Authority-Signature"
DELIVERY_HEADER: Final = "Authority-Delivery"
SIGNATURE_TOLERANCE: Final = 300.0  # seconds a receiver accepts a signature's timestamp
BACKOFF_INITIAL: Final = 1.0
BACKOFF_CAP: Final = 60.0
RETRY_AFTER_CAP: Final = 300.0
MAX_IN_FLIGHT: Final = 16
MAX_ANSWER_BYTES: Final = 64 * 1024  # of a webhook's answer body, read (and dropped)
_USER_AGENT: Final = b"agent-authority-notify/1"


# --- what is said -------------------------------------------------------------------------------


def approval_link(console_url: str, approval_id: str) -> str:
    """``<console_url>/approvals/<id>``, or empty without a console."""
    if not console_url:
        return ""
    return f"{console_url.rstrip('/')}/approvals/{urllib.parse.quote(approval_id, safe='')}"


@dataclass(frozen=True, slots=True)
class ApprovalNotice:
    """What a webhook is told of a pending approval: nothing secret, nothing the prompt said."""

    approval_id: str
    agent: str
    task_id: str
    action: str
    resource: str
    environment: str
    purpose: str  # at most PURPOSE_CHARS (then ends with an ellipsis)
    audience: str
    rules: tuple[str, ...]
    policy: str  # id@version
    decision_id: str
    requested_at: dt.datetime
    expires_at: dt.datetime
    link: str  # the console's page of the approval, or ""

    @classmethod
    def of(
        cls, approval: Approval, intent: Intent, decision: Decision, console_url: str
    ) -> ApprovalNotice:
        purpose = intent.purpose
        if len(purpose) > PURPOSE_CHARS:
            purpose = purpose[: PURPOSE_CHARS - 1] + "\u2026"
        return cls(
            approval_id=approval.id,
            agent=approval.principal,
            task_id=approval.task_id,
            action=intent.action,
            resource=intent.resource,
            environment=intent.environment,
            purpose=purpose,
            audience=approval.audience,
            rules=tuple(decision.reasons),
            policy=f"{decision.policy_id}@{decision.policy_version}",
            decision_id=decision.decision_id,
            requested_at=approval.requested_at,
            expires_at=approval.expires_at,
            link=approval_link(console_url, approval.id),
        )


def _time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def json_body(notice: ApprovalNotice) -> dict[str, Any]:
    return {
        "type": "approval.requested",
        "approval": {
            "id": notice.approval_id,
            "state": "pending",
            "url": notice.link or None,
            "agent": notice.agent,
            "task_id": notice.task_id,
            "action": notice.action,
            "resource": notice.resource,
            "environment": notice.environment,
            "purpose": notice.purpose,
            "audience": notice.audience,
            "rules": list(notice.rules),
            "policy": notice.policy,
            "decision_id": notice.decision_id,
            "requested_at": _time(notice.requested_at),
            "expires_at": _time(notice.expires_at),
        },
    }


def slack_escape(text: str) -> str:
    """Slack's mrkdwn control characters: ``&``, ``<``, ``>`` (links, mentions)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(notice: ApprovalNotice) -> dict[str, Any]:
    """A Slack incoming-webhook message: ``text`` (the fallback) and ``blocks``."""
    e = slack_escape
    agent, action, resource = e(notice.agent), e(notice.action), e(notice.resource)
    expires = _time(notice.expires_at)
    text = f"Approval needed: {agent} asks to {action} {resource} (expires {expires})"
    if notice.link:
        text += f": {notice.link}"
    rules = ", ".join(e(r) for r in notice.rules) or "(none named)"
    blocks: list[dict[str, Any]] = [
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": f"*Approval needed*: `{agent}` asks to *{action}* `{resource}`",
            },
        },
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": f"*Audience*\n`{e(notice.audience)}`"},
                {"type": "mrkdwn", "text": f"*Rule*\n{rules}"},
                {"type": "mrkdwn", "text": f"*Task*\n`{e(notice.task_id)}`"},
                {"type": "mrkdwn", "text": f"*Expires*\n{expires}"},
            ],
        },
        {
            "type": "context",
            "elements": [
                {"type": "mrkdwn", "text": f"The agent's purpose: {e(notice.purpose)}"},
                {"type": "mrkdwn", "text": f"Approval `{e(notice.approval_id)}`"},
            ],
        },
    ]
    if notice.link:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Review"},
                        "url": notice.link,
                    }
                ],
            }
        )
    return {"text": text, "blocks": blocks}


def encode(webhook_format: str, notice: ApprovalNotice) -> bytes:
    body = slack_body(notice) if webhook_format == "slack" else json_body(notice)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


# --- the signature ------------------------------------------------------------------------------


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """``t=<timestamp>,v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>``."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    secret: bytes, header: str, body: bytes, *, now: float, tolerance: float = SIGNATURE_TOLERANCE
) -> bool:
    """What a receiver checks: a ``v1`` of the header matches, and ``t`` is within
    ``tolerance`` seconds of ``now``."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))


# --- when to try again --------------------------------------------------------------------------


def retry_after(value: str | None, now: dt.datetime) -> float | None:
    """An answer's ``Retry-After`` in seconds (delta-seconds or an HTTP-date), None when absent
    or unreadable; a date in the past is 0."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())


def retryable(status: int | None) -> bool:
    """A network error (None), a 5xx or a 429 is tried again; any other answer is final."""
    return status is None or status == 429 or status >= 500


def next_delay(backoff: Backoff, after: float | None, *, cap: float = RETRY_AFTER_CAP) -> float:
    """The wait before the next attempt: the backoff's, or the answer's Retry-After (up to
    ``cap``) when that is longer."""
    delay = backoff.next_delay()
    if after is not None:
        delay = max(delay, min(after, cap))
    return delay


# --- the wire -----------------------------------------------------------------------------------


class DeliveryError(Exception):
    """The webhook could not be reached, or broke off its answer (a type name, never the URL)."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    retry_after: str | None = None


class Transport(Protocol):
    async def post(
        self, url: str, headers: Sequence[tuple[str, str]], body: bytes, time_limit: float
    ) -> Answer:
        """POST ``body`` within ``time_limit`` seconds; the answer (its body read and
        dropped), or ``DeliveryError``."""
        ...

    async def aclose(self) -> None: ...


class HttpTransport:
    """httpcore2: no redirects followed, no environment proxies, no cookies."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._pool = httpcore2.AsyncConnectionPool(
            ssl_context=ssl_context or ssl.create_default_context(),
            max_connections=MAX_IN_FLIGHT,
            keepalive_expiry=30.0,
        )

    async def post(
        self, url: str, headers: Sequence[tuple[str, str]], body: bytes, time_limit: float
    ) -> Answer:
        host = urllib.parse.urlsplit(url).netloc  # no user:password@ (config refuses one)
        sent = [(b"host", host.encode("idna"))]
        sent += [(k.encode(), v.encode()) for k, v in headers]
        sent += [(b"content-length", str(len(body)).encode()), (b"user-agent", _USER_AGENT)]
        request = httpcore2.Request(
            "POST",
            url,
            headers=sent,
            content=body,
            extensions={"timeout": dict.fromkeys(("connect", "read", "write", "pool"), time_limit)},
        )
        try:
            async with asyncio.timeout(time_limit):
                response = await self._pool.handle_async_request(request)
                try:
                    read = 0
                    async for chunk in response.aiter_stream():  # read and dropped, bounded
                        read += len(chunk)
                        if read > MAX_ANSWER_BYTES:
                            break
                finally:
                    await response.aclose()
        except (
            TimeoutError,
            httpcore2.TimeoutException,
            httpcore2.NetworkError,
            httpcore2.ProtocolError,
            httpcore2.UnsupportedProtocol,
            OSError,
            h11.LocalProtocolError,
        ) as exc:
            raise DeliveryError(type(exc).__name__) from None
        header = next((v for k, v in response.headers if k.lower() == b"retry-after"), None)
        return Answer(response.status, header.decode("latin-1") if header is not None else None)

    async def aclose(self) -> None:
        await self._pool.aclose()


# --- delivery -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Webhook:
    """A configured webhook with its secret read (the composition root reads it: ``load``)."""

    config: WebhookConfig
    secret: bytes | None = None

    @property
    def host(self) -> str:
        return self.config.host


def load_webhooks(config: Config, environ: Mapping[str, str] = os.environ) -> list[Webhook]:
    """Each ``[[webhooks]]`` entry with its secret (the file's bytes or the variable's value,
    surrounding whitespace removed); a secret named but missing or empty is an error."""
    out = []
    for i, entry in enumerate(config.webhooks):
        secret: bytes | None = None
        if entry.secret_file is not None:
            path = Path(entry.secret_file)
            secret = path.read_bytes().strip()
            where = f"webhooks[{i}].secret_file"
            if path.stat().st_mode & 0o077:
                log.warning("%s: %s is readable by others than its owner (chmod 600)", where, path)
        elif entry.secret_env:
            secret = environ.get(entry.secret_env, "").strip().encode()
            where = f"webhooks[{i}].secret_env ({entry.secret_env})"
        if secret is not None and not secret:
            raise ValueError(f"{where} is empty")
        out.append(Webhook(entry, secret))
    return out


@dataclass(slots=True, eq=False)
class Delivery:
    webhook: Webhook
    notice: ApprovalNotice
    body: bytes
    queued: float  # monotonic


Sleep = Callable[[float], Awaitable[None]]


class Notifier:
    """Pending approvals to the webhooks: ``approval_requested`` (the Exchange's hook, never
    blocking) queues; ``run`` (a supervised job) sends."""

    def __init__(
        self,
        webhooks: Sequence[Webhook],
        *,
        console_url: str,
        clock: Clock,
        queue_size: int = 1000,
        transport: Transport | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_cap: float = BACKOFF_CAP,
        retry_after_cap: float = RETRY_AFTER_CAP,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self.webhooks = tuple(webhooks)
        self.console_url = console_url  # where approval links point (<url>/approvals/<id>)
        self._clock = clock
        self._queue: asyncio.Queue[Delivery] = asyncio.Queue(maxsize=queue_size)
        self._transport = transport or HttpTransport()
        self._sleep = sleep
        self._rng = rng
        self._backoff = (backoff_initial, backoff_cap)
        Backoff(backoff_initial, backoff_cap)  # checks the bounds now
        self._retry_after_cap = retry_after_cap
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._dropped_log = RateLimitedLog(log, summary="notifications dropped")

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # --- the Exchange's side: never blocks, never raises ----------------------------------------

    def approval_requested(self, approval: Approval, intent: Intent, decision: Decision) -> None:
        try:
            notice = ApprovalNotice.of(approval, intent, decision, self.console_url)
            for webhook in self.webhooks:
                delivery = Delivery(
                    webhook, notice, encode(webhook.config.format, notice), time.monotonic()
                )
                try:
                    self._queue.put_nowait(delivery)
                except asyncio.QueueFull:
                    self._outcome("dropped", delivery)
                    self._dropped_log.log(
                        "queue full",
                        logging.WARNING,
                        "approval notification dropped: approval=%s webhook=%s "
                        "(queue full: %d waiting)",
                        approval.id,
                        webhook.host,
                        self._queue.qsize(),
                        extra={"approval_id": approval.id, "webhook": webhook.host},
                    )
        except Exception:
            log.exception("approval notification not queued: approval=%s", approval.id)

    # --- the job --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Send what is queued, at most ``max_in_flight`` deliveries at once, until cancelled
        (the deliveries under way are cancelled with it)."""
        try:
            while True:
                await self._slots.acquire()
                try:
                    delivery = await self._queue.get()
                except BaseException:
                    self._slots.release()
                    raise
                task = asyncio.create_task(self._deliver_in_slot(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _deliver_in_slot(self, delivery: Delivery) -> None:
        try:
            await self.deliver(delivery)
        except Exception:
            log.exception(
                "approval notification failed: approval=%s webhook=%s",
                delivery.notice.approval_id,
                delivery.webhook.host,
            )
        finally:
            self._slots.release()

    async def deliver(self, delivery: Delivery) -> str:
        """Attempts until delivered or given up; the outcome (``delivered``, ``gave_up``)."""
        webhook, notice = delivery.webhook, delivery.notice
        config = webhook.config
        backoff = Backoff(*self._backoff, rng=self._rng)
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            after: float | None = None
            try:
                answer = await self._transport.post(
                    config.url,
                    self._headers(webhook, notice, delivery.body),
                    delivery.body,
                    config.timeout.total_seconds(),
                )
                status = answer.status
                what = f"HTTP {status}"
                if 200 <= status < 300:
                    _DELIVERY.add(time.monotonic() - delivery.queued)
                    return self._outcome(
                        "delivered", delivery, f"attempt {attempt}: {what}", logging.INFO
                    )
                after = retry_after(answer.retry_after, self._clock.now())
            except DeliveryError as exc:
                what = str(exc)
            if not retryable(status):
                return self._outcome("gave_up", delivery, f"{what}: not retried")
            if attempt >= config.max_attempts:
                return self._outcome("gave_up", delivery, f"{what} after {attempt} attempts")
            delay = next_delay(backoff, after, cap=self._retry_after_cap)
            if self._clock.now() + dt.timedelta(seconds=delay) >= notice.expires_at:
                return self._outcome(
                    "gave_up",
                    delivery,
                    f"{what}: the approval expires before attempt {attempt + 1}",
                )
            self._outcome(
                "retried",
                delivery,
                f"attempt {attempt}: {what}; next in {delay:.1f}s",
                logging.INFO,
            )
            await self._sleep(delay)

    def _headers(
        self, webhook: Webhook, notice: ApprovalNotice, body: bytes
    ) -> list[tuple[str, str]]:
        headers = [
            ("content-type", "application/json"),
            (DELIVERY_HEADER, notice.approval_id),
        ]
        if webhook.secret is not None:
            timestamp = int(self._clock.now().timestamp())
            headers.append((SIGNATURE_HEADER, sign(webhook.secret, body, timestamp)))
        return headers

    def _outcome(
        self, outcome: str, delivery: Delivery, detail: str = "", level: int = logging.WARNING
    ) -> str:
        STATS[outcome] += 1
        if outcome != "dropped":  # dropped: logged by the caller, rate-limited
            log.log(
                level,
                "approval notification %s: approval=%s webhook=%s (%s)",
                outcome.replace("_", " "),
                delivery.notice.approval_id,
                delivery.webhook.host,
                detail,
                extra={
                    "outcome": outcome,
                    "approval_id": delivery.notice.approval_id,
                    "webhook": delivery.webhook.host,
                },
            )
        return outcome


def stats() -> dict[str, int]:
    """A copy of ``STATS``."""
    return dict(STATS)


__all__ = [
    "DELIVERY_HEADER",
    "OUTCOMES",
    "SIGNATURE_HEADER",
    "STATS",
    "Answer",
    "ApprovalNotice",
    "DeliveryError",
    "HttpTransport",
    "Notifier",
    "Transport",
    "Webhook",
    "approval_link",
    "encode",
    "json_body",
    "load_webhooks",
    "next_delay",
    "retry_after",
    "retryable",
    "sign",
    "slack_body",
    "slack_escape",
    "stats",
    "verify_signature",
]
