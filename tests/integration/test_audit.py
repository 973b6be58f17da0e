"""The audit chain through the real ``authority`` command against ``authority serve``: a full
agent task reconstructed by ``audit trace``; tampering with the SQLite file found by ``audit
verify``; offline verification of exports and archives; ``audit tail`` following live."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import queue
import re
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from authority.audit import AuditEvent, AuditRecord, chain, sign_checkpoint
from tests.helpers import ServeProcess, authority_command, serve_process

TD = "example.org"
AGENT = f"spiffe://{TD}/agent/reporter"
HELPER = f"spiffe://{TD}/agent/helper"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"
POLICY = EXAMPLES / "agents.cedar"
POLICY_TESTS = EXAMPLES / "agents.tests.json"
READ_PROMPT = hashlib.sha256(b"Summarise last week's error rate in prod.").hexdigest()
DEPLOY_PROMPT = hashlib.sha256(b"Roll out the fix to production.").hexdigest()
TOOL_ARGS = hashlib.sha256(b'{"query": "rate(errors[7d])"}').hexdigest()
BROKEN = re.compile(r"BROKEN at record (\d+): (.*)")


# --- driving the CLI ---------------------------------------------------------------------------


def bundle_file(served: ServeProcess, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "bundle.pem"
    path.write_text(served.cli("bundle", "show").stdout)
    return path


def attest(served: ServeProcess, spiffe_id: str, out: Path) -> None:
    token = served.cli("token", "create", "--spiffe-id", spiffe_id).stdout.strip()
    served.cli(
        "workload", "attest", "--server", served.address,
        "--trust-bundle", str(bundle_file(served, out.parent)), "--join-token", "-",
        "--out", str(out), stdin=token + "\n",
    )  # fmt: skip


def exchange(
    served: ServeProcess, svid_dir: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return served.cli(
        "workload", "exchange", "--server", served.address, "--svid-dir", str(svid_dir), *args,
        check=check,
    )  # fmt: skip


def read_metrics(served: ServeProcess, svid_dir: Path, task: str) -> str:
    return exchange(
        served, svid_dir, "--action", "read", "--resource", "metrics/prod",
        "--audience", "metrics-api", "--purpose", "weekly report", "--task", task,
        "--prompt-sha256", READ_PROMPT, "--tool", "query_metrics",
        "--tool-args-sha256", TOOL_ARGS, "--model", "model-x",
    ).stdout.strip()  # fmt: skip


def exported(served: ServeProcess) -> list[dict[str, Any]]:
    """Every line of ``audit export``, parsed."""
    out = served.cli("audit", "export", "--format", "jsonl").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def records_of(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["type"] == "record"]


def verify(served: ServeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return served.cli("audit", "verify", *args, check=False)


def assert_verifies(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: "), result.stdout
    assert result.stderr == ""


def assert_broken_at(result: subprocess.CompletedProcess[str], seq: int, needle: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stdout == ""
    found = BROKEN.search(result.stderr)
    assert found is not None, result.stderr
    assert int(found.group(1)) == seq, result.stderr
    assert needle in found.group(2), result.stderr
    return found.group(2)


def jti_of(token: str) -> str:
    claims = jwt.decode(token, options={"verify_signature": False})
    return str(claims["jti"])


def activity(served: ServeProcess, folder: Path) -> None:
    """Enough of a life to leave a chain of a few dozen records of many kinds."""
    served.cli("policy", "load", str(POLICY), str(POLICY_TESTS))
    agent = folder / "agent"
    attest(served, AGENT, agent)
    for n in range(3):
        read_metrics(served, agent, f"task-activity-{n}")
    denied = exchange(
        served, agent, "--action", "write", "--resource", "metrics/prod",
        "--audience", "metrics-api", "--purpose", "tidy", check=False,
    )  # fmt: skip
    assert denied.returncode == 1
    served.cli(
        "workload", "jwt", "--server", served.address, "--svid-dir", str(agent),
        "--audience", "relying-service",
    )  # fmt: skip


# --- a full agent task, reconstructed ----------------------------------------------------------


def test_trace_reconstructs_a_full_agent_task(served: ServeProcess, tmp_path: Path) -> None:
    loaded = served.cli("policy", "load", str(POLICY), str(POLICY_TESTS)).stdout
    version_match = re.search(r"policy agents version (\S+)", loaded)
    assert version_match is not None, loaded
    version = version_match.group(1)
    agent, helper = tmp_path / "agent", tmp_path / "helper"
    attest(served, AGENT, agent)
    attest(served, HELPER, helper)
    task = "task-incident-42"

    # 1. an exchange the policy allows
    read_token = read_metrics(served, agent, task)
    # 2. an exchange that needs an operator
    deploy_args = (
        "--action", "deploy", "--resource", "deploy/production", "--audience", "deployer",
        "--purpose", "ship the fix", "--task", task, "--prompt-sha256", DEPLOY_PROMPT,
        "--tool", "deploy", "--model", "model-x",
    )  # fmt: skip
    pending = exchange(served, agent, *deploy_args, check=False)
    assert pending.returncode == 3, pending.stderr
    approval_id = pending.stdout.strip()
    # 3. the operator approves; the agent collects its token
    served.cli("approve", approval_id, "--note", "change 1234")
    deploy_token = exchange(served, agent, *deploy_args, "--approval", approval_id).stdout.strip()
    # 4. the agent hands its read token on to a second workload
    delegated_token = served.cli(
        "workload", "delegate", "--server", served.address, "--svid-dir", str(agent),
        "--token", read_token, "--to-svid", str(helper / "svid.pem"),
    ).stdout.strip()  # fmt: skip
    # 5. the operator revokes the delegated token, found by its jti in the export
    delegations = [r for r in records_of(exported(served)) if r["kind"] == "task_token.delegated"]
    assert len(delegations) == 1
    delegated_jti = delegations[0]["details"]["jti"]
    assert delegated_jti == jti_of(delegated_token)
    served.cli("revoke", "--jti", delegated_jti, "--reason", "incident response")
    # 6. the agent ends its task
    served.cli(
        "workload", "end-task", "--server", served.address, "--svid-dir", str(agent),
        "--task", task, "--reason", "done",
    )  # fmt: skip

    lines = served.cli("audit", "trace", task, "--format", "json").stdout.splitlines()
    trace = [json.loads(line) for line in lines]  # one JSON document per line
    # First the attestations behind the callers' SVIDs (the agent's, and the delegate's),
    # linked from the decisions by identity id; then the task itself.
    attested = [r for r in trace if r["kind"] in ("attest.succeeded", "x509.issued")]
    assert {r["subject"] for r in attested if r["kind"] == "attest.succeeded"} == {AGENT, HELPER}
    assert [r["kind"] for r in attested] == ["attest.succeeded", "x509.issued"] * 2
    trace = [r for r in trace if r not in attested]
    assert max(r["seq"] for r in attested) < min(r["seq"] for r in trace)
    assert [r["kind"] for r in trace] == [
        "policy.decided",  # read: allow
        "task_token.issued",
        "policy.decided",  # deploy: require approval
        "approval.requested",
        "approval.approved",
        "policy.decided",  # deploy, approved: allow
        "task_token.issued",
        "policy.decided",  # the delegate, at depth 1
        "task_token.delegated",
        "revocation.created",  # the delegated jti
        "task.ended",
        "revocation.created",  # the task, as it ended
    ]
    seqs = [r["seq"] for r in trace]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    times = [r["time_us"] for r in trace]
    assert times == sorted(times)
    (
        read_decided, read_issued, deploy_decided, requested, approved,
        deploy_allowed, deploy_issued, delegate_decided, delegated, revoked, ended, task_revoked,
    ) = trace  # fmt: skip

    # What the agent asked for and why; what policy decided, which policy, on which inputs.
    d = read_decided["details"]
    assert read_decided["actor"] == AGENT
    assert read_decided["task_id"] == task
    assert d["input"]["principal"] == AGENT
    assert d["input"]["action"] == "read"
    assert d["input"]["resource"] == "metrics/prod"
    assert d["input"]["requested"]["purpose"] == "weekly report"
    assert d["resource_facts"] == {"kind": "metrics", "environment": "prod"}
    assert d["input"]["audience"] == "metrics-api"
    assert d["input"]["delegation_depth"] == 0
    assert d["input"]["attributes"]["attestor"] == "join_token"
    assert d["context"] == {
        "prompt_sha256": READ_PROMPT,
        "tool": "query_metrics",
        "tool_args_sha256": TOOL_ARGS,
        "model": "model-x",
    }
    assert d["policy"] == {"id": "agents", "version": version, "backend": "cedar"}
    assert d["outcome"] == "allow"
    assert d["reasons"] == ["agents-read-metrics"]
    assert d["max_delegation_depth"] == 1

    # What was issued, linked to the decision that allowed it.
    assert read_issued["decision_id"] == read_decided["decision_id"] != ""
    assert read_issued["task_id"] == task
    assert read_issued["subject"] == AGENT
    assert read_issued["details"]["jti"] == jti_of(read_token)
    assert read_issued["details"]["token_sha256"] == hashlib.sha256(read_token.encode()).hexdigest()
    assert read_issued["details"]["prompt_sha256"] == READ_PROMPT
    assert read_issued["details"]["approval_id"] == ""

    # The elevation: decided, requested, approved by the operator, collected.
    assert deploy_decided["details"]["outcome"] == "require_approval"
    assert deploy_decided["details"]["input"]["action"] == "deploy"
    assert deploy_decided["details"]["input"]["resource"] == "deploy/production"
    assert deploy_decided["details"]["input"]["approved"] is False
    assert deploy_decided["details"]["context"]["prompt_sha256"] == DEPLOY_PROMPT
    assert deploy_decided["details"]["policy"]["version"] == version
    assert requested["subject"] == approval_id
    assert requested["decision_id"] == deploy_decided["decision_id"]
    assert requested["details"]["intent"]["resource"] == "deploy/production"
    assert approved["actor"] == "operator"
    assert approved["subject"] == approval_id
    assert approved["details"]["note"] == "change 1234"
    assert deploy_allowed["details"]["outcome"] == "allow"
    assert deploy_allowed["details"]["input"]["approved"] is True
    assert deploy_issued["decision_id"] == deploy_allowed["decision_id"]
    assert deploy_issued["decision_id"] != deploy_decided["decision_id"]
    assert deploy_issued["details"]["approval_id"] == approval_id
    assert deploy_issued["details"]["jti"] == jti_of(deploy_token)
    assert deploy_issued["details"]["scope"] == "deploy"

    # The delegation: decided for the delegate, on the same task, narrowing the read token.
    assert delegate_decided["details"]["input"]["principal"] == HELPER
    assert delegate_decided["details"]["input"]["delegation_depth"] == 1
    assert delegate_decided["details"]["outcome"] == "allow"
    assert delegate_decided["task_id"] == task
    assert delegated["decision_id"] == delegate_decided["decision_id"]
    assert delegated["task_id"] == task
    assert delegated["actor"] == AGENT
    assert delegated["subject"] == HELPER
    assert delegated["details"]["jti"] == delegated_jti
    assert delegated["details"]["parent_jti"] == jti_of(read_token)
    assert delegated["details"]["act"] == [HELPER]

    # The revocation of the delegated token, then the end of the task (and its revocation).
    assert revoked["actor"] == "operator"
    assert revoked["subject"] == delegated_jti
    assert revoked["details"]["kind"] == "jti"
    assert revoked["details"]["reason"] == "incident response"
    assert ended["actor"] == AGENT
    assert ended["subject"] == task
    assert ended["details"]["reason"] == "done"
    assert task_revoked["subject"] == task
    assert task_revoked["details"]["kind"] == "task"

    # The same, readable in a terminal: one line per record, in the same order.
    text = served.cli("audit", "trace", task).stdout.splitlines()
    everything = sorted([*attested, *trace], key=lambda r: r["seq"])
    assert len(text) == len(everything)
    for line, record in zip(text, everything, strict=True):
        assert line.split()[0] == str(record["seq"])
        assert record["kind"] in line
    first_task_line = text[len(attested)]
    assert f"decision={read_decided['decision_id']}" in first_task_line
    assert READ_PROMPT in first_task_line

    # Records of other tasks stay out; a task nobody ran has no trace.
    read_metrics(served, agent, "task-unrelated")
    again = served.cli("audit", "trace", task, "--format", "json").stdout.splitlines()
    assert [json.loads(line) for line in again] == everything
    missing = served.cli("audit", "trace", "task-never-ran", check=False)
    assert missing.returncode == 1
    assert "no audit records" in missing.stderr
    assert_verifies(verify(served))


# --- tampering with the database ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pristine:
    """A stopped authority's data directory whose head ``head`` is checkpointed."""

    data_dir: Path
    head: int


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    root = tmp_path_factory.mktemp("pristine")
    with serve_process(root / "data") as served:
        activity(served, root)
        out = served.cli("audit", "checkpoint").stdout
        match = re.match(r"checkpoint at (\d+): [0-9a-f]{64}$", out.strip())
        assert match is not None, out
        head = int(match.group(1))
        assert head == records_of(exported(served))[-1]["seq"]
    assert head >= 12
    return Pristine(root / "data", head)


@pytest.fixture
def tampered_copy(pristine: Pristine, tmp_path: Path) -> Path:
    copy = tmp_path / "data"
    shutil.copytree(pristine.data_dir, copy, ignore=shutil.ignore_patterns("*.sock"))
    return copy


def db_path(data_dir: Path) -> Path:
    return data_dir / "authority.db"


def edit(data_dir: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    with sqlite3.connect(db_path(data_dir)) as db:
        for sql, params in statements:
            db.execute(sql, params)
    db.close()


def stored(data_dir: Path, seq: int) -> AuditRecord:
    with sqlite3.connect(db_path(data_dir)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM audit WHERE seq = ?", (seq,)).fetchone()
    db.close()
    assert row is not None
    return AuditRecord(
        row["seq"], row["time_us"], row["kind"], row["actor"], row["subject"], row["task_id"],
        row["decision_id"], row["details"], row["prev_hash"], row["hash"],
    )  # fmt: skip


def verify_served(data_dir: Path) -> subprocess.CompletedProcess[str]:
    with serve_process(data_dir) as served:
        return verify(served)


def test_untouched_copy_verifies(pristine: Pristine, tampered_copy: Path) -> None:
    result = verify_served(tampered_copy)
    assert_verifies(result)
    assert result.stdout.startswith(f"ok: {pristine.head} records, ")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("actor", "spiffe://example.org/agent/innocent"),
        ("details", '{"outcome":"allow"}'),
        ("time_us", 0),
        ("kind", "task.ended"),
    ],
)
def test_an_edited_field_is_named(
    pristine: Pristine, tampered_copy: Path, column: str, value: object
) -> None:
    seq = pristine.head // 2
    edit(tampered_copy, (f"UPDATE audit SET {column} = ? WHERE seq = ?", (value, seq)))  # noqa: S608
    assert_broken_at(verify_served(tampered_copy), seq, "altered")


def test_a_deleted_record_is_named(pristine: Pristine, tampered_copy: Path) -> None:
    seq = pristine.head // 2
    edit(tampered_copy, ("DELETE FROM audit WHERE seq = ?", (seq,)))
    assert_broken_at(verify_served(tampered_copy), seq, f"record {seq} is missing")


def test_an_inserted_record_is_named(pristine: Pristine, tampered_copy: Path) -> None:
    """A forgery that follows the hash rule, slotted in at ``seq``: the rest move up by one, and
    the original record now at ``seq + 1`` no longer links to what precedes it."""
    seq = pristine.head // 2
    before = stored(tampered_copy, seq - 1)
    forged = chain(
        AuditEvent(
            "approval.approved",
            before.time + dt.timedelta(microseconds=1),
            actor="operator",
            subject="apr-forged",
            details={"note": "approved, honest"},
        ),
        seq,
        before.hash,
    )
    edit(
        tampered_copy,
        ("UPDATE audit SET seq = -seq WHERE seq >= ?", (seq,)),
        ("UPDATE audit SET seq = 1 - seq WHERE seq < 0", ()),
        (
            "INSERT INTO audit (seq, time_us, kind, actor, subject, task_id, decision_id, details,"
            " prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            dataclasses.astuple(forged),
        ),
    )
    assert stored(tampered_copy, seq) == forged
    assert_broken_at(verify_served(tampered_copy), seq + 1, "prev_hash")


@pytest.mark.parametrize("distance", [1, 5])
def test_two_swapped_records_are_named(
    pristine: Pristine, tampered_copy: Path, distance: int
) -> None:
    first = pristine.head // 2
    second = first + distance
    edit(
        tampered_copy,
        ("UPDATE audit SET seq = -1 WHERE seq = ?", (first,)),
        ("UPDATE audit SET seq = ? WHERE seq = ?", (first, second)),
        ("UPDATE audit SET seq = ? WHERE seq = -1", (second,)),
    )
    assert_broken_at(verify_served(tampered_copy), first, "prev_hash")


def test_a_truncated_tail_after_a_checkpoint_is_named(
    pristine: Pristine, tampered_copy: Path
) -> None:
    keep = pristine.head - 3
    edit(tampered_copy, ("DELETE FROM audit WHERE seq > ?", (keep,)))
    assert_broken_at(verify_served(tampered_copy), keep + 1, "truncated")


def test_a_forged_checkpoint_is_refused(pristine: Pristine, tampered_copy: Path) -> None:
    """Rewrite a record, rehash the rest of the chain, and sign a new head with a key of one's
    own: the checkpoint's kid is not in the bundle."""
    seq = pristine.head // 2
    with sqlite3.connect(db_path(tampered_copy)) as db:
        rows = db.execute(
            "SELECT seq, time_us, kind, actor, subject, task_id, decision_id, details, prev_hash"
            " FROM audit WHERE seq >= ? ORDER BY seq",
            (seq,),
        ).fetchall()
        prev = str(rows[0][8])
        for number, row in enumerate(rows):
            actor = "spiffe://example.org/agent/innocent" if number == 0 else row[3]
            event = AuditEvent(
                row[2],
                dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=row[1]),
                actor=actor,
                subject=row[4],
                task_id=row[5],
                decision_id=row[6],
                details=json.loads(row[7]),
            )
            record = chain(event, row[0], prev)
            db.execute(
                "UPDATE audit SET actor = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                (record.actor, record.prev_hash, record.hash, record.seq),
            )
            prev = record.hash
        mine = ec.generate_private_key(ec.SECP256R1())
        forged = sign_checkpoint(
            pristine.head, prev, mine, "attacker-kid", "ES256", dt.datetime.now(dt.UTC), TD
        )
        db.execute("DELETE FROM audit_checkpoints")
        db.execute(
            "INSERT INTO audit_checkpoints (seq, hash, jws) VALUES (?, ?, ?)",
            (forged.seq, forged.hash, forged.jws),
        )
    db.close()
    assert_broken_at(verify_served(tampered_copy), pristine.head, "not in the bundle")


# --- export and offline verification -----------------------------------------------------------


def write_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_export_verifies_offline_and_an_edited_line_does_not(
    served: ServeProcess, tmp_path: Path
) -> None:
    activity(served, tmp_path)
    served.cli("audit", "checkpoint")
    export = tmp_path / "audit.jsonl"
    result = served.cli("audit", "export", "--format", "jsonl", "--out", str(export))
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    records = records_of(lines)
    checkpoints = [line for line in lines if line["type"] == "checkpoint"]
    assert f"exported {len(records)} records" in result.stderr
    assert lines[0]["type"] == "header"
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert checkpoints
    assert checkpoints[-1]["seq"] <= records[-1]["seq"]
    # The checkpoints are signed by a key of the published bundle (its JWT-SVID keys).
    jwks = tmp_path / "jwks.json"
    jwks.write_text(served.cli("bundle", "show", "--format", "jwks").stdout)
    bundle_kids = {k["kid"] for k in json.loads(jwks.read_text())["keys"] if "kid" in k}
    assert {jwt.get_unverified_header(c["jws"])["kid"] for c in checkpoints} <= bundle_kids

    # Offline: no server needed. Stop it to be sure.
    served.stop()
    assert_verifies(verify(served, "--file", str(export), "--jwks", str(jwks)))
    own = verify(served, "--file", str(export))  # against the JWK Set the export carries
    assert_verifies(own)
    assert own.stdout.startswith(f"ok: {len(records)} records, {len(checkpoints)} signed")

    # Against a JWK Set that lacks the signer, the checkpoints do not verify.
    empty = tmp_path / "empty.json"
    empty.write_text('{"keys": []}')
    assert_broken_at(
        verify(served, "--file", str(export), "--jwks", str(empty)),
        checkpoints[-1]["seq"],
        "not in the bundle",
    )

    # One edited line: the record is named.
    target = len(records) // 2
    edited = [dict(line) for line in lines]
    index = next(i for i, line in enumerate(edited) if line.get("seq") == target and "kind" in line)
    edited[index]["actor"] = "spiffe://example.org/agent/innocent"
    tampered = tmp_path / "tampered.jsonl"
    write_lines(tampered, edited)
    assert_broken_at(
        verify(served, "--file", str(tampered), "--jwks", str(jwks)), target, "altered"
    )

    # The readable time is not hashed, but it may not be edited either.
    edited = [dict(line) for line in lines]
    edited[index]["time"] = "2020-01-01T00:00:00+00:00"
    retimed = tmp_path / "retimed.jsonl"
    write_lines(retimed, edited)
    refused = verify(served, "--file", str(retimed), "--jwks", str(jwks))
    assert refused.returncode == 1
    assert f"{retimed}:{index + 1}:" in refused.stderr
    assert "time" in refused.stderr

    # A deleted line, a dropped tail: named too.
    without = [line for i, line in enumerate(lines) if i != index]
    dropped = tmp_path / "dropped.jsonl"
    write_lines(dropped, without)
    assert_broken_at(verify(served, "--file", str(dropped)), target, f"record {target} is missing")
    last_checkpointed = checkpoints[-1]["seq"]
    short = [line for line in lines if line["type"] != "record" or line["seq"] < last_checkpointed]
    truncated = tmp_path / "truncated.jsonl"
    write_lines(truncated, short)
    assert_broken_at(verify(served, "--file", str(truncated)), last_checkpointed, "truncated")


def test_an_export_re_signed_by_someone_else_fails_against_the_bundle(
    served: ServeProcess, tmp_path: Path
) -> None:
    """Edit, rehash everything after, sign a fresh head with one's own key and ship one's own
    JWK Set in the header: only the bundle's JWK Set, given with --jwks, tells."""
    activity(served, tmp_path)
    served.cli("audit", "checkpoint")
    lines = [json.loads(line) for line in served.cli("audit", "export").stdout.splitlines()]
    jwks = tmp_path / "jwks.json"
    jwks.write_text(served.cli("bundle", "show", "--format", "jwks").stdout)
    records = [AuditRecord.from_json({k: v for k, v in r.items() if k != "type"})
               for r in records_of(lines)]  # fmt: skip
    target = len(records) // 2
    prev = records[target - 2].hash
    forged_records = records[: target - 1]
    for record in records[target - 1 :]:
        actor = "spiffe://example.org/agent/innocent" if record.seq == target else record.actor
        event = AuditEvent(
            record.kind, record.time, actor=actor, subject=record.subject,
            task_id=record.task_id, decision_id=record.decision_id, details=record.details,
        )  # fmt: skip
        forged = chain(event, record.seq, prev)
        forged_records.append(forged)
        prev = forged.hash
    mine = ec.generate_private_key(ec.SECP256R1())
    head = forged_records[-1]
    checkpoint = sign_checkpoint(
        head.seq, head.hash, mine, "attacker-kid", "ES256", dt.datetime.now(dt.UTC), TD
    )
    my_jwk = json.loads(ECAlgorithm.to_jwk(mine.public_key()))
    header = {**lines[0], "jwks": {"keys": [{**my_jwk, "kid": "attacker-kid", "use": "jwt-svid"}]}}
    forged_lines = [
        header,
        *({"type": "record", **r.as_json()} for r in forged_records),
        {"type": "checkpoint", "seq": checkpoint.seq, "hash": checkpoint.hash,
         "jws": checkpoint.jws},
    ]  # fmt: skip
    forgery = tmp_path / "forgery.jsonl"
    write_lines(forgery, forged_lines)
    assert_broken_at(
        verify(served, "--file", str(forgery), "--jwks", str(jwks)), head.seq, "not in the bundle"
    )


# --- retention ---------------------------------------------------------------------------------


def test_archive_then_prune_keeps_both_halves_verifiable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    archive = tmp_path / "archive.jsonl"
    with serve_process(data) as served:
        activity(served, tmp_path)
        head = records_of(exported(served))[-1]["seq"]
        through = head - 4
        result = served.cli("audit", "archive", "--through", str(through), "--out", str(archive))
        assert f"archived {through} records" in result.stderr
        # What remains starts after the archive and still verifies against its anchor.
        remaining = exported(served)
        assert remaining[0]["anchor_seq"] == through + 1
        kept = records_of(remaining)
        assert kept[0]["seq"] == through + 1
        archived_lines = [json.loads(line) for line in archive.read_text().splitlines()]
        assert kept[0]["prev_hash"] == records_of(archived_lines)[-1]["hash"]
        assert kept[-1]["kind"] == "audit.pruned"
        assert kept[-1]["details"] == {"through_seq": through, "removed": through}
        live = verify(served)
        assert_verifies(live)
        assert live.stdout.startswith(f"ok: {len(kept)} records, ")
        # And more activity after the prune chains on.
        read_metrics(served, tmp_path / "agent", "task-after-archive")
        assert_verifies(verify(served))

    archived = verify(served, "--file", str(archive))
    assert_verifies(archived)
    assert archived.stdout.startswith(f"ok: {through} records, ")
    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    assert [r["seq"] for r in records_of(lines)] == list(range(1, through + 1))
    assert any(line["type"] == "checkpoint" and line["seq"] == through for line in lines)

    # What remains is still guarded: the first record kept, deleted, is named.
    edit(data, ("DELETE FROM audit WHERE seq = ?", (through + 1,)))
    assert_broken_at(verify_served(data), through + 1, f"record {through + 1} is missing")


def test_archive_refuses_to_overwrite(served: ServeProcess, tmp_path: Path) -> None:
    activity(served, tmp_path)
    archive = tmp_path / "archive.jsonl"
    archive.write_text("precious\n")
    result = served.cli("audit", "archive", "--through", "3", "--out", str(archive), check=False)
    assert result.returncode == 1
    assert "exists" in result.stderr
    assert archive.read_text() == "precious\n"
    assert exported(served)[0]["anchor_seq"] == 1  # nothing pruned


# --- tail ----------------------------------------------------------------------------------------


class Tail:
    """``authority audit tail`` as a subprocess, its stdout read line by line on a thread."""

    def __init__(self, served: ServeProcess, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*authority_command(), "audit", "tail", *args],
            env=served.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, accept: Callable[[str], bool], timeout: float = 15.0) -> list[str]:
        """The lines read until one is accepted (AssertionError after ``timeout``)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"audit tail printed nothing accepted: {seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            seen.append(line)
            if accept(line):
                return seen

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=15)
        self._reader.join(timeout=15)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def tails() -> Iterator[list[Tail]]:
    started: list[Tail] = []
    yield started
    for tail in started:
        tail.stop()


def test_tail_prints_records_as_they_are_committed(served: ServeProcess, tails: list[Tail]) -> None:
    head = records_of(exported(served))[-1]["seq"]
    tail = Tail(served, "--from-start", "--format", "json")
    tails.append(tail)
    # The whole chain first: once its head is printed, the tail is following.
    backlog = tail.until(lambda line: json.loads(line)["seq"] == head)
    assert [json.loads(line)["seq"] for line in backlog] == list(range(1, head + 1))

    served.cli("token", "create", "--spiffe-id", AGENT)
    (line,) = tail.until(lambda _: True)
    record = json.loads(line)
    assert record["seq"] == head + 1
    assert record["kind"] == "join_token.created"
    assert record["subject"] == AGENT

    served.cli("policy", "load", str(POLICY), str(POLICY_TESTS))
    (line,) = tail.until(lambda _: True)
    record = json.loads(line)
    assert record["seq"] == head + 2
    assert record["kind"] == "policy.loaded"
    assert tail.proc.poll() is None  # still following


def test_tail_without_from_start_prints_only_new_records(
    served: ServeProcess, tails: list[Tail]
) -> None:
    head = records_of(exported(served))[-1]["seq"]
    tail = Tail(served)
    tails.append(tail)
    # The tail starts following at some moment we cannot see: act until it prints something.
    printed: list[str] = []
    deadline = time.monotonic() + 30
    while not printed and time.monotonic() < deadline:
        served.cli("token", "create", "--spiffe-id", AGENT)
        try:
            printed.append(tail.lines.get(timeout=1.0))
        except queue.Empty:
            continue
    assert printed, "audit tail printed nothing"
    fields = printed[0].split()
    assert int(fields[0]) > head  # nothing of what was there before
    assert fields[2] == "join_token.created"
    assert f"subject={AGENT}" in printed[0]
