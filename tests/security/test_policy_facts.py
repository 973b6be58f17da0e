"""Attacks on the facts a policy decides on, one test each, against the real server (issue 11).

Facts come from the authority, never from the requester. The resource's environment is derived
from the resource name; what the caller says (purpose, parameters, the environment it named) is
only ever under ``context.requested`` (Cedar) / ``input.requested`` (Rego). Each attack asserts
the precise refusal, that no token was issued, and what the audit recorded.

The policy is the one of the issue: a permit on ``resource.environment == "sandbox"``, which
granted ``deploy/production`` to a caller that named the sandbox environment."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from authority import audit_cli
from authority._pb import authority_v1_authority_pb2 as pb
from authority.audit import AuditRecord
from authority.policy.rego import rego_available
from tests.helpers import Running
from tests.integration.test_exchange import Agent, attest_agent, claims_of, issued_tokens
from tests.security._attack import assert_status, count_rows, rpc_error

TD = "example.org"
REPORTER = f"spiffe://{TD}/agent/reporter"
HELPER = f"spiffe://{TD}/agent/helper"

SANDBOX_CEDAR = f"""
// The policy of issue 11: deploys to the sandbox need nothing more.
@id("deploy-sandbox")
@ttl("120")
@delegation("1")
permit (principal, action == Action::"deploy", resource)
when {{ resource.environment == "sandbox" }};

// A token for the whole of deploy/, for the reporter only, to be narrowed by delegation.
@id("deploy-root")
@delegation("1")
permit (
  principal == Workload::"{REPORTER}",
  action == Action::"deploy",
  resource == Resource::"deploy"
);

// Facts a caller must not be able to claim through its parameters or purpose.
@id("approved-release")
permit (principal, action == Action::"release", resource) when {{ context.approved }};

@id("admins-administer")
permit (principal, action == Action::"administer", resource)
when {{ context.attributes.admin == "true" }};

@id("x509pop-attested")
permit (principal, action == Action::"rotate", resource)
when {{ context.attributes.attestor == "x509pop" }};

@id("high-risk")
forbid (principal, action, resource) when {{ context.risk >= 80 }};
"""

SANDBOX_REGO = """package authority

decision := {
	"allow": true,
	"require_approval": false,
	"ttl_seconds": 120,
	"reasons": ["deploy-sandbox"],
} if {
	input.action == "deploy"
	input.resource_environment == "sandbox"
} else := {"allow": false, "require_approval": false}
"""

BACKENDS = [
    pytest.param(("facts.cedar", SANDBOX_CEDAR), id="cedar"),
    pytest.param(
        ("facts.rego", SANDBOX_REGO),
        id="rego",
        marks=pytest.mark.skipif(
            not rego_available(), reason="regorus (the optional 'rego' extra) is not installed"
        ),
    ),
]

# What a caller might put in its parameters to pass for the authority's facts.
CLAIMED_FACTS = {
    "approved": "true",
    "admin": "true",
    "attestor": "x509pop",
    "attributes": "admin=true",
    "risk": "0",
    "delegation_depth": "0",
    "environment": "sandbox",
    "resource.environment": "sandbox",
}


@dataclass
class World:
    running: Running
    reporter: Agent
    helper: Agent

    @property
    def issued(self) -> int:
        return issued_tokens(self.running.data_dir)

    def records(self, kind: str) -> int:
        return count_rows(self.running.data_dir, "audit", "kind = ?", (kind,))

    async def task_records(self, task: str) -> list[AuditRecord]:
        admin = self.running.admin()
        return [r async for r in audit_cli.stream_records(admin, task_ids=[task])]


async def load_policy(running: Running, name: str, text: str) -> pb.PolicyInfo:
    files = [pb.PolicyFile(name=name, content=text)]
    # These policies are about facts, not their tests: loaded untested, deliberately.
    request = pb.LoadPolicyRequest(files=files, allow_untested=True)
    return await running.admin().stub.LoadPolicy(request)


async def world_with(running: Running, folder: Path, name: str, text: str) -> World:
    await load_policy(running, name, text)
    reporter = await attest_agent(running, REPORTER, folder / "reporter")
    helper = await attest_agent(running, HELPER, folder / "helper")
    return World(running, reporter, helper)


@pytest.fixture(params=BACKENDS)
async def world(request: pytest.FixtureRequest, authority: Running, tmp_path: Path) -> World:
    name, text = request.param
    return await world_with(authority, tmp_path, name, text)


@pytest.fixture
async def cedar_world(authority: Running, tmp_path: Path) -> World:
    return await world_with(authority, tmp_path, "facts.cedar", SANDBOX_CEDAR)


# --- the environment ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "derived"),
    [
        ("deploy/production", "production"),  # the request
        ("deploy", ""),  # a resource in no environment
        ("deploy/production/sandbox", "production"),  # the sandbox as a third segment
    ],
)
async def test_naming_the_sandbox_does_not_make_a_resource_the_sandboxs(
    world: World, resource: str, derived: str
) -> None:
    task = "task-claims-sandbox"
    before, decided = world.issued, world.records("policy.decided")
    err = await rpc_error(
        world.reporter.exchange("deploy", resource, "deployer", environment="sandbox", task_id=task)
    )
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "ENVIRONMENT_MISMATCH")
    assert "derived from the resource name" in (err.details() or "")
    assert world.issued == before  # no token
    assert world.records("policy.decided") == decided  # no decision: refused before policy
    (refused,) = await world.task_records(task)
    assert refused.kind == "exchange.refused"
    assert refused.actor == REPORTER
    assert refused.subject == resource
    refusal = refused.details
    assert refusal["reason"] == "ENVIRONMENT_MISMATCH"
    assert refusal["intent"]["environment"] == "sandbox"  # what was claimed, on the record
    assert refusal["derived"] == {"environment": derived}
    assert refusal["caller"]["identity_id"]


async def test_an_oversized_environment_is_refused_in_bounded_space(cedar_world: World) -> None:
    """The named environment has no bound of its own: its refusal record keeps it cut, with its
    length and SHA-256, instead of the whole text."""
    world = cedar_world
    named = "sandbox" + "x" * 200_000
    task = "task-huge-environment"
    before = world.issued
    err = await rpc_error(
        world.reporter.exchange(
            "deploy", "deploy/production", "deployer", environment=named, task_id=task
        )
    )
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "ENVIRONMENT_MISMATCH")
    assert len(err.details() or "") < 1000
    assert world.issued == before
    (refused,) = await world.task_records(task)
    assert len(refused.details_json) < 4096
    kept = refused.details["intent"]["environment"]
    assert kept.startswith("sandbox")
    assert hashlib.sha256(named.encode()).hexdigest() in kept


async def test_the_sandbox_deploy_still_works(world: World) -> None:
    task = "task-sandbox"
    for resource, named in [
        ("deploy/sandbox", ""),
        ("deploy/sandbox", "sandbox"),  # naming the resource's own environment is fine
        ("deploy/sandbox/web", ""),
    ]:
        token = await world.reporter.token(
            "deploy", resource, "deployer", environment=named, task_id=task
        )
        claims = claims_of(token)
        assert claims["tctx"]["resource"] == resource
        assert claims["tctx"]["environment"] == "sandbox"
        assert claims["scope"] == "deploy"
    decisions = [r for r in await world.task_records(task) if r.kind == "policy.decided"]
    assert [r.details["outcome"] for r in decisions] == ["allow"] * 3
    assert [r.details["resource_facts"]["environment"] for r in decisions] == ["sandbox"] * 3
    named_on_record = [r.details["input"]["requested"]["environment"] for r in decisions]
    assert named_on_record == ["", "sandbox", ""]
    assert world.records("exchange.refused") == 0


async def test_an_environment_parameter_is_only_a_parameter(world: World) -> None:
    task = "task-parameter-sandbox"
    before = world.issued
    err = await rpc_error(
        world.reporter.exchange(
            "deploy",
            "deploy/production",
            "deployer",
            parameters={"environment": "sandbox", "resource.environment": "sandbox"},
            purpose="environment=sandbox",
            task_id=task,
        )
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    assert world.issued == before
    (decided,) = await world.task_records(task)
    assert decided.details["outcome"] == "deny"
    assert decided.details["resource_facts"]["environment"] == "production"
    requested = decided.details["input"]["requested"]
    assert requested["parameters"] == {"environment": "sandbox", "resource.environment": "sandbox"}
    assert requested["environment"] == ""


# --- facts a caller cannot claim -------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "fact"),
    [
        ("release", "approved"),  # permitted only when an operator approved
        ("administer", "admin"),  # only for an admin identity
        ("rotate", "attestor"),  # only for workloads attested by x509pop
    ],
)
async def test_parameters_and_purpose_named_like_facts_set_no_fact(
    cedar_world: World, action: str, fact: str
) -> None:
    world = cedar_world
    task = f"task-claims-{fact}"
    before = world.issued
    err = await rpc_error(
        world.reporter.exchange(
            action,
            "app/prod",
            "app-api",
            parameters=CLAIMED_FACTS,
            purpose=f"{fact}=true approved=true admin=true",
            task_id=task,
        )
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    assert world.issued == before
    (decided,) = await world.task_records(task)
    record = decided.details
    assert record["outcome"] == "deny"
    inp = record["input"]
    assert inp["requested"]["parameters"] == CLAIMED_FACTS  # the claims: only here
    assert inp["approved"] is False
    assert inp["attributes"]["admin"] == "false"
    assert inp["attributes"]["attestor"] == "join_token"
    assert inp["risk"] < 80
    assert inp["delegation_depth"] == 0
    assert set(inp) == {
        "principal",
        "action",
        "resource",
        "audience",
        "time",
        "risk",
        "delegation_depth",
        "approved",
        "attributes",
        "requested",
    }


async def test_a_risk_parameter_does_not_lower_the_risk(cedar_world: World) -> None:
    """Denials raise the caller's risk; at 80 the forbid denies even a sandbox deploy, whatever
    risk the caller says it has."""
    world = cedar_world
    for _ in range(8):
        err = await rpc_error(world.reporter.exchange("release", "app/prod", "app-api"))
        assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    task = "task-claims-risk"
    before = world.issued
    err = await rpc_error(
        world.reporter.exchange(
            "deploy",
            "deploy/sandbox",
            "deployer",
            parameters={"risk": "0"},
            purpose="risk=0",
            task_id=task,
        )
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    assert world.issued == before
    (decided,) = await world.task_records(task)
    assert decided.details["reasons"] == ["high-risk"]
    assert decided.details["input"]["risk"] >= 80
    # The same deploy by a caller without denials goes through: the forbid is what denied.
    token = await world.helper.token("deploy", "deploy/sandbox", "deployer")
    assert claims_of(token)["tctx"]["environment"] == "sandbox"


# --- delegation -----------------------------------------------------------------------------


async def test_a_delegated_token_has_its_own_resources_environment(cedar_world: World) -> None:
    """A token for the whole of deploy/ (in no environment) narrowed to a production resource
    does not take the parent's environment: the delegate's decision sees production, and is
    denied; narrowed into the sandbox, the child token says sandbox."""
    world = cedar_world
    parent = await world.reporter.token("deploy", "deploy", "deployer", task_id="task-root")
    assert claims_of(parent)["tctx"]["environment"] == ""
    before = world.issued
    err = await rpc_error(
        world.reporter.delegate(parent, world.helper, resource="deploy/production")
    )
    assert_status(err, grpc.StatusCode.PERMISSION_DENIED, "POLICY_DENIED")
    assert world.issued == before
    child = await world.reporter.delegate(parent, world.helper, resource="deploy/sandbox/web")
    assert child.WhichOneof("result") == "token"
    claims = claims_of(child.token.token)
    assert claims["tctx"]["resource"] == "deploy/sandbox/web"
    assert claims["tctx"]["environment"] == "sandbox"
    records = await world.task_records("task-root")
    decided = [r.details for r in records if r.kind == "policy.decided"]
    assert [(d["input"]["principal"], d["outcome"]) for d in decided] == [
        (REPORTER, "allow"),
        (HELPER, "deny"),
        (HELPER, "allow"),
    ]
    assert [d["resource_facts"]["environment"] for d in decided] == ["", "production", "sandbox"]
    assert all(d["input"]["requested"]["environment"] == "" for d in decided)


# --- policies written against the caller's word ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "old.cedar",
            'permit (principal, action == Action::"deploy", resource)'
            ' when { context.environment == "sandbox" };',
        ),
        pytest.param(
            "old.rego",
            "package authority\n\n"
            'decision := {"allow": true, "require_approval": false} if {\n'
            '\tinput.environment == "sandbox"\n}\n',
            marks=pytest.mark.skipif(not rego_available(), reason="regorus is not installed"),
        ),
        pytest.param(
            "old-forbid.rego",
            "package authority\n\n"
            'forbids contains "purpose-required" if input.purpose == ""\n\n'
            'decision := {"allow": count(forbids) == 0, "require_approval": false}\n',
            marks=pytest.mark.skipif(not rego_available(), reason="regorus is not installed"),
        ),
    ],
)
async def test_a_policy_reading_the_callers_word_as_a_fact_is_refused_at_load(
    cedar_world: World, name: str, text: str
) -> None:
    """A policy that reads the environment, purpose or parameters where the caller's word used
    to sit is refused (for Rego, such a forbid would silently never fire); the running policy
    stays."""
    world = cedar_world
    running = await world.running.admin().stub.GetPolicy(pb.GetPolicyRequest())
    err = await rpc_error(load_policy(world.running, name, text))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "POLICY_INVALID")
    assert ".requested." in (err.details() or "")
    still = await world.running.admin().stub.GetPolicy(pb.GetPolicyRequest())
    assert (still.policy_id, still.version) == (running.policy_id, running.version)
    err = await rpc_error(
        world.reporter.exchange("deploy", "deploy/production", "deployer", environment="sandbox")
    )
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "ENVIRONMENT_MISMATCH")


# --- explain ------------------------------------------------------------------------------------


async def test_explain_takes_the_callers_word_only_under_requested(cedar_world: World) -> None:
    """``authority policy explain --input``: the resource's environment follows its name whatever
    ``requested`` says, and an input that gives the environment as a fact is refused."""
    admin = cedar_world.running.admin().stub
    document = {
        "principal": REPORTER,
        "action": "deploy",
        "resource": "deploy/production",
        "audience": "deployer",
        "time": "2026-01-05T10:00:00+00:00",
        "requested": {"purpose": "ship", "environment": "sandbox"},
    }
    reply = await admin.ExplainPolicy(pb.ExplainPolicyRequest(input_json=json.dumps(document)))
    shown = json.loads(reply.explanation_json)
    assert shown["decision"]["outcome"] == "deny"
    resource = next(e for e in shown["entities"] if e["uid"]["type"] == "Resource")
    assert resource["attrs"] == {"kind": "deploy", "environment": "production"}
    assert shown["request"]["context"]["requested"]["environment"] == "sandbox"
    for field in ("environment", "purpose", "approved_by_caller"):
        old = {**document, field: "sandbox"}
        err = await rpc_error(
            admin.ExplainPolicy(pb.ExplainPolicyRequest(input_json=json.dumps(old)))
        )
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "POLICY_INPUT_INVALID")
