"""The ASGI middleware end to end: a Starlette service behind ``TaskTokenMiddleware``, served
over real TLS by ``authority.httpserve`` with its own SVID, and a real ``authority serve``
minting the tokens (Exchange over mutual TLS), publishing the task keys and the revocation feed.

Every refusal the middleware makes is tried here, each over a real TLS connection."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route as StarletteRoute

from authority._pb import authority_v1_authority_pb2 as pb
from authority.asgi import Route, TaskTokenMiddleware
from authority.client import (
    AdminClient,
    RevocationWatcher,
    SvidFiles,
    TaskKeySource,
    TaskTokenVerifier,
    WorkloadClient,
    der_chain_to_pem,
)
from authority.httpserve import TlsIdentity, client_context, serve
from authority.tokens import x5t_s256
from tests.helpers import ServeProcess

TD = "example.org"
ISSUER = f"spiffe://{TD}"
AUDIENCE = "metrics-api"
POLICIES = Path(__file__).resolve().parents[2] / "examples" / "policies"

RULES = [
    Route("GET", "/metrics/{env}/{name}", "read", "metrics/{env}/{name}"),
    Route("POST", "/metrics/{env}/{name}", "write", "metrics/{env}/{name}"),
]


class ShiftedClock:
    """The system clock moved by ``offset``: the service's view of time, for expiry."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def now(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - a condition of another component, polled
            await asyncio.sleep(0.02)
    assert predicate(), what


@dataclass
class Holder:
    """An attested workload: its SVID folder and a client holding its SVID."""

    spiffe_id: str
    folder: Path
    client: WorkloadClient

    def credentials(self) -> tuple[bytes, bytes, bytes]:
        return SvidFiles(self.folder).read()

    @property
    def cert_der(self) -> bytes:
        chain = self.credentials()[0]
        return x509.load_pem_x509_certificates(chain)[0].public_bytes(Encoding.DER)

    async def token(self, action: str, resource: str, audience: str = AUDIENCE) -> str:
        reply = await self.client.exchange(
            pb.ExchangeRequest(
                intent=pb.Intent(action=action, resource=resource, purpose="test"),
                audience=audience,
                context=pb.AuditContext(prompt_sha256="ab" * 32, model="test-model"),
            )
        )
        assert reply.WhichOneof("result") == "token", reply
        return reply.token.token


@dataclass
class Service:
    url: str
    bundle: bytes
    clock: ShiftedClock
    watcher: RevocationWatcher
    admin: AdminClient

    @contextlib.asynccontextmanager
    async def as_(self, holder: Holder | None) -> AsyncIterator[httpx2.AsyncClient]:
        """An HTTPS client presenting ``holder``'s SVID (None: no client certificate)."""
        if holder is None:
            import ssl

            context = ssl.create_default_context(cadata=self.bundle.decode())
            context.check_hostname = False
        else:
            chain, key, bundle = holder.credentials()
            context = client_context(chain, key, bundle)
        async with httpx2.AsyncClient(base_url=self.url, verify=context, timeout=10) as http:
            yield http


async def attest(
    served: ServeProcess, admin: AdminClient, bundle: bytes, name: str, folder: Path
) -> Holder:
    spiffe_id = f"{ISSUER}/{name}"
    created = await admin.stub.CreateJoinToken(pb.CreateJoinTokenRequest(spiffe_id=spiffe_id))
    async with WorkloadClient(served.address, bundle) as anonymous:
        await anonymous.attest_to_folder("join_token", created.token.encode(), folder)
    return Holder(spiffe_id, folder, WorkloadClient.from_svid_dir(served.address, folder))


def answer(request: Request) -> JSONResponse:
    token = request.state.task_token
    return JSONResponse(
        {
            "jti": token.jti,
            "holder": token.holder,
            "action": token.intent.action,
            "resource": token.intent.resource,
            "path": request.url.path,
        }
    )


def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


APP = Starlette(
    routes=[
        StarletteRoute("/metrics/{env}/{name}", answer, methods=["GET", "POST"]),
        StarletteRoute("/healthz", health),
        StarletteRoute("/undeclared", health),
    ]
)


@dataclass
class World:
    service: Service
    reporter: Holder
    other: Holder


@pytest.fixture
async def world(served: ServeProcess, tmp_path: Path) -> AsyncIterator[World]:
    async with AdminClient(served.admin_socket) as admin:
        files = [
            pb.PolicyFile(name=name, content=(POLICIES / name).read_text())
            for name in ("agents.cedar", "agents.tests.json")
        ]
        await admin.stub.LoadPolicy(pb.LoadPolicyRequest(files=files))
        bundle = der_chain_to_pem(
            list((await admin.stub.GetBundle(pb.GetBundleRequest())).x509_authorities)
        )
        reporter = await attest(served, admin, bundle, "agent/reporter", tmp_path / "reporter")
        other = await attest(served, admin, bundle, "agent/other", tmp_path / "other")
        svc = await attest(served, admin, bundle, "svc/metrics-api", tmp_path / "svc")
        chain, key, _ = svc.credentials()
        clock = ShiftedClock()
        watcher = RevocationWatcher(svc.client.watch_revocations)
        verifier = TaskTokenVerifier(
            issuer=ISSUER,
            audience=AUDIENCE,
            keys=TaskKeySource(svc.client, issuer=TD),
            clock=clock,
            revocations=watcher,
        )
        app = TaskTokenMiddleware(APP, verifier, RULES, public=["/healthz"])
        watcher.start()
        try:
            await watcher.wait_synced()
            async with serve(app, TlsIdentity(chain, key, bundle)) as server:
                yield World(Service(server.url, bundle, clock, watcher, admin), reporter, other)
        finally:
            await watcher.close()
            for holder in (reporter, other, svc):
                await holder.client.close()


def refusal_of(response: httpx2.Response) -> tuple[int, str, str]:
    """(status, WWW-Authenticate, reason) of a refused request."""
    body: dict[str, Any] = json.loads(response.content)
    assert response.headers["content-type"] == "application/json"
    return response.status_code, response.headers.get("www-authenticate", ""), body["reason"]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_a_token_for_the_route_is_admitted_and_the_handler_sees_it(world: World) -> None:
    token = await world.reporter.token("read", "metrics/prod")
    async with world.service.as_(world.reporter) as http:
        response = await http.get("/metrics/prod/cpu", headers=bearer(token))
        assert response.status_code == 200, response.text
        assert response.json() == {
            "jti": json.loads(_payload(token))["jti"],
            "holder": world.reporter.spiffe_id,
            "action": "read",
            "resource": "metrics/prod",
            "path": "/metrics/prod/cpu",
        }
        # Public routes pass without a token; the token's cnf is the connection's certificate.
        assert (await http.get("/healthz")).json() == {"ok": True}
    assert json.loads(_payload(token))["cnf"] == {"x5t#S256": x5t_s256(world.reporter.cert_der)}


def _payload(token: str) -> str:
    import base64

    part = token.split(".")[1]
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)).decode()


async def test_refusals_missing_wrong_action_outside_and_unknown_routes(world: World) -> None:
    token = await world.reporter.token("read", "metrics/prod")
    async with world.service.as_(world.reporter) as http:
        status, challenge, reason = refusal_of(await http.get("/metrics/prod/cpu"))
        assert (status, reason) == (401, "TOKEN_MISSING")
        assert challenge == f'Bearer realm="{AUDIENCE}"'  # RFC 6750 §3.1: no error code

        response = await http.get("/metrics/prod/cpu", headers={"authorization": "Basic eA=="})
        status, challenge, reason = refusal_of(response)
        assert (status, reason) == (401, "TOKEN_MALFORMED")
        assert 'error="invalid_token"' in challenge

        status, challenge, reason = refusal_of(
            await http.post("/metrics/prod/cpu", headers=bearer(token))
        )
        assert (status, reason) == (403, "TOKEN_SCOPE")
        assert challenge.startswith(f'Bearer realm="{AUDIENCE}", error="insufficient_scope"')

        status, challenge, reason = refusal_of(
            await http.get("/metrics/staging/cpu", headers=bearer(token))
        )
        assert (status, reason) == (403, "TOKEN_RESOURCE")
        assert 'error="insufficient_scope"' in challenge

        status, challenge, reason = refusal_of(
            await http.get("/metrics/prod/caf%C3%A9", headers=bearer(token))
        )
        assert (status, reason) == (400, "BAD_RESOURCE")
        assert 'error="invalid_request"' in challenge

        # A route the service has but did not declare: refused, even with a valid token.
        status, challenge, reason = refusal_of(await http.get("/undeclared", headers=bearer(token)))
        assert (status, reason) == (403, "ROUTE_NOT_ALLOWED")
        status, _, reason = refusal_of(
            await http.delete("/metrics/prod/cpu", headers=bearer(token))
        )
        assert (status, reason) == (403, "ROUTE_NOT_ALLOWED")

        # A token for another service.
        elsewhere = await world.reporter.token("read", "metrics/prod", audience="other-api")
        status, _, reason = refusal_of(
            await http.get("/metrics/prod/cpu", headers=bearer(elsewhere))
        )
        assert (status, reason) == (401, "TOKEN_AUDIENCE")

        # And the valid call still passes on the same connection.
        assert (await http.get("/metrics/prod/cpu", headers=bearer(token))).status_code == 200


async def test_a_token_is_refused_over_another_clients_connection_or_without_a_certificate(
    world: World,
) -> None:
    token = await world.reporter.token("read", "metrics/prod")
    async with world.service.as_(world.other) as http:
        status, challenge, reason = refusal_of(
            await http.get("/metrics/prod/cpu", headers=bearer(token))
        )
        assert (status, reason) == (401, "TOKEN_CNF_MISMATCH")  # RFC 8705 §3
        assert 'error="invalid_token"' in challenge
        # The other agent's own token works on its own connection.
        own = await world.other.token("read", "metrics/prod")
        assert (await http.get("/metrics/prod/cpu", headers=bearer(own))).status_code == 200
    async with world.service.as_(None) as http:
        status, challenge, reason = refusal_of(
            await http.get("/metrics/prod/cpu", headers=bearer(token))
        )
        assert (status, reason) == (401, "TOKEN_UNBOUND")
        assert 'error="invalid_token"' in challenge
        assert (await http.get("/healthz")).status_code == 200  # public needs no certificate


async def test_an_expired_token_is_refused(world: World) -> None:
    token = await world.reporter.token("read", "metrics/prod")
    expires = json.loads(_payload(token))["exp"]
    async with world.service.as_(world.reporter) as http:
        assert (await http.get("/metrics/prod/cpu", headers=bearer(token))).status_code == 200
        # The service's clock past the token's expiry and the verifier's leeway (5 s).
        world.service.clock.offset = dt.timedelta(
            seconds=expires - dt.datetime.now(dt.UTC).timestamp() + 6
        )
        status, challenge, reason = refusal_of(
            await http.get("/metrics/prod/cpu", headers=bearer(token))
        )
        assert (status, reason) == (401, "TOKEN_EXPIRED")
        assert 'error="invalid_token"' in challenge


async def test_a_revoked_token_is_refused_within_a_second(world: World) -> None:
    token = await world.reporter.token("read", "metrics/prod")
    kept = await world.reporter.token("read", "metrics/prod")
    jti = json.loads(_payload(token))["jti"]
    async with world.service.as_(world.reporter) as http:
        assert (await http.get("/metrics/prod/cpu", headers=bearer(token))).status_code == 200
        await world.service.admin.stub.Revoke(
            pb.RevokeRequest(kind="jti", target=jti, reason="test")
        )
        revoked_at = asyncio.get_running_loop().time()
        while True:
            response = await http.get("/metrics/prod/cpu", headers=bearer(token))
            if response.status_code != 200:
                break
            assert asyncio.get_running_loop().time() - revoked_at < 1.0, "still admitted after 1 s"
            await asyncio.sleep(0.02)
        status, challenge, reason = refusal_of(response)
        assert (status, reason) == (401, "TOKEN_REVOKED")
        assert 'error="invalid_token"' in challenge
        assert asyncio.get_running_loop().time() - revoked_at < 1.0
        # Another token of the same agent is untouched.
        assert (await http.get("/metrics/prod/cpu", headers=bearer(kept))).status_code == 200


async def test_a_stale_revocation_feed_fails_closed(world: World) -> None:
    token = await world.reporter.token("read", "metrics/prod")
    async with world.service.as_(world.reporter) as http:
        assert (await http.get("/metrics/prod/cpu", headers=bearer(token))).status_code == 200
        await world.service.watcher.close()  # the feed stops
        await wait_for(lambda: not world.service.watcher.fresh(), "the feed to go stale")
        response = await http.get("/metrics/prod/cpu", headers=bearer(token))
        status, _, reason = refusal_of(response)
        assert (status, reason) == (503, "REVOCATION_FEED_STALE")
        assert response.headers["retry-after"] == "1"
        assert (await http.get("/healthz")).status_code == 200
        # Fed again, the service admits again.
        world.service.watcher.start()
        await wait_for(world.service.watcher.fresh, "the feed to come back")
        assert (await http.get("/metrics/prod/cpu", headers=bearer(token))).status_code == 200
