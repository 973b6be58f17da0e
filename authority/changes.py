"""One place that wakes the authority's open streams when what they send may have changed.

The SPIFFE Workload API's streams and the node agents' sync streams wait on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from authority.tasks import cancel_and_wait

if TYPE_CHECKING:
    from authority.revocation import Subscription
    from authority.service import Authority
    from authority.supervisor import Supervisor


class Waiters:
    """Events of the streams waiting for a change; ``notify`` sets them all."""

    def __init__(self) -> None:
        self._waiters: set[asyncio.Event] = set()

    @property
    def watching(self) -> int:
        """How many streams are waiting."""
        return len(self._waiters)

    def notify(self) -> None:
        for event in self._waiters:
            event.set()

    @contextlib.contextmanager
    def watch(self) -> Iterator[asyncio.Event]:
        """An event set on every change while the block runs (the caller clears it)."""
        event = asyncio.Event()
        self._waiters.add(event)
        try:
            yield event
        finally:
            self._waiters.discard(event)


class ChangeNotifier(Waiters):
    """Wakes every open stream when the bundle changes, an entry is created or deleted, or a
    revocation is published: one listener of each kind for all of them."""

    def __init__(self, authority: Authority) -> None:
        super().__init__()
        self._authority = authority
        self._ca = authority.ca
        self._hub = authority.revocations.hub
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    def start(
        self, supervisor: Supervisor | None = None, name: str = "workload-api-changes"
    ) -> None:
        """Listen; the revocation pump runs under ``supervisor`` (as ``name``) when given."""
        self._ca.add_listener(self.notify)
        self._authority.add_entry_listener(self.notify)
        self._sub = self._hub.subscribe()
        if supervisor is not None:
            supervisor.start(name, self._pump)
        else:
            self._task = asyncio.create_task(self._pump(), name=name)

    async def close(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None
        if self._sub is not None:
            self._hub.unsubscribe(self._sub)
            self._sub = None
        self._authority.remove_entry_listener(self.notify)
        self._waiters.clear()  # the CA keeps the listener; it then wakes no one

    async def _pump(self) -> None:
        if self._sub is None or self._sub.overflowed:  # restarted: a subscription afresh
            if self._sub is not None:
                self._hub.unsubscribe(self._sub)
            self._sub = self._hub.subscribe()
        while True:
            assert self._sub is not None
            await self._sub.queue.get()
            while not self._sub.queue.empty():
                self._sub.queue.get_nowait()
            if self._sub.overflowed:  # the hub stopped feeding it: start afresh
                self._hub.unsubscribe(self._sub)
                self._sub = self._hub.subscribe()
            self.notify()
