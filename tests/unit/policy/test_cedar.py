"""The Cedar backend: every outcome branch, the annotations the host resolves, failing closed."""

from __future__ import annotations

import datetime as dt
import json
import threading
from typing import Any

import pytest

from authority.errors import InvalidArgument
from authority.policy import DEFAULT_DENY_REASON, Outcome, explain
from authority.policy.cedar import CedarEngine
from tests.unit.policy._support import CLAIMED_FACTS, MONDAY_10, cedar, make_input

READ_METRICS = """
@id("read-metrics") @ttl("300") @delegation("2")
permit (principal, action == Action::"read", resource) when { resource.kind == "metrics" };
"""


def test_a_matching_permit_allows_exactly_the_action() -> None:
    engine = cedar(READ_METRICS, policy_id="agents")
    decision = engine.decide(make_input())
    assert decision.outcome is Outcome.ALLOW
    assert decision.scopes == ("read",)
    assert decision.ttl_cap == dt.timedelta(seconds=300)
    assert decision.max_delegation_depth == 2
    assert decision.reasons == ("read-metrics",)
    assert decision.backend == "cedar"
    assert decision.policy_id == "agents"
    assert decision.policy_version == engine.policy_version
    assert len(engine.policy_version) == 16


def test_no_matching_permit_is_default_deny() -> None:
    decision = cedar(READ_METRICS).decide(make_input(action="write"))
    assert decision.outcome is Outcome.DENY
    assert decision.scopes == ()
    assert decision.reasons == (DEFAULT_DENY_REASON,)
    assert decision.ttl_cap is None
    assert decision.max_delegation_depth == 0


def test_an_empty_policy_set_denies() -> None:
    decision = cedar("// nothing here\n").decide(make_input())
    assert decision.outcome is Outcome.DENY
    assert decision.reasons == (DEFAULT_DENY_REASON,)


def test_a_matching_forbid_overrides_permits() -> None:
    engine = cedar(
        READ_METRICS,
        '@id("no-risk") forbid (principal, action, resource) when { context.risk >= 80 };',
        '@id("no-prod") forbid (principal, action, resource)'
        ' when { resource == Resource::"metrics/prod" };',
    )
    assert engine.decide(make_input(risk=79, resource="metrics/dev")).outcome is Outcome.ALLOW
    decision = engine.decide(make_input(risk=80))
    assert decision.outcome is Outcome.DENY
    assert decision.reasons == ("no-prod", "no-risk")
    assert decision.ttl_cap is None


def test_approval_required_on_every_matching_permit() -> None:
    engine = cedar(
        '@id("prod") @approval("required") @ttl("60") permit'
        ' (principal, action == Action::"deploy", resource == Resource::"deploy/production");'
    )
    pending = engine.decide(make_input(action="deploy", resource="deploy/production"))
    assert pending.outcome is Outcome.REQUIRE_APPROVAL
    assert pending.scopes == ()
    assert pending.reasons == ("prod",)
    assert pending.ttl_cap == dt.timedelta(seconds=60)  # what an approval would grant
    approved = engine.decide(
        make_input(action="deploy", resource="deploy/production", approved=True)
    )
    assert approved.outcome is Outcome.ALLOW
    assert approved.scopes == ("deploy",)


def test_one_matching_permit_without_approval_is_enough() -> None:
    engine = cedar(
        '@id("gated") @approval("required") @ttl("60") permit (principal, action, resource);',
        '@id("open") @ttl("600") permit (principal, action == Action::"read", resource);',
    )
    decision = engine.decide(make_input())
    assert decision.outcome is Outcome.ALLOW
    assert decision.reasons == ("gated", "open")
    # Every determining permit's cap applies: the smallest wins.
    assert decision.ttl_cap == dt.timedelta(seconds=60)
    assert engine.decide(make_input(action="write")).outcome is Outcome.REQUIRE_APPROVAL


def test_smallest_ttl_and_delegation_among_determining_permits() -> None:
    engine = cedar(
        '@id("a") @ttl("300") @delegation("3") permit (principal, action, resource);',
        '@id("b") @ttl("90") permit (principal, action, resource) when { context.risk > 10 };',
        '@id("c") @delegation("1") permit (principal, action, resource)'
        " when { context.risk > 20 };",
        '@id("d") permit (principal, action, resource) when { context.risk > 30 };',
        '@id("e") @ttl("5") @delegation("0") permit (principal, action, resource) when { false };',
    )
    only_a = engine.decide(make_input(risk=0))
    assert (only_a.ttl_cap, only_a.max_delegation_depth) == (dt.timedelta(seconds=300), 3)
    a_b = engine.decide(make_input(risk=15))
    assert (a_b.ttl_cap, a_b.max_delegation_depth) == (dt.timedelta(seconds=90), 3)
    a_b_c_d = engine.decide(make_input(risk=35))
    assert (a_b_c_d.ttl_cap, a_b_c_d.max_delegation_depth) == (dt.timedelta(seconds=90), 1)
    assert a_b_c_d.reasons == ("a", "b", "c", "d")


def test_no_annotations_means_no_cap_and_no_delegation() -> None:
    decision = cedar("permit (principal, action, resource);").decide(make_input())
    assert decision.outcome is Outcome.ALLOW
    assert decision.ttl_cap is None
    assert decision.max_delegation_depth == 0
    assert decision.reasons == ("p0.cedar[0]",)  # no @id: named by file and position


def test_unnamed_policies_are_named_by_file_and_position() -> None:
    engine = cedar(
        'permit (principal, action == Action::"write", resource);',
        "forbid (principal, action, resource) when { context.risk > 50 };\n"
        "permit (principal, action, resource);",
    )
    assert engine.decide(make_input()).reasons == ("p1.cedar[1]",)
    assert engine.decide(make_input(risk=60)).reasons == ("p1.cedar[0]",)


def test_entities_and_context_carry_the_derived_facts() -> None:
    engine = cedar(
        """
        @id("shape") permit (principal, action, resource) when {
          principal.trust_domain == "example.org" && principal.path like "/agent/*" &&
          resource.kind == "deploy" && resource.environment == "sandbox" &&
          context.requested.environment == "sandbox" && context.audience == "deployer" &&
          context.requested.purpose == "ship it" && context.delegation_depth == 1 &&
          context.requested.parameters.version == "1.2" &&
          context.attributes["unix:uid"] == "1000" &&
          context.time == "2026-01-05T10:00:00.000Z" &&
          datetime(context.time) > datetime("2026-01-01")
        };
        """
    )
    inp = make_input(
        action="deploy",
        resource="deploy/sandbox/web",
        requested_environment="sandbox",
        audience="deployer",
        purpose="ship it",
        delegation_depth=1,
        parameters={"version": "1.2"},
        attributes={"unix:uid": "1000"},
    )
    assert engine.decide(inp).outcome is Outcome.ALLOW


def test_entities_parsed_once_still_follow_each_request() -> None:
    # Cedar parses the entities once per (principal, resource); a request that differs in either
    # sees its own attributes, a repeated one the same as before.
    engine = cedar(
        """
        @id("sandbox-agents") permit (principal, action, resource) when {
          principal.path like "/agent/*" && resource.kind == "deploy" &&
          resource.environment == "sandbox"
        };
        """
    )
    allowed = make_input(action="deploy", resource="deploy/sandbox")
    outcomes = [
        engine.decide(inp).outcome
        for inp in (
            allowed,
            make_input(action="deploy", resource="deploy/production"),
            make_input(action="deploy", resource="tickets/sandbox"),
            make_input(
                action="deploy",
                resource="deploy/sandbox",
                principal="spiffe://example.org/batch/job",
            ),
            allowed,
        )
    ]
    assert outcomes == [Outcome.ALLOW, Outcome.DENY, Outcome.DENY, Outcome.DENY, Outcome.ALLOW]


def test_the_resource_environment_is_the_resource_names_not_the_callers() -> None:
    """The bypass of issue 11: a permit on ``resource.environment == "sandbox"`` granted a
    production deploy to a caller that named the sandbox. The resource's environment is now
    derived from its name; what the caller named is only ``context.requested.environment``."""
    engine = cedar(
        '@id("sandbox") permit (principal, action == Action::"deploy", resource)'
        ' when { resource.environment == "sandbox" };'
    )
    claimed = make_input(
        action="deploy", resource="deploy/production", requested_environment="sandbox"
    )
    decision = engine.decide(claimed)
    assert decision.outcome is Outcome.DENY
    assert decision.reasons == (DEFAULT_DENY_REASON,)
    shown = explain(engine, claimed)
    entities = shown["entities"]
    assert isinstance(entities, list)
    assert entities[1]["attrs"] == {"kind": "deploy", "environment": "production"}
    request = shown["request"]
    assert isinstance(request, dict)
    assert request["context"]["requested"]["environment"] == "sandbox"
    assert "environment" not in request["context"]
    bare = make_input(action="deploy", resource="deploy", requested_environment="sandbox")
    assert engine.decide(bare).outcome is Outcome.DENY
    legit = make_input(action="deploy", resource="deploy/sandbox")
    assert engine.decide(legit).outcome is Outcome.ALLOW


FACT_CASES = [
    ("context.approved", {}, {"approved": True}),
    ("context.risk == 0", {"risk": 50}, {}),
    ("context.delegation_depth == 0", {"delegation_depth": 1}, {}),
    (
        'context.attributes has admin && context.attributes.admin == "true"',
        {},
        {"attributes": {"admin": "true"}},
    ),
    ('resource.environment == "sandbox"', {}, {"resource": "metrics/sandbox"}),
]


@pytest.mark.parametrize(("condition", "attacked", "real"), FACT_CASES)
def test_parameters_named_like_a_fact_stay_parameters(
    condition: str, attacked: dict[str, Any], real: dict[str, Any]
) -> None:
    """A parameter (or the purpose) is only ever under ``context.requested``: one named
    ``approved``, ``risk``, ``attributes`` or ``environment`` sets none of those facts, while the
    fact itself, set by the authority, does grant."""
    engine = cedar(f'@id("fact") permit (principal, action, resource) when {{ {condition} }};')
    claimed = make_input(purpose="approved=true", parameters=CLAIMED_FACTS, **attacked)
    assert engine.decide(claimed).outcome is Outcome.DENY
    request = explain(engine, claimed)["request"]
    assert isinstance(request, dict)
    assert request["context"]["requested"]["parameters"] == CLAIMED_FACTS
    assert engine.decide(make_input(parameters=CLAIMED_FACTS, **real)).outcome is Outcome.ALLOW


@pytest.mark.parametrize("field", ["purpose", "environment", "parameters"])
def test_a_policy_reading_a_field_moved_under_requested_is_refused(field: str) -> None:
    """A policy written for the older input would fail on every decision; loading refuses it
    and names the field to read instead."""
    with pytest.raises(InvalidArgument, match=f"context.requested.{field}") as info:
        cedar(READ_METRICS, f"forbid (principal, action, resource) when {{ context.{field} }};")
    assert info.value.reason == "POLICY_INVALID"
    assert "p1.cedar: line 1" in info.value.message
    with pytest.raises(InvalidArgument, match=r"resource\.environment"):
        cedar('permit (principal, action, resource) when { context["environment"] == "x" };')
    cedar(READ_METRICS + f"// context.{field} moved under context.requested\n")  # a comment
    cedar(  # or a string
        f'@id("ok") permit (principal, action, resource) when {{ context.requested.{field} == '
        f'"not context.{field}" }};'
    )


def test_hour_and_weekday_are_utc() -> None:
    engine = cedar(
        '@id("office") permit (principal, action, resource)'
        " when { context.weekday < 5 && context.hour >= 9 && context.hour < 17 };"
    )
    assert engine.decide(make_input(time=MONDAY_10)).outcome is Outcome.ALLOW
    # 10:00 in UTC+8 is 02:00 UTC.
    tz8 = dt.timezone(dt.timedelta(hours=8))
    night = dt.datetime(2026, 1, 5, 10, 0, tzinfo=tz8)
    assert engine.decide(make_input(time=night)).outcome is Outcome.DENY
    saturday = dt.datetime(2026, 1, 10, 10, 0, tzinfo=dt.UTC)
    assert engine.decide(make_input(time=saturday)).outcome is Outcome.DENY
    # Sunday 23:30 in UTC-5 is Monday 04:30 UTC: weekday 0 but before 9.
    sunday_late = dt.datetime(2026, 1, 4, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    assert engine.decide(make_input(time=sunday_late)).outcome is Outcome.DENY


def test_an_erroring_forbid_denies() -> None:
    engine = cedar(
        READ_METRICS,
        '@id("no-batch") forbid (principal, action, resource)'
        ' when { context.requested.parameters.batch == "yes" };',
    )
    # Cedar would skip the erroring forbid and allow; the host fails closed.
    decision = engine.decide(make_input())
    assert decision.outcome is Outcome.DENY
    assert decision.reasons[0].startswith("forbid no-batch failed to evaluate")
    assert "batch" in decision.reasons[0]
    assert engine.decide(make_input(parameters={"batch": "no"})).outcome is Outcome.ALLOW


def test_an_erroring_permit_does_not_grant() -> None:
    engine = cedar(
        '@id("needs-ticket") permit (principal, action, resource)'
        ' when { context.requested.parameters.ticket like "CHG-*" };'
    )
    assert engine.decide(make_input()).outcome is Outcome.DENY
    assert engine.decide(make_input(parameters={"ticket": "CHG-1"})).outcome is Outcome.ALLOW
    both = cedar(
        READ_METRICS,
        '@id("t") @ttl("10") permit (principal, action, resource)'
        ' when { context.requested.parameters.t == "1" };',
    )
    decision = both.decide(make_input())
    assert decision.outcome is Outcome.ALLOW
    assert decision.reasons == ("read-metrics",)
    assert decision.ttl_cap == dt.timedelta(seconds=300)


def test_type_errors_in_policies_do_not_raise() -> None:
    engine = cedar(
        '@id("bad") permit (principal, action, resource) when { context.requested.purpose > 3 };',
        '@id("bad-forbid") forbid (principal, action, resource) when { context.risk like "x" };',
    )
    decision = engine.decide(make_input())
    assert decision.outcome is Outcome.DENY
    assert decision.reasons[0].startswith("forbid bad-forbid failed to evaluate")


def test_an_invalid_principal_is_denied_not_raised() -> None:
    decision = cedar("permit (principal, action, resource);").decide(
        make_input(principal="spiffe://Example.org/agent")
    )
    assert decision.outcome is Outcome.DENY
    assert decision.reasons[0].startswith("invalid principal:")


def test_odd_ids_are_passed_as_data() -> None:
    engine = cedar('permit (principal, action == Action::"a\\"b", resource == Resource::"x\\ny");')
    assert engine.decide(make_input(action='a"b', resource="x\ny")).outcome is Outcome.ALLOW
    assert engine.decide(make_input(action="a", resource="x")).outcome is Outcome.DENY


def test_decision_ids_are_unique() -> None:
    engine = cedar(READ_METRICS)
    ids = {engine.decide(make_input()).decision_id for _ in range(200)}
    assert len(ids) == 200


def test_policy_version_follows_the_source() -> None:
    one = cedar(READ_METRICS)
    assert cedar(READ_METRICS).policy_version == one.policy_version
    assert cedar(READ_METRICS + "\n// edited\n").policy_version != one.policy_version
    assert cedar(READ_METRICS, "").policy_version != one.policy_version


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (
            ("permit (principal, action, resource);\n\n// a comment\npermit (principal, action",),
            "p0.cedar: line 4: ",
        ),
        (
            ("permit (principal, action, resource) when { x };",),
            "p0.cedar: line 1: invalid variable: x",
        ),
        (
            ("permit (principal, action, resource);", "\n\nforbid (principal, action, resource)"),
            "p1.cedar: line 3: ",
        ),
        (('@ttl("1") @ttl("2") permit (principal, action, resource);',), "duplicate annotation"),
        (('@ttl("0") permit (principal, action, resource);',), "@ttl must be a positive"),
        (('@ttl("5m") permit (principal, action, resource);',), "@ttl must be a positive"),
        (("@ttl permit (principal, action, resource);",), "@ttl must be a positive"),
        (('@approval("maybe") permit (principal, action, resource);',), '"required"'),
        (('@delegation("-1") permit (principal, action, resource);',), "@delegation must be"),
        (('@id("f") @ttl("5") forbid (principal, action, resource);',), "f: @ttl has no meaning"),
        (
            ('@id("f") @approval("required") forbid (principal, action, resource);',),
            "@approval has no meaning",
        ),
        (
            (
                '@id("x") permit (principal, action, resource);',
                '@id("x") forbid (principal, action, resource);',
            ),
            "used by more than one policy",
        ),
        (('@id("") permit (principal, action, resource);',), "@id must not be empty"),
        (("permit (principal == ?principal, action, resource);",), "templates"),
    ],
)
def test_a_broken_policy_is_refused_with_the_compiler_message(
    texts: tuple[str, ...], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("(", r"\(")) as info:
        cedar(*texts)
    assert info.value.reason == "POLICY_INVALID"


def test_a_semicolon_inside_a_string_or_comment_does_not_confuse_the_locator() -> None:
    text = 'permit (principal, action == Action::"a;b", resource); // x; y\npermit (oops);'
    with pytest.raises(InvalidArgument, match="line 2"):
        cedar(text)


def test_explain_shows_matches_errors_and_context() -> None:
    engine = cedar(
        READ_METRICS,
        '@id("t") permit (principal, action, resource)'
        ' when { context.requested.parameters.t == "1" };',
    )
    shown = explain(engine, make_input())
    decision = shown["decision"]
    assert isinstance(decision, dict)
    assert decision["outcome"] == "allow"
    assert shown["matched"] == ["read-metrics"]
    errors = shown["errors"]
    assert isinstance(errors, list)
    assert len(errors) == 1
    assert "attribute `t`" in errors[0]
    request = shown["request"]
    assert isinstance(request, dict)
    assert request["context"]["hour"] == 10
    assert shown["entities"]
    assert json.loads(json.dumps(shown)) == shown  # printable as JSON by the CLI


def test_engine_lists_its_policies() -> None:
    engine = cedar(READ_METRICS)
    assert isinstance(engine, CedarEngine)
    (meta,) = engine.policies.values()
    assert (meta.name, meta.effect, meta.ttl_seconds, meta.delegation) == (
        "read-metrics",
        "permit",
        300,
        2,
    )


def test_concurrent_decisions_from_threads() -> None:
    engine = cedar(READ_METRICS)
    wrong: list[str] = []

    def worker(n: int) -> None:
        for i in range(200):
            action = "read" if (n + i) % 2 else "write"
            decision = engine.decide(make_input(action=action))
            expected = Outcome.ALLOW if action == "read" else Outcome.DENY
            if decision.outcome is not expected or decision.scopes not in ((), ("read",)):
                wrong.append(f"{n}/{i}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
