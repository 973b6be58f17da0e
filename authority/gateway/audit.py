"""Tool calls into the authority's audit chain, batched off the request path.

Every tools/call the gateway sees (forwarded or refused) becomes one ``ToolCallRecord``. A call
takes a place in a bounded backlog before it is forwarded (``reserve``); when the backlog is
full the gateway refuses the call (503) rather than act unrecorded. A flusher sends what is
queued every ``flush_interval`` or as soon as ``batch`` records wait, with ``RecordToolCalls``;
a batch the authority cannot take now is sent again (after a backoff) and keeps its places, so
a long outage fills the backlog and the gateway stops forwarding. A batch the authority refuses
as malformed (INVALID_ARGUMENT) would never pass: it is logged (counts only) and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import grpc

from authority._pb import authority_v1_authority_pb2 as pb
from authority.backoff import Backoff, LinkState
from authority.errors import Unavailable

log = logging.getLogger(__name__)

Send = Callable[[Sequence[pb.ToolCallRecord]], Awaitable[int]]


class AuditBacklogFull(Unavailable):
    reason = "AUDIT_BACKLOG_FULL"


class AuditBatcher:
    def __init__(
        self,
        send: Send,
        *,
        backlog: int = 10_000,
        batch: int = 256,
        flush_interval: float = 0.05,
        backoff: Backoff | None = None,
    ) -> None:
        self._send = send
        self._capacity = backlog
        self._batch = batch
        self._interval = flush_interval
        self._backoff = backoff or Backoff(0.05, 2.0)
        self._link = LinkState("tool-call audit (RecordToolCalls)", log)
        self._queue: deque[pb.ToolCallRecord] = deque()
        self._reserved = 0  # places taken by calls in flight, not yet queued
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._singles = 0  # > 0: send this many records one by one (after a refused batch)
        self.recorded = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        return len(self._queue) + self._reserved

    def reserve(self) -> None:
        """Take a place for one record, or raise ``AuditBacklogFull``."""
        if self.pending >= self._capacity:
            raise AuditBacklogFull(
                "the audit backlog is full (the authority is not taking records): "
                "refusing calls rather than acting unrecorded"
            )
        self._reserved += 1

    def submit(self, record: pb.ToolCallRecord, *, reserved: bool = True) -> None:
        """Queue ``record`` (in the place reserved for it; a refusal may come unreserved and
        is then queued only while there is room)."""
        if reserved:
            self._reserved -= 1
        elif self.pending >= self._capacity:
            self.dropped += 1
            return
        self._queue.append(record)
        self._idle.clear()
        if len(self._queue) == 1 or len(self._queue) >= self._batch:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tool-call-audit")

    async def flushed(self) -> None:
        """Until every queued record has been sent."""
        self._wake.set()
        await self._idle.wait()

    async def close(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.flushed()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                await self._wake.wait()  # the first record of a batch
                self._wake.clear()
            if len(self._queue) < self._batch:  # gather more, for at most the interval
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval):
                        await self._wake.wait()
                self._wake.clear()
            size = min(1 if self._singles else self._batch, len(self._queue))
            self._singles = max(0, self._singles - 1)
            batch = [self._queue[i] for i in range(size)]
            if not batch:
                continue
            try:
                await self._send(batch)
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                    for _ in batch:
                        self._queue.popleft()
                    if len(batch) == 1:
                        log.error(
                            "the authority refused a tool-call record as malformed (%s); dropped",
                            exc.details(),
                        )
                        self.dropped += 1
                    else:  # one by one, so that only the malformed one is lost
                        self._queue.extendleft(reversed(batch))
                        self._singles = len(batch)
                    continue
                self._link.lost(f"{exc.code().name}: {exc.details()} ({self.pending} waiting)")
                await asyncio.sleep(self._backoff.next_delay())
                continue
            except (ConnectionError, OSError, ValueError) as exc:
                self._link.lost(f"{type(exc).__name__}: {exc} ({self.pending} waiting)")
                await asyncio.sleep(self._backoff.next_delay())
                continue
            self._link.restored()
            self._backoff.reset()
            for _ in batch:
                self._queue.popleft()
            self.recorded += len(batch)
