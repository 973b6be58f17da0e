"""``PolicyAdmin``: an operator's ``policy load`` needs tests (or says it does without), and the
running policy's state reports the tests that ran when it was loaded."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from authority.clock import FakeClock
from authority.errors import InvalidArgument
from authority.policy_admin import PolicyAdmin
from authority.store.memory import MemoryStore
from tests.unit.policy._support import EXAMPLES

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CEDAR = (EXAMPLES / "agents.cedar").read_text()
TESTS = (EXAMPLES / "agents.tests.json").read_text()
CASES = len(json.loads(TESTS)["cases"])


@pytest.fixture
def admin(tmp_path: Path) -> tuple[PolicyAdmin, MemoryStore]:
    store = MemoryStore()
    admin = PolicyAdmin.start(
        configured=[], folder=tmp_path / "policy", store=store, clock=FakeClock(START)
    )
    return admin, store


async def records(store: MemoryStore, kind: str) -> list[dict[str, Any]]:
    return [json.loads(r.details_json) for r in await store.audit_records() if r.kind == kind]


async def test_an_untested_policy_is_refused_and_the_running_one_stays(
    admin: tuple[PolicyAdmin, MemoryStore],
) -> None:
    policy, store = admin
    before = policy.state()
    assert (before.tests_total, before.tests_passed) == (0, 0)  # the built-in default
    for files in ({"a.cedar": CEDAR}, {"a.cedar": CEDAR, "a.tests.json": '{"cases": []}'}):
        with pytest.raises(InvalidArgument) as refused:
            await policy.load(files)
        assert refused.value.reason == "POLICY_UNTESTED"
        assert "a.tests.json" in refused.value.message
        assert "--allow-untested" in refused.value.message
        assert policy.state() == before
    assert [r["reason"] for r in await records(store, "policy.load_refused")] == [
        "POLICY_UNTESTED",
        "POLICY_UNTESTED",
    ]
    assert await records(store, "policy.loaded") == []


async def test_allowed_untested_it_loads_and_the_audit_says_so(
    admin: tuple[PolicyAdmin, MemoryStore],
) -> None:
    policy, store = admin
    state = await policy.load({"a.cedar": CEDAR}, allow_untested=True)
    assert (state.files, state.tests_total, state.tests_passed) == (("a.cedar",), 0, 0)
    [loaded] = await records(store, "policy.loaded")
    assert (loaded["tests"], loaded["untested"]) == (0, True)


async def test_state_reports_the_tests_run_at_load(
    admin: tuple[PolicyAdmin, MemoryStore], tmp_path: Path
) -> None:
    policy, store = admin
    state = await policy.load({"agents.cedar": CEDAR, "agents.tests.json": TESTS})
    assert (state.tests_total, state.tests_passed) == (CASES, CASES)
    assert state.files == ("agents.cedar", "agents.tests.json")
    [loaded] = await records(store, "policy.loaded")
    assert loaded["tests"] == CASES
    assert "untested" not in loaded
    # The tests file changing on disk afterwards does not change what ran at load.
    (tmp_path / "policy" / "agents.tests.json").write_text('{"cases": []}')
    assert policy.state() == state
