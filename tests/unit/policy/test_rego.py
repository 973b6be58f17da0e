"""The Rego backend: the decision object, every outcome branch, and errors that deny."""

from __future__ import annotations

import datetime as dt
import gc
import json
import sys
import threading
from typing import Any

import pytest

from authority.errors import InvalidArgument
from authority.policy import DEFAULT_DENY_REASON, Outcome, PolicyEngine, explain
from tests.unit.policy._support import CLAIMED_FACTS, MONDAY_10, make_input, rego, requires_rego

pytestmark = requires_rego


def policy(body: str) -> str:
    return "package authority\n\n" + body + "\n"


READ_METRICS = policy(
    'decision := {"allow": true, "require_approval": false, "ttl_seconds": 300,'
    ' "delegation": 2, "reasons": ["read-metrics"]} if {\n'
    '  input.action == "read"\n  input.resource_kind == "metrics"\n}\n'
    'else := {"allow": false, "require_approval": false}'
)


def test_allow_grants_exactly_the_action() -> None:
    engine = rego(READ_METRICS, policy_id="agents")
    decision = engine.decide(make_input())
    assert decision.outcome is Outcome.ALLOW
    assert decision.scopes == ("read",)
    assert decision.ttl_cap == dt.timedelta(seconds=300)
    assert decision.max_delegation_depth == 2
    assert decision.reasons == ("read-metrics",)
    assert (decision.backend, decision.policy_id) == ("rego", "agents")
    assert decision.policy_version == engine.policy_version


def test_allow_false_is_deny_with_default_reason() -> None:
    decision = rego(READ_METRICS).decide(make_input(action="write"))
    assert decision.outcome is Outcome.DENY
    assert decision.reasons == (DEFAULT_DENY_REASON,)
    assert (decision.ttl_cap, decision.max_delegation_depth) == (None, 0)


def test_deny_keeps_the_policy_reasons() -> None:
    engine = rego(
        policy('decision := {"allow": false, "require_approval": false, "reasons": ["b", "a"]}')
    )
    assert engine.decide(make_input()).reasons == ("a", "b")


def test_require_approval_then_approved() -> None:
    engine = rego(
        policy('decision := {"allow": true, "require_approval": true, "ttl_seconds": 60}')
    )
    pending = engine.decide(make_input())
    assert pending.outcome is Outcome.REQUIRE_APPROVAL
    assert pending.scopes == ()
    assert pending.ttl_cap == dt.timedelta(seconds=60)
    approved = engine.decide(make_input(approved=True))
    assert approved.outcome is Outcome.ALLOW
    assert approved.scopes == ("read",)


def test_require_approval_without_allow_is_deny() -> None:
    engine = rego(policy('decision := {"allow": false, "require_approval": true}'))
    assert engine.decide(make_input(approved=True)).outcome is Outcome.DENY


def test_optional_fields_absent_means_no_cap_no_delegation() -> None:
    decision = rego(policy('decision := {"allow": true, "require_approval": false}')).decide(
        make_input()
    )
    assert decision.outcome is Outcome.ALLOW
    assert (decision.ttl_cap, decision.max_delegation_depth, decision.reasons) == (None, 0, ())


def test_an_integral_float_ttl_is_accepted() -> None:
    decision = rego(
        policy('decision := {"allow": true, "require_approval": false, "ttl_seconds": 120.0}')
    ).decide(make_input())
    assert decision.ttl_cap == dt.timedelta(seconds=120)


def test_undefined_decision_denies() -> None:
    engine = rego(
        policy('decision := {"allow": true, "require_approval": false} if input.risk > 50')
    )
    decision = engine.decide(make_input(risk=10))
    assert decision.outcome is Outcome.DENY
    assert decision.reasons == ("data.authority.decision is undefined for this input",)
    assert engine.decide(make_input(risk=60)).outcome is Outcome.ALLOW


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("true", "must be an object"),
        ('"allow"', "must be an object"),
        ('["allow"]', "must be an object"),
        ('{"allow": true}', "must be booleans"),
        ('{"allow": "true", "require_approval": false}', "must be booleans"),
        ('{"allow": 1, "require_approval": false}', "must be booleans"),
        ('{"allow": true, "require_approval": false, "ttl": 60}', "unknown key"),
        ('{"allow": true, "require_approval": false, "ttl_seconds": "60"}', "must be a number"),
        ('{"allow": true, "require_approval": false, "ttl_seconds": 0}', "within 1.."),
        ('{"allow": true, "require_approval": false, "ttl_seconds": 1.5}', "whole number"),
        ('{"allow": true, "require_approval": false, "delegation": -1}', "within 0.."),
        ('{"allow": true, "require_approval": false, "delegation": true}', "must be a number"),
        ('{"allow": true, "require_approval": false, "reasons": "x"}', "list of strings"),
        ('{"allow": true, "require_approval": false, "reasons": [1]}', "list of strings"),
    ],
)
def test_a_malformed_decision_denies(value: str, message: str) -> None:
    engine = rego(policy(f"decision := {value} if input.risk < 100"))
    decision = engine.decide(make_input())
    assert decision.outcome is Outcome.DENY
    assert decision.reasons[0].startswith("rego decision is malformed")
    assert message in decision.reasons[0]


def test_an_evaluation_error_denies_and_does_not_raise() -> None:
    engine = rego(
        policy(
            'decision := {"allow": true, "require_approval": false, "ttl_seconds": n} if {\n'
            "  n := 300 / to_number(input.requested.parameters.divisor)\n}\n"
            'else := {"allow": false, "require_approval": false}'
        )
    )
    decision = engine.decide(make_input(parameters={"divisor": "0"}))
    assert decision.outcome is Outcome.DENY
    assert decision.reasons[0].startswith("rego evaluation error")
    assert "divide by zero" in decision.reasons[0]
    assert "Stack backtrace" not in decision.reasons[0]
    assert engine.decide(make_input(parameters={"divisor": "2"})).ttl_cap == dt.timedelta(
        seconds=150
    )


def test_a_builtin_type_error_denies() -> None:
    engine = rego(
        policy(
            'decision := {"allow": true, "require_approval": false} if {\n'
            "  input.risk == 7\n  x := input.requested.purpose + 1\n  x > 0\n}"
        )
    )
    decision = engine.decide(make_input(risk=7))
    assert decision.outcome is Outcome.DENY
    assert decision.reasons[0].startswith("rego evaluation error")


def test_an_invalid_principal_is_denied_not_raised() -> None:
    decision = rego(policy('decision := {"allow": true, "require_approval": false}')).decide(
        make_input(principal="agent-7")
    )
    assert decision.outcome is Outcome.DENY
    assert decision.reasons[0].startswith("invalid principal:")


def test_the_input_document_carries_the_facts() -> None:
    engine = rego(
        policy(
            'decision := {"allow": true, "require_approval": false} if {\n'
            '  input.principal == "spiffe://example.org/agent/reporter"\n'
            '  input.principal_trust_domain == "example.org"\n'
            '  input.principal_path == "/agent/reporter"\n'
            '  input.action == "deploy"\n'
            '  input.resource == "deploy/sandbox/web"\n'
            '  input.resource_kind == "deploy"\n'
            '  input.resource_environment == "sandbox"\n'
            '  input.audience == "deployer"\n'
            '  input.requested.purpose == "ship it"\n'
            '  input.requested.environment == "sandbox"\n'
            '  input.time == "2026-01-05T10:00:00.000Z"\n'
            '  time.parse_rfc3339_ns(input.time) > time.parse_rfc3339_ns("2026-01-01T00:00:00Z")\n'
            "  input.hour == 10\n"
            "  input.weekday == 0\n"
            "  input.risk == 7\n"
            "  input.delegation_depth == 1\n"
            "  input.approved == false\n"
            '  input.requested.parameters.version == "1.2"\n'
            '  input.attributes["unix:uid"] == "1000"\n'
            "}"
        )
    )
    inp = make_input(
        action="deploy",
        resource="deploy/sandbox/web",
        requested_environment="sandbox",
        audience="deployer",
        purpose="ship it",
        risk=7,
        delegation_depth=1,
        parameters={"version": "1.2"},
        attributes={"unix:uid": "1000"},
    )
    assert engine.decide(inp).outcome is Outcome.ALLOW


def test_the_resource_environment_is_the_resource_names_not_the_callers() -> None:
    """The Rego form of the issue 11 bypass: the environment a policy tests is derived from the
    resource name; the one the caller named is only ``input.requested.environment``."""
    engine = rego(
        policy(
            'decision := {"allow": true, "require_approval": false} if {\n'
            '  input.action == "deploy"\n  input.resource_environment == "sandbox"\n}'
        )
    )
    claimed = make_input(
        action="deploy", resource="deploy/production", requested_environment="sandbox"
    )
    assert engine.decide(claimed).outcome is Outcome.DENY
    document = explain(engine, claimed)["rego_input"]
    assert isinstance(document, dict)
    assert document["resource_environment"] == "production"
    assert document["requested"]["environment"] == "sandbox"
    assert "environment" not in document
    legit = make_input(action="deploy", resource="deploy/sandbox")
    assert engine.decide(legit).outcome is Outcome.ALLOW


@pytest.mark.parametrize(
    ("condition", "attacked", "real"),
    [
        ("input.approved == true", {}, {"approved": True}),
        ("input.risk == 0", {"risk": 50}, {}),
        ("input.delegation_depth == 0", {"delegation_depth": 1}, {}),
        ('input.attributes.admin == "true"', {}, {"attributes": {"admin": "true"}}),
        ('input.resource_environment == "sandbox"', {}, {"resource": "metrics/sandbox"}),
    ],
)
def test_parameters_named_like_a_fact_stay_parameters(
    condition: str, attacked: dict[str, Any], real: dict[str, Any]
) -> None:
    """The Rego form: a parameter or the purpose is only ever under ``input.requested``."""
    engine = rego(
        policy(f'decision := {{"allow": true, "require_approval": false}} if {{\n  {condition}\n}}')
    )
    claimed = make_input(purpose="approved=true", parameters=CLAIMED_FACTS, **attacked)
    assert engine.decide(claimed).outcome is Outcome.DENY
    document = explain(engine, claimed)["rego_input"]
    assert isinstance(document, dict)
    assert document["requested"]["parameters"] == CLAIMED_FACTS
    assert engine.decide(make_input(parameters=CLAIMED_FACTS, **real)).outcome is Outcome.ALLOW


@pytest.mark.parametrize("field", ["purpose", "environment", "parameters"])
def test_a_policy_reading_a_field_moved_under_requested_is_refused(field: str) -> None:
    """Rego reads a missing field as undefined: a forbid on ``input.purpose == ""`` would never
    fire once purpose moved under ``requested``. Loading refuses such a policy, naming the fix."""
    forbid = f'forbids contains "x" if input.{field} == ""\n'
    with pytest.raises(InvalidArgument, match=f"input.requested.{field}") as info:
        rego(READ_METRICS + forbid)
    assert info.value.reason == "POLICY_INVALID"
    with pytest.raises(InvalidArgument, match="line"):
        rego(READ_METRICS + f'x if input["{field}"]\n')
    rego(READ_METRICS + f"# input.{field} moved under input.requested\n")  # a comment is fine


def test_hour_and_weekday_are_utc() -> None:
    engine = rego(
        policy(
            'decision := {"allow": true, "require_approval": false} if {\n'
            "  input.weekday < 5\n  input.hour >= 9\n  input.hour < 17\n}"
        )
    )
    assert engine.decide(make_input(time=MONDAY_10)).outcome is Outcome.ALLOW
    tz8 = dt.timezone(dt.timedelta(hours=8))
    assert engine.decide(make_input(time=dt.datetime(2026, 1, 5, 10, tzinfo=tz8))).outcome is (
        Outcome.DENY
    )
    saturday = dt.datetime(2026, 1, 10, 10, 0, tzinfo=dt.UTC)
    assert engine.decide(make_input(time=saturday)).outcome is Outcome.DENY


def test_decision_ids_are_unique() -> None:
    engine = rego(READ_METRICS)
    assert len({engine.decide(make_input()).decision_id for _ in range(200)}) == 200


def test_policy_version_follows_the_source() -> None:
    one = rego(READ_METRICS)
    assert rego(READ_METRICS).policy_version == one.policy_version
    assert rego(READ_METRICS + "# edited\n").policy_version != one.policy_version


def test_concurrent_decisions_do_not_share_input() -> None:
    engine = rego(
        policy(
            'decision := {"allow": true, "require_approval": false,'
            ' "reasons": [input.requested.purpose]}'
        )
    )
    mismatches: list[str] = []

    def worker(n: int) -> None:
        for i in range(300):
            purpose = f"t{n}-{i}"
            decision = engine.decide(make_input(purpose=purpose))
            if decision.reasons != (purpose,):
                mismatches.append(f"{purpose} -> {decision.reasons}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mismatches == []


@pytest.mark.parametrize(
    ("texts", "message"),
    [
        (("package authority\n\ndecision := { if {\n",), r"p0.rego:3:\d+"),
        (
            ('package authority\n\ndecision := {"allow": true}\n', "package authority\nx := ("),
            "p1.rego:",
        ),
        (("package other\n\ndecision := 1\n",), "no policy declares `package authority`"),
        (("package authority\n\nfoo := 1\n",), "defines no rule `decision`"),
        (("package authority\n\ndecision if { nosuchfn(1) }\n",), "could not find function"),
        (("package authority\ndecision := 1\ndecision := 2\n",), "conflicts"),
    ],
)
def test_a_broken_policy_is_refused_with_the_compiler_message(
    texts: tuple[str, ...], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        rego(*texts)
    assert info.value.reason == "POLICY_INVALID"
    assert "Stack backtrace" not in str(info.value)


def test_explain_shows_the_input_document_and_raw_decision() -> None:
    shown = explain(rego(READ_METRICS), make_input())
    document = shown["rego_input"]
    assert isinstance(document, dict)
    assert document["resource_kind"] == "metrics"
    raw = shown["rego_decision"]
    assert isinstance(raw, dict)
    assert raw["ttl_seconds"] == 300
    assert shown["matched"] == ["read-metrics"]
    assert json.loads(json.dumps(shown)) == shown  # printable as JSON by the CLI


def test_interpreters_stay_on_their_threads_across_reloads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """regorus interpreters are unsendable: each must be used and dropped on its own thread, even
    when an engine is loaded on one thread, used on others, and replaced while they live."""
    unraisable: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(str(u.exc_value)))
    holder: list[PolicyEngine] = []

    def load() -> None:
        holder.append(rego(READ_METRICS))

    loader = threading.Thread(target=load)
    loader.start()
    loader.join()  # the loading thread is gone; its interpreter went with it
    first = holder  # the only reference to the first engine, dropped below
    go, replaced, done = threading.Event(), threading.Event(), threading.Event()
    outcomes: list[Outcome] = []

    def worker() -> None:
        outcomes.append(first[0].decide(make_input()).outcome)
        go.set()
        replaced.wait(5)
        outcomes.append(second.decide(make_input()).outcome)
        done.set()

    second = rego(READ_METRICS + "# v2\n")
    thread = threading.Thread(target=worker)
    thread.start()
    assert go.wait(5)
    first.clear()
    gc.collect()  # the first engine dies on this thread while the worker holds its interpreter
    replaced.set()
    assert done.wait(5)
    thread.join()
    gc.collect()
    assert outcomes == [Outcome.ALLOW, Outcome.ALLOW]
    assert second.decide(make_input()).outcome is Outcome.ALLOW
    assert unraisable == []
