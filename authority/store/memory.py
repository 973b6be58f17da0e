"""``MemoryStore``: the store on a SQLite database in memory, for tests and tools.

It runs the same rules (``queries.SqlStore``) and the same writer as the file and PostgreSQL
stores, so that no backend has rules of its own; nothing survives ``close``.
"""

from __future__ import annotations

from authority.store.queries import SqlStore
from authority.store.sqlite import MEMORY, SqliteBackend


class MemoryStore(SqlStore):
    def __init__(self) -> None:
        super().__init__(SqliteBackend(MEMORY))
