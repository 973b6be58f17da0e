"""Attacks on task tokens, one test each, against the real server and a real relying service.

Each test asserts the precise refusal (status and ``authority-reason``) and, where the authority
is asked for something, that it issued nothing: no task-token row and no issuance record.
The example policy is loaded (metric reads may be delegated once; production deploys need an
operator's approval); agents are attested with join tokens."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from authority._pb import authority_v1_authority_pb2 as pb
from authority.clock import FakeClock
from authority.relying import parse_task_jwks
from tests.helpers import Running
from tests.helpers import test_config as config_for
from tests.integration.test_exchange import (
    READ_METRICS,
    WRITE_METRICS,
    Agent,
    RelyingService,
    attest_agent,
    claims_of,
    issued_tokens,
    load_agents_policy,
    relying_service,
)
from tests.security._attack import assert_status, rpc_error, running_with_clock

TD = "example.org"


@dataclass
class World:
    running: Running
    reporter: Agent  # the agent whose tokens are attacked
    helper: Agent  # a workload it may delegate metric reads to
    other: Agent  # another workload of the trust domain
    service: RelyingService  # metrics-api
    clock: FakeClock | None = None

    @property
    def issued(self) -> int:
        return issued_tokens(self.running.data_dir)


@contextlib.asynccontextmanager
async def world_of(
    running: Running, folder: Path, clock: FakeClock | None = None
) -> AsyncIterator[World]:
    await load_agents_policy(running)
    reporter = await attest_agent(running, f"spiffe://{TD}/agent/reporter", folder / "reporter")
    helper = await attest_agent(running, f"spiffe://{TD}/agent/helper", folder / "helper")
    other = await attest_agent(running, f"spiffe://{TD}/agent/other", folder / "other")
    async with relying_service(running, folder / "metrics-api", clock=clock) as service:
        yield World(running, reporter, helper, other, service, clock)


@pytest.fixture
async def world(authority: Running, tmp_path: Path) -> AsyncIterator[World]:
    async with world_of(authority, tmp_path) as built:
        yield built


@pytest.fixture
async def clocked_world(tmp_path: Path, socket_dir: Path) -> AsyncIterator[World]:
    """The authority and the relying service on one clock the test moves (started at the real
    time, so that TLS peers accept the certificates); pending approvals wait one minute."""
    clock = FakeClock(dt.datetime.now(dt.UTC))
    config = config_for(tmp_path / "data", socket_dir, approval_wait=dt.timedelta(minutes=1))
    async with (
        running_with_clock(config, clock) as running,
        world_of(running, tmp_path, clock) as built,
    ):
        yield built


# --- forging -------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Mapping[str, Any]) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def with_header(token: str, **changes: Any) -> str:
    """``token`` with its header changed, payload and signature kept."""
    header = {**jwt.get_unverified_header(token), **changes}
    _, payload, signature = token.split(".")
    return f"{segment(header)}.{payload}.{signature}"


async def task_public_key(world: World) -> tuple[str, ec.EllipticCurvePublicKey]:
    """The active task-token key as anyone can fetch it (GetTaskKeys needs no SVID)."""
    reply = await world.reporter.client.tls_stub.GetTaskKeys(pb.GetTaskKeysRequest())
    keys = parse_task_jwks(reply.jwks_json)
    assert len(keys) >= 1
    kid = next(iter(keys))
    return kid, keys[kid]


async def prod_approval(world: World, *, task_id: str = "", grant_seconds: int = 0) -> str:
    """A production deploy that an operator approved (``grant_seconds`` 0: still pending)."""
    pending = await world.reporter.exchange(
        "deploy", "deploy/production", "deployer", task_id=task_id
    )
    assert pending.WhichOneof("result") == "pending"
    if grant_seconds:
        approved = await world.running.admin().stub.Approve(
            pb.ApproveRequest(id=pending.pending.id, grant_seconds=grant_seconds)
        )
        assert approved.state == "approved"
    return pending.pending.id


# --- at the relying service ----------------------------------------------------------------------


async def test_a_token_replayed_over_another_workloads_connection_is_refused(
    world: World,
) -> None:
    token = await world.reporter.token("read", "metrics/prod", "metrics-api")
    async with world.service.channel(world.other) as thief:
        err = await thief.refused(READ_METRICS, "metrics/prod", token)
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_CNF_MISMATCH")
    async with world.service.channel(world.reporter) as holder:  # the holder itself may
        assert (await holder.call(READ_METRICS, "metrics/prod", token))["holder"] == (
            world.reporter.spiffe_id
        )


async def test_a_token_for_another_audience_is_refused(world: World) -> None:
    token = await world.reporter.token("read", "metrics/prod", "dashboard-api")
    async with world.service.channel(world.reporter) as channel:
        err = await channel.refused(READ_METRICS, "metrics/prod", token)
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_AUDIENCE")


async def test_a_read_token_cannot_write(world: World) -> None:
    token = await world.reporter.token("read", "metrics/prod", "metrics-api")
    async with world.service.channel(world.reporter) as channel:
        err = await channel.refused(WRITE_METRICS, "metrics/prod", token)
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_SCOPE")


async def test_a_token_cannot_reach_beyond_its_resource(world: World) -> None:
    token = await world.reporter.token("read", "metrics/prod", "metrics-api")
    async with world.service.channel(world.reporter) as channel:
        outside = await channel.refused(READ_METRICS, "metrics/staging", token)
        climbing = await channel.refused(READ_METRICS, "metrics/prod/../staging", token)
    assert_status(outside, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_RESOURCE")
    assert_status(climbing, grpc.StatusCode.INVALID_ARGUMENT, "BAD_RESOURCE")


async def test_a_changed_claim_breaks_the_signature(world: World) -> None:
    token = await world.reporter.token("read", "metrics/prod", "metrics-api")
    header, _, signature = token.split(".")
    widened = {**claims_of(token), "scope": "write", "tctx": {}}
    widened["tctx"] = {**claims_of(token)["tctx"], "action": "write"}
    forged = f"{header}.{segment(widened)}.{signature}"
    async with world.service.channel(world.reporter) as channel:
        err = await channel.refused(WRITE_METRICS, "metrics/prod", forged)
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_SIGNATURE")


async def test_an_expired_token_is_refused_after_the_leeway(clocked_world: World) -> None:
    world, clock = clocked_world, clocked_world.clock
    assert clock is not None
    token = await world.reporter.token("read", "metrics/prod", "metrics-api", ttl_seconds=30)
    async with world.service.channel(world.reporter) as channel:
        clock.advance(dt.timedelta(seconds=34))
        await channel.call(READ_METRICS, "metrics/prod", token)  # within the 5 s leeway
        clock.advance(dt.timedelta(seconds=1))
        err = await channel.refused(READ_METRICS, "metrics/prod", token)
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED")


# --- forged and foreign tokens -------------------------------------------------------------------


async def test_alg_none_is_refused(world: World) -> None:
    genuine = await world.reporter.token("read", "metrics/prod", "metrics-api")
    forged = with_header(genuine, alg="none").rsplit(".", 1)[0] + "."
    async with world.service.channel(world.reporter) as channel:
        err = await channel.refused(READ_METRICS, "metrics/prod", forged)
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_ALGORITHM")
    before = world.issued
    err = await rpc_error(world.reporter.delegate(forged, world.helper))
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_ALGORITHM")
    assert world.issued == before


@pytest.mark.parametrize("encoding", ["pem", "der"])
async def test_hs256_keyed_with_the_task_keys_public_bytes_is_refused(
    world: World, encoding: str
) -> None:
    kid, public = await task_public_key(world)
    secret = public.public_bytes(
        serialization.Encoding.PEM if encoding == "pem" else serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    genuine = await world.reporter.token("read", "metrics/prod", "metrics-api")
    signing_input = (
        f"{segment({'alg': 'HS256', 'typ': 'task+jwt', 'kid': kid})}.{genuine.split('.')[1]}"
    )
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{b64(mac)}"
    async with world.service.channel(world.reporter) as channel:
        err = await channel.refused(READ_METRICS, "metrics/prod", forged)
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_ALGORITHM")
    before = world.issued
    err = await rpc_error(world.reporter.delegate(forged, world.helper))
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_ALGORITHM")
    assert world.issued == before


async def test_a_token_signed_with_an_unknown_kid_is_refused(world: World) -> None:
    genuine = await world.reporter.token("read", "metrics/prod", "metrics-api")
    attacker = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(
        claims_of(genuine), attacker, algorithm="ES256", headers={"typ": "task+jwt", "kid": "x"}
    )
    async with world.service.channel(world.reporter) as channel:
        err = await channel.refused(READ_METRICS, "metrics/prod", forged)
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_UNKNOWN_KEY")
    before = world.issued
    err = await rpc_error(world.reporter.delegate(forged, world.helper))
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_UNKNOWN_KEY")
    assert world.issued == before


async def test_a_token_signed_by_another_key_under_the_real_kid_is_refused(world: World) -> None:
    genuine = await world.reporter.token("read", "metrics/prod", "metrics-api")
    attacker = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(
        claims_of(genuine),
        attacker,
        algorithm="ES256",
        headers={"typ": "task+jwt", "kid": jwt.get_unverified_header(genuine)["kid"]},
    )
    async with world.service.channel(world.reporter) as channel:
        err = await channel.refused(READ_METRICS, "metrics/prod", forged)
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_SIGNATURE")


async def test_a_jwt_svid_is_not_a_task_token(world: World) -> None:
    svid = await world.reporter.client.fetch_jwt(["metrics-api"])
    assert jwt.get_unverified_header(svid.token)["typ"] == "JWT"
    async with world.service.channel(world.reporter) as channel:
        err = await channel.refused(READ_METRICS, "metrics/prod", svid.token)
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_TYPE")
    before = world.issued
    err = await rpc_error(world.reporter.delegate(svid.token, world.helper))
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_TYPE")
    assert world.issued == before


async def test_a_token_of_another_type_is_refused(world: World) -> None:
    """What the authority signs for other purposes (an audit checkpoint), and a task token
    whose ``typ`` was rewritten, are not task tokens."""
    checkpoint = await world.running.admin().stub.CheckpointAudit(pb.CheckpointAuditRequest())
    genuine = await world.reporter.token("read", "metrics/prod", "metrics-api")
    retyped = with_header(genuine, typ="JWT")
    async with world.service.channel(world.reporter) as channel:
        for token in (checkpoint.jws, retyped):
            err = await channel.refused(READ_METRICS, "metrics/prod", token)
            assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_TYPE")


# --- delegation ----------------------------------------------------------------------------------


async def test_delegation_cannot_add_an_action(world: World) -> None:
    token = await world.reporter.token("read", "metrics/prod", "metrics-api")
    before = world.issued
    err = await rpc_error(world.reporter.delegate(token, world.helper, action="write"))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "DELEGATION_WIDENS")
    assert world.issued == before


@pytest.mark.parametrize("resource", ["metrics", "metrics/staging", "metrics/production"])
async def test_delegation_cannot_leave_the_parents_resource(world: World, resource: str) -> None:
    token = await world.reporter.token("read", "metrics/prod", "metrics-api")
    before = world.issued
    err = await rpc_error(world.reporter.delegate(token, world.helper, resource=resource))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "DELEGATION_WIDENS")
    assert world.issued == before


async def test_a_delegated_token_never_outlives_its_parent(world: World) -> None:
    parent = await world.reporter.token("read", "metrics/prod", "metrics-api", ttl_seconds=60)
    child = await world.reporter.delegate(
        parent, world.helper, resource="metrics/prod/cpu", ttl_seconds=600
    )
    assert child.WhichOneof("result") == "token"
    parent_claims, child_claims = claims_of(parent), claims_of(child.token.token)
    assert child_claims["exp"] <= parent_claims["exp"]
    assert child_claims["act"] == {"sub": world.helper.spiffe_id}
    assert child_claims["sub"] == world.reporter.spiffe_id
    assert child_claims["parent"] == parent_claims["jti"]
    assert child_claims["tctx"]["resource"] == "metrics/prod/cpu"
    async with world.service.channel(world.helper) as helper:
        answer = await helper.call(READ_METRICS, "metrics/prod/cpu", child.token.token)
        assert answer["holder"] == world.helper.spiffe_id
    async with world.service.channel(world.reporter) as reporter:  # bound to the new holder
        err = await reporter.refused(READ_METRICS, "metrics/prod/cpu", child.token.token)
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_CNF_MISMATCH")


async def test_delegation_beyond_the_policys_depth_is_refused(world: World) -> None:
    token = await world.reporter.token("read", "metrics/prod", "metrics-api")
    assert claims_of(token)["del"] == 1  # the policy allows one hop for metric reads
    first = await world.reporter.delegate(token, world.helper)
    assert first.token.may_delegate == 0
    before = world.issued
    err = await rpc_error(world.helper.delegate(first.token.token, world.other))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "DELEGATION_DEPTH")
    assert world.issued == before


async def test_a_token_the_caller_does_not_hold_cannot_be_delegated(world: World) -> None:
    token = await world.reporter.token("read", "metrics/prod", "metrics-api")
    before = world.issued
    err = await rpc_error(world.other.delegate(token, world.other))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_CNF_MISMATCH")
    assert world.issued == before


# --- approvals -----------------------------------------------------------------------------------


async def test_an_expired_approval_yields_nothing(clocked_world: World) -> None:
    world, clock = clocked_world, clocked_world.clock
    assert clock is not None
    approval_id = await prod_approval(world, grant_seconds=60)
    clock.advance(dt.timedelta(seconds=61))
    before = world.issued
    err = await rpc_error(
        world.reporter.exchange("deploy", "deploy/production", "deployer", approval_id=approval_id)
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "APPROVAL_EXPIRED")
    assert world.issued == before


async def test_an_approval_left_unanswered_expires(clocked_world: World) -> None:
    world, clock = clocked_world, clocked_world.clock
    assert clock is not None
    approval_id = await prod_approval(world)
    clock.advance(dt.timedelta(seconds=61))
    admin = world.running.admin().stub
    err = await rpc_error(admin.Approve(pb.ApproveRequest(id=approval_id)))
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "APPROVAL_EXPIRED")
    before = world.issued
    err = await rpc_error(
        world.reporter.exchange("deploy", "deploy/production", "deployer", approval_id=approval_id)
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "APPROVAL_EXPIRED")
    assert world.issued == before


@pytest.mark.parametrize(
    ("action", "resource", "audience", "purpose"),
    [
        ("deploy", "deploy/sandbox", "deployer", "weekly report"),
        ("deploy", "deploy/production", "another-deployer", "weekly report"),
        ("deploy", "deploy/production", "deployer", "something else"),
        ("read", "metrics/prod", "metrics-api", "weekly report"),
    ],
)
async def test_an_approval_is_for_its_intent_only(
    world: World, action: str, resource: str, audience: str, purpose: str
) -> None:
    approval_id = await prod_approval(world, grant_seconds=300)
    before = world.issued
    err = await rpc_error(
        world.reporter.exchange(
            action, resource, audience, purpose=purpose, approval_id=approval_id
        )
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "APPROVAL_OTHER_INTENT")
    assert world.issued == before
    collected = await world.reporter.exchange(  # untouched: still good for its own intent
        "deploy", "deploy/production", "deployer", approval_id=approval_id
    )
    assert collected.WhichOneof("result") == "token"


async def test_a_token_from_an_approval_ends_with_the_approval(world: World) -> None:
    """The policy allows production tokens 60 s; an approval granted for 20 s caps it lower."""
    approval_id = await prod_approval(world)
    approved = await world.running.admin().stub.Approve(
        pb.ApproveRequest(id=approval_id, grant_seconds=20)
    )
    collected = await world.reporter.exchange(
        "deploy", "deploy/production", "deployer", approval_id=approval_id, ttl_seconds=600
    )
    claims = claims_of(collected.token.token)
    assert claims["exp"] <= approved.grant_expires_at
    assert claims["exp"] - claims["iat"] <= 20


async def test_an_approval_yields_one_token(world: World) -> None:
    approval_id = await prod_approval(world, grant_seconds=300)
    first = await world.reporter.exchange(
        "deploy", "deploy/production", "deployer", approval_id=approval_id
    )
    assert first.WhichOneof("result") == "token"
    before = world.issued
    err = await rpc_error(
        world.reporter.exchange("deploy", "deploy/production", "deployer", approval_id=approval_id)
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "APPROVAL_USED")
    assert world.issued == before


async def test_an_approval_of_another_principal_does_not_exist_for_the_caller(
    world: World,
) -> None:
    approval_id = await prod_approval(world, grant_seconds=300)
    before = world.issued
    err = await rpc_error(
        world.other.exchange("deploy", "deploy/production", "deployer", approval_id=approval_id)
    )
    assert_status(err, grpc.StatusCode.NOT_FOUND, "APPROVAL_NOT_FOUND")
    err = await rpc_error(
        (await world.other.stub()).GetApproval(pb.GetApprovalRequest(id=approval_id))
    )
    assert_status(err, grpc.StatusCode.NOT_FOUND, "APPROVAL_NOT_FOUND")
    assert world.issued == before


@pytest.mark.parametrize("how", ["ended by the agent", "revoked by an operator"])
async def test_an_approval_is_not_collected_once_its_task_is_over(world: World, how: str) -> None:
    task = "deploy-task"
    await world.reporter.token("read", "metrics/prod", "metrics-api", task_id=task)
    approval_id = await prod_approval(world, task_id=task)
    if how == "ended by the agent":
        await (await world.reporter.stub()).EndTask(pb.EndTaskRequest(task_id=task))
    else:
        await world.running.admin().stub.Revoke(
            pb.RevokeRequest(kind="task", target=task, reason="incident 7")
        )
    await world.running.admin().stub.Approve(pb.ApproveRequest(id=approval_id))
    before = world.issued
    err = await rpc_error(  # collected without naming the task: the approval's task counts
        world.reporter.exchange("deploy", "deploy/production", "deployer", approval_id=approval_id)
    )
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "TASK_ENDED")
    assert world.issued == before
