from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from authority.clock import FakeClock
from tests.helpers import Running, test_config
from tests.security._attack import running_with_clock


@dataclass
class Clocked:
    """A running authority whose clock moves only when the test says so."""

    running: Running
    clock: FakeClock


@pytest.fixture
async def clocked(tmp_path: Path, socket_dir: Path) -> AsyncIterator[Clocked]:
    # Start at the real time: TLS peers check the server's SVID against the wall clock.
    clock = FakeClock(dt.datetime.now(dt.UTC))
    config = test_config(tmp_path / "data", socket_dir)
    async with running_with_clock(config, clock) as running:
        yield Clocked(running, clock)
