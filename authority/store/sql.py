"""What the store's rules need of a SQL database, so that they are written once.

``queries.SqlStore`` holds every rule (uniqueness, single use, task ownership, the audit chain)
as jobs over a ``Tx``; ``sqlite`` and ``postgres`` supply connections. The rules rely only on
statements that are atomic on both databases under concurrent writers:

- insert-if-absent: ``INSERT ... ON CONFLICT DO NOTHING`` (rows changed: 1 or 0);
- compare-and-set: ``UPDATE ... WHERE <the expected state>`` (rows changed: 1 or 0); on
  PostgreSQL a concurrent writer of the row waits for the first to commit, then re-checks;
- a counter row bumped in the transaction (``UPDATE ... SET value = value + 1``), whose row lock
  orders the transactions that take numbers from it, so numbers are handed out in commit order.

SQL is written with ``?`` placeholders; the PostgreSQL connection rewrites them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

# Topics a committed change is announced under: to this process's listeners, and (PostgreSQL)
# to the other replicas through NOTIFY.
ENTRIES = "entries"
ATTESTORS = "attestors"
KEYS = "keys"
REVOCATIONS = "revocations"
APPROVALS = "approvals"
TOPICS = (ENTRIES, ATTESTORS, KEYS, REVOCATIONS, APPROVALS)


class Duplicate(Exception):
    """A unique constraint refused the row (the job turns it into AlreadyExists)."""


class MissingReference(Exception):
    """A foreign key refused the row."""


class Tx(Protocol):
    """The open transaction a job runs in."""

    @property
    def shared(self) -> bool:
        """Whether other processes write this database (then nothing may be cached between
        transactions)."""
        ...

    @property
    def for_update(self) -> str:
        """`` FOR UPDATE`` where a SELECT can lock its rows; empty on SQLite, whose one writer
        holds the whole database."""
        ...

    @property
    def cache(self) -> dict[str, Any]:
        """Values a job may keep for later transactions of this connection: emptied whenever a
        write is rolled back, and at the start of each transaction when ``shared``."""
        ...

    def one(self, sql: str, params: Sequence[object] = ()) -> dict[str, Any] | None: ...

    def all(self, sql: str, params: Sequence[object] = ()) -> list[dict[str, Any]]: ...

    def run(self, sql: str, params: Sequence[object] = ()) -> int:
        """Execute; return the rows changed. Raises Duplicate or MissingReference for a
        constraint that refused the row."""
        ...

    def notify(self, topic: str) -> None:
        """Announce ``topic`` once this transaction commits (dropped if the job is rolled
        back)."""
        ...
