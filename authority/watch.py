"""The relying side of the revocation feed: a revocation set kept fresh by the stream.

``RevocationWatcher`` subscribes (over mutual TLS with the service's own SVID, or over the
operator socket), applies replays, snapshots and live events, resumes from its last sequence
number after a disconnect (exponential backoff with jitter), and knows how fresh it is: every
message, heartbeats included, proves the feed alive. A verifier asks ``fresh()`` before trusting
``is_revoked``; when the feed has been silent longer than ``stale_after`` the answer is no, and
the verifier fails closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority.backoff import Backoff, LinkState
from authority.tasks import cancel_and_wait

log = logging.getLogger(__name__)

KINDS = ("jti", "task", "subject", "entry", "attestor", "key")


@dataclass(slots=True)
class RevocationSet:
    """Targets by kind, each with when it may be forgotten (Unix microseconds)."""

    targets: dict[str, dict[str, int]] = field(default_factory=lambda: {k: {} for k in KINDS})
    seq: int = 0

    def apply(self, event: pb.RevocationEvent) -> None:
        bucket = self.targets.setdefault(event.kind, {})
        bucket[event.target] = max(bucket.get(event.target, 0), event.expires_at_us)
        self.seq = max(self.seq, event.seq)

    def replace(self, snapshot: pb.RevocationSnapshot) -> None:
        self.targets = {k: {} for k in KINDS}
        self.seq = 0
        for event in snapshot.revocations:
            self.apply(event)
        self.seq = snapshot.seq  # the feed's position now, even below the old one (a restore)

    def has(self, kind: str, target: str, now_us: int) -> bool:
        until = self.targets.get(kind, {}).get(target)
        return until is not None and until > now_us

    def forget_expired(self, now_us: int) -> None:
        for bucket in self.targets.values():
            for target in [t for t, until in bucket.items() if until <= now_us]:
                del bucket[target]

    def __len__(self) -> int:
        return sum(len(b) for b in self.targets.values())


StreamFactory = Callable[[int], AsyncIterator[pb.RevocationMessage]]


class RevocationWatcher:
    """Keeps a ``RevocationSet`` fed by ``WatchRevocations``.

    ``open_stream(since)`` returns the message stream (see ``stub_stream``), from ``since`` at
    first and from the last sequence number applied after that. A lost stream is reopened after
    a ``Backoff`` delay (full jitter, ``backoff_initial`` doubling up to ``backoff_max``; kept
    short by default because a service fails closed while the feed is stale); the loss and the
    recovery are logged once each, with the outage's duration, never each retry.
    ``on_message`` sees every message before it is applied (``seq`` is still the position
    before it); ``on_event`` and ``on_snapshot`` after. ``on_event`` is told of each event once:
    one at or below the position (a stream resumed on another server of the same database,
    whose numbers are the same) is applied, never reported again.

    With several authority servers, ``open_stream`` is ``WorkloadClient.watch_revocations``:
    a lost stream reopens on the next server, from the last sequence number applied.
    """

    def __init__(
        self,
        open_stream: StreamFactory,
        *,
        stale_after: dt.timedelta = dt.timedelta(seconds=3),
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        rng: random.Random | None = None,
        since: int = 0,
        on_event: Callable[[pb.RevocationEvent], None] | None = None,
        on_snapshot: Callable[[], None] | None = None,
        on_message: Callable[[pb.RevocationMessage], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        name: str = "revocation feed",
    ) -> None:
        self._open = open_stream
        self._stale_after = stale_after.total_seconds()
        self._backoff = Backoff(backoff_initial, backoff_max, rng=rng)
        self._link = LinkState(name, log)
        self._on_event = on_event
        self._on_snapshot = on_snapshot
        self._on_message = on_message
        self._wall = wall_clock
        self.revoked = RevocationSet(seq=since)
        self._last_heard: float | None = None
        self._task: asyncio.Task[None] | None = None
        self.connects = 0
        self.resyncs = 0
        self._synced = asyncio.Event()
        self._retry = asyncio.Event()  # retry_now(): end the backoff wait of an outage

    # --- what a verifier asks -----------------------------------------------------------

    def fresh(self) -> bool:
        heard = self._last_heard
        return heard is not None and time.monotonic() - heard <= self._stale_after

    def staleness(self) -> float | None:
        """Seconds since the feed was last heard (None: never)."""
        return None if self._last_heard is None else time.monotonic() - self._last_heard

    @property
    def seq(self) -> int:
        return self.revoked.seq

    def is_revoked(
        self,
        jti: str,
        task_id: str,
        subject: str,
        holder: str,
        *,
        actors: Iterable[str] = (),
        key_id: str = "",
    ) -> bool:
        now_us = int(self._wall() * 1_000_000)
        has = self.revoked.has
        return (
            has("jti", jti, now_us)
            or has("task", task_id, now_us)
            or (bool(key_id) and has("key", key_id, now_us))
            or any(has("subject", who, now_us) for who in (subject, holder, *actors))
        )

    # --- running ------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="revocation-watcher")

    async def wait_synced(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            await self._synced.wait()

    async def run(self) -> None:
        """Follow the feed in the calling task, until it is cancelled."""
        await self._run()

    async def close(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None

    def retry_now(self) -> None:
        """The authority is known to answer again (another call to it just succeeded): while
        the feed is down, end its backoff wait and reconnect at once with a fresh backoff. A
        revocation follower must not sit out a long jittered wait once its peer is back."""
        if not self._link.up:
            self._retry.set()

    async def _run(self) -> None:
        while True:
            try:
                self.connects += 1
                async for message in self._open(self.revoked.seq):
                    self._link.restored()
                    self._backoff.reset()
                    self._handle(message)
                    if message.WhichOneof("body") == "resync":
                        self.resyncs += 1
                        break
                else:
                    self._link.lost("the stream ended")
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # The call was cancelled under us (its channel closed): resume, not an outage.
                log.info("revocation feed call cancelled; resuming from seq=%d", self.seq)
            except grpc.aio.AioRpcError as exc:
                self._link.lost(f"{exc.code().name}: {exc.details()}")
            except Exception as exc:
                self._link.lost(f"{type(exc).__name__}: {exc}", exc_info=exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._backoff.next_delay()):
                    await self._retry.wait()
            if self._retry.is_set():
                self._retry.clear()
                self._backoff.reset()

    def _handle(self, message: pb.RevocationMessage) -> None:
        self._last_heard = time.monotonic()
        if self._on_message is not None:
            self._on_message(message)
        body = message.WhichOneof("body")
        if body == "event":
            news = message.event.seq > self.revoked.seq
            self.revoked.apply(message.event)
            if news and self._on_event is not None:  # a replayed one was reported already
                self._on_event(message.event)
        elif body == "snapshot":
            self.revoked.replace(message.snapshot)
            if self._on_snapshot is not None:
                self._on_snapshot()
        elif body == "heartbeat":
            self._synced.set()
            self.revoked.forget_expired(int(self._wall() * 1_000_000))


def unseen(message: pb.RevocationMessage, last: int) -> list[pb.RevocationEvent]:
    """The revocations in ``message`` that a follower at position ``last`` has not had: an
    event numbered above it; a snapshot's events numbered above it, or all of them when the
    snapshot stands below it (the authority's store was restored: its numbers are of another
    history). Heartbeats and resyncs carry none."""
    body = message.WhichOneof("body")
    if body == "event":
        return [message.event] if message.event.seq > last else []
    if body == "snapshot":
        floor = 0 if message.snapshot.seq < last else last
        return [e for e in message.snapshot.revocations if e.seq > floor]
    return []


def stub_stream(stub: object) -> StreamFactory:
    """A stream factory over a Workload (mTLS) or Admin stub's WatchRevocations."""

    def open_stream(since: int) -> AsyncIterator[pb.RevocationMessage]:
        call = stub.WatchRevocations(pb.WatchRevocationsRequest(since=since))  # type: ignore[attr-defined]
        return call.__aiter__()  # type: ignore[no-any-return]

    return open_stream
