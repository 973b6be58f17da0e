"""Approval notifications end to end: the real authority (in this process, on real sockets) posts a
pending approval to real HTTP receivers on 127.0.0.1: the generic JSON body and a Slack body,
signed; a receiver failing twice is retried and delivered; one that always fails, and one that
never answers, are given up on, while the Exchange answered at once and the approval still works.
Nothing the agent must keep (its token, its prompt, the prompt's digest) reaches a receiver."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from authority import notify
from authority._pb import authority_v1_authority_pb2 as pb
from authority.config import Config, StoreConfig, WebhookConfig
from tests.helpers import Running, running_authority, short_socket_dir
from tests.helpers import test_config as config_in
from tests.integration.test_exchange import REPORTER, attest_agent, load_agents_policy

CONSOLE = "https://console.example.test/ops"
SECRET = "whsec-integration-0123456789"
PROMPT = "Deploy fix 42 to production. Internal note: the vault key is hunter2."
PROMPT_SHA256 = hashlib.sha256(PROMPT.encode()).hexdigest()
QUERY_SECRET = "sig=query-secret-xyz"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 in a thread: each path answers from its script (a status per
    request, the last one repeated; "hang" holds the request until the test ends)."""

    scripts: dict[str, list[int | str]]
    got: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    def on(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.path == path]

    def answer(self, path: str) -> int | str:
        with self.lock:
            script = self.scripts[path]
            return script.pop(0) if len(script) > 1 else script[0]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}?{QUERY_SECRET}"


@contextlib.contextmanager
def receiver(scripts: dict[str, list[int | str]]) -> Iterator[Receiver]:
    state = Receiver(scripts)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            path = self.path.split("?")[0]
            with state.lock:
                state.got.append(
                    Received(path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
            answer = state.answer(path)
            if answer == "hang":
                state.release.wait(30)
                return
            assert isinstance(answer, int)
            self.send_response(answer)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(10)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """``tests.helpers.wait_until`` for a test whose server runs on the same event loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def quick(seconds: float) -> None:
    """The server's waits (the webhook backoff, the scheduled jobs) fifty times shorter."""
    await asyncio.sleep(seconds / 50)


@pytest.fixture
def hooks() -> Iterator[Receiver]:
    with receiver(
        {
            "/generic": [200],
            "/slack": [200],
            "/flaky": [500, 500, 200],
            "/down": [500],
            "/hang": ["hang"],
        }
    ) as state:
        yield state


@pytest.fixture
async def authority(
    hooks: Receiver, tmp_path: Path, socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Running]:
    secret_file = tmp_path / "hook-secret"
    secret_file.write_text(SECRET + "\n")
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", SECRET)
    config = dataclasses.replace(
        config_in(tmp_path / "data", socket_dir),
        console_url=CONSOLE,
        webhooks=(
            WebhookConfig(url=hooks.url("/generic"), secret_file=secret_file),
            WebhookConfig(
                url=hooks.url("/slack"), format="slack", secret_env="TEST_WEBHOOK_SECRET"
            ),
            WebhookConfig(url=hooks.url("/flaky")),
            WebhookConfig(url=hooks.url("/down"), max_attempts=3),
            WebhookConfig(url=hooks.url("/hang"), max_attempts=1, timeout=dt.timedelta(seconds=1)),
        ),
    )
    async with running_authority(config, sleep=quick) as running:
        yield running


async def test_a_pending_approval_is_posted_to_every_webhook(
    authority: Running, hooks: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authority.notify")
    await load_agents_policy(authority)
    agent = await attest_agent(authority, REPORTER, tmp_path / "reporter")
    stub = await agent.stub()
    before = notify.stats()

    def exchange(approval_id: str = "") -> pb.ExchangeRequest:
        return pb.ExchangeRequest(
            intent=pb.Intent(action="deploy", resource="deploy/production", purpose="ship fix 42"),
            audience="deployer",
            task_id="t-webhooks",
            approval_id=approval_id,
            context=pb.AuditContext(prompt_sha256=PROMPT_SHA256, prompt=PROMPT, model="m"),
        )

    # The Exchange answers at once, a receiver that never answers notwithstanding.
    started = time.monotonic()
    pending = await stub.Exchange(exchange())
    elapsed = time.monotonic() - started
    assert pending.WhichOneof("result") == "pending"
    approval_id = pending.pending.id
    assert elapsed < 1.0, f"the Exchange took {elapsed:.2f}s"

    await until(lambda: bool(hooks.on("/generic")) and bool(hooks.on("/slack")), "the bodies")
    link = f"{CONSOLE}/approvals/{approval_id}"

    # The generic body: what is asked, by whom, under which rule, until when, and the link.
    (generic,) = hooks.on("/generic")
    assert generic.headers["content-type"] == "application/json"
    assert generic.headers[notify.DELIVERY_HEADER.lower()] == approval_id
    body = json.loads(generic.body)
    assert body["type"] == "approval.requested"
    got = body["approval"]
    assert got["id"] == approval_id
    assert got["agent"] == REPORTER
    assert (got["action"], got["resource"], got["audience"]) == (
        "deploy",
        "deploy/production",
        "deployer",
    )
    assert got["purpose"] == "ship fix 42"
    assert got["rules"] == ["agents-deploy-production"]
    assert got["url"] == link
    expires = dt.datetime.fromisoformat(got["expires_at"])
    assert int(expires.timestamp()) == pending.pending.expires_at
    assert notify.verify_signature(
        SECRET.encode(),
        generic.headers[notify.SIGNATURE_HEADER.lower()],
        generic.body,
        now=time.time(),
    )
    assert not notify.verify_signature(
        b"another secret",
        generic.headers[notify.SIGNATURE_HEADER.lower()],
        generic.body,
        now=time.time(),
    )

    # The Slack body: text and blocks, the link in both.
    (slack,) = hooks.on("/slack")
    message = json.loads(slack.body)
    assert set(message) == {"text", "blocks"}
    assert link in message["text"]
    assert REPORTER in message["text"]
    assert link in json.dumps(message["blocks"])
    assert notify.verify_signature(
        SECRET.encode(), slack.headers[notify.SIGNATURE_HEADER.lower()], slack.body, now=time.time()
    )

    # 500, 500, then delivered; no secret configured: no signature.
    await until(lambda: len(hooks.on("/flaky")) == 3, "the flaky receiver's third attempt")
    assert notify.SIGNATURE_HEADER.lower() not in hooks.on("/flaky")[0].headers
    await until(lambda: notify.stats()["delivered"] - before["delivered"] == 3, "three deliveries")

    # Approvals still work: approved over the Admin API, the token collected.
    approved = await authority.admin().stub.Approve(
        pb.ApproveRequest(id=approval_id, grant_seconds=300, note="change 42")
    )
    assert approved.state == "approved"
    collected = await stub.Exchange(exchange(approval_id))
    assert collected.WhichOneof("result") == "token"
    token = collected.token.token

    # The failing ones given up on (3 attempts; the silent one after its timeout), logged.
    await until(lambda: notify.stats()["gave_up"] - before["gave_up"] == 2, "the two given up", 60)
    assert len(hooks.on("/down")) == 3
    assert len(hooks.on("/hang")) == 1
    gave_up = [r.getMessage() for r in caplog.records if "gave up" in r.getMessage()]
    assert len(gave_up) == 2
    assert any("after 3 attempts" in line for line in gave_up)
    assert all(
        f"approval={approval_id}" in line and "webhook=127.0.0.1" in line for line in gave_up
    )
    after = notify.stats()
    assert after["retried"] - before["retried"] == 4  # flaky twice, down twice
    assert after["dropped"] == before["dropped"]

    # Nothing secret anywhere: not in what the receivers got, before or after the token was
    # collected (nothing more was sent), nor in the log lines (the URL's query neither).
    assert len(hooks.got) == 1 + 1 + 3 + 3 + 1
    for received in hooks.got:
        text = received.body.decode() + json.dumps(received.headers)
        assert token not in text
        assert PROMPT not in text
        assert "hunter2" not in text
        assert PROMPT_SHA256 not in text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "query-secret-xyz" not in logged
    assert SECRET not in logged
    assert token not in logged
    assert "hunter2" not in logged


# --- replicas: the one that created the approval posts it, once --------------------------------


async def test_with_replicas_only_the_creating_one_notifies(
    pg_url: str, tmp_path: Path, hooks: Receiver
) -> None:
    def replica(name: str) -> Config:
        sockets = short_socket_dir()
        return dataclasses.replace(
            config_in(tmp_path / name / "data", sockets),
            store=StoreConfig(url=pg_url, replica=name),
            console_url=CONSOLE,
            # Both replicas post to the same receiver: a second post of an approval would show.
            webhooks=(WebhookConfig(url=hooks.url("/generic")),),
        )

    async with (
        running_authority(replica("ra"), sleep=quick) as a,
        running_authority(replica("rb"), sleep=quick) as b,
    ):
        before = notify.stats()
        pending = []
        for running, folder in ((a, "agent-a"), (b, "agent-b")):
            await load_agents_policy(running)
            agent = await attest_agent(running, REPORTER, tmp_path / folder)
            response = await agent.exchange("deploy", "deploy/production", "deployer")
            assert response.WhichOneof("result") == "pending"
            pending.append(response.pending.id)
        # Both replicas see every approval (one database); only its creator posts it.
        for running in (a, b):
            listed = await running.admin().stub.ListApprovals(pb.ListApprovalsRequest())
            assert set(pending) <= {x.id for x in listed.approvals}

        def posted() -> list[str]:
            return [json.loads(r.body)["approval"]["id"] for r in hooks.on("/generic")]

        await until(lambda: set(posted()) == set(pending), "both approvals posted")
        await until(
            lambda: notify.stats()["delivered"] - before["delivered"] == 2, "two deliveries"
        )
        # Each once: the hook is in the Exchange that created it, not on the store's changes
        # (replica B, which saw A's approval in the database before creating its own, and
        # posted its own, posted nothing of A's).
        assert sorted(posted()) == sorted(pending)
        assert notify.stats()["delivered"] - before["delivered"] == 2


async def test_without_console_url_the_link_names_the_served_console(
    hooks: Receiver, tmp_path: Path, socket_dir: Path
) -> None:
    """``console_url`` unset, the console served: the notice links to where it is served."""
    config = dataclasses.replace(
        config_in(tmp_path / "data", socket_dir),
        console_listen="127.0.0.1:0",
        console_plain_http=True,
        webhooks=(WebhookConfig(url=hooks.url("/generic")),),
    )
    async with running_authority(config, sleep=quick) as running:
        assert running.server.console is not None
        served = running.server.console.url
        await load_agents_policy(running)
        agent = await attest_agent(running, REPORTER, tmp_path / "reporter")
        stub = await agent.stub()
        pending = await stub.Exchange(
            pb.ExchangeRequest(
                intent=pb.Intent(action="deploy", resource="deploy/production", purpose="ship"),
                audience="deployer",
            )
        )
        assert pending.WhichOneof("result") == "pending"
        await until(lambda: bool(hooks.on("/generic")), "the notice")
    (notice,) = hooks.on("/generic")
    link = json.loads(notice.body)["approval"]["url"]
    assert served.startswith("http://127.0.0.1:")
    assert link == f"{served}/approvals/{pending.pending.id}"
