"""The relying side of the feed: ``RevocationSet`` and ``RevocationWatcher``.

The watcher runs against ``FakeFeed``, an in-memory WatchRevocations whose streams the test
drives message by message (ends them, breaks them, tells them to resync).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from authority._pb import authority_v1_authority_pb2 as pb
from authority.watch import KINDS, RevocationSet, RevocationWatcher, unseen

NOW_US = 1_800_000_000 * 1_000_000
LATER_US = NOW_US + 60_000_000

Item = pb.RevocationMessage | BaseException | None


def event(
    seq: int, kind: str = "subject", target: str = "", until_us: int = LATER_US
) -> pb.RevocationEvent:
    return pb.RevocationEvent(
        seq=seq,
        kind=kind,
        target=target or f"spiffe://example.org/v/{seq}",
        reason="r",
        revoked_at_us=NOW_US,
        expires_at_us=until_us,
    )


def as_message(revocation: pb.RevocationEvent) -> pb.RevocationMessage:
    return pb.RevocationMessage(event=revocation)


def heartbeat(seq: int) -> pb.RevocationMessage:
    return pb.RevocationMessage(heartbeat=pb.RevocationHeartbeat(seq=seq, interval_ms=50))


def snapshot(seq: int, *events: pb.RevocationEvent) -> pb.RevocationMessage:
    return pb.RevocationMessage(snapshot=pb.RevocationSnapshot(seq=seq, revocations=events))


def resync() -> pb.RevocationMessage:
    return pb.RevocationMessage(resync=pb.RevocationResync(reason="behind"))


class FakeFeed:
    """Each ``open_stream(since)`` is a stream fed from a queue: a message is delivered, an
    exception raised into the watcher, ``None`` ends the stream."""

    def __init__(self) -> None:
        self.since: list[int] = []
        self.streams: list[asyncio.Queue[Item]] = []

    def __call__(self, since: int) -> AsyncIterator[pb.RevocationMessage]:
        self.since.append(since)
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self.streams.append(queue)
        return self._iterate(queue)

    @staticmethod
    async def _iterate(queue: asyncio.Queue[Item]) -> AsyncIterator[pb.RevocationMessage]:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def connected(self, count: int) -> asyncio.Queue[Item]:
        """The ``count``-th stream, once the watcher opened it."""
        await settle(lambda: len(self.streams) >= count)
        return self.streams[count - 1]


async def settle(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.001)


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone", None
    )


# --- RevocationSet ----------------------------------------------------------------------------


def test_set_keeps_the_longest_expiry_and_the_highest_seq() -> None:
    revoked = RevocationSet()
    assert len(revoked) == 0
    revoked.apply(event(2, "task", "t1", until_us=NOW_US + 10))
    revoked.apply(event(1, "task", "t1", until_us=NOW_US + 20))
    revoked.apply(event(3, "task", "t1", until_us=NOW_US + 5))
    assert revoked.targets["task"] == {"t1": NOW_US + 20}
    assert revoked.seq == 3
    assert revoked.has("task", "t1", NOW_US + 19)
    assert not revoked.has("task", "t1", NOW_US + 20)  # forgotten at its expiry
    assert not revoked.has("jti", "t1", NOW_US)  # by kind
    assert not revoked.has("no-such-kind", "t1", NOW_US)
    assert len(revoked) == 1


def test_set_forgets_what_expired() -> None:
    revoked = RevocationSet()
    revoked.apply(event(1, "jti", "a", until_us=NOW_US))
    revoked.apply(event(2, "jti", "b", until_us=LATER_US))
    revoked.forget_expired(NOW_US)
    assert revoked.targets["jti"] == {"b": LATER_US}
    assert revoked.seq == 2  # forgetting does not move the position in the feed


def test_a_snapshot_replaces_the_set() -> None:
    revoked = RevocationSet()
    revoked.apply(event(1, "subject", "spiffe://example.org/old"))
    revoked.replace(
        snapshot(
            9, event(7, "task", "t7"), event(8, "subject", "spiffe://example.org/new")
        ).snapshot
    )
    assert {k: set(v) for k, v in revoked.targets.items() if v} == {
        "task": {"t7"},
        "subject": {"spiffe://example.org/new"},
    }
    assert set(revoked.targets) == set(KINDS)
    assert revoked.seq == 9


# --- RevocationWatcher ------------------------------------------------------------------------


async def test_fresh_only_while_the_feed_is_heard() -> None:
    feed = FakeFeed()
    watcher = RevocationWatcher(feed, stale_after=dt.timedelta(milliseconds=150))
    assert not watcher.fresh()  # never heard: not fresh
    assert watcher.staleness() is None
    watcher.start()
    try:
        stream = await feed.connected(1)
        assert not watcher.fresh()
        stream.put_nowait(heartbeat(0))
        await watcher.wait_synced(timeout=5)
        assert watcher.fresh()
        staleness = watcher.staleness()
        assert staleness is not None
        assert staleness < 0.15
        # Silence longer than the bound: not fresh (a verifier then fails closed).
        await asyncio.sleep(0.25)
        assert not watcher.fresh()
        stream.put_nowait(heartbeat(0))
        await settle(watcher.fresh)
    finally:
        await watcher.close()


async def test_events_are_applied_and_reported() -> None:
    feed = FakeFeed()
    seen: list[int] = []
    watcher = RevocationWatcher(
        feed, on_event=lambda e: seen.append(e.seq), wall_clock=lambda: NOW_US / 1e6
    )
    watcher.start()
    try:
        stream = await feed.connected(1)
        for revocation in (
            event(1, "jti", "j1"),
            event(2, "task", "t1"),
            event(3, "subject", "spiffe://example.org/s"),
            event(4, "key", "k1"),
        ):
            stream.put_nowait(as_message(revocation))
        await settle(lambda: watcher.seq == 4)
        assert seen == [1, 2, 3, 4]
        assert watcher.is_revoked("j1", "", "", "")
        assert watcher.is_revoked("", "t1", "", "")
        assert watcher.is_revoked("", "", "spiffe://example.org/s", "")  # as subject
        assert watcher.is_revoked("", "", "", "spiffe://example.org/s")  # as holder
        assert watcher.is_revoked("", "", "", "", actors=["spiffe://example.org/s"])
        assert watcher.is_revoked("", "", "", "", key_id="k1")
        assert not watcher.is_revoked("j2", "t2", "spiffe://example.org/x", "", key_id="k2")
    finally:
        await watcher.close()


async def test_revocations_stop_counting_once_expired() -> None:
    feed = FakeFeed()
    now = [NOW_US / 1e6]
    watcher = RevocationWatcher(feed, wall_clock=lambda: now[0])
    watcher.start()
    try:
        stream = await feed.connected(1)
        stream.put_nowait(as_message(event(1, "jti", "j1", until_us=NOW_US + 1_000_000)))
        await settle(lambda: watcher.seq == 1)
        assert watcher.is_revoked("j1", "", "", "")
        now[0] += 1.0
        assert not watcher.is_revoked("j1", "", "", "")
        stream.put_nowait(heartbeat(1))  # a heartbeat sweeps what expired
        await settle(lambda: len(watcher.revoked) == 0)
    finally:
        await watcher.close()


@pytest.mark.parametrize(
    "cut",
    [None, unavailable(), ConnectionResetError("reset")],
    ids=["stream-ended", "rpc-error", "other-error"],
)
async def test_a_lost_feed_resumes_from_the_last_sequence_number(cut: BaseException | None) -> None:
    feed = FakeFeed()
    watcher = RevocationWatcher(feed, backoff_initial=0.01, backoff_max=0.02)
    watcher.start()
    try:
        first = await feed.connected(1)
        for seq in (1, 2, 3):
            first.put_nowait(as_message(event(seq)))
        await settle(lambda: watcher.seq == 3)
        first.put_nowait(cut)
        second = await feed.connected(2)
        assert feed.since == [0, 3]
        second.put_nowait(as_message(event(4)))
        await settle(lambda: watcher.seq == 4)
        assert watcher.connects == 2
        assert len(watcher.revoked) == 4
    finally:
        await watcher.close()


async def test_a_resync_reconnects_from_the_last_sequence_number() -> None:
    feed = FakeFeed()
    watcher = RevocationWatcher(feed, backoff_initial=0.01)
    watcher.start()
    try:
        first = await feed.connected(1)
        first.put_nowait(as_message(event(1)))
        first.put_nowait(resync())
        first.put_nowait(as_message(event(99)))  # after a resync nothing more is read
        await feed.connected(2)
        assert watcher.resyncs == 1
        assert feed.since == [0, 1]
        assert watcher.seq == 1
    finally:
        await watcher.close()


async def test_a_snapshot_replaces_what_the_watcher_held() -> None:
    feed = FakeFeed()
    watcher = RevocationWatcher(feed)
    watcher.start()
    try:
        stream = await feed.connected(1)
        stream.put_nowait(as_message(event(1, "task", "stale")))
        stream.put_nowait(snapshot(40, event(30, "task", "kept")))
        stream.put_nowait(heartbeat(40))
        await watcher.wait_synced()
        assert set(watcher.revoked.targets["task"]) == {"kept"}
        assert watcher.seq == 40
        assert not watcher.is_revoked("", "stale", "", "")
    finally:
        await watcher.close()


async def test_a_failing_feed_keeps_retrying_and_never_turns_fresh() -> None:
    feed = FakeFeed()
    watcher = RevocationWatcher(feed, backoff_initial=0.005, backoff_max=0.01)
    watcher.start()
    try:
        for n in range(1, 6):
            (await feed.connected(n)).put_nowait(unavailable())
        assert watcher.connects >= 5
        assert not watcher.fresh()
        assert set(feed.since) == {0}
    finally:
        await watcher.close()


async def test_close_stops_the_watcher() -> None:
    feed = FakeFeed()
    watcher = RevocationWatcher(feed)
    watcher.start()
    watcher.start()  # idempotent: one task
    await feed.connected(1)
    await watcher.close()
    await watcher.close()
    await asyncio.sleep(0.05)
    assert len(feed.streams) == 1  # no reconnect after close
    assert watcher.connects == 1


def test_a_snapshot_sets_the_position_even_below_the_old_one() -> None:
    """After a restore of the authority's store the feed's numbers restart lower: the snapshot's
    position is the one to resume from."""
    revoked = RevocationSet()
    revoked.apply(event(500))
    revoked.replace(snapshot(450, event(449)).snapshot)
    assert revoked.seq == 450
    assert set(revoked.targets["subject"]) == {"spiffe://example.org/v/449"}


# --- reconnects: backoff, one log line each way, the position resumed -------------------------


class Windows(random.Random):
    """Records each backoff window drawn from and waits nothing, so retries run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.windows: list[float] = []

    def uniform(self, a: float, b: float) -> float:
        self.windows.append(b)
        return 0.0


async def test_retries_back_off_and_a_message_resets_the_backoff() -> None:
    feed = FakeFeed()
    rng = Windows()
    watcher = RevocationWatcher(feed, backoff_initial=0.01, backoff_max=0.04, rng=rng)
    watcher.start()
    try:
        for n in range(1, 6):
            (await feed.connected(n)).put_nowait(unavailable())
        stream = await feed.connected(6)
        assert rng.windows == [0.01, 0.02, 0.04, 0.04, 0.04]  # doubling, capped
        stream.put_nowait(heartbeat(0))
        stream.put_nowait(unavailable())
        await feed.connected(7)
        assert rng.windows[-1] == 0.01  # heard again: the next loss starts over
    finally:
        await watcher.close()


async def test_an_outage_is_logged_once_each_way(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="authority.watch")
    feed = FakeFeed()
    watcher = RevocationWatcher(feed, rng=Windows())
    watcher.start()
    try:
        (await feed.connected(1)).put_nowait(heartbeat(0))
        await watcher.wait_synced()
        feed.streams[0].put_nowait(unavailable())
        for n in range(2, 52):  # fifty failed reconnects
            (await feed.connected(n)).put_nowait(unavailable() if n % 2 else None)
        (await feed.connected(52)).put_nowait(heartbeat(0))
        await settle(lambda: any("restored" in r.getMessage() for r in caplog.records))
    finally:
        await watcher.close()
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.INFO]
    assert len(said) == 2, said
    assert said[0][0] == logging.WARNING
    assert said[0][1].startswith("revocation feed lost: UNAVAILABLE: gone")
    assert said[1][0] == logging.INFO
    assert said[1][1].startswith("revocation feed restored after ")
    assert feed.since == [0] * 52


async def test_a_watcher_starts_from_the_position_given_and_shows_each_message_first() -> None:
    feed = FakeFeed()
    shown: list[tuple[str | None, int]] = []
    watcher = RevocationWatcher(
        feed,
        since=41,
        on_message=lambda m: shown.append((m.WhichOneof("body"), watcher.seq)),
    )
    watcher.start()
    try:
        stream = await feed.connected(1)
        stream.put_nowait(as_message(event(42)))
        stream.put_nowait(heartbeat(42))
        await watcher.wait_synced()
    finally:
        await watcher.close()
    assert feed.since == [41]
    assert shown == [("event", 41), ("heartbeat", 42)]  # before each is applied


def test_unseen_is_what_a_follower_has_not_had() -> None:
    def seqs(message: pb.RevocationMessage, last: int) -> list[int]:
        return [e.seq for e in unseen(message, last)]

    assert seqs(as_message(event(5)), 4) == [5]
    assert seqs(as_message(event(5)), 5) == []  # a duplicate
    assert seqs(heartbeat(9), 0) == []
    assert seqs(resync(), 0) == []
    pruned = snapshot(12, event(3), event(8), event(12))
    assert seqs(pruned, 0) == [3, 8, 12]
    assert seqs(pruned, 8) == [12]  # what was had already is not had twice
    restored = snapshot(6, event(2), event(6))  # below the follower: another history
    assert seqs(restored, 40) == [2, 6]


async def test_retry_now_ends_a_long_backoff_wait_once_the_authority_answers() -> None:
    """A follower whose backoff has grown (an hour here) is not left waiting once the process
    knows the authority answers again: ``retry_now`` reconnects it at once, from where it was,
    with a fresh backoff. While the feed is up it does nothing."""
    feed = FakeFeed()
    watcher = RevocationWatcher(feed, backoff_initial=3600.0, backoff_max=3600.0)
    watcher.start()
    try:
        first = await feed.connected(1)
        first.put_nowait(as_message(event(1)))
        await settle(lambda: watcher.seq == 1)
        watcher.retry_now()  # up: no effect
        first.put_nowait(unavailable())
        await asyncio.sleep(0.05)
        assert len(feed.streams) == 1  # waiting out its (hour-long) backoff
        watcher.retry_now()
        second = await feed.connected(2)
        assert feed.since == [0, 1]
        second.put_nowait(as_message(event(2)))
        await settle(lambda: watcher.seq == 2)
    finally:
        await watcher.close()
