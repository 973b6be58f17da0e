"""Exchange end to end, through the real server: policy-as-code decides, operators approve, a
relying service verifies, EndTask closes the task, and the audit chain tells the story.

The example policy (examples/policies/agents.cedar with its tests) is loaded as an operator
would; the trust domain is example.org; the agent is spiffe://example.org/agent/reporter,
attested with a join token."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from authority import audit_cli
from authority._pb import authority_v1_authority_pb2 as pb
from authority._pb import authority_v1_authority_pb2_grpc as pb_grpc
from authority.client import SvidFiles, WorkloadClient
from authority.clock import Clock
from authority.relying import (
    MethodRule,
    TaskKeySource,
    TaskTokenInterceptor,
    TaskTokenVerifier,
    current_task_token,
)
from authority.tokens import x5t_s256
from tests.helpers import Running, ServeProcess
from tests.security._attack import assert_status, count_rows, rpc_error

TD = "example.org"
ISSUER = f"spiffe://{TD}"
REPORTER = f"spiffe://{TD}/agent/reporter"
POLICIES = Path(__file__).resolve().parents[2] / "examples" / "policies"
PURPOSE = "weekly report"

READ_METRICS = "/demo.Metrics/Read"
WRITE_METRICS = "/demo.Metrics/Write"


# --- plumbing shared with tests/security/test_task_tokens.py -------------------------------------


async def load_agents_policy(running: Running) -> pb.PolicyInfo:
    """The example policy, loaded over the admin socket (its tests run before it is swapped in)."""
    files = [
        pb.PolicyFile(name=name, content=(POLICIES / name).read_text())
        for name in ("agents.cedar", "agents.tests.json")
    ]
    return await running.admin().stub.LoadPolicy(pb.LoadPolicyRequest(files=files))


@dataclass
class Agent:
    """An attested workload: its SPIFFE ID, SVID folder and a client holding the SVID."""

    spiffe_id: str
    folder: Path
    client: WorkloadClient

    async def stub(self) -> pb_grpc.WorkloadAsyncStub:
        return await self.client.mtls_stub()

    @property
    def cert_der(self) -> bytes:
        chain = SvidFiles(self.folder).read()[0]
        return x509.load_pem_x509_certificates(chain)[0].public_bytes(Encoding.DER)

    async def exchange(
        self,
        action: str,
        resource: str,
        audience: str,
        *,
        purpose: str = PURPOSE,
        task_id: str = "",
        ttl_seconds: int = 0,
        approval_id: str = "",
        environment: str = "",
        parameters: Mapping[str, str] | None = None,
    ) -> pb.ExchangeResponse:
        request = pb.ExchangeRequest(
            intent=pb.Intent(
                action=action,
                resource=resource,
                purpose=purpose,
                environment=environment,
                parameters=parameters or {},
            ),
            audience=audience,
            ttl_seconds=ttl_seconds,
            task_id=task_id,
            approval_id=approval_id,
            context=pb.AuditContext(
                prompt_sha256="ab" * 32, tool_name="metrics.query", model="test-model"
            ),
        )
        return await (await self.stub()).Exchange(request)

    async def token(self, action: str, resource: str, audience: str, **kwargs: Any) -> str:
        """Exchange, expecting a token at once."""
        response = await self.exchange(action, resource, audience, **kwargs)
        assert response.WhichOneof("result") == "token", response
        return response.token.token

    async def delegate(
        self, token: str, to: Agent, *, action: str = "", resource: str = "", ttl_seconds: int = 0
    ) -> pb.ExchangeResponse:
        request = pb.DelegateRequest(
            parent_token=token,
            delegate_svid=to.cert_der,
            action=action,
            resource=resource,
            ttl_seconds=ttl_seconds,
        )
        return await (await self.stub()).Delegate(request)


async def attest_agent(running: Running, spiffe_id: str, folder: Path) -> Agent:
    return Agent(spiffe_id, folder, await running.attested(spiffe_id, folder))


def issued_tokens(data_dir: Path) -> int:
    """Task tokens the authority recorded (direct and delegated), and audit records of them."""
    rows = count_rows(data_dir, "task_tokens")
    records = count_rows(data_dir, "audit", "kind IN ('task_token.issued', 'task_token.delegated')")
    assert rows == records, (rows, records)
    return rows


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def _resource(request: bytes) -> str:
    return request.decode()


METRICS_RULES: dict[str, MethodRule] = {
    READ_METRICS: ("read", _resource),
    WRITE_METRICS: ("write", _resource),
}


def metrics_api() -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """A relying service's handlers: they answer with what the verified token says."""

    async def answer(request: bytes, context: Any) -> bytes:
        token = current_task_token()
        return json.dumps(
            {
                "jti": token.jti,
                "subject": token.subject,
                "holder": token.holder,
                "action": token.intent.action,
                "resource": request.decode(),
            }
        ).encode()

    return grpc.method_handlers_generic_handler(
        "demo.Metrics",
        {
            "Read": grpc.unary_unary_rpc_method_handler(answer),
            "Write": grpc.unary_unary_rpc_method_handler(answer),
        },
    )


@dataclass
class RelyingService:
    """A relying service on 127.0.0.1 with mutual TLS: its own SVID from the authority, the
    authority's bundle as the roots its clients must chain to."""

    audience: str
    port: int
    dns_name: str
    keys: TaskKeySource
    verifier: TaskTokenVerifier

    @contextlib.asynccontextmanager
    async def channel(self, agent: Agent) -> AsyncIterator[Raw]:
        """A connection presenting ``agent``'s SVID."""
        chain, key, bundle = SvidFiles(agent.folder).read()
        creds = grpc.ssl_channel_credentials(
            root_certificates=bundle, private_key=key, certificate_chain=chain
        )
        channel = grpc.aio.secure_channel(
            f"127.0.0.1:{self.port}",
            creds,
            options=[("grpc.ssl_target_name_override", self.dns_name)],
        )
        try:
            yield Raw(channel)
        finally:
            await channel.close(None)


@dataclass
class Raw:
    channel: grpc.aio.Channel

    async def call(self, method: str, resource: str, token: str) -> dict[str, Any]:
        reply = await self.channel.unary_unary(method, None, None)(
            resource.encode(), metadata=bearer(token), timeout=20
        )
        answer: dict[str, Any] = json.loads(reply)
        return answer

    async def refused(self, method: str, resource: str, token: str) -> grpc.aio.AioRpcError:
        return await rpc_error(self.call(method, resource, token))


@contextlib.asynccontextmanager
async def relying_service(
    running: Running, folder: Path, audience: str = "metrics-api", clock: Clock | None = None
) -> AsyncIterator[RelyingService]:
    """Register and attest the service (its SVID carries a DNS name for its TLS listener), fetch
    task-token keys from the authority, and serve ``demo.Metrics`` behind the interceptor."""
    spiffe_id = f"{ISSUER}/svc/{audience}"
    dns_name = f"{audience}.{TD}"
    await running.admin().stub.CreateEntry(
        pb.CreateEntryRequest(
            spiffe_id=spiffe_id,
            selectors=[pb.Selector(type="join_token", value=f"spiffe_id:{spiffe_id}")],
            dns_names=[dns_name],
        )
    )
    await running.attested(spiffe_id, folder)
    chain, key, bundle = SvidFiles(folder).read()
    keys = TaskKeySource(
        (await running.workload()).tls_stub,
        issuer=TD,
        min_refresh_interval=dt.timedelta(seconds=1),
    )
    verifier = TaskTokenVerifier(issuer=ISSUER, audience=audience, keys=keys, clock=clock)
    server = grpc.aio.server(interceptors=[TaskTokenInterceptor(verifier, METRICS_RULES)])
    server.add_generic_rpc_handlers((metrics_api(),))
    port = server.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=bundle, require_client_auth=True
        ),
    )
    await server.start()
    try:
        yield RelyingService(audience, port, dns_name, keys, verifier)
    finally:
        await server.stop(None)


# --- in process ----------------------------------------------------------------------------------


@pytest.fixture
async def reporter(authority: Running, tmp_path: Path) -> Agent:
    info = await load_agents_policy(authority)
    assert (info.policy_id, info.backend) == ("agents", "cedar")
    return await attest_agent(authority, REPORTER, tmp_path / "reporter")


async def test_an_agents_day_through_the_real_server(authority: Running, reporter: Agent) -> None:
    admin = authority.admin().stub
    task = "report-2026-w02"

    # Read metrics: allowed, at once, for exactly that intent.
    read = await reporter.exchange("read", "metrics/prod", "metrics-api", task_id=task)
    assert read.WhichOneof("result") == "token"
    assert read.token.scopes == ["read"]
    assert read.token.task_id == task
    assert read.token.may_delegate == 1
    claims = claims_of(read.token.token)
    assert claims["iss"] == ISSUER
    assert claims["sub"] == REPORTER
    assert claims["aud"] == "metrics-api"
    assert claims["scope"] == "read"
    assert claims["txn"] == task
    assert claims["tctx"]["resource"] == "metrics/prod"
    assert claims["tctx"]["environment"] == "prod"
    assert claims["cnf"] == {"x5t#S256": x5t_s256(reporter.cert_der)}
    assert claims["decision_id"] == read.decision_id
    assert 0 < claims["exp"] - claims["iat"] <= 300  # the policy's cap for metric reads
    assert jwt.get_unverified_header(read.token.token)["typ"] == "task+jwt"

    # Deploy to the sandbox: allowed.
    sandbox = await reporter.exchange("deploy", "deploy/sandbox", "deployer", task_id=task)
    assert sandbox.WhichOneof("result") == "token"
    assert claims_of(sandbox.token.token)["scope"] == "deploy"
    assert claims_of(sandbox.token.token)["exp"] - claims_of(sandbox.token.token)["iat"] <= 120

    # Deploy to production: pending until an operator approves.
    before = issued_tokens(authority.data_dir)
    prod = await reporter.exchange("deploy", "deploy/production", "deployer", task_id=task)
    assert prod.WhichOneof("result") == "pending"
    approval_id = prod.pending.id
    assert prod.pending.state == "pending"
    assert prod.pending.principal == REPORTER
    assert json.loads(prod.pending.intent_json)["resource"] == "deploy/production"
    assert issued_tokens(authority.data_dir) == before
    listed = await admin.ListApprovals(pb.ListApprovalsRequest())
    assert [a.id for a in listed.approvals] == [approval_id]
    polled = await reporter.exchange(
        "deploy", "deploy/production", "deployer", approval_id=approval_id
    )
    assert polled.WhichOneof("result") == "pending"  # asking again does not skip the operator
    status = await (await reporter.stub()).GetApproval(pb.GetApprovalRequest(id=approval_id))
    assert status.state == "pending"

    approved = await admin.Approve(
        pb.ApproveRequest(id=approval_id, grant_seconds=300, note="change 42")
    )
    assert approved.state == "approved"
    assert approved.note == "change 42"
    collected = await reporter.exchange(
        "deploy", "deploy/production", "deployer", approval_id=approval_id
    )
    assert collected.WhichOneof("result") == "token"
    assert collected.token.task_id == task  # the approval's task
    prod_claims = claims_of(collected.token.token)
    assert prod_claims["tctx"]["resource"] == "deploy/production"
    assert prod_claims["exp"] - prod_claims["iat"] <= 60  # the policy's cap for production
    assert prod_claims["exp"] <= approved.grant_expires_at
    assert (await admin.ListApprovals(pb.ListApprovalsRequest())).approvals == []

    # Write where it may only read: denied by policy, with the policy's reasons; nothing issued.
    before = issued_tokens(authority.data_dir)
    err = await rpc_error(reporter.exchange("write", "metrics/prod", "metrics-api", task_id=task))
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    assert "metrics-read-only" in (err.details() or "")
    assert issued_tokens(authority.data_dir) == before

    # End the task: everything issued for it is listed, and nothing more is issued for it.
    ended = await (await reporter.stub()).EndTask(
        pb.EndTaskRequest(task_id=task, reason="report sent")
    )
    assert sorted(ended.revoked_jtis) == sorted(
        [read.token.jti, sandbox.token.jti, collected.token.jti]
    )
    err = await rpc_error(reporter.exchange("read", "metrics/prod", "metrics-api", task_id=task))
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "TASK_ENDED")
    err = await rpc_error(
        (await reporter.stub()).EndTask(pb.EndTaskRequest(task_id=task, reason="again"))
    )
    assert_status(err, grpc.StatusCode.FAILED_PRECONDITION, "TASK_ENDED")

    # The audit chain verifies, and the task's trace tells the story in order.
    admin_client = authority.admin()
    verification = await audit_cli.verify_live(admin_client)
    assert verification.ok, verification
    own = [r async for r in audit_cli.stream_records(admin_client, task_ids=[task])]
    kinds = [r.kind for r in own]
    assert kinds == [
        "policy.decided",  # read metrics
        "task_token.issued",
        "policy.decided",  # deploy to sandbox
        "task_token.issued",
        "policy.decided",  # deploy to production: approval required
        "approval.requested",
        "approval.approved",
        "policy.decided",  # collected with the approval
        "task_token.issued",
        "policy.decided",  # write metrics: denied
        "task.ended",
        "revocation.created",  # EndTask revokes what was issued for the task
    ], kinds
    trace = await audit_cli.trace(admin_client, task)  # with what surrounds it, in chain order
    assert [r.seq for r in trace] == sorted(r.seq for r in trace)
    assert [r for r in trace if r.task_id == task] == own
    first = own[0].details
    assert first["input"]["principal"] == REPORTER
    assert first["context"] == {
        "prompt_sha256": "ab" * 32,
        "tool": "metrics.query",
        "model": "test-model",
    }
    denial = own[9].details
    assert denial["outcome"] == "deny"
    assert denial["reasons"] == ["metrics-read-only"]
    for record in trace:  # tokens appear by jti and digest, never whole
        for token in (read.token.token, sandbox.token.token, collected.token.token):
            assert token not in record.details_json


async def test_a_relying_service_accepts_the_agents_token_over_the_agents_connection(
    authority: Running, reporter: Agent, tmp_path: Path
) -> None:
    async with (
        relying_service(authority, tmp_path / "metrics-api") as service,
        service.channel(reporter) as channel,
    ):
        token = await reporter.token("read", "metrics/prod", "metrics-api")
        answer = await channel.call(READ_METRICS, "metrics/prod/cpu", token)
        assert answer == {
            "jti": claims_of(token)["jti"],
            "subject": REPORTER,
            "holder": REPORTER,
            "action": "read",
            "resource": "metrics/prod/cpu",
        }
        err = await channel.refused(WRITE_METRICS, "metrics/prod/cpu", token)
        assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "TOKEN_SCOPE")


async def test_the_relying_service_follows_a_rotation_of_the_task_keys(
    authority: Running, reporter: Agent, tmp_path: Path
) -> None:
    async with (
        relying_service(authority, tmp_path / "metrics-api") as service,
        service.channel(reporter) as channel,
    ):
        before = await reporter.token("read", "metrics/prod", "metrics-api")
        await channel.call(READ_METRICS, "metrics/prod", before)
        assert service.keys.fetches == 1
        rotated = await authority.admin().stub.RotateCA(pb.RotateCARequest(immediate=True))
        assert any(a.kind == "task" and a.state == "active" for a in rotated.authorities)
        after = await reporter.token("read", "metrics/prod", "metrics-api")
        kid_before = jwt.get_unverified_header(before)["kid"]
        assert jwt.get_unverified_header(after)["kid"] != kid_before
        answer = await channel.call(READ_METRICS, "metrics/prod", after)
        assert answer["jti"] == claims_of(after)["jti"]
        assert service.keys.fetches == 2  # fetched again for the unknown kid
        await channel.call(READ_METRICS, "metrics/prod", before)  # the old key is still published


async def test_a_task_stays_its_principals_once_known_open(
    authority: Running, reporter: Agent, tmp_path: Path
) -> None:
    # The task is open and known so to the server (a token was just issued for it): another
    # agent still cannot use it, and its owner still can.
    other = await attest_agent(authority, "spiffe://example.org/agent/other", tmp_path / "other")
    await reporter.exchange("read", "metrics/prod", "metrics-api", task_id="shared-name")
    err = await rpc_error(
        other.exchange("read", "metrics/prod", "metrics-api", task_id="shared-name")
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "TASK_NOT_YOURS")
    again = await reporter.exchange("read", "metrics/prod", "metrics-api", task_id="shared-name")
    assert again.token.task_id == "shared-name"


async def test_exchange_needs_the_callers_svid(authority: Running, reporter: Agent) -> None:
    """On the server-TLS endpoint there is no client certificate: no token, whoever asks."""
    anonymous = await authority.workload()
    request = pb.ExchangeRequest(
        intent=pb.Intent(action="read", resource="metrics/prod", purpose=PURPOSE),
        audience="metrics-api",
    )
    err = await rpc_error(anonymous.tls_stub.Exchange(request))
    assert_status(err, grpc.StatusCode.UNAUTHENTICATED, "NO_CLIENT_SVID")


# --- through the command line, against `authority serve` -----------------------------------------

TOKEN = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")


def cli_attest(served: ServeProcess, spiffe_id: str, folder: Path) -> None:
    bundle = folder.parent / "bundle.pem"
    bundle.write_text(served.cli("bundle", "show").stdout)
    join = served.cli("token", "create", "--spiffe-id", spiffe_id).stdout.strip()
    served.cli(
        "workload", "attest", "--server", served.address, "--trust-bundle", str(bundle),
        "--join-token", "-", "--out", str(folder), stdin=join + "\n",
    )  # fmt: skip


def cli_exchange(
    served: ServeProcess, folder: Path, action: str, resource: str, audience: str, *extra: str
) -> Any:
    return served.cli(
        "workload", "exchange", "--server", served.address, "--svid-dir", str(folder),
        "--action", action, "--resource", resource, "--audience", audience,
        "--purpose", PURPOSE, *extra, check=False,
    )  # fmt: skip


def approvals_json(served: ServeProcess, *extra: str) -> list[Mapping[str, Any]]:
    listed: list[Mapping[str, Any]] = json.loads(
        served.cli("approvals", "list", "--format", "json", *extra).stdout
    )
    return listed


def test_the_cli_exchanges_approves_and_denies(served: ServeProcess, tmp_path: Path) -> None:
    loaded = served.cli("policy", "load", str(POLICIES / "agents.cedar"))
    assert "cedar" in loaded.stdout
    folder = tmp_path / "reporter"
    cli_attest(served, REPORTER, folder)

    # Allowed: the token alone on stdout.
    read = cli_exchange(served, folder, "read", "metrics/prod", "metrics-api", "--ttl", "2m")
    assert read.returncode == 0, read.stderr
    assert TOKEN.fullmatch(read.stdout.strip()), read.stdout
    assert read.stdout.count("\n") == 1
    claims = claims_of(read.stdout.strip())
    assert claims["scope"] == "read"
    assert claims["exp"] - claims["iat"] <= 120  # --ttl 2m under the policy's 300 s

    # Pending: exit 3, the approval id alone on stdout.
    task = "cli-task-1"
    pending = cli_exchange(
        served, folder, "deploy", "deploy/production", "deployer", "--task", task
    )
    assert pending.returncode == 3, pending.stderr
    approval_id = pending.stdout.strip()
    assert approval_id.startswith("apr-")
    assert pending.stdout == approval_id + "\n"
    assert f"authority approve {approval_id}" in pending.stderr
    listed = served.cli("approvals", "list")
    assert approval_id in listed.stdout
    assert "deploy/production" in listed.stdout
    assert [a["id"] for a in approvals_json(served)] == [approval_id]

    approved = served.cli("approve", approval_id, "--for", "5m", "--note", "change 42")
    assert "approved" in approved.stdout
    collected = cli_exchange(
        served, folder, "deploy", "deploy/production", "deployer", "--approval", approval_id
    )
    assert collected.returncode == 0, collected.stderr
    assert TOKEN.fullmatch(collected.stdout.strip())
    assert claims_of(collected.stdout.strip())["txn"] == task
    (used,) = [a for a in approvals_json(served, "--all") if a["id"] == approval_id]
    assert used["state"] == "used"
    assert used["grant_expires_at"] - used["requested_at"] <= 5 * 60 + 5

    # Denied by the operator: collecting fails with the reason.
    second = cli_exchange(served, folder, "deploy", "deploy/production", "deployer")
    assert second.returncode == 3
    second_id = second.stdout.strip()
    denied = served.cli("deny", second_id, "--reason", "change freeze")
    assert "denied" in denied.stdout
    refused = cli_exchange(
        served, folder, "deploy", "deploy/production", "deployer", "--approval", second_id
    )
    assert refused.returncode not in (0, 3)
    assert refused.stdout == ""
    assert "APPROVAL_DENIED" in refused.stderr
    assert approvals_json(served) == []

    # Denied by policy: non-zero, the policy's reasons on stderr, nothing on stdout.
    write = cli_exchange(served, folder, "write", "metrics/prod", "metrics-api")
    assert write.returncode not in (0, 3)
    assert write.stdout == ""
    assert "POLICY_DENIED" in write.stderr
    assert "metrics-read-only" in write.stderr

    # End the task; the trace shows it from the command line too.
    served.cli(
        "workload", "end-task", "--server", served.address, "--svid-dir", str(folder),
        "--task", task, "--reason", "deployed",
    )  # fmt: skip
    again = cli_exchange(served, folder, "read", "metrics/prod", "metrics-api", "--task", task)
    assert again.returncode == 1
    assert "TASK_ENDED" in again.stderr
    traced = [
        json.loads(line)
        for line in served.cli("audit", "trace", task, "--format", "json").stdout.splitlines()
    ]
    assert [r["seq"] for r in traced] == sorted(r["seq"] for r in traced)
    assert [r["kind"] for r in traced if r["task_id"] == task] == [
        "policy.decided",
        "approval.requested",
        "approval.approved",
        "policy.decided",
        "task_token.issued",
        "task.ended",
        "revocation.created",
    ]
    assert served.cli("audit", "verify").returncode == 0


async def test_loading_a_policy_reports_its_files_and_passed_tests(authority: Running) -> None:
    info = await load_agents_policy(authority)
    cases = json.loads((POLICIES / "agents.tests.json").read_text())["cases"]
    assert info.tests_passed == len(cases) > 0
    assert list(info.files) == ["agents.cedar", "agents.tests.json"]
    assert info.backend == "cedar"
    shown = await authority.admin().stub.GetPolicy(pb.GetPolicyRequest())
    assert (shown.version, shown.tests_passed) == (info.version, info.tests_passed)
