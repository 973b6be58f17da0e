"""The operators' console, in a real browser (Debian's Chromium, driven by Playwright) against
the real server: sign-in links, approvals decided in the browser and collected by a real agent's
Exchange, a task's trace with the chain verified, and the refusals, one test each.

Screenshots go to a folder under pytest's tmp dir (printed), and to $AUTHORITY_TEST_ARTIFACTS
when set."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import logging
import os
import re
import shutil
import socket
import sqlite3
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from authority._pb import authority_v1_authority_pb2 as pb
from authority.errors import FailedPrecondition
from authority.server import AuthorityServer
from tests.helpers import (
    Running,
    authority_command,
    free_port,
    running_agent,
    running_authority,
    serve_process,
    short_socket_dir,
    wait_held,
)
from tests.helpers import test_config as make_config
from tests.integration.test_exchange import (
    REPORTER,
    Agent,
    attest_agent,
    claims_of,
    load_agents_policy,
)
from tests.security._attack import assert_status, rpc_error

CHROMIUM = Path("/usr/bin/chromium")
OPERATOR = "alice"
INJECTED = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


def _chromium() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"the console's browser tests need Debian's Chromium at {CHROMIUM} "
            "(apt-get install chromium); they are not skipped without it"
        )
    return CHROMIUM


@contextlib.asynccontextmanager
async def console_authority(
    tmp_path: Path, socket_dir: Path, **console: object
) -> AsyncIterator[Running]:
    config = dataclasses.replace(
        make_config(tmp_path / "data", socket_dir),
        console_listen="127.0.0.1:0",
        **console,  # type: ignore[arg-type]
    )
    async with running_authority(config) as running:
        await load_agents_policy(running)
        yield running


def console_url(running: Running) -> str:
    assert running.server.console is not None
    return running.server.console.url


async def sign_in_link(running: Running, operator: str = OPERATOR) -> str:
    link = await running.admin().stub.CreateConsoleSignIn(
        pb.CreateConsoleSignInRequest(operator=operator)
    )
    assert link.url.startswith(console_url(running) + "/signin?code=")
    return link.url


async def pending_approval(agent: Agent, task_id: str, **kwargs: object) -> str:
    response = await agent.exchange(
        "deploy",
        "deploy/production",
        "deployer",
        task_id=task_id,
        **kwargs,  # type: ignore[arg-type]
    )
    assert response.WhichOneof("result") == "pending", response
    return response.pending.id


def screenshots_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "screenshots"
    folder.mkdir(exist_ok=True)
    print(f"console screenshots: {folder}")
    return folder


def publish(shot: Path) -> None:
    target = os.environ.get("AUTHORITY_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / shot.name)


# --- in the browser ------------------------------------------------------------------------------


async def test_operator_signs_in_approves_denies_and_reads_the_trace(
    tmp_path: Path, socket_dir: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    shots = screenshots_dir(tmp_path)
    async with console_authority(tmp_path, socket_dir) as running, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(_chromium()))
        try:
            context = await browser.new_context(ignore_https_errors=True)
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))

            link = await sign_in_link(running)
            await page.goto(link)
            await page.click("#signin")
            await expect(page).to_have_url(f"{console_url(running)}/approvals")
            await expect(page.locator("header .who")).to_contain_text(f"signed in as {OPERATOR}")

            # The same link, a second time (another browser context: no session to reuse).
            other = await (await browser.new_context(ignore_https_errors=True)).new_page()
            await other.goto(link)
            await other.click("#signin")
            await expect(other.locator("#message")).to_contain_text("already used")

            # A real agent: an earlier step in the task, then a production deploy (pending).
            agent = await attest_agent(running, REPORTER, tmp_path / "reporter")
            task = "t-console"
            await agent.token("read", "metrics/prod", "metrics-api", task_id=task)
            approval_id = await pending_approval(agent, task, parameters={"change": "42"})

            # The open list shows it without a reload (the console's script polls).
            row = page.locator(f'tr.approval[data-id="{approval_id}"]')
            await expect(row).to_be_visible(timeout=10_000)
            await expect(row).to_contain_text(REPORTER)
            await page.screenshot(path=shots / "console-approvals.png", full_page=True)

            await row.get_by_role("link", name="Review").click()
            await expect(page.locator("#principal")).to_have_text(REPORTER)
            facts = page.locator("dl.facts")
            await expect(facts).to_contain_text("join_token")  # how it attested
            await expect(facts).to_contain_text("agents-deploy-production")  # the rule
            await expect(facts).to_contain_text("ab" * 32)  # the prompt digest
            await expect(facts).to_contain_text("metrics.query")  # the tool
            await expect(facts).to_contain_text("test-model")
            await expect(page.locator("#parameters")).to_contain_text("42")
            await expect(page.locator("ol.timeline")).to_contain_text("task_token.issued")
            await expect(page.locator(".countdown")).to_contain_text("m")
            await page.screenshot(path=shots / "console-approval.png", full_page=True)

            await page.select_option("select[name=minutes]", "10")
            await page.fill("input[name=note]", "change 42")
            await page.click("#approve")
            await expect(page.locator("#state")).to_have_text("approved")
            await expect(page.locator("#decided-by")).to_have_text(OPERATOR)

            # The agent collects its token, once, living no longer than the 10 minutes.
            collected = await agent.exchange(
                "deploy",
                "deploy/production",
                "deployer",
                task_id=task,
                approval_id=approval_id,
                parameters={"change": "42"},
            )
            assert collected.WhichOneof("result") == "token", collected
            claims = claims_of(collected.token.token)
            assert claims["exp"] - claims["iat"] <= 600

            # Another request, denied in the browser; the agent is refused with it.
            second = await pending_approval(agent, task, purpose="ship fix 43")
            await page.goto(f"{console_url(running)}/approvals/{second}")
            await page.fill("input[name=reason]", "not during the freeze")
            await page.click("#deny")
            await expect(page.locator("#state")).to_have_text("denied")
            refused = await rpc_error(
                agent.exchange(
                    "deploy",
                    "deploy/production",
                    "deployer",
                    task_id=task,
                    approval_id=second,
                    purpose="ship fix 43",
                )
            )
            assert_status(refused, grpc.StatusCode.PERMISSION_DENIED, "APPROVAL_DENIED")

            # The task's trace: every step, and the chain verified.
            await page.goto(f"{console_url(running)}/tasks/{task}")
            await expect(page.locator("#chain")).to_contain_text("chain verified")
            steps = page.locator("#timeline li.step .kind")
            kinds = await steps.all_inner_texts()
            for kind in (
                "attest.succeeded",  # the attestation behind the agent's SVID
                "policy.decided",
                "task_token.issued",
                "approval.requested",
                "approval.approved",
                "approval.denied",
            ):
                assert kind in kinds, kinds
            assert kinds.count("task_token.issued") == 2, kinds
            await page.screenshot(path=shots / "console-task-trace.png", full_page=True)

            assert not errors, errors
        finally:
            await browser.close()
        # Recorded as the operator who signed in, in the approvals and in the audit chain.
        listed = await running.admin().stub.ListApprovals(pb.ListApprovalsRequest(all=True))
        decided_by = {a.id: a.decided_by for a in listed.approvals}
        assert decided_by[approval_id] == decided_by[second] == OPERATOR
        records = await running.server.authority.audit_records(task_ids=[task])  # type: ignore[union-attr]
        actors = {r.kind: r.actor for r in records}
        assert actors["approval.approved"] == actors["approval.denied"] == OPERATOR
    for shot in sorted(shots.iterdir()):
        publish(shot)


async def test_agent_supplied_markup_is_shown_as_text_and_never_runs(
    tmp_path: Path, socket_dir: Path
) -> None:
    from playwright.async_api import async_playwright, expect

    async with console_authority(tmp_path, socket_dir) as running, async_playwright() as pw:
        agent = await attest_agent(running, REPORTER, tmp_path / "reporter")
        approval_id = await pending_approval(
            agent, "t-inject", purpose=INJECTED, parameters={"note": INJECTED}
        )
        browser = await pw.chromium.launch(executable_path=str(_chromium()))
        try:
            page = await (await browser.new_context(ignore_https_errors=True)).new_page()
            dialogs: list[str] = []
            page.on("dialog", lambda d: dialogs.append(d.message))
            await page.goto(await sign_in_link(running))
            await page.click("#signin")
            row = page.locator(f'tr.approval[data-id="{approval_id}"]')
            await expect(row.locator(".purpose")).to_have_text(INJECTED)
            await page.goto(f"{console_url(running)}/approvals/{approval_id}")
            await expect(page.locator("#purpose")).to_have_text(INJECTED)
            await expect(page.locator("#parameters")).to_contain_text(INJECTED)
            assert await page.locator("main script").count() == 0
            assert await page.locator("main img").count() == 0
            assert await page.evaluate("window.__pwned") is None
            await page.goto(f"{console_url(running)}/tasks/t-inject")
            assert await page.evaluate("window.__pwned") is None
            assert not dialogs
        finally:
            await browser.close()


# --- refusals, over plain HTTP requests -----------------------------------------------------------


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(verify=False, follow_redirects=False)  # the console's own certificate


async def _signed_in(running: Running, client: httpx.AsyncClient) -> tuple[str, str]:
    """(cookie header value, the session's CSRF token), signed in with a fresh link."""
    link = await sign_in_link(running)
    code = link.split("code=", 1)[1]
    base = console_url(running)
    response = await client.post(f"{base}/signin", data={"code": code}, headers={"origin": base})
    assert response.status_code == 303, response.text
    cookie = response.headers["set-cookie"]
    for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/"):
        assert attribute.lower() in cookie.lower(), cookie
    assert cookie.startswith("__Host-console=")
    pair = cookie.split(";", 1)[0]
    page = await client.get(f"{base}/approvals", headers={"cookie": pair})
    assert page.status_code == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    return pair, csrf.group(1)


async def test_no_session_is_refused(tmp_path: Path, socket_dir: Path) -> None:
    async with console_authority(tmp_path, socket_dir) as running, _client() as client:
        base = console_url(running)
        for path in ("/approvals", "/approvals/apr-x", "/tasks/t1", "/trust"):
            response = await client.get(base + path)
            assert response.status_code == 401, path
            assert "Sign in" in response.text
            assert "script-src 'self'" in response.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
            assert response.headers["x-frame-options"] == "DENY"
        agent = await attest_agent(running, REPORTER, tmp_path / "reporter")
        approval_id = await pending_approval(agent, "t-nosession")
        response = await client.post(
            f"{base}/approvals/{approval_id}/approve",
            data={"minutes": "10", "csrf": "x"},
            headers={"origin": base},
        )
        assert response.status_code == 401
        await _still_pending(running, approval_id)


async def _still_pending(running: Running, approval_id: str) -> None:
    listed = await running.admin().stub.ListApprovals(pb.ListApprovalsRequest(all=True))
    states = {a.id: a.state for a in listed.approvals}
    assert states[approval_id] == "pending", states


async def test_an_expired_session_is_refused(tmp_path: Path, socket_dir: Path) -> None:

    async with (
        console_authority(
            tmp_path, socket_dir, console_session_ttl=dt.timedelta(seconds=2)
        ) as running,
        _client() as client,
    ):
        cookie, _ = await _signed_in(running, client)  # usable at first (checked there)
        base = console_url(running)
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            response = await client.get(f"{base}/approvals", headers={"cookie": cookie})
            if response.status_code == 401:
                break
            assert response.status_code == 200
            assert asyncio.get_running_loop().time() < deadline, "the session never expired"
            await asyncio.sleep(0.2)
        assert "Sign in" in response.text


async def test_a_forged_cookie_is_refused(tmp_path: Path, socket_dir: Path) -> None:
    async with console_authority(tmp_path, socket_dir) as running, _client() as client:
        cookie, _ = await _signed_in(running, client)
        base = console_url(running)
        name, value = cookie.split("=", 1)
        for forged in (f"{name}={value[:-2]}xx", f"{name}=admin", f"{name}="):
            response = await client.get(f"{base}/approvals", headers={"cookie": forged})
            assert response.status_code == 401, forged


async def test_a_cookie_replayed_after_sign_out_is_refused(
    tmp_path: Path, socket_dir: Path
) -> None:
    async with console_authority(tmp_path, socket_dir) as running, _client() as client:
        cookie, csrf = await _signed_in(running, client)
        base = console_url(running)
        out = await client.post(
            f"{base}/signout", data={"csrf": csrf}, headers={"cookie": cookie, "origin": base}
        )
        assert out.status_code == 303
        response = await client.get(f"{base}/approvals", headers={"cookie": cookie})
        assert response.status_code == 401


async def test_a_post_without_the_csrf_token_is_refused(tmp_path: Path, socket_dir: Path) -> None:
    async with console_authority(tmp_path, socket_dir) as running, _client() as client:
        cookie, csrf = await _signed_in(running, client)
        base = console_url(running)
        agent = await attest_agent(running, REPORTER, tmp_path / "reporter")
        approval_id = await pending_approval(agent, "t-csrf")
        url = f"{base}/approvals/{approval_id}/approve"
        for form in ({"minutes": "10"}, {"minutes": "10", "csrf": csrf[:-1] + "A"}):
            response = await client.post(url, data=form, headers={"cookie": cookie, "origin": base})
            assert response.status_code == 403, form
        await _still_pending(running, approval_id)
        # The same form with its token goes through: the refusals above were the token's.
        done = await client.post(
            url, data={"minutes": "10", "csrf": csrf}, headers={"cookie": cookie, "origin": base}
        )
        assert done.status_code == 303


async def test_a_post_from_another_origin_is_refused(tmp_path: Path, socket_dir: Path) -> None:
    async with console_authority(tmp_path, socket_dir) as running, _client() as client:
        cookie, csrf = await _signed_in(running, client)
        base = console_url(running)
        agent = await attest_agent(running, REPORTER, tmp_path / "reporter")
        approval_id = await pending_approval(agent, "t-origin")
        url = f"{base}/approvals/{approval_id}/approve"
        form = {"minutes": "10", "csrf": csrf}
        for headers in (
            {"origin": "https://evil.example"},
            {},  # no Origin at all
            {"origin": base, "sec-fetch-site": "cross-site"},
            {"origin": "null"},
        ):
            response = await client.post(url, data=form, headers={"cookie": cookie, **headers})
            assert response.status_code == 403, headers
        await _still_pending(running, approval_id)


async def test_plain_http_beyond_loopback_is_refused_at_start(
    tmp_path: Path, socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = dataclasses.replace(
        make_config(tmp_path / "data", socket_dir),
        console_listen="0.0.0.0:0",
        console_plain_http=True,
    )
    server = AuthorityServer(config)
    with pytest.raises(FailedPrecondition) as refused:
        await server.start()
    await server.stop(grace=0)
    assert refused.value.reason == "CONSOLE_PLAIN_HTTP"
    assert not (tmp_path / "data").exists()  # refused before anything was created
    # Explicitly allowed: it serves, with a loud warning.
    allowed = dataclasses.replace(config, console_allow_plain_http=True)
    with caplog.at_level(logging.WARNING, logger="authority.console.server"):
        async with running_authority(allowed) as running, _client() as client:
            url = console_url(running)
            port = int(url.rsplit(":", 1)[1])
            # 0.0.0.0 is no address for a browser: links name this host.
            assert url == f"http://{socket.gethostname()}:{port}"
            response = await client.get(f"http://127.0.0.1:{port}/approvals")
            assert response.status_code == 401
    assert any("CONSOLE WITHOUT TLS" in r.getMessage() for r in caplog.records)


async def test_console_login_needs_a_console(tmp_path: Path, socket_dir: Path) -> None:
    async with running_authority(make_config(tmp_path / "data", socket_dir)) as running:
        err = await rpc_error(
            running.admin().stub.CreateConsoleSignIn(
                pb.CreateConsoleSignInRequest(operator=OPERATOR)
            )
        )
        assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "NO_CONSOLE")


# --- operators by certificate ------------------------------------------------------------------

BOB = "spiffe://example.org/operator/bob"


async def _operator_svid(running: Running, spiffe_id: str, folder: Path, *, admin: bool) -> None:
    """An X.509-SVID for ``spiffe_id`` under an entry marked admin (or not)."""
    await running.admin().stub.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id=spiffe_id,
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{spiffe_id}")],
            admin=admin,
        )
    )
    await running.attested(spiffe_id, folder)


def _cert_client(folder: Path) -> httpx.AsyncClient:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the console's own certificate: not under test here
    context.load_cert_chain(folder / "svid.pem", folder / "svid.key")
    return httpx.AsyncClient(verify=context, follow_redirects=False)


async def test_an_operator_entry_signs_in_with_its_certificate(
    tmp_path: Path, socket_dir: Path
) -> None:
    async with console_authority(tmp_path, socket_dir) as running:
        base = console_url(running)
        await _operator_svid(running, BOB, tmp_path / "bob", admin=True)
        agent = await attest_agent(running, REPORTER, tmp_path / "reporter")
        approval_id = await pending_approval(agent, "t-cert")
        async with _cert_client(tmp_path / "bob") as client, _client() as bare:
            signed = await client.post(f"{base}/signin/certificate", headers={"origin": base})
            assert signed.status_code == 303, signed.text
            cookie = signed.headers["set-cookie"].split(";", 1)[0]
            page = await client.get(f"{base}/approvals", headers={"cookie": cookie})
            assert page.status_code == 200
            assert BOB in page.text
            csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert csrf is not None
            # The session holds only on a connection presenting that certificate.
            stolen = await bare.get(f"{base}/approvals", headers={"cookie": cookie})
            assert stolen.status_code == 401
            done = await client.post(
                f"{base}/approvals/{approval_id}/approve",
                data={"minutes": "5", "csrf": csrf.group(1)},
                headers={"cookie": cookie, "origin": base},
            )
            assert done.status_code == 303
            listed = await running.admin().stub.ListApprovals(pb.ListApprovalsRequest(all=True))
            assert {a.id: a.decided_by for a in listed.approvals}[approval_id] == BOB
            # Revoked, the certificate no longer holds the session.
            await running.admin().stub.Revoke(
                pb.RevokeRequest(kind="subject", target=BOB, reason="left the team")
            )
            after = await client.get(f"{base}/approvals", headers={"cookie": cookie})
            assert after.status_code == 401


async def test_a_certificate_of_an_entry_not_marked_admin_is_refused(
    tmp_path: Path, socket_dir: Path
) -> None:
    async with console_authority(tmp_path, socket_dir) as running:
        base = console_url(running)
        carol = "spiffe://example.org/operator/carol"
        await _operator_svid(running, carol, tmp_path / "carol", admin=False)
        async with _cert_client(tmp_path / "carol") as client:
            refused = await client.post(f"{base}/signin/certificate", headers={"origin": base})
            assert refused.status_code == 401
            assert "set-cookie" not in refused.headers


# --- the command line ----------------------------------------------------------------------------


def test_serve_with_a_console_and_console_login(tmp_path: Path) -> None:
    port = free_port()
    base = f"https://127.0.0.1:{port}"
    with serve_process(tmp_path / "data", "--console-listen", f"127.0.0.1:{port}") as served:
        url = served.cli("console", "login", "--operator", "dana").stdout.strip()
        assert url.startswith(f"{base}/signin?code="), url
        code = url.split("code=", 1)[1]
        with httpx.Client(verify=False, follow_redirects=False) as client:
            form = {"code": code}
            first = client.post(f"{base}/signin", data=form, headers={"origin": base})
            assert first.status_code == 303
            cookie = first.headers["set-cookie"].split(";", 1)[0].split("=", 1)[1]
            again = client.post(f"{base}/signin", data=form, headers={"origin": base})
            assert again.status_code == 401
            out = served.cli("console", "logout", "--operator", "dana").stdout
            assert out.strip() == "dana: 1 sessions ended, 0 unused links dropped"
            cookies = {"cookie": f"__Host-console={cookie}"}
            assert client.get(f"{base}/approvals", headers=cookies).status_code == 401
        log = served.log()
        assert f"console serving: {base}" in log
        assert code not in log
        assert cookie not in log
        refused = served.cli("console", "login", "--operator", "<script>", check=False)
        assert refused.returncode != 0
        assert "operator name" in refused.stderr


def test_serve_refuses_a_plain_http_console_beyond_loopback(tmp_path: Path) -> None:
    socket_dir = short_socket_dir()
    try:
        result = subprocess.run(
            [
                *authority_command(),
                "serve",
                "--data-dir",
                str(tmp_path / "data"),
                "--listen",
                f"127.0.0.1:{free_port()}",
                "--listen-mtls",
                f"127.0.0.1:{free_port()}",
                "--admin-socket",
                str(socket_dir / "admin.sock"),
                "--console-listen",
                f"0.0.0.0:{free_port()}",
                "--console-plain-http",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
    assert result.returncode != 0
    assert "console_allow_plain_http" in result.stderr, result.stderr


# --- the trust domain ----------------------------------------------------------------------------

NODE = "spiffe://example.org/node/node1"


async def test_the_trust_domain_page(tmp_path: Path, socket_dir: Path) -> None:
    from playwright.async_api import async_playwright, expect

    shots = screenshots_dir(tmp_path)
    async with (
        console_authority(tmp_path, socket_dir) as running,
        running_agent(running, socket_dir / "a.sock", tmp_path / "agent", NODE) as agent,
        async_playwright() as pw,
    ):
        workload = "spiffe://example.org/svc/billing"
        created = await running.admin().stub.CreateEntry(
            pb.CreateEntryRequest(
                spiffe_id=workload,
                selectors=[pb.Selector(type="unix", value=f"uid:{os.getuid()}")],
                parent_id=NODE,
            )
        )
        await wait_held(agent, created.id)
        keys = await running.admin().stub.ListAuthorities(pb.ListAuthoritiesRequest())
        browser = await pw.chromium.launch(executable_path=str(_chromium()))
        try:
            page = await (await browser.new_context(ignore_https_errors=True)).new_page()
            await page.goto(await sign_in_link(running))
            await page.click("#signin")
            await page.goto(f"{console_url(running)}/trust")
            main = page.locator("main")
            await expect(main).to_contain_text(NODE)
            await expect(main).to_contain_text(workload)  # its entry, and the SVID it holds
            await expect(main).to_contain_text("last seen 20")
            await expect(main).to_contain_text("join_token")  # an attestor instance
            await expect(main).to_contain_text("successor prepared")  # the rotation schedule
            for key in keys.authorities:
                await expect(main).to_contain_text(key.key_id[:16])
            policy = await running.admin().stub.GetPolicy(pb.GetPolicyRequest())
            await expect(main).to_contain_text(
                f"tests: {policy.tests_passed}/{policy.tests_total} passed"
            )
            # The revocation feed, live: a revocation shows without a reload.
            await running.admin().stub.Revoke(
                pb.RevokeRequest(kind="subject", target=workload, reason="decommissioned")
            )
            await expect(page.locator("#revocations")).to_contain_text(workload, timeout=10_000)
            await expect(page.locator("#revocations")).to_contain_text("decommissioned")
            await page.screenshot(path=shots / "console-trust.png", full_page=True)
        finally:
            await browser.close()
    for shot in sorted(shots.iterdir()):
        publish(shot)


async def test_a_task_trace_names_an_altered_chain(tmp_path: Path, socket_dir: Path) -> None:
    async with console_authority(tmp_path, socket_dir) as running, _client() as client:
        cookie, _ = await _signed_in(running, client)
        base = console_url(running)
        agent = await attest_agent(running, REPORTER, tmp_path / "reporter")
        await agent.token("read", "metrics/prod", "metrics-api", task_id="t-chain")
        page = await client.get(f"{base}/tasks/t-chain", headers={"cookie": cookie})
        assert "chain verified" in page.text
        records = await running.server.authority.audit_records(task_ids=["t-chain"])  # type: ignore[union-attr]
        seq = records[0].seq
        db = sqlite3.connect(running.data_dir / "authority.db")
        with db:
            db.execute("UPDATE audit SET actor = ? WHERE seq = ?", ("spiffe://x/innocent", seq))
        db.close()
        page = await client.get(f"{base}/tasks/t-chain", headers={"cookie": cookie})
        assert "chain verified" not in page.text
        assert f"chain NOT verified: record {seq}: its content was altered" in page.text


async def test_an_operators_sessions_end_from_the_admin_socket(
    tmp_path: Path, socket_dir: Path
) -> None:
    async with console_authority(tmp_path, socket_dir) as running, _client() as client:
        base = console_url(running)
        cookie, _ = await _signed_in(running, client)
        other, _ = await _signed_in(running, client)
        unused = await sign_in_link(running)
        ended = await running.admin().stub.EndConsoleSessions(
            pb.EndConsoleSessionsRequest(operator=OPERATOR)
        )
        assert (ended.sessions, ended.links) == (2, 1)
        for value in (cookie, other):
            response = await client.get(f"{base}/approvals", headers={"cookie": value})
            assert response.status_code == 401
        code = unused.split("code=", 1)[1]
        spent = await client.post(f"{base}/signin", data={"code": code}, headers={"origin": base})
        assert spent.status_code == 401


async def test_the_console_works_without_javascript(tmp_path: Path, socket_dir: Path) -> None:
    from playwright.async_api import async_playwright, expect

    async with console_authority(tmp_path, socket_dir) as running, async_playwright() as pw:
        agent = await attest_agent(running, REPORTER, tmp_path / "reporter")
        browser = await pw.chromium.launch(executable_path=str(_chromium()))
        try:
            context = await browser.new_context(ignore_https_errors=True, java_script_enabled=False)
            page = await context.new_page()
            await page.goto(await sign_in_link(running))
            await page.click("#signin")
            await expect(page.locator("#approvals-list")).to_contain_text("No approval is waiting")
            approval_id = await pending_approval(agent, "t-nojs")
            await page.reload()  # no script: the list is what the server rendered
            await page.locator(f'tr.approval[data-id="{approval_id}"] a.button').click()
            await page.click("#approve")
            await expect(page.locator("#state")).to_have_text("approved")
            await expect(page.locator("#decided-by")).to_have_text(OPERATOR)
        finally:
            await browser.close()


async def test_a_console_port_in_use_is_refused_at_start(tmp_path: Path, socket_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = dataclasses.replace(
            make_config(tmp_path / "data", socket_dir), console_listen=address
        )
        server = AuthorityServer(config)
        with pytest.raises(FailedPrecondition) as refused:
            await server.start()
        await server.stop(grace=0)
    assert refused.value.reason == "ADDRESS_IN_USE"
    assert "console_listen" in str(refused.value)
    assert not (tmp_path / "data").exists()


# --- the console's certificate -------------------------------------------------------------------


def _served_certificate(url: str) -> x509.Certificate:
    host, port = url.removeprefix("https://").rsplit(":", 1)
    pem = ssl.get_server_certificate((host, int(port)))
    return x509.load_pem_x509_certificate(pem.encode())


def _self_signed(folder: Path) -> tuple[Path, Path, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "console.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / "console.pem", folder / "console.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, cert


async def test_the_console_serves_the_certificate_files_it_is_given(
    tmp_path: Path, socket_dir: Path
) -> None:
    cert_path, key_path, cert = _self_signed(tmp_path / "tls")
    async with console_authority(
        tmp_path, socket_dir, console_tls_cert=cert_path, console_tls_key=key_path
    ) as running:
        served = await asyncio.to_thread(_served_certificate, console_url(running))
        assert served == cert
    alone = dataclasses.replace(
        make_config(tmp_path / "data2", socket_dir),
        console_listen="127.0.0.1:0",
        console_tls_cert=cert_path,
    )
    with pytest.raises(FailedPrecondition) as refused:
        await AuthorityServer(alone).start()
    assert refused.value.reason == "CONSOLE_TLS_FILES"


async def test_the_consoles_own_certificate_follows_a_ca_rotation(
    tmp_path: Path, socket_dir: Path
) -> None:
    async with console_authority(tmp_path, socket_dir) as running:
        url = console_url(running)
        before = await asyncio.to_thread(_served_certificate, url)
        uris = before.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [
            "spiffe://example.org/authority"
        ]
        await running.admin().stub.RotateCA(pb.RotateCARequest(immediate=True))
        after = await asyncio.to_thread(_served_certificate, url)
        assert after.serial_number != before.serial_number
        bundle = x509.load_pem_x509_certificates(await running.bundle_pem())
        # Signed by the new key: another root of the bundle than the one before.
        assert _issuer(after, bundle) != _issuer(before, bundle)


def _issuer(cert: x509.Certificate, roots: list[x509.Certificate]) -> x509.Certificate:
    for root in roots:
        try:
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return root
    raise AssertionError("no root of the bundle issued it")
