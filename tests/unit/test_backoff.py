"""``Backoff`` (full jitter over a doubling, capped window) and ``LinkState`` (one log line per
state change, none per retry)."""

from __future__ import annotations

import logging
import random

import pytest

from authority.backoff import Backoff, LinkState


class Extremes(random.Random):
    """Draws the top of every window (or the bottom): the bounds a real draw stays within."""

    def __init__(self, top: bool = True) -> None:
        super().__init__()
        self.top = top

    def uniform(self, a: float, b: float) -> float:
        return b if self.top else a


def test_the_window_doubles_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 30.0, rng=Extremes())
    delays = [backoff.next_delay() for _ in range(10)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert backoff.attempts == 10


def test_full_jitter_may_wait_nothing() -> None:
    backoff = Backoff(0.5, 30.0, rng=Extremes(top=False))
    assert [backoff.next_delay() for _ in range(5)] == [0.0] * 5


def test_real_draws_stay_within_their_windows_and_spread() -> None:
    backoff = Backoff(0.5, 4.0, rng=random.Random(7))
    delays = []
    for _ in range(200):
        window = backoff.window()
        delay = backoff.next_delay()
        assert 0 <= delay <= window <= 4.0
        delays.append(delay)
    assert len(set(delays)) == len(delays)  # jittered: no two retries in lockstep
    late = delays[10:]
    assert min(late) < 1.0 < 3.0 < max(late)  # spread over the whole capped window


def test_reset_starts_again_from_initial() -> None:
    backoff = Backoff(1.0, 8.0, rng=Extremes())
    for _ in range(6):
        backoff.next_delay()
    assert backoff.window() == 8.0
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_delay() == 1.0


def test_a_long_outage_does_not_overflow() -> None:
    backoff = Backoff(0.5, 30.0, rng=Extremes())
    backoff.attempts = 10_000
    assert backoff.next_delay() == 30.0


@pytest.mark.parametrize(("initial", "cap"), [(0.0, 1.0), (-1.0, 1.0), (2.0, 1.0)])
def test_settings_are_checked(initial: float, cap: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        Backoff(initial, cap)


def test_a_link_logs_loss_and_recovery_once_each(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.backoff")
    now = [100.0]
    link = LinkState("the feed", logger, monotonic=lambda: now[0])
    caplog.set_level(logging.INFO, logger="tests.backoff")
    link.restored()  # up from the start: nothing to say
    assert link.up
    for attempt in range(50):
        link.lost(f"UNAVAILABLE attempt {attempt}")
        now[0] += 0.25
    assert not link.up
    link.restored()
    link.restored()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (logging.WARNING, "the feed lost: UNAVAILABLE attempt 0"),
        (logging.INFO, "the feed restored after 12s"),
    ]
    assert link.outages == 1
    link.lost("again")
    assert link.outages == 2
