"""The relying-service library: the verifier, the key source and the gRPC interceptor.

Keys, certificates and tokens are made here (tokens with ``authority.tokens.mint``); the key
source talks to a real gRPC server holding a JWK Set the test changes, and the interceptor runs
on a real ``grpc.aio`` server with mutual TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import random
import secrets
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.backoff import Backoff
from authority.clock import FakeClock
from authority.errors import (
    AuthorityError,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from authority.relying import (
    NoRevocations,
    StaticKeys,
    TaskKeySource,
    TaskTokenInterceptor,
    TaskTokenVerifier,
    bearer_token,
    current_task_token,
    parse_task_jwks,
)
from authority.tokens import Intent, TaskToken, mint, x5t_s256
from tests.security._attack import assert_status, rpc_error
from tests.unit._pki import der, make_ca, make_leaf

TD = "example.org"
ISSUER = f"spiffe://{TD}"
AUDIENCE = "metrics-api"
AGENT = f"spiffe://{TD}/agent/reporter"
OTHER = f"spiffe://{TD}/agent/other"
HELPER = f"spiffe://{TD}/agent/helper"
RUNNER = f"spiffe://{TD}/agent/runner"


def real_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


@dataclass
class Signer:
    """A task-token key of the test's own."""

    kid: str = field(default_factory=lambda: f"kid-{secrets.token_hex(4)}")
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    @property
    def public(self) -> dict[str, ec.EllipticCurvePublicKey]:
        return {self.kid: self.key.public_key()}

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        jwk.update(kid=self.kid, alg="ES256", use="sig")
        return jwk

    def mint(
        self,
        holder_cert_der: bytes,
        *,
        now: dt.datetime,
        action: str = "read",
        resource: str = "metrics/prod",
        audience: str = AUDIENCE,
        issuer: str = ISSUER,
        ttl: dt.timedelta = dt.timedelta(minutes=5),
        actors: tuple[str, ...] = (),
    ) -> TaskToken:
        return mint(
            key=self.key,
            key_id=self.kid,
            algorithm="ES256",
            issuer=issuer,
            subject=AGENT,
            audience=audience,
            now=now,
            expires_at=now + ttl,
            jti=secrets.token_urlsafe(12),
            task_id="task-1",
            intent=Intent(action=action, resource=resource, purpose="weekly report"),
            cnf_x5t=x5t_s256(holder_cert_der),
            actors=actors,
            decision_id="dec-1",
            may_delegate=0,
        )


def jwks(*signers: Signer) -> bytes:
    return json.dumps({"keys": [s.jwk() for s in signers]}).encode()


@dataclass
class Revocations:
    """An in-memory RevocationView."""

    revoked: set[str] = field(default_factory=set)  # jtis, tasks, identities and keys alike
    is_fresh: bool = True
    asked: list[tuple[str, str, str, str, tuple[str, ...], str]] = field(default_factory=list)

    def is_revoked(
        self,
        jti: str,
        task_id: str,
        subject: str,
        holder: str,
        *,
        actors: Iterable[str] = (),
        key_id: str = "",
    ) -> bool:
        self.asked.append((jti, task_id, subject, holder, tuple(actors), key_id))
        return bool(self.revoked & {jti, task_id, subject, holder, *actors, key_id})

    def fresh(self) -> bool:
        return self.is_fresh


HOLDER_CERT = b"the agent's certificate, DER"
OTHER_CERT = b"another workload's certificate, DER"


def reason_of(exc: pytest.ExceptionInfo[AuthorityError]) -> str:
    return exc.value.reason


# --- the verifier --------------------------------------------------------------------------------


@pytest.fixture
def signer() -> Signer:
    return Signer()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(real_now())


@pytest.fixture
def revocations() -> Revocations:
    return Revocations()


@pytest.fixture
def verifier(signer: Signer, clock: FakeClock, revocations: Revocations) -> TaskTokenVerifier:
    return TaskTokenVerifier(
        issuer=TD,
        audience=AUDIENCE,
        keys=StaticKeys(signer.public),
        clock=clock,
        revocations=revocations,
    )


async def test_a_good_token_verifies(
    verifier: TaskTokenVerifier, signer: Signer, clock: FakeClock, revocations: Revocations
) -> None:
    minted = signer.mint(HOLDER_CERT, now=clock.now())
    verified = await verifier.verify(
        minted.token, action="read", resource="metrics/prod/cpu", peer_cert_der=HOLDER_CERT
    )
    assert verified == minted
    assert revocations.asked == [(minted.jti, "task-1", AGENT, AGENT, (), signer.kid)]


async def test_the_issuer_may_be_given_as_the_trust_domain_id(
    signer: Signer, clock: FakeClock
) -> None:
    verifier = TaskTokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, keys=StaticKeys(signer.public), clock=clock
    )
    minted = signer.mint(HOLDER_CERT, now=clock.now())
    assert verifier.issuer == ISSUER
    verified = await verifier.verify(minted.token, action="read", peer_cert_der=HOLDER_CERT)
    assert verified.jti == minted.jti


async def test_another_peer_cannot_use_the_token(
    verifier: TaskTokenVerifier, signer: Signer, clock: FakeClock
) -> None:
    token = signer.mint(HOLDER_CERT, now=clock.now()).token
    with pytest.raises(PermissionDenied) as caught:
        await verifier.verify(token, action="read", peer_cert_der=OTHER_CERT)
    assert caught.value.reason == "TOKEN_CNF_MISMATCH"
    with pytest.raises(Unauthenticated) as unbound:
        await verifier.verify(token, action="read", peer_cert_der=None)
    assert unbound.value.reason == "TOKEN_UNBOUND"


async def test_a_token_for_another_service_is_refused(
    verifier: TaskTokenVerifier, signer: Signer, clock: FakeClock
) -> None:
    token = signer.mint(HOLDER_CERT, now=clock.now(), audience="tickets-api").token
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(token, action="read", peer_cert_der=HOLDER_CERT)
    assert caught.value.reason == "TOKEN_AUDIENCE"


async def test_a_token_of_another_issuer_is_refused(
    verifier: TaskTokenVerifier, signer: Signer, clock: FakeClock
) -> None:
    token = signer.mint(HOLDER_CERT, now=clock.now(), issuer="spiffe://evil.example").token
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(token, action="read", peer_cert_der=HOLDER_CERT)
    assert caught.value.reason == "TOKEN_ISSUER"


@pytest.mark.parametrize(
    ("action", "resource", "reason"),
    [
        ("write", None, "TOKEN_SCOPE"),
        ("deploy", "metrics/prod", "TOKEN_SCOPE"),
        ("read", "metrics/staging", "TOKEN_RESOURCE"),
        ("read", "metrics", "TOKEN_RESOURCE"),
        ("read", "metrics/production", "TOKEN_RESOURCE"),
    ],
)
async def test_the_action_and_resource_must_be_within_the_token(
    verifier: TaskTokenVerifier,
    signer: Signer,
    clock: FakeClock,
    action: str,
    resource: str | None,
    reason: str,
) -> None:
    token = signer.mint(HOLDER_CERT, now=clock.now()).token
    with pytest.raises(PermissionDenied) as caught:
        await verifier.verify(token, action=action, resource=resource, peer_cert_der=HOLDER_CERT)
    assert caught.value.reason == reason


@pytest.mark.parametrize("resource", ["metrics/prod/../secrets", "metrics/prod/%2e%2e", ""])
async def test_a_resource_that_could_climb_out_is_refused(
    verifier: TaskTokenVerifier, signer: Signer, clock: FakeClock, resource: str
) -> None:
    token = signer.mint(HOLDER_CERT, now=clock.now()).token
    with pytest.raises(InvalidArgument) as caught:
        await verifier.verify(token, action="read", resource=resource, peer_cert_der=HOLDER_CERT)
    assert caught.value.reason == "BAD_RESOURCE"


async def test_expiry_has_a_small_leeway(
    verifier: TaskTokenVerifier, signer: Signer, clock: FakeClock
) -> None:
    token = signer.mint(HOLDER_CERT, now=clock.now(), ttl=dt.timedelta(seconds=60)).token
    clock.advance(dt.timedelta(seconds=64))
    assert (await verifier.verify(token, action="read", peer_cert_der=HOLDER_CERT)).token == token
    clock.advance(dt.timedelta(seconds=1))
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(token, action="read", peer_cert_der=HOLDER_CERT)
    assert caught.value.reason == "TOKEN_EXPIRED"


async def test_without_leeway_a_token_ends_at_exp(signer: Signer, clock: FakeClock) -> None:
    strict = TaskTokenVerifier(
        issuer=TD,
        audience=AUDIENCE,
        keys=StaticKeys(signer.public),
        clock=clock,
        leeway=dt.timedelta(0),
    )
    token = signer.mint(HOLDER_CERT, now=clock.now(), ttl=dt.timedelta(seconds=60)).token
    clock.advance(dt.timedelta(seconds=60))
    with pytest.raises(Unauthenticated) as caught:
        await strict.verify(token, action="read", peer_cert_der=HOLDER_CERT)
    assert caught.value.reason == "TOKEN_EXPIRED"


async def test_a_token_from_the_future_is_refused(
    verifier: TaskTokenVerifier, signer: Signer, clock: FakeClock
) -> None:
    token = signer.mint(HOLDER_CERT, now=clock.now() + dt.timedelta(seconds=30)).token
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(token, action="read", peer_cert_der=HOLDER_CERT)
    assert caught.value.reason == "TOKEN_NOT_YET_VALID"


@pytest.mark.parametrize("which", ["jti", "task", "subject", "holder", "first actor", "key"])
async def test_the_revocation_hook_refuses_what_it_names(
    verifier: TaskTokenVerifier,
    signer: Signer,
    clock: FakeClock,
    revocations: Revocations,
    which: str,
) -> None:
    """A token delegated twice (agent -> helper -> runner), refused for any link revoked."""
    minted = signer.mint(RUNNER.encode(), now=clock.now(), actors=(RUNNER, HELPER))
    revocations.revoked.add(
        {
            "jti": minted.jti,
            "task": "task-1",
            "subject": AGENT,
            "holder": RUNNER,
            "first actor": HELPER,
            "key": signer.kid,
        }[which]
    )
    assert verifier.is_revoked(minted)
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(minted.token, action="read", peer_cert_der=RUNNER.encode())
    assert caught.value.reason == "TOKEN_REVOKED"


async def test_a_stale_revocation_feed_fails_closed(
    verifier: TaskTokenVerifier, signer: Signer, clock: FakeClock, revocations: Revocations
) -> None:
    token = signer.mint(HOLDER_CERT, now=clock.now()).token
    revocations.is_fresh = False
    with pytest.raises(Unavailable) as caught:
        await verifier.verify(token, action="read", peer_cert_der=HOLDER_CERT)
    assert caught.value.reason == "REVOCATION_FEED_STALE"
    revocations.is_fresh = True
    assert (await verifier.verify(token, action="read", peer_cert_der=HOLDER_CERT)).token == token


def test_the_default_view_revokes_nothing_and_is_fresh() -> None:
    view = NoRevocations()
    assert view.fresh()
    assert not view.is_revoked("jti", "task", AGENT, AGENT)


async def test_an_oversized_token_is_refused_before_parsing(verifier: TaskTokenVerifier) -> None:
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify("a" * 9000, action="read", peer_cert_der=HOLDER_CERT)
    assert caught.value.reason == "TOKEN_MALFORMED"


@dataclass
class RotatingKeys:
    """A KeySource whose ``refresh_for`` brings in the next key (an authority that rotated)."""

    current: dict[str, ec.EllipticCurvePublicKey]
    upcoming: dict[str, ec.EllipticCurvePublicKey]
    refreshes: list[str] = field(default_factory=list)

    async def keys(self) -> dict[str, ec.EllipticCurvePublicKey]:
        return self.current

    async def refresh_for(self, kid: str) -> dict[str, ec.EllipticCurvePublicKey]:
        self.refreshes.append(kid)
        self.current = {**self.current, **self.upcoming}
        return self.current


async def test_an_unknown_kid_asks_the_key_source_once_more(clock: FakeClock) -> None:
    old, new, stranger = Signer(), Signer(), Signer()
    source = RotatingKeys(old.public, new.public)
    verifier = TaskTokenVerifier(issuer=TD, audience=AUDIENCE, keys=source, clock=clock)
    await verifier.verify(
        old.mint(HOLDER_CERT, now=clock.now()).token, action="read", peer_cert_der=HOLDER_CERT
    )
    assert source.refreshes == []
    rotated = new.mint(HOLDER_CERT, now=clock.now()).token
    await verifier.verify(rotated, action="read", peer_cert_der=HOLDER_CERT)
    assert source.refreshes == [new.kid]
    with pytest.raises(Unauthenticated) as caught:
        await verifier.verify(
            stranger.mint(HOLDER_CERT, now=clock.now()).token,
            action="read",
            peer_cert_der=HOLDER_CERT,
        )
    assert caught.value.reason == "TOKEN_UNKNOWN_KEY"
    assert source.refreshes == [new.kid, stranger.kid]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"audience": ""},
        {"audience": "two names"},
        {"leeway": dt.timedelta(seconds=-1)},
        {"leeway": dt.timedelta(minutes=2)},
        {"issuer": "spiffe://example.org/agent/x"},
        {"issuer": "Example.ORG"},
    ],
)
def test_the_verifier_checks_its_settings(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"issuer": TD, "audience": AUDIENCE, "keys": StaticKeys({})}
    args.update(kwargs)
    with pytest.raises(InvalidArgument):
        TaskTokenVerifier(**args)


# --- the task-token JWK Set ----------------------------------------------------------------------


def test_a_task_jwks_parses_to_keys_by_kid() -> None:
    one, two = Signer(), Signer()
    keys = parse_task_jwks(jwks(one, two))
    assert set(keys) == {one.kid, two.kid}
    assert keys[one.kid].public_numbers() == one.key.public_key().public_numbers()


def _bad_sets() -> Iterator[tuple[str, bytes]]:
    signer = Signer()
    good = signer.jwk()
    private: dict[str, Any] = ECAlgorithm.to_jwk(signer.key, as_dict=True)
    p384 = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(), as_dict=True)
    yield "not json", b"{"
    yield "no keys", b"{}"
    yield "keys not a list", json.dumps({"keys": good}).encode()
    yield "no kid", json.dumps({"keys": [{**good, "kid": None}]}).encode()
    yield "duplicate kid", json.dumps({"keys": [good, good]}).encode()
    yield "alg none", json.dumps({"keys": [{**good, "alg": "none"}]}).encode()
    yield "alg HS256", json.dumps({"keys": [{**good, "alg": "HS256"}]}).encode()
    yield "use enc", json.dumps({"keys": [{**good, "use": "enc"}]}).encode()
    yield "a private key", json.dumps({"keys": [{**private, "kid": "p", "alg": "ES256"}]}).encode()
    yield "curve of another alg", json.dumps({"keys": [{**good, "alg": "ES384"}]}).encode()
    yield "P-384 as ES256", json.dumps({"keys": [{**p384, "kid": "q", "alg": "ES256"}]}).encode()
    yield (
        "not EC",
        json.dumps({"keys": [{"kty": "oct", "k": "AAAA", "kid": "h", "alg": "ES256"}]}).encode(),
    )


BAD_SETS = list(_bad_sets())


@pytest.mark.parametrize(("case", "data"), BAD_SETS, ids=[c for c, _ in BAD_SETS])
def test_a_doubtful_jwks_is_refused_whole(case: str, data: bytes) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_task_jwks(data)
    assert caught.value.reason == "TASK_KEYS_MALFORMED"


# --- the key source, against a real gRPC server --------------------------------------------------


@dataclass
class KeyServer:
    """What a GetTaskKeys endpoint answers, changed by the test; counts the calls."""

    issuer: str
    jwks: bytes
    calls: int = 0
    failing: bool = False

    async def get_task_keys(self, request: pb.GetTaskKeysRequest, context: Any) -> pb.TaskKeys:
        self.calls += 1
        if self.failing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down for the test")
        return pb.TaskKeys(issuer=self.issuer, jwks_json=self.jwks)


@dataclass
class KeyEndpoint:
    state: KeyServer
    stub: pb_grpc.WorkloadAsyncStub


@pytest.fixture
async def key_endpoint(signer: Signer) -> AsyncIterator[KeyEndpoint]:
    state = KeyServer(ISSUER, jwks(signer))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "authority.v1.Workload",
                {
                    "GetTaskKeys": grpc.unary_unary_rpc_method_handler(
                        state.get_task_keys,
                        request_deserializer=pb.GetTaskKeysRequest.FromString,
                        response_serializer=pb.TaskKeys.SerializeToString,
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield KeyEndpoint(state, pb_grpc.WorkloadStub(channel))
    finally:
        await channel.close(None)
        await server.stop(None)


def source_for(endpoint: KeyEndpoint, clock: FakeClock, **kwargs: Any) -> TaskKeySource:
    args: dict[str, Any] = {
        "issuer": TD,
        "clock": clock,
        "refresh_interval": dt.timedelta(minutes=5),
        "min_refresh_interval": dt.timedelta(seconds=30),
    }
    args.update(kwargs)
    return TaskKeySource(endpoint.stub, **args)


async def test_keys_are_fetched_once_and_cached(
    key_endpoint: KeyEndpoint, signer: Signer, clock: FakeClock
) -> None:
    source = source_for(key_endpoint, clock)
    assert set(await source.keys()) == {signer.kid}
    assert set(await source.keys()) == {signer.kid}
    assert key_endpoint.state.calls == 1
    assert source.fetches == 1


async def test_keys_are_refreshed_on_schedule(
    key_endpoint: KeyEndpoint, signer: Signer, clock: FakeClock
) -> None:
    source = source_for(key_endpoint, clock)
    await source.keys()
    successor = Signer()
    key_endpoint.state.jwks = jwks(signer, successor)
    clock.advance(dt.timedelta(minutes=4, seconds=59))
    assert set(await source.keys()) == {signer.kid}
    clock.advance(dt.timedelta(seconds=1))
    assert set(await source.keys()) == {signer.kid, successor.kid}
    assert key_endpoint.state.calls == 2


async def test_an_unknown_kid_refreshes_at_most_once_per_interval(
    key_endpoint: KeyEndpoint, signer: Signer, clock: FakeClock
) -> None:
    source = source_for(key_endpoint, clock)
    await source.keys()
    rotated = Signer()
    key_endpoint.state.jwks = jwks(rotated)  # the old key retired, a new one active
    assert set(await source.refresh_for(rotated.kid)) == {rotated.kid}
    assert key_endpoint.state.calls == 2
    for _ in range(5):  # made-up kids: no call to the authority within the interval
        await source.refresh_for(f"made-up-{secrets.token_hex(4)}")
    assert key_endpoint.state.calls == 2
    clock.advance(dt.timedelta(seconds=30))
    await source.refresh_for("made-up-again")
    assert key_endpoint.state.calls == 3


async def test_a_verifier_follows_a_rotation_through_the_key_source(
    key_endpoint: KeyEndpoint, signer: Signer, clock: FakeClock
) -> None:
    source = source_for(key_endpoint, clock)
    verifier = TaskTokenVerifier(issuer=TD, audience=AUDIENCE, keys=source, clock=clock)
    first = signer.mint(HOLDER_CERT, now=clock.now()).token
    await verifier.verify(first, action="read", peer_cert_der=HOLDER_CERT)
    rotated = Signer()
    key_endpoint.state.jwks = jwks(signer, rotated)
    second = rotated.mint(HOLDER_CERT, now=clock.now()).token
    assert (await verifier.verify(second, action="read", peer_cert_der=HOLDER_CERT)).token == second
    assert key_endpoint.state.calls == 2


async def test_concurrent_unknown_kids_share_one_fetch(
    key_endpoint: KeyEndpoint, signer: Signer, clock: FakeClock
) -> None:
    source = source_for(key_endpoint, clock)
    await source.keys()
    rotated = Signer()
    key_endpoint.state.jwks = jwks(signer, rotated)
    results = await asyncio.gather(*(source.refresh_for(rotated.kid) for _ in range(10)))
    assert all(rotated.kid in keys for keys in results)
    assert key_endpoint.state.calls == 2


async def test_concurrent_first_uses_share_one_fetch(
    key_endpoint: KeyEndpoint, signer: Signer, clock: FakeClock
) -> None:
    source = source_for(key_endpoint, clock)
    results = await asyncio.gather(*(source.keys() for _ in range(10)))
    assert all(set(keys) == {signer.kid} for keys in results)
    assert key_endpoint.state.calls == 1


async def test_a_failed_refresh_keeps_the_keys_held(
    key_endpoint: KeyEndpoint, signer: Signer, clock: FakeClock
) -> None:
    source = source_for(key_endpoint, clock)
    await source.keys()
    key_endpoint.state.failing = True
    clock.advance(dt.timedelta(minutes=6))
    assert set(await source.keys()) == {signer.kid}
    key_endpoint.state.failing = False
    key_endpoint.state.jwks = b"not a JWK Set"
    clock.advance(dt.timedelta(minutes=6))
    assert set(await source.keys()) == {signer.kid}
    assert key_endpoint.state.calls == 3


async def test_no_keys_at_all_is_unavailable(key_endpoint: KeyEndpoint, clock: FakeClock) -> None:
    key_endpoint.state.failing = True
    source = source_for(key_endpoint, clock)
    with pytest.raises(Unavailable) as caught:
        await source.keys()
    assert caught.value.reason == "TASK_KEYS_UNAVAILABLE"
    with pytest.raises(Unavailable):
        await source.keys()  # within a second: not asked again
    assert key_endpoint.state.calls == 1
    key_endpoint.state.failing = False
    clock.advance(dt.timedelta(seconds=1))
    assert await source.keys()


class TopOfWindow(random.Random):
    """Backoff delays at the top of each window: the schedule is known."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def test_an_unreachable_authority_is_retried_with_backoff_and_logged_once(
    key_endpoint: KeyEndpoint, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="authority.relying")
    key_endpoint.state.failing = True
    source = source_for(key_endpoint, clock, backoff=Backoff(1.0, 8.0, rng=TopOfWindow()))
    calls = []
    for step in [0.0, 0.9, 0.1, 1.9, 0.1, 3.9, 0.1]:  # waits of 1 s, 2 s, 4 s between calls
        clock.advance(dt.timedelta(seconds=step))
        with pytest.raises(Unavailable):
            await source.keys()
        calls.append(key_endpoint.state.calls)
    assert calls == [1, 1, 2, 2, 3, 3, 4]
    key_endpoint.state.failing = False
    clock.advance(dt.timedelta(seconds=8))
    assert await source.keys()
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in said] == [logging.WARNING, logging.INFO, logging.INFO]
    assert said[0][1].startswith("task-token keys from the authority lost: periodic refresh: ")
    assert "UNAVAILABLE: down for the test" in said[0][1]
    assert said[1][1] == "task-token keys from the authority restored after 15s"
    assert said[2][1].startswith("task-token keys fetched")


async def test_with_keys_held_a_failing_authority_is_asked_no_more_than_the_interval(
    key_endpoint: KeyEndpoint, signer: Signer, clock: FakeClock
) -> None:
    source = source_for(key_endpoint, clock, backoff=Backoff(1.0, 8.0, rng=TopOfWindow()))
    await source.keys()
    key_endpoint.state.failing = True
    clock.advance(dt.timedelta(minutes=5))
    for _ in range(3):
        assert set(await source.keys()) == {signer.kid}  # the keys held still serve
        clock.advance(dt.timedelta(seconds=10))
    assert key_endpoint.state.calls == 2  # the backoff is short, the interval is not
    clock.advance(dt.timedelta(seconds=1))
    await source.keys()
    assert key_endpoint.state.calls == 3


async def test_keys_of_another_trust_domain_are_refused(
    key_endpoint: KeyEndpoint, clock: FakeClock
) -> None:
    key_endpoint.state.issuer = "spiffe://evil.example"
    source = source_for(key_endpoint, clock)
    with pytest.raises(Unavailable) as caught:
        await source.keys()
    assert caught.value.reason == "TASK_KEYS_UNAVAILABLE"


def test_the_key_source_checks_its_intervals(key_endpoint: KeyEndpoint, clock: FakeClock) -> None:
    with pytest.raises(InvalidArgument):
        source_for(
            key_endpoint,
            clock,
            refresh_interval=dt.timedelta(seconds=10),
            min_refresh_interval=dt.timedelta(seconds=30),
        )


# --- the interceptor, on a real server with mutual TLS -------------------------------------------

READ = "/test.Metrics/Read"
WATCH = "/test.Metrics/Watch"
UPLOAD = "/test.Metrics/Upload"
CHAT = "/test.Metrics/Chat"
SYNC = "/test.Metrics/Sync"
HEALTH = "/test.Metrics/Health"
SECRET = "/test.Metrics/Secret"


def _decode(request: bytes) -> str:
    return request.decode()


RULES: dict[str, tuple[str, Any]] = {
    READ: ("read", _decode),
    WATCH: ("read", None),
    UPLOAD: ("write", _decode),
    CHAT: ("read", _decode),
    SYNC: ("read", None),
}


def metrics_service() -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    async def read(request: bytes, context: Any) -> bytes:
        token = current_task_token()
        return json.dumps({"jti": token.jti, "holder": token.holder}).encode()

    async def watch(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(3):
            yield f"{current_task_token().jti}:{i}".encode()

    async def upload(requests: AsyncIterator[bytes], context: Any) -> bytes:
        return b",".join([r async for r in requests])

    async def chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request + b" ok"

    def sync(request: bytes, context: Any) -> bytes:
        return b"sync"

    async def health(request: bytes, context: Any) -> bytes:
        return b"serving"

    async def secret(request: bytes, context: Any) -> bytes:
        return b"the crown jewels"

    return grpc.method_handlers_generic_handler(
        "test.Metrics",
        {
            "Read": grpc.unary_unary_rpc_method_handler(read),
            "Watch": grpc.unary_stream_rpc_method_handler(watch),
            "Upload": grpc.stream_unary_rpc_method_handler(upload),
            "Chat": grpc.stream_stream_rpc_method_handler(chat),
            "Sync": grpc.unary_unary_rpc_method_handler(sync),
            "Health": grpc.unary_unary_rpc_method_handler(health),
            "Secret": grpc.unary_unary_rpc_method_handler(secret),
        },
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Peer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def der(self) -> bytes:
        return der(self.cert)


@dataclass
class Relying:
    """A relying service on 127.0.0.1: mutual TLS on ``port``, plaintext on ``plain_port``."""

    port: int
    plain_port: int
    ca_pem: bytes
    agent: Peer
    other: Peer
    revocations: Revocations
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self, peer: Peer | None) -> Raw:
        """A channel presenting ``peer``'s certificate (plaintext for None); closed at the end."""
        if peer is None:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.plain_port}")
        else:
            creds = grpc.ssl_channel_credentials(self.ca_pem, _key_pem(peer.key), _pem(peer.cert))
            channel = grpc.aio.secure_channel(f"127.0.0.1:{self.port}", creds)
        self.channels.append(channel)
        return Raw(channel)


@dataclass
class Raw:
    """Calls carrying raw bytes, on one channel."""

    channel: grpc.aio.Channel

    def unary_unary(self, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
        return self.channel.unary_unary(method, None, None)

    def unary_stream(self, method: str) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
        return self.channel.unary_stream(method, None, None)

    def stream_unary(self, method: str) -> grpc.aio.StreamUnaryMultiCallable[bytes, bytes]:
        return self.channel.stream_unary(method, None, None)

    def stream_stream(self, method: str) -> grpc.aio.StreamStreamMultiCallable[bytes, bytes]:
        return self.channel.stream_stream(method, None, None)


def _peer(ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey], spiffe_id: str) -> Peer:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = make_leaf(
        ca,
        key.public_key(),
        uris=(spiffe_id,),
        not_before=now - dt.timedelta(minutes=1),
        not_after=now + dt.timedelta(hours=1),
    )
    return Peer(cert, key)


def _server_cert(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(f"spiffe://{TD}/svc/metrics"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca[1], hashes.SHA256())
    )
    return cert, key


@pytest.fixture
async def relying(signer: Signer, revocations: Revocations) -> AsyncIterator[Relying]:
    now = dt.datetime.now(dt.UTC)
    ca = make_ca(not_before=now - dt.timedelta(hours=1), not_after=now + dt.timedelta(hours=2))
    server_cert, server_key = _server_cert(ca)
    verifier = TaskTokenVerifier(
        issuer=TD, audience=AUDIENCE, keys=StaticKeys(signer.public), revocations=revocations
    )
    server = grpc.aio.server(interceptors=[TaskTokenInterceptor(verifier, RULES, public=[HEALTH])])
    server.add_generic_rpc_handlers((metrics_service(),))
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(_key_pem(server_key), _pem(server_cert))],
            root_certificates=_pem(ca[0]),
            require_client_auth=True,
        ),
    )
    plain_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    service = Relying(
        port, plain_port, _pem(ca[0]), _peer(ca, AGENT), _peer(ca, OTHER), revocations
    )
    try:
        yield service
    finally:
        for channel in service.channels:
            await channel.close(None)
        await server.stop(None)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_the_interceptor_admits_the_holder_and_hands_the_token_on(
    relying: Relying, signer: Signer
) -> None:
    minted = signer.mint(relying.agent.der, now=real_now())
    channel = relying.channel(relying.agent)
    reply = await channel.unary_unary(READ)(b"metrics/prod/cpu", metadata=bearer(minted.token))
    assert json.loads(reply) == {"jti": minted.jti, "holder": AGENT}


async def test_a_streamed_response_sees_the_token(relying: Relying, signer: Signer) -> None:
    minted = signer.mint(relying.agent.der, now=real_now())
    call = relying.channel(relying.agent).unary_stream(WATCH)(b"", metadata=bearer(minted.token))
    assert [item async for item in call] == [f"{minted.jti}:{i}".encode() for i in range(3)]


async def test_a_streamed_request_is_checked_message_by_message(
    relying: Relying, signer: Signer
) -> None:
    token = signer.mint(relying.agent.der, now=real_now(), action="write").token
    upload = relying.channel(relying.agent).stream_unary(UPLOAD)

    async def messages(*names: bytes) -> AsyncIterator[bytes]:
        for name in names:
            yield name

    reply = await upload(messages(b"metrics/prod/a", b"metrics/prod/b"), metadata=bearer(token))
    assert reply == b"metrics/prod/a,metrics/prod/b"
    err = await rpc_error(
        upload(messages(b"metrics/prod/a", b"metrics/staging/x"), metadata=bearer(token))
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_RESOURCE")


async def test_a_bidirectional_stream_stops_at_a_resource_outside(
    relying: Relying, signer: Signer
) -> None:
    token = signer.mint(relying.agent.der, now=real_now()).token
    chat = relying.channel(relying.agent).stream_stream(CHAT)

    async def messages() -> AsyncIterator[bytes]:
        yield b"metrics/prod/a"
        yield b"deploy/production"

    received: list[bytes] = []

    async def converse() -> None:
        async for item in chat(messages(), metadata=bearer(token)):
            received.append(item)

    err = await rpc_error(converse())
    assert received == [b"metrics/prod/a ok"]
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_RESOURCE")


async def test_another_peer_presenting_the_token_is_refused(
    relying: Relying, signer: Signer
) -> None:
    token = signer.mint(relying.agent.der, now=real_now()).token
    read = relying.channel(relying.other).unary_unary(READ)
    err = await rpc_error(read(b"metrics/prod", metadata=bearer(token)))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_CNF_MISMATCH")


async def test_without_mutual_tls_a_token_is_unbound(relying: Relying, signer: Signer) -> None:
    token = signer.mint(relying.agent.der, now=real_now()).token
    read = relying.channel(None).unary_unary(READ)
    err = await rpc_error(read(b"metrics/prod", metadata=bearer(token)))
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_UNBOUND")


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "TOKEN_MISSING"),
        ((("authorization", "Basic dXNlcjpwdw=="),), "TOKEN_MALFORMED"),
        ((("authorization", "Bearer "),), "TOKEN_MALFORMED"),
        ((("authorization", "Bearer a.b.c"), ("authorization", "Bearer d.e.f")), "TOKEN_MALFORMED"),
        ((("authorization", "Bearer not-a-token"),), "TOKEN_MALFORMED"),
    ],
)
async def test_a_missing_or_garbled_token_is_unauthenticated(
    relying: Relying, metadata: tuple[tuple[str, str], ...], reason: str
) -> None:
    read = relying.channel(relying.agent).unary_unary(READ)
    err = await rpc_error(read(b"metrics/prod", metadata=metadata))
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, reason)


async def test_scope_and_resource_are_enforced_per_method(relying: Relying, signer: Signer) -> None:
    channel = relying.channel(relying.agent)
    read_token = signer.mint(relying.agent.der, now=real_now()).token
    err = await rpc_error(
        channel.stream_unary(UPLOAD)(_one(b"metrics/prod"), metadata=bearer(read_token))
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_SCOPE")
    err = await rpc_error(
        channel.unary_unary(READ)(b"metrics/staging", metadata=bearer(read_token))
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_RESOURCE")
    err = await rpc_error(
        channel.unary_unary(READ)(b"metrics/prod/../x", metadata=bearer(read_token))
    )
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "BAD_RESOURCE")


async def _one(item: bytes) -> AsyncIterator[bytes]:
    yield item


async def test_methods_outside_the_map_are_refused_unless_public(
    relying: Relying, signer: Signer
) -> None:
    channel = relying.channel(relying.agent)
    token = signer.mint(relying.agent.der, now=real_now()).token
    err = await rpc_error(channel.unary_unary(SECRET)(b"", metadata=bearer(token)))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")
    assert await channel.unary_unary(HEALTH)(b"") == b"serving"
    err = await rpc_error(channel.unary_unary("/test.Metrics/Nope")(b""))
    assert err.code() is grpc.StatusCode.UNIMPLEMENTED


async def test_a_sync_handler_is_refused_not_run_unguarded(
    relying: Relying, signer: Signer
) -> None:
    token = signer.mint(relying.agent.der, now=real_now()).token
    sync = relying.channel(relying.agent).unary_unary(SYNC)
    err = await rpc_error(sync(b"", metadata=bearer(token)))
    assert_status(err, grpc.StatusCode.INTERNAL, "HANDLER_NOT_ASYNC")


async def test_a_stale_feed_makes_the_service_unavailable(relying: Relying, signer: Signer) -> None:
    token = signer.mint(relying.agent.der, now=real_now()).token
    relying.revocations.is_fresh = False
    read = relying.channel(relying.agent).unary_unary(READ)
    err = await rpc_error(read(b"metrics/prod", metadata=bearer(token)))
    assert_status(err, grpc.StatusCode.UNAVAILABLE, "REVOCATION_FEED_STALE")


async def test_tokens_never_reach_the_log(
    relying: Relying, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="authority.relying")
    minted = signer.mint(relying.agent.der, now=real_now())
    good = relying.channel(relying.agent).unary_unary(READ)
    await good(b"metrics/prod", metadata=bearer(minted.token))
    stolen = relying.channel(relying.other).unary_unary(READ)
    await rpc_error(stolen(b"metrics/prod", metadata=bearer(minted.token)))
    assert minted.jti in caplog.text  # accepted: logged by jti
    assert "TOKEN_CNF_MISMATCH" in caplog.text  # refused: logged by reason and digest
    assert minted.token not in caplog.text
    assert minted.token.split(".")[2] not in caplog.text


def test_outside_a_protected_call_there_is_no_token() -> None:
    with pytest.raises(Unauthenticated) as caught:
        current_task_token()
    assert caught.value.reason == "TOKEN_MISSING"


def test_bearer_token_takes_exactly_one_bearer_header() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("x-other", "v"), ("authorization", b"Bearer abc")]) == "abc"


@pytest.mark.parametrize(
    ("methods", "public"),
    [
        ({"Read": ("read", None)}, ()),
        ({"/test.Metrics/": ("read", None)}, ()),
        ({"/test.Metrics/Read/x": ("read", None)}, ()),
        ({READ: ("Read All", None)}, ()),
        ({READ: ("read", None)}, (READ,)),
        ({}, ("not-a-method",)),
    ],
)
def test_the_interceptor_checks_its_rules(
    verifier: TaskTokenVerifier, methods: dict[str, tuple[str, Any]], public: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidArgument):
        TaskTokenInterceptor(verifier, methods, public=public)


def test_the_relying_side_is_importable_from_authority_client() -> None:
    """The issue names ``authority.client`` as the relying services' library."""
    import authority.client as client
    import authority.relying as relying
    import authority.watch as watch

    assert client.TaskTokenVerifier is relying.TaskTokenVerifier
    assert client.TaskKeySource is relying.TaskKeySource
    assert client.TaskTokenInterceptor is relying.TaskTokenInterceptor
    assert client.RevocationWatcher is watch.RevocationWatcher
