from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.fuzz.harness import FuzzServer, RpcReport, fuzz_server
from tests.fuzz.wire import Connection


@dataclass
class Fuzzing:
    """One authority for the whole fuzz suite, a connection per endpoint, and the reports."""

    server: FuzzServer
    rss_start_kb: int
    reports: list[RpcReport] = field(default_factory=list)
    unanswered: dict[str, set[str]] = field(default_factory=dict)  # by endpoint
    _connections: dict[str, Connection] = field(default_factory=dict)

    def connection(self, endpoint: str) -> Connection:
        if endpoint not in self._connections:
            self._connections[endpoint] = Connection(self.server.targets[endpoint])
        return self._connections[endpoint]

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()


@pytest.fixture(scope="session")
def fuzzing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzing]:
    with fuzz_server(tmp_path_factory.mktemp("fuzz")) as server:
        fuzzing = Fuzzing(server, server.rss_kb())
        try:
            yield fuzzing
        finally:
            fuzzing.close()
