"""Loading policy files, policy tests, the default policy, and reloads that never install a broken
policy."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from authority.clock import FakeClock
from authority.errors import InvalidArgument
from authority.policy import (
    DEFAULT_DENY_REASON,
    Decision,
    Outcome,
    PolicyInput,
    PolicyManager,
    explain,
    load_default_policy,
    load_policy_set,
    run_policy_tests,
)
from authority.policy.loader import default_policy_text, find_policy_tests
from tests.unit.policy._support import EXAMPLES, ROOT, make_input, requires_rego

ALLOW_READ = '@id("read") @ttl("300") permit (principal, action == Action::"read", resource);\n'
VALID_INPUT = {
    "principal": "spiffe://example.org/a",
    "action": "read",
    "resource": "r",
    "time": "2026-01-05T10:00:00+00:00",
}
ALLOW_READ_SHORT = (
    '@id("read") @ttl("30") permit (principal, action == Action::"read", resource);\n'
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_tests(path: Path, *cases: tuple[str, str, str, int | None]) -> Path:
    """Write ``<stem>.tests.json`` next to ``path``: (name, action, outcome, ttl) per case."""
    document = {
        "cases": [
            {
                "name": name,
                "input": {
                    "principal": "spiffe://example.org/agent/a",
                    "action": action,
                    "resource": "metrics/prod",
                    "time": "2026-01-05T10:00:00Z",
                    "requested": {"purpose": "p"},
                },
                "expect": {"outcome": outcome, "ttl_cap_seconds": ttl},
            }
            for name, action, outcome, ttl in cases
        ]
    }
    return write(path.with_name(path.stem + ".tests.json"), json.dumps(document))


# -- loading --------------------------------------------------------------------------------------


def test_backend_follows_the_extension(tmp_path: Path) -> None:
    engine = load_policy_set([write(tmp_path / "agents.cedar", ALLOW_READ)])
    assert (engine.backend, engine.policy_id) == ("cedar", "agents")
    assert engine.decide(make_input()).outcome is Outcome.ALLOW


def test_several_files_form_one_set(tmp_path: Path) -> None:
    files = [
        write(tmp_path / "a.cedar", ALLOW_READ + "// ends in a comment without newline"),
        write(
            tmp_path / "b.cedar",
            '@id("no-risk") forbid (principal, action, resource) when { context.risk > 50 };',
        ),
    ]
    engine = load_policy_set(files)
    assert engine.policy_id == "a+b"
    assert engine.decide(make_input()).outcome is Outcome.ALLOW
    assert engine.decide(make_input(risk=60)).reasons == ("no-risk",)
    assert load_policy_set(files, name="prod-set").policy_id == "prod-set"


@pytest.mark.parametrize(
    ("names", "backend", "message"),
    [
        ([], None, "no policy files"),
        (["a.txt"], None, "ends in .cedar or .rego"),
        (["a.cedar", "b.rego"], None, "cannot mix"),
        (["a.cedar"], "rego", "files are cedar"),
        (["a.cedar"], "opa", "unknown policy backend"),
    ],
)
def test_file_selection_errors(
    tmp_path: Path, names: list[str], backend: str | None, message: str
) -> None:
    files = [write(tmp_path / n, ALLOW_READ) for n in names]
    with pytest.raises(InvalidArgument, match=message) as info:
        load_policy_set(files, backend)
    assert info.value.reason == "POLICY_INVALID"


def test_missing_or_oversized_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read"):
        load_policy_set([tmp_path / "absent.cedar"])
    big = write(tmp_path / "big.cedar", "// x\n" * 300_000)
    with pytest.raises(InvalidArgument, match="larger than"):
        load_policy_set([big])


def test_a_broken_file_names_itself_and_the_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.cedar", ALLOW_READ + "\npermit (principal, action, resource\n")
    with pytest.raises(InvalidArgument, match=r"bad\.cedar: line 3: ") as info:
        load_policy_set([bad])
    assert info.value.reason == "POLICY_INVALID"


def test_version_changes_with_the_source(tmp_path: Path) -> None:
    path = write(tmp_path / "p.cedar", ALLOW_READ)
    before = load_policy_set([path]).policy_version
    assert load_policy_set([path]).policy_version == before
    write(path, ALLOW_READ_SHORT)
    assert load_policy_set([path]).policy_version != before


def test_the_rego_backend_without_regorus_is_a_clear_error(tmp_path: Path) -> None:
    """The package imports and Cedar works without regorus; asking for Rego says what to install."""
    policy = write(tmp_path / "p.rego", "package authority\n")
    script = f"""
import sys
sys.modules["regorus"] = None  # as if the optional extra were not installed
from pathlib import Path
from authority.errors import FailedPrecondition
from authority.policy import load_default_policy, load_policy_set
from authority.policy.rego import rego_available
assert not rego_available()
assert load_default_policy().backend == "cedar"
try:
    load_policy_set([Path({str(policy)!r})])
except FailedPrecondition as exc:
    print(exc.reason)
    print(exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    reason, message = result.stdout.splitlines()
    assert reason == "POLICY_BACKEND_UNAVAILABLE"
    assert "install the 'rego' extra" in message


# -- the default policy ---------------------------------------------------------------------------


def test_default_policy_ships_in_the_package_and_denies_everything() -> None:
    assert "default deny" in default_policy_text()
    engine = load_default_policy()
    assert (engine.backend, engine.policy_id) == ("cedar", "default")
    for action in ("read", "write", "deploy"):
        decision = engine.decide(make_input(action=action, approved=True))
        assert decision.outcome is Outcome.DENY
        assert decision.reasons == (DEFAULT_DENY_REASON,)


# -- policy tests ---------------------------------------------------------------------------------


def test_tests_next_to_a_policy_are_found_once(tmp_path: Path) -> None:
    cedar_file = write(tmp_path / "agents.cedar", ALLOW_READ)
    rego_file = tmp_path / "agents.rego"
    assert find_policy_tests([cedar_file]) == []
    tests = write_tests(cedar_file, ("reads", "read", "allow", 300))
    assert find_policy_tests([cedar_file, rego_file]) == [tests]


def test_run_policy_tests_reports_each_case(tmp_path: Path) -> None:
    policy = write(tmp_path / "p.cedar", ALLOW_READ)
    tests = write_tests(
        policy,
        ("reads", "read", "allow", 300),
        ("writes", "write", "deny", None),
        ("wrong ttl", "read", "allow", 60),
        ("wrong outcome", "write", "allow", None),
    )
    results = run_policy_tests(load_policy_set([policy]), [tests])
    assert [(r.name, r.passed) for r in results] == [
        ("reads", True),
        ("writes", True),
        ("wrong ttl", False),
        ("wrong outcome", False),
    ]
    assert results[2].failures == ("ttl_cap_seconds 300 != expected 60",)
    assert results[3].failures[0].startswith("outcome deny != expected allow")
    assert all(r.file == str(tests) for r in results)
    assert results[0].decision is not None


def test_optional_expectations_are_checked_only_when_present(tmp_path: Path) -> None:
    policy = write(tmp_path / "p.cedar", ALLOW_READ)
    tests = write(
        tmp_path / "t.json",
        json.dumps(
            {
                "cases": [
                    {
                        "name": "outcome only",
                        "input": {
                            "principal": "spiffe://example.org/a",
                            "action": "read",
                            "resource": "r",
                            "time": "2026-01-05T10:00:00+00:00",
                        },
                        "expect": {"outcome": "allow"},
                    },
                    {
                        "name": "all of it",
                        "comment": "comments are allowed",
                        "input": {
                            "principal": "spiffe://example.org/a",
                            "action": "read",
                            "resource": "r",
                            "time": "2026-01-05T10:00:00+00:00",
                        },
                        "expect": {
                            "outcome": "allow",
                            "ttl_cap_seconds": 300,
                            "max_delegation_depth": 1,
                            "reasons": ["read"],
                        },
                    },
                ]
            }
        ),
    )
    first, second = run_policy_tests(load_policy_set([policy]), [tests])
    assert first.passed
    assert not second.passed
    assert second.failures == ("max_delegation_depth 0 != expected 1",)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not json", "not JSON"),
        ("[]", "expected"),
        ('{"cases": [1]}', "is not an object"),
        ('{"cases": [{"input": {}, "expect": {}}]}', "has no name"),
        (
            '{"cases": [{"name": "a", "input": {}, "expect": {"outcome": "allow"}}]}',
            "lacks required",
        ),
        ('{"cases": [{"name": "a", "input": {}, "expect": {"outcome": "maybe"}}]}', "not a valid"),
        ('{"cases": [{"name": "a", "input": {}, "expect": []}]}', "expect must be an object"),
        ('{"cases": [{"name": "a", "inputs": {}, "expect": {}}]}', "unknown key"),
        ('{"cases": [{"name": "a", "input": {}, "expect": {"ttl": 1}}]}', "unknown expect key"),
        (
            json.dumps(
                {"cases": [{"name": "a", "input": VALID_INPUT, "expect": {"outcome": "deny"}}] * 2}
            ),
            "used twice",
        ),
    ],
)
def test_a_malformed_tests_file_is_refused(tmp_path: Path, document: str, message: str) -> None:
    tests = write(tmp_path / "t.tests.json", document)
    with pytest.raises(InvalidArgument, match=message) as info:
        run_policy_tests(load_default_policy(), [tests])
    assert info.value.reason == "POLICY_TESTS_INVALID"


# -- the manager ----------------------------------------------------------------------------------


def test_manager_starts_from_files_and_reports_what_runs(tmp_path: Path) -> None:
    clock = FakeClock()
    policy = write(tmp_path / "p.cedar", ALLOW_READ)
    write_tests(policy, ("reads", "read", "allow", 300))
    manager = PolicyManager.from_files([policy], clock=clock)
    assert (manager.policy_id, manager.backend) == ("p", "cedar")
    assert manager.policy_version == manager.current.policy_version
    assert manager.loaded_at == clock.now()
    assert manager.files == (policy,)
    assert manager.decide(make_input()).outcome is Outcome.ALLOW


def test_manager_refuses_to_start_when_tests_fail(tmp_path: Path) -> None:
    policy = write(tmp_path / "p.cedar", ALLOW_READ)
    write_tests(policy, ("reads briefly", "read", "allow", 30))
    with pytest.raises(InvalidArgument, match="reads briefly") as info:
        PolicyManager.from_files([policy], clock=FakeClock())
    assert info.value.reason == "POLICY_TESTS_FAILED"


def test_reload_swaps_only_after_compile_and_tests_pass(tmp_path: Path) -> None:
    clock = FakeClock()
    policy = write(tmp_path / "p.cedar", ALLOW_READ)
    write_tests(policy, ("reads", "read", "allow", 300))
    manager = PolicyManager.from_files([policy], clock=clock)
    first = manager.current
    started = manager.loaded_at

    # 1. A policy that does not compile: refused, the old engine keeps running.
    clock.advance(dt.timedelta(minutes=1))
    write(policy, "permit (principal, action, resource")
    assert manager.changed_on_disk()
    with pytest.raises(InvalidArgument) as info:
        manager.reload()
    assert info.value.reason == "POLICY_INVALID"
    assert manager.current is first
    assert manager.loaded_at == started
    assert manager.decide(make_input()).ttl_cap == dt.timedelta(seconds=300)

    # 2. A policy that compiles but fails its own tests: refused, naming the cases.
    write(policy, ALLOW_READ_SHORT)
    with pytest.raises(InvalidArgument, match=r"policy tests failed \(1\): .*: reads") as info:
        manager.reload()
    assert info.value.reason == "POLICY_TESTS_FAILED"
    assert manager.current is first
    assert manager.policy_version == first.policy_version

    # 3. Policy and tests updated together: swapped, with a new version and load time.
    write_tests(policy, ("reads", "read", "allow", 30))
    clock.advance(dt.timedelta(minutes=1))
    installed = manager.reload()
    assert manager.current is installed
    assert manager.policy_version != first.policy_version
    assert manager.loaded_at == started + dt.timedelta(minutes=2)
    assert manager.decide(make_input()).ttl_cap == dt.timedelta(seconds=30)
    assert not manager.changed_on_disk()


def test_reload_with_explicit_files_and_tests(tmp_path: Path) -> None:
    manager = PolicyManager.with_default_policy(clock=FakeClock())
    assert manager.policy_id == "default"
    assert not manager.files
    assert not manager.changed_on_disk()
    with pytest.raises(InvalidArgument, match="no policy files to reload"):
        manager.reload()
    policy = write(tmp_path / "p.cedar", ALLOW_READ)
    other_tests = write_tests(tmp_path / "elsewhere.cedar", ("denies", "read", "deny", None))
    with pytest.raises(InvalidArgument, match="denies"):
        manager.reload([policy], test_files=[other_tests])
    assert manager.policy_id == "default"
    manager.reload([policy], name="agents")
    assert (manager.policy_id, manager.files) == ("agents", (policy,))


def test_reload_keeps_the_old_engine_when_a_tests_file_is_broken(tmp_path: Path) -> None:
    policy = write(tmp_path / "p.cedar", ALLOW_READ)
    manager = PolicyManager.from_files([policy], clock=FakeClock())
    first = manager.current
    write(policy.with_name("p.tests.json"), "{")
    with pytest.raises(InvalidArgument) as info:
        manager.reload()
    assert info.value.reason == "POLICY_TESTS_INVALID"
    assert manager.current is first


@requires_rego
def test_reload_can_switch_backend(tmp_path: Path) -> None:
    manager = PolicyManager.from_files([EXAMPLES / "agents.cedar"], clock=FakeClock())
    manager.reload([EXAMPLES / "agents.rego"])
    assert manager.backend == "rego"
    assert manager.decide(make_input()).outcome is Outcome.ALLOW


def test_explain_uses_the_engine_when_it_can_and_the_decision_otherwise() -> None:
    default = load_default_policy()
    shown = explain(default, make_input())
    assert shown["matched"] == []
    assert set(shown) >= {"decision", "input", "request", "entities", "errors"}

    class DecideOnly:
        backend = "other"
        policy_id = "other"
        policy_version = "0"

        def decide(self, inp: PolicyInput) -> Decision:
            return default.decide(inp)

    plain = explain(DecideOnly(), make_input())
    assert set(plain) == {"decision", "input"}
