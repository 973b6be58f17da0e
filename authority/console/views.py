"""What the console shows, gathered from the authority's domain objects (no HTTP here)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from authority.audit import (
    AuditRecord,
    Verification,
    task_records,
    trace_surroundings,
    verify_chain,
)
from authority.bundle import parse_jwks
from authority.exchange import ExchangeService
from authority.models import Approval, HeldSvid
from authority.policy_admin import PolicyAdmin
from authority.service import Authority
from authority.store import Store

MAX_TRACE_TASKS = 64  # a task and the tasks delegated from it, followed this far


@dataclass(frozen=True, slots=True)
class ApprovalView:
    approval: Approval
    state: str
    intent: dict[str, Any]
    remaining_s: int
    attestor: str = ""
    reasons: tuple[str, ...] = ()
    rule: str = ""
    context: dict[str, str] = field(default_factory=dict)
    earlier: tuple[AuditRecord, ...] = ()

    @property
    def remaining(self) -> str:
        return human_seconds(self.remaining_s)


def human_seconds(seconds: int) -> str:
    if seconds <= 0:
        return "expired"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def _intent(approval: Approval) -> dict[str, Any]:
    try:
        value = json.loads(approval.intent_json)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class ConsoleData:
    """Read side of the console, over the authority's own services."""

    def __init__(
        self, authority: Authority, exchange: ExchangeService, policy: PolicyAdmin, store: Store
    ) -> None:
        self.authority = authority
        self.store = store
        self.exchange = exchange
        self.policy = policy

    def now(self) -> dt.datetime:
        return self.authority.now()

    async def approvals(self) -> tuple[list[ApprovalView], list[ApprovalView]]:
        """(pending, the 20 most recently decided or expired)."""
        now = self.now()
        pending: list[ApprovalView] = []
        other: list[ApprovalView] = []
        for approval in await self.exchange.list_approvals():
            state = approval.effective_state(now)
            remaining = int((approval.expires_at - now).total_seconds())
            view = ApprovalView(approval, state, _intent(approval), remaining)
            (pending if state == "pending" else other).append(view)
        other.sort(key=lambda v: v.approval.decided_at or v.approval.expires_at, reverse=True)
        return pending, other[:20]

    async def approval(self, approval_id: str) -> ApprovalView | None:
        """One approval with what the operator needs to decide it: the decision that asked for
        review (its reasons, the caller's attestor, the audit context) and the task's earlier
        steps."""
        approval = await self.store.get_approval(approval_id)
        if approval is None:
            return None
        now = self.now()
        records = await self.task_records(approval.task_id, follow=False)
        attestor, rule = "", ""
        reasons: tuple[str, ...] = ()
        context: dict[str, str] = {}
        earlier: list[AuditRecord] = []
        for record in records:
            if record.decision_id == approval.decision_id and record.kind == "policy.decided":
                details = record.details
                inp = details.get("input") or {}
                attributes = inp.get("attributes") or {} if isinstance(inp, dict) else {}
                attestor = (
                    str(attributes.get("attestor", "")) if isinstance(attributes, dict) else ""
                )
                reasons = tuple(str(r) for r in details.get("reasons") or ())
                policy = details.get("policy") or {}
                rule = ", ".join(reasons) or str(policy.get("id", ""))
                raw = details.get("context") or {}
                context = {str(k): str(v) for k, v in raw.items() if k != "prompt"}
            elif record.time < approval.requested_at or record.decision_id != approval.decision_id:
                earlier.append(record)
        return ApprovalView(
            approval,
            approval.effective_state(now),
            _intent(approval),
            int((approval.expires_at - now).total_seconds()),
            attestor,
            reasons,
            rule,
            context,
            tuple(r for r in earlier if r.seq < _first_seq(records, approval)),
        )

    async def _pages(self, *, task_ids: Sequence[str] = (), after: int = 0) -> list[AuditRecord]:
        out: list[AuditRecord] = []
        while True:
            page = await self.authority.audit_records(after_seq=after, task_ids=task_ids)
            if not page:
                return out
            out.extend(page)
            after = page[-1].seq

    async def _each(self, task_ids: list[str]) -> AsyncIterator[AuditRecord]:
        for record in await self._pages(task_ids=task_ids):
            yield record

    async def task_records(self, task_id: str, *, follow: bool = True) -> list[AuditRecord]:
        """The task's records (and, ``follow``ing, those of tasks delegated from it), in chain
        order."""
        found = await task_records(task_id, self._each, follow=follow, max_tasks=MAX_TRACE_TASKS)
        return [found[seq] for seq in sorted(found)]

    async def trace(self, task_id: str) -> tuple[list[AuditRecord], Verification]:
        """What ``authority audit trace`` shows (the task's records, those of tasks delegated
        from it, the attestations behind its callers' SVIDs, revocations of its tokens by jti)
        and what ``authority audit verify`` says of the whole chain, from one read of it."""
        found = {r.seq: r for r in await self.task_records(task_id)}
        belongs = trace_surroundings(found)
        (anchor_seq, anchor_hash), _, checkpoints = await self.authority.audit_info()
        chain = await self._pages(after=anchor_seq - 1)
        for record in chain:
            if belongs is not None and belongs(record):
                found[record.seq] = record
        verification = verify_chain(
            chain,
            checkpoints,
            parse_jwks(self.authority.ca.bundle().jwks_json()),
            start_seq=anchor_seq,
            start_prev_hash=anchor_hash,
        )
        return [found[seq] for seq in sorted(found)], verification

    async def trust_domain(self) -> dict[str, Any]:
        authority = self.authority
        now = self.now()
        entries = sorted(authority.list_entries(), key=lambda e: e.spiffe_id.uri)
        agents: dict[str, NodeAgentView] = {}
        for entry in entries:
            if entry.parent_id is not None:
                agent = agents.setdefault(entry.parent_id.uri, NodeAgentView(entry.parent_id.uri))
                agent.entries.append(entry.spiffe_id.uri)
        for held in await self.store.node_svids(now):
            agent = agents.setdefault(held.agent, NodeAgentView(held.agent))
            agent.svids.append(held)
        revocations = await self.store.active_revocations(now)
        revocations.sort(key=lambda r: r.seq, reverse=True)
        return {
            "trust_domain": authority.trust_domain,
            "entries": entries,
            "node_agents": [agents[k] for k in sorted(agents)],
            "attestors": sorted(authority.attestors.instances(), key=lambda a: a.name),
            "keys": authority.ca.authorities(),
            "revocations": revocations[:50],
            "policy": self.policy.state(),
            "now": now,
        }


@dataclass
class NodeAgentView:
    """A node agent as the store knows it: the entries it serves and the live SVIDs signed
    for them (last seen: the latest signing)."""

    spiffe_id: str
    entries: list[str] = field(default_factory=list)
    svids: list[HeldSvid] = field(default_factory=list)

    @property
    def last_seen(self) -> dt.datetime | None:
        return max((s.signed_at for s in self.svids), default=None)


def _first_seq(records: Sequence[AuditRecord], approval: Approval) -> int:
    for record in records:
        if record.decision_id == approval.decision_id:
            return record.seq
    return 1 << 62
