"""The supervisor of long-lived tasks, on a fake clock: its sleeps advance the clock at once and
are recorded, its randomness is the test's."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Callable

import pytest

from authority.supervisor import Outage, Supervisor, format_seconds

LOGGER = "tests.supervisor"


class Drawn(random.Random):
    """Randomness of the test's choosing: each draw is ``fraction`` of the window."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.fraction


class FakeTime:
    """``monotonic`` and ``sleep`` for a supervisor: sleeping moves the clock, not the test."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def supervisor(
    time: FakeTime,
    *,
    fraction: float = 1.0,
    generation: Callable[[], int] = lambda: 0,
    changes: list[tuple[str, bool]] | None = None,
) -> Supervisor:
    return Supervisor(
        backoff_initial=0.5,
        backoff_cap=30.0,
        sleep=time.sleep,
        monotonic=time.monotonic,
        rng=Drawn(fraction),
        generation=generation,
        settle=None,  # recovery only when a task says so, unless a test asks otherwise
        on_change=None if changes is None else lambda n, up: changes.append((n, up)),
        logger=logging.getLogger(LOGGER),
    )


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - the tasks under test run between the checks
            await asyncio.sleep(0)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


async def test_a_failing_task_is_logged_once_restarted_with_capped_backoff_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime()
    changes: list[tuple[str, bool]] = []
    sup = supervisor(time, changes=changes)
    attempts = 0
    healed = asyncio.Event()

    async def flaky() -> None:
        nonlocal attempts
        attempts += 1
        if attempts <= 10:
            raise ConnectionError("the authority is away")
        sup.ok("flaky")
        healed.set()
        await asyncio.Event().wait()

    sup.start("flaky", flaky)
    await asyncio.wait_for(healed.wait(), 10)
    # Ten failures: ten restarts, each after a delay doubling from 0.5 s up to the 30 s cap.
    assert sup.restarts("flaky") == 10
    assert time.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    # One line when it went down (with the reason), one when it came back (with how long).
    assert lines(caplog) == [
        "task flaky failing: ConnectionError: the authority is away",
        "task flaky recovered after 2m32s",
    ]
    assert changes == [("flaky", False), ("flaky", True)]
    assert sup.down() == {}
    await sup.stop()
    assert len(lines(caplog)) == 2  # stopping is not a failure


async def test_down_tasks_are_reported_and_only_critical_ones_make_it_unhealthy() -> None:
    time = FakeTime()
    sup = supervisor(time)
    release = asyncio.Event()

    async def broken() -> None:
        await release.wait()
        raise OSError("disk gone")

    async def steady() -> None:
        await asyncio.Event().wait()

    sup.start("optional", broken, critical=False)
    sup.start("needed", steady)
    release.set()
    await until(lambda: sup.is_down("optional"))
    assert sup.down() == {"optional": "OSError: disk gone"}
    assert sup.healthy()  # nothing critical is down
    assert not sup.healthy("optional")
    assert sup.healthy("needed")
    await sup.stop()

    critical = supervisor(FakeTime())
    critical.start("needed", broken)
    await until(lambda: critical.is_down("needed"))
    assert not critical.healthy()
    await critical.stop()


async def test_a_task_that_returns_is_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    sup = supervisor(FakeTime())
    runs = 0

    async def quits() -> None:
        nonlocal runs
        runs += 1

    sup.start("quitter", quits)
    await until(lambda: runs >= 3)
    assert sup.is_down("quitter")
    assert sup.restarts("quitter") >= 2
    await sup.stop()
    assert lines(caplog) == ["task quitter failing: TaskReturned: the task returned"]


async def test_a_call_cancelled_under_the_task_is_a_failure_not_a_silent_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The node agent's stall: a gRPC call cancelled under a task (its channel closed) raised
    CancelledError and the task ended without a word. Here it is logged and restarted."""
    caplog.set_level(logging.INFO, logger=LOGGER)
    sup = supervisor(FakeTime())
    runs = 0

    async def cancelled_under() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise asyncio.CancelledError
        await asyncio.Event().wait()

    sup.start("rotate", cancelled_under)
    await until(lambda: runs == 2)
    assert sup.restarts("rotate") == 1
    assert sup.is_down("rotate")
    assert lines(caplog) == [
        "task rotate failing: a call was cancelled under the task (CancelledError)"
    ]
    await sup.stop()


async def test_a_cancellation_from_the_process_own_channel_swap_is_retried_at_once_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime()
    generation = 0
    sup = supervisor(time, generation=lambda: generation)
    runs = 0
    call: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def signing() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            await call  # an RPC in flight on the old channel
        await asyncio.Event().wait()

    sup.start("rotate", signing)
    await until(lambda: runs == 1)
    generation += 1  # the agent renewed its SVID: a new channel, the old one closing
    call.cancel()  # as the closing channel cancels its calls: the call, not the task
    await until(lambda: runs == 2)
    assert sup.swaps("rotate") == 1
    assert sup.restarts("rotate") == 0
    assert time.sleeps == []  # at once
    assert not sup.is_down("rotate")
    assert lines(caplog) == []
    await sup.stop()


async def test_stop_cancels_every_task_without_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    sup = supervisor(FakeTime())
    started = asyncio.Event()
    cleaned = asyncio.Event()

    async def long_lived() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    sup.start("a", long_lived)
    await asyncio.wait_for(started.wait(), 10)
    await sup.stop()
    assert cleaned.is_set()
    assert sup.restarts("a") == 0
    assert lines(caplog) == []


async def test_a_periodic_job_fails_alone_and_recovers_on_its_next_good_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime()
    sup = supervisor(time, fraction=0.5)
    outcomes = [True, False, False, False, True, True]
    steps: list[float] = []
    done = asyncio.Event()

    async def step() -> None:
        steps.append(time.now)
        good = outcomes.pop(0) if outcomes else True
        if not outcomes:
            done.set()
        if not good:
            raise ValueError("policy file missing")

    sup.every("policy", 10.0, step, critical=False)
    await asyncio.wait_for(done.wait(), 10)
    await until(lambda: not sup.is_down("policy"))
    # Every interval while good; after a failure, again after the backoff (half of 0.5, 1, 2
    # with this randomness), not an interval later.
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(steps)]
    assert gaps[0] == 10.0
    assert gaps[1:4] == [0.25, 0.5, 1.0]
    assert lines(caplog) == [
        "task policy failing: ValueError: policy file missing",
        "task policy recovered after 2s",
    ]
    await sup.stop()


async def test_a_restarted_task_that_keeps_running_is_recovered_after_settling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime()
    sup = Supervisor(
        sleep=time.sleep,
        monotonic=time.monotonic,
        rng=Drawn(1.0),
        settle=5.0,
        logger=logging.getLogger(LOGGER),
    )
    runs = 0

    async def once_broken() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise KeyError("x")
        await asyncio.Event().wait()

    sup.start("sync", once_broken)
    await until(lambda: runs == 2 and not sup.is_down("sync"))
    assert lines(caplog) == ["task sync failing: KeyError: 'x'", "task sync recovered after 6s"]
    await sup.stop()


async def test_an_unexpected_failure_is_logged_with_its_traceback_an_expected_one_without(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def bug() -> None:
        raise ZeroDivisionError("bug")

    async def peer_gone() -> None:
        raise ConnectionError("gone")

    sup = Supervisor(
        sleep=FakeTime().sleep, expected=(ConnectionError,), logger=logging.getLogger(LOGGER)
    )
    sup.start("bug", bug)
    sup.start("peer", peer_gone)
    await until(lambda: sup.is_down("bug") and sup.is_down("peer"))
    await sup.stop()
    by_task = {r.getMessage().split()[1]: r for r in caplog.records if r.name == LOGGER}
    assert by_task["bug"].exc_info is not None
    assert by_task["peer"].exc_info is None


def test_backoff_bounds_are_checked_when_the_supervisor_is_made() -> None:
    with pytest.raises(ValueError, match="backoff"):
        Supervisor(backoff_initial=0.0)
    with pytest.raises(ValueError, match="backoff"):
        Supervisor(backoff_initial=5.0, backoff_cap=1.0)


def test_an_outage_logs_each_change_of_state_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    time = FakeTime()
    outage = Outage(
        "authority",
        lost="unreachable",
        restored="reachable again",
        monotonic=time.monotonic,
        logger=logging.getLogger(LOGGER),
    )
    assert outage.ok() is None
    assert outage.fail("UNAVAILABLE")
    for _ in range(100):
        time.now += 0.43
        assert not outage.fail("UNAVAILABLE")
    assert outage.ok() == pytest.approx(43.0)
    assert outage.ok() is None
    assert lines(caplog) == [
        "authority unreachable: UNAVAILABLE",
        "authority reachable again after 43s",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (30, "30s"), (300, "5m"), (152, "2m32s"), (86400, "24h"), (7500, "2h5m")],
)
def test_durations_read_as_an_operator_writes_them(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text
