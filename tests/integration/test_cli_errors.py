"""Errors a new operator can act on, through the real ``authority`` command against
``authority serve`` in a subprocess: each refusal is one ``error:`` line naming the code, the
stable reason and what to do, exits non-zero, prints no traceback, and changes nothing."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ServeProcess, serve_process
from tests.integration.test_cli import assert_one_error_line

TD = "example.org"
POLICIES = Path(__file__).resolve().parents[2] / "examples" / "policies"
# How str(timedelta) prints: what the CLI must never show an operator.
TIMEDELTA_TEXT = re.compile(r"\b\d+:\d\d:\d\d\b")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One server for the module: each test uses names of its own."""
    with serve_process(tmp_path_factory.mktemp("cli-errors") / "data") as proc:
        yield proc


def refused(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return assert_one_error_line(result, *needles)


def audit(served: ServeProcess, kind: str) -> list[dict[str, Any]]:
    """The audit records of ``kind``, from ``authority audit export``."""
    lines = served.cli("audit", "export").stdout.splitlines()
    records = [json.loads(line) for line in lines]
    return [r for r in records if r.get("type") == "record" and r["kind"] == kind]


def entry(served: ServeProcess, spiffe_id: str, *args: str, check: bool = True) -> Any:
    result = served.cli(
        "entry", "create", "--spiffe-id", spiffe_id, *args, "--format", "json", check=check
    )
    return json.loads(result.stdout) if check else result


# --- revoke: a name with no record is NOT_FOUND unless --preemptive ---------------------------


@pytest.mark.parametrize(
    ("flag", "target", "reason"),
    [
        ("--entry", "0b6c7c1e-no-such-entry", "ENTRY_NOT_FOUND"),
        ("--attestor", "no-such-attestor", "ATTESTOR_NOT_FOUND"),
        ("--spiffe-id", f"spiffe://{TD}/typo/nobody", "SUBJECT_NOT_FOUND"),
    ],
)
def test_revoking_an_unknown_name_is_not_found(
    served: ServeProcess, flag: str, target: str, reason: str
) -> None:
    before = len(audit(served, "revocation.created"))
    result = served.cli("revoke", flag, target, "--reason", "typo", check=False)
    refused(result, "NOT_FOUND", f"[{reason}]", target, "--preemptive")
    assert len(audit(served, "revocation.created")) == before


def test_a_preemptive_revocation_is_made_and_audited_as_such(served: ServeProcess) -> None:
    target = f"spiffe://{TD}/not-yet/agent"
    result = served.cli(
        "revoke", "--spiffe-id", target, "--reason", "leaked before use", "--preemptive"
    )
    assert f"revoked subject {target}" in result.stdout
    [record] = [r for r in audit(served, "revocation.created") if r["subject"] == target]
    assert record["details"]["preemptive"] is True


def test_names_on_record_are_revoked_without_preemptive(served: ServeProcess) -> None:
    spiffe_id = f"spiffe://{TD}/known/app"
    created = entry(served, spiffe_id, "--selector", f"join_token:spiffe_id:{spiffe_id}")
    by_entry = served.cli("revoke", "--entry", created["id"], "--reason", "r")
    assert f"revoked entry {created['id']}" in by_entry.stdout
    by_id = served.cli("revoke", "--spiffe-id", spiffe_id, "--reason", "r")
    assert f"revoked subject {spiffe_id}" in by_id.stdout
    served.cli("attestor", "register", "known-local", "--plugin", "unix")
    by_attestor = served.cli("revoke", "--attestor", "known-local", "--reason", "r")
    assert "revoked attestor known-local" in by_attestor.stdout
    records = [
        r for r in audit(served, "revocation.created") if r["subject"] in (spiffe_id, "known-local")
    ]
    assert records
    assert not any("preemptive" in r["details"] for r in records)


def test_preemptive_does_not_apply_to_a_token(served: ServeProcess) -> None:
    result = served.cli(
        "revoke", "--jti", "no-such-jti", "--reason", "r", "--preemptive", check=False
    )
    refused(result, "INVALID_ARGUMENT", "[NOT_PREEMPTIBLE]")
    plain = served.cli("revoke", "--jti", "no-such-jti", "--reason", "r", check=False)
    refused(plain, "NOT_FOUND", "[TOKEN_NOT_FOUND]")


# --- policy load: tests required unless --allow-untested; policy show reports them ------------


def test_an_untested_policy_is_refused_unless_allowed(served: ServeProcess, tmp_path: Path) -> None:
    lone = tmp_path / "lone.cedar"
    lone.write_text((POLICIES / "agents.cedar").read_text())
    before = served.cli("policy", "show").stdout
    result = served.cli("policy", "load", str(lone), check=False)
    refused(result, "INVALID_ARGUMENT", "[POLICY_UNTESTED]", "lone.tests.json", "--allow-untested")
    assert served.cli("policy", "show").stdout == before
    [refusal] = [
        r for r in audit(served, "policy.load_refused") if "lone.cedar" in r["details"]["files"]
    ]
    assert refusal["details"]["reason"] == "POLICY_UNTESTED"

    loaded = served.cli("policy", "load", str(lone), "--allow-untested").stdout
    assert "tests: none (untested)" in loaded
    shown = served.cli("policy", "show").stdout
    assert "files: lone.cedar\n" in shown
    assert "tests: none (untested)" in shown
    last = audit(served, "policy.loaded")[-1]
    assert last["details"]["untested"] is True
    assert last["details"]["tests"] == 0


def test_policy_show_reports_the_tests_run_at_load(served: ServeProcess, tmp_path: Path) -> None:
    cases = json.loads((POLICIES / "agents.tests.json").read_text())["cases"]
    loaded = served.cli(
        "policy", "load", str(POLICIES / "agents.cedar"), str(POLICIES / "agents.tests.json")
    ).stdout
    expected = f"tests: {len(cases)}, all passed when it was loaded"
    assert expected in loaded
    shown = served.cli("policy", "show").stdout
    assert "agents.tests.json" in shown
    assert expected in shown
    last = audit(served, "policy.loaded")[-1]
    assert last["details"]["tests"] == len(cases)
    assert "untested" not in last["details"]


# --- entry create: selectors no workload could present ---------------------------------------


def test_a_selector_of_no_registered_attestor_is_refused(served: ServeProcess) -> None:
    spiffe_id = f"spiffe://{TD}/sel/later"
    before = served.cli("entry", "list", "--format", "json").stdout
    result = entry(served, spiffe_id, "--selector", "k8s-later:namespace:prod", check=False)
    line = refused(
        result, "INVALID_ARGUMENT", "[SELECTOR_UNKNOWN_ATTESTOR]", "k8s-later", "--force"
    )
    assert "join_token" in line  # the registered attestors are named
    assert served.cli("entry", "list", "--format", "json").stdout == before
    # --force: for an attestor registered later; the audit says which selectors were unchecked.
    forced = entry(served, spiffe_id, "--selector", "k8s-later:namespace:prod", "--force")
    [record] = [r for r in audit(served, "entry.created") if r["subject"] == forced["id"]]
    assert record["details"]["forced_selectors"] == ["k8s-later:namespace:prod"]


def test_a_key_the_plugin_does_not_produce_is_refused(served: ServeProcess) -> None:
    result = entry(
        served, f"spiffe://{TD}/sel/bad-key", "--selector", "join_token:sub:x", check=False
    )
    refused(result, "INVALID_ARGUMENT", "[SELECTOR_KIND]", "spiffe_id", "'sub'")
    served.cli("attestor", "register", "sel-local", "--plugin", "unix")
    wrong = entry(
        served, f"spiffe://{TD}/sel/bad-unix", "--selector", "sel-local:colour:blue", check=False
    )
    refused(wrong, "[SELECTOR_KIND]", "uid", "sha256", "'colour'")
    no_key = entry(served, f"spiffe://{TD}/sel/no-key", "--selector", "sel-local:1000", check=False)
    refused(no_key, "[SELECTOR_KIND]", "sel-local:KEY:VALUE")
    ok = entry(served, f"spiffe://{TD}/sel/good-unix", "--selector", "sel-local:uid:1000")
    assert ok["selectors"] == [{"type": "sel-local", "value": "uid:1000"}]


def test_node_entries_take_the_agents_unix_selectors(served: ServeProcess) -> None:
    """The agent's unix attestor runs on the node, not registered here: any type (the agent's
    --workload-attestor), but only the unix plugin's keys."""
    parent = f"spiffe://{TD}/agent/node-sel"
    for kind in ("unix", "node-local"):
        entry(
            served, f"spiffe://{TD}/node/{kind}", "--selector", f"{kind}:uid:1000",
            "--parent-id", parent,
        )  # fmt: skip
    result = entry(
        served, f"spiffe://{TD}/node/bad", "--selector", "unix:pod:web", "--parent-id", parent,
        check=False,
    )  # fmt: skip
    refused(result, "[SELECTOR_KIND]", "node agent", "uid", "'pod'")


# --- entry update -----------------------------------------------------------------------------


def test_entry_update_changes_what_is_given_and_is_audited(served: ServeProcess) -> None:
    spiffe_id = f"spiffe://{TD}/upd/app"
    created = entry(served, spiffe_id, "--selector", f"join_token:spiffe_id:{spiffe_id}")
    shown = served.cli(
        "entry", "update", created["id"], "--x509-ttl", "10m", "--dns-name", "app.example.org"
    ).stdout
    assert "X509-SVID TTL: 10m" in shown
    assert "app.example.org" in shown
    assert not TIMEDELTA_TEXT.search(shown), shown
    after = json.loads(served.cli("entry", "show", created["id"], "--format", "json").stdout)
    assert after["x509_ttl_seconds"] == 600
    assert after["jwt_ttl_seconds"] == created["jwt_ttl_seconds"]  # not given: unchanged
    assert after["selectors"] == created["selectors"]
    [record] = [r for r in audit(served, "entry.updated") if r["subject"] == created["id"]]
    assert record["details"]["changed"] == ["dns_names", "x509_ttl_s"]
    assert record["details"]["before"] == {"dns_names": [], "x509_ttl_s": 300}
    assert record["details"]["after"] == {"dns_names": ["app.example.org"], "x509_ttl_s": 600}


def test_entry_update_refusals(served: ServeProcess) -> None:
    missing = served.cli("entry", "update", "no-such-entry", "--x509-ttl", "10m", check=False)
    refused(missing, "NOT_FOUND", "no-such-entry")
    spiffe_id = f"spiffe://{TD}/upd/refused"
    created = entry(served, spiffe_id, "--selector", f"join_token:spiffe_id:{spiffe_id}")
    nothing = served.cli("entry", "update", created["id"], check=False)
    refused(nothing, "nothing to change")
    bad = served.cli("entry", "update", created["id"], "--selector", "nowhere:a:b", check=False)
    refused(bad, "[SELECTOR_UNKNOWN_ATTESTOR]")
    too_long = served.cli("entry", "update", created["id"], "--x509-ttl", "2d", check=False)
    line = refused(too_long, "INVALID_ARGUMENT", "X.509-SVID TTL must be between 30s and 1h")
    assert not TIMEDELTA_TEXT.search(line), line
    unchanged = json.loads(served.cli("entry", "show", created["id"], "--format", "json").stdout)
    assert unchanged == created
    assert not [r for r in audit(served, "entry.updated") if r["subject"] == created["id"]]


# --- durations --------------------------------------------------------------------------------


def test_durations_print_as_units_not_clock_times(served: ServeProcess) -> None:
    spiffe_id = f"spiffe://{TD}/dur/app"
    shown = served.cli(
        "entry", "create", "--spiffe-id", spiffe_id, "--selector",
        f"join_token:spiffe_id:{spiffe_id}", "--x509-ttl", "30s", "--jwt-ttl", "24h", check=False,
    )  # fmt: skip
    line = refused(shown, "JWT-SVID TTL must be between 30s and 1h")  # 24h: past the maximum
    assert not TIMEDELTA_TEXT.search(line), line
    made = served.cli(
        "entry", "create", "--spiffe-id", spiffe_id, "--selector",
        f"join_token:spiffe_id:{spiffe_id}", "--x509-ttl", "30s", "--jwt-ttl", "5m",
    ).stdout  # fmt: skip
    assert "X509-SVID TTL: 30s" in made
    assert "JWT-SVID TTL : 5m" in made
    short_token = served.cli(
        "token", "create", "--spiffe-id", f"spiffe://{TD}/dur/node", "--ttl", "1s", check=False
    )
    line = refused(short_token, "join token TTL must be between 30s and 7d")
    assert not TIMEDELTA_TEXT.search(line), line
