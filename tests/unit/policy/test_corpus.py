"""The shared decision corpus: Cedar and Rego, loaded with the example agent policies, must give
the corpus's decisions, and the same decisions as each other (outcome, TTL cap, delegation depth,
reasons)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from authority.policy import Outcome, PolicyEngine, load_policy_set, run_policy_tests
from authority.policy.loader import load_policy_tests
from authority.policy.rego import rego_available
from tests.unit.policy._support import CORPUS, EXAMPLES, requires_rego

CASES = load_policy_tests(CORPUS)
REGO_SKIP = (
    "regorus is not installed (the optional 'rego' extra: pip install -r requirements-rego.txt); "
    "only the Cedar half of the corpus ran"
)


def engines() -> list[PolicyEngine]:
    found = [load_policy_set([EXAMPLES / "agents.cedar"])]
    if rego_available():
        found.append(load_policy_set([EXAMPLES / "agents.rego"]))
    return found


def test_the_corpus_covers_every_branch() -> None:
    assert len(CASES) >= 25
    outcomes = Counter(case.outcome for case in CASES)
    assert outcomes[Outcome.ALLOW] >= 5
    assert outcomes[Outcome.DENY] >= 10
    assert outcomes[Outcome.REQUIRE_APPROVAL] >= 1
    assert len({case.name for case in CASES}) == len(CASES)
    reasons = {reason for case in CASES for reason in case.reasons or ()}
    document = json.loads(CORPUS.read_text(encoding="utf-8"))
    assert all("reasons" in case["expect"] for case in document["cases"])
    # Every permit and forbid of the example policy decides at least one case.
    for name in (
        "agents-read-metrics",
        "agents-open-ticket",
        "agents-deploy-sandbox",
        "agents-deploy-production",
        "metrics-read-only",
        "high-risk",
        "purpose-required",
        "delegation-only-metric-reads",
        "delegation-depth-limit",
    ):
        assert name in reasons, name


def test_cedar_gives_the_corpus_decisions() -> None:
    engine = load_policy_set([EXAMPLES / "agents.cedar"])
    failed = [(r.name, r.failures) for r in run_policy_tests(engine, [CORPUS]) if not r.passed]
    assert failed == []


@requires_rego
def test_rego_gives_the_corpus_decisions() -> None:
    engine = load_policy_set([EXAMPLES / "agents.rego"])
    failed = [(r.name, r.failures) for r in run_policy_tests(engine, [CORPUS]) if not r.passed]
    assert failed == []


def test_both_backends_agree_case_by_case() -> None:
    if not rego_available():
        pytest.skip(REGO_SKIP)
    cedar_engine, rego_engine = engines()
    for case in CASES:
        a, b = cedar_engine.decide(case.input), rego_engine.decide(case.input)
        assert (a.outcome, a.scopes, a.ttl_cap, a.max_delegation_depth, set(a.reasons)) == (
            b.outcome,
            b.scopes,
            b.ttl_cap,
            b.max_delegation_depth,
            set(b.reasons),
        ), case.name
        assert (a.backend, b.backend) == ("cedar", "rego")
        assert a.decision_id != b.decision_id


@pytest.mark.parametrize("suffix", [".cedar", ".rego"])
def test_the_example_policies_pass_their_own_tests(suffix: str) -> None:
    if suffix == ".rego" and not rego_available():
        pytest.skip(REGO_SKIP)
    policy = EXAMPLES / f"agents{suffix}"
    tests = EXAMPLES / "agents.tests.json"
    results = run_policy_tests(load_policy_set([policy]), [tests])
    assert len(results) >= 10
    assert [r.name for r in results if not r.passed] == []
