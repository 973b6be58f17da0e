"""The revocation feed on the wire: replay or snapshot, then live events and heartbeats.

The subscriber registers with the hub before reading the store, so nothing committed in between
is missed (duplicates are dropped by sequence number). A subscriber whose bounded queue overflows
is told to resync and the stream ends; it reconnects from its last sequence number.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import OrderedDict
from collections.abc import AsyncIterator

from authority._pb import authority_v1_authority_pb2 as pb
from authority.clock import Clock
from authority.models import Revocation
from authority.revocation import RevocationService
from authority.store import Store

REPLAY_PAGE = 1000
SNAPSHOT_PAGE_BYTES = 1024 * 1024  # well under gRPC's 4 MiB message limit
_SET_CACHE = 4096


def _us(when: dt.datetime) -> int:
    return int(when.timestamp() * 1_000_000)


class RevocationFeed:
    def __init__(
        self, service: RevocationService, store: Store, clock: Clock, heartbeat: dt.timedelta
    ) -> None:
        self._service = service
        self._store = store
        self._clock = clock
        self._heartbeat = heartbeat.total_seconds()
        self._messages: OrderedDict[int, pb.RevocationMessage] = OrderedDict()

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
            while True:
                if sub.overflowed:
                    yield pb.RevocationMessage(
                        resync=pb.RevocationResync(reason="the subscriber fell behind")
                    )
                    return
                try:
                    async with asyncio.timeout(self._heartbeat):
                        revocation = await sub.queue.get()
                except TimeoutError:
                    yield self._heartbeat_message()
                    continue
                if revocation.seq <= last:
                    continue
                yield self._message(revocation)
                last = revocation.seq
        finally:
            hub.unsubscribe(sub)
