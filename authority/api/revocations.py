"""The revocation feed on the wire: replay or snapshot, then live events and heartbeats.

The subscriber registers with the hub before reading the store, so nothing committed in between
is missed (duplicates are dropped by sequence number). A subscriber whose bounded queue overflows
is told to resync and the stream ends; it reconnects from its last sequence number.

Heartbeats run on one clock for all subscribers: it ticks ``HEARTBEAT_TICKS`` times per interval
and wakes each stream that has sent nothing for most of an interval, so a quiet stream hears a
heartbeat at least once an interval and a busy one none, without a timer per stream per event.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from authority._pb import authority_v1_authority_pb2 as pb
from authority.clock import Clock
from authority.models import Revocation
from authority.revocation import RevocationService, Subscription
from authority.store import Store

REPLAY_PAGE = 1000
SNAPSHOT_PAGE_BYTES = 1024 * 1024  # well under gRPC's 4 MiB message limit
_SET_CACHE = 4096
HEARTBEAT_TICKS = 8


def _us(when: dt.datetime) -> int:
    return int(when.timestamp() * 1_000_000)


@dataclass(slots=True, eq=False)  # compared and hashed by identity
class _Listener:
    """A live stream as the heartbeat clock sees it."""

    sub: Subscription
    sent_at: float  # loop time of the last message it sent
    beat_due: bool = False


class RevocationFeed:
    def __init__(
        self, service: RevocationService, store: Store, clock: Clock, heartbeat: dt.timedelta
    ) -> None:
        self._service = service
        self._store = store
        self._clock = clock
        self._heartbeat = heartbeat.total_seconds()
        self._messages: OrderedDict[int, pb.RevocationMessage] = OrderedDict()
        self._listeners: set[_Listener] = set()
        self._ticker: asyncio.TimerHandle | None = None
        self._beat: tuple[int, pb.RevocationMessage] | None = None  # (head, message) this tick
        # Called as a published revocation is handed to a subscriber's stream (metrics: lag).
        self.on_sent: Callable[[Revocation], None] | None = None

    def event(self, revocation: Revocation) -> pb.RevocationEvent:
        return pb.RevocationEvent(
            seq=revocation.seq,
            kind=str(revocation.kind),
            target=revocation.target,
            reason=revocation.reason,
            revoked_at_us=_us(revocation.revoked_at),
            expires_at_us=_us(revocation.expires_at),
            actor=revocation.actor,
            security_event_token=self._service.security_event_token(revocation),
        )

    def _message(self, revocation: Revocation) -> pb.RevocationMessage:
        """Built (and its SET signed) once per event, whatever the number of subscribers."""
        message = self._messages.get(revocation.seq)
        if message is None:
            message = pb.RevocationMessage(event=self.event(revocation))
            self._messages[revocation.seq] = message
            if len(self._messages) > _SET_CACHE:
                self._messages.popitem(last=False)
        return message

    def _heartbeat_message(self) -> pb.RevocationMessage:
        return pb.RevocationMessage(
            heartbeat=pb.RevocationHeartbeat(
                seq=self._service.hub.head,
                time_us=_us(self._clock.now()),
                interval_ms=int(self._heartbeat * 1000),
            )
        )

    def _tick_heartbeat(self) -> pb.RevocationMessage:
        """The heartbeat for the streams a tick woke: one message for all of them."""
        head = self._service.hub.head
        if self._beat is None or self._beat[0] != head:
            self._beat = (head, self._heartbeat_message())
        return self._beat[1]

    def _listen(self, listener: _Listener) -> None:
        self._listeners.add(listener)
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().call_later(
                self._heartbeat / HEARTBEAT_TICKS, self._tick
            )

    def _unlisten(self, listener: _Listener) -> None:
        self._listeners.discard(listener)
        if not self._listeners and self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    def _tick(self) -> None:
        """Wake the streams quiet since before the last (HEARTBEAT_TICKS - 1) ticks: each
        sends a heartbeat after between (TICKS - 1) / TICKS of an interval and one interval."""
        loop = asyncio.get_running_loop()
        step = self._heartbeat / HEARTBEAT_TICKS
        # Scheduled first: a tick that fails must not stop the clock (a timer callback that
        # raises is only logged by the loop), or every quiet stream would look dead.
        self._ticker = loop.call_later(step, self._tick)
        quiet_since = loop.time() - (self._heartbeat - step)
        self._beat = None  # built again, once, for the streams this tick wakes
        for listener in self._listeners:
            if listener.sent_at <= quiet_since and not listener.beat_due:
                listener.beat_due = True
                listener.sub.queue.wake()

    async def stream(self, since: int) -> AsyncIterator[pb.RevocationMessage]:
        hub = self._service.hub
        sub = hub.subscribe()
        try:
            low, head = await self._store.revocation_bounds()
            last = since
            # A snapshot when the replay is gone (pruned), or when the subscriber is ahead of
            # this store (restored from a backup): its numbers are of another history, and a
            # replay would skip every revocation numbered up to its ``since``.
            if since > head or (since < head and since + 1 < low):
                # Everything still revoked, in sequence order. The first page is the snapshot
                # (it replaces the subscriber's set); the rest follow as events, so no message
                # outgrows the gRPC limit and a subscriber cut off midway resumes from the last
                # one it applied, having every active revocation below it.
                active = await self._store.active_revocations(self._clock.now())
                first: list[pb.RevocationEvent] = []
                size = 0
                for revocation in active:
                    event = self._message(revocation).event
                    if first and size + event.ByteSize() > SNAPSHOT_PAGE_BYTES:
                        break
                    first.append(event)
                    size += event.ByteSize()
                rest = active[len(first) :]
                last = first[-1].seq if rest else head
                yield pb.RevocationMessage(
                    snapshot=pb.RevocationSnapshot(seq=last, revocations=first)
                )
                for revocation in rest:
                    yield self._message(revocation)
                    last = revocation.seq
                last = max(last, head)
            else:
                while True:
                    page = await self._store.revocations_since(last, REPLAY_PAGE)
                    for revocation in page:
                        yield self._message(revocation)
                        last = revocation.seq
                    if len(page) < REPLAY_PAGE:
                        break
            yield self._heartbeat_message()
            loop = asyncio.get_running_loop()
            listener = _Listener(sub, loop.time())
            self._listen(listener)
            try:
                queue = sub.queue
                while True:
                    if sub.overflowed:
                        yield pb.RevocationMessage(
                            resync=pb.RevocationResync(reason="the subscriber fell behind")
                        )
                        return
                    if queue.empty():
                        if listener.beat_due:  # everything published so far was sent
                            yield self._tick_heartbeat()
                            listener.sent_at = loop.time()
                            listener.beat_due = False
                        else:
                            await queue.wait()
                        continue
                    revocation = queue.get_nowait()
                    if revocation.seq <= last:
                        continue
                    if self.on_sent is not None:
                        self.on_sent(revocation)
                    yield self._message(revocation)
                    last = revocation.seq
                    listener.sent_at = loop.time()
                    listener.beat_due = False
            finally:
                self._unlisten(listener)
        finally:
            hub.unsubscribe(sub)
