"""Discovery (a gateway's tools/list: ``tool.discovery`` true, no arguments, an empty purpose)
and forbids over what the caller says: the agents example's ``purpose-required`` does not fire
there, so loaded with the tools example it hides no tool, and still denies a real call."""

from __future__ import annotations

import pytest

from authority.policy import Outcome, load_policy_set, run_policy_tests
from authority.policy.model import ToolFact
from authority.policy.rego import rego_available
from tests.unit.policy._support import EXAMPLES, make_input


@pytest.mark.parametrize("suffix", [".cedar", ".rego"])
def test_agents_and_tools_together_pass_both_tests(suffix: str) -> None:
    if suffix == ".rego" and not rego_available():
        pytest.skip("regorus is not installed")
    engine = load_policy_set([EXAMPLES / f"agents{suffix}", EXAMPLES / f"tools{suffix}"])
    results = run_policy_tests(engine, [EXAMPLES / "tools.tests.json"])
    assert [r.name for r in results if not r.passed] == []
    assert any("discovery" in r.name for r in results)

    listed = engine.decide(
        make_input(
            action="tools.call",
            resource="mcp/billing/get_invoice",
            purpose="",
            tool=ToolFact.discovering("billing", "get_invoice"),
        )
    )
    assert listed.outcome is Outcome.ALLOW
    called = engine.decide(
        make_input(
            action="tools.call",
            resource="mcp/billing/get_invoice",
            purpose="",
            tool=ToolFact("billing", "get_invoice", {"invoice": "inv-1"}),
        )
    )
    assert called.outcome is Outcome.DENY
    assert "purpose-required" in called.reasons
