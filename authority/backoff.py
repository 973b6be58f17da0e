"""Retrying a lost connection: how long to wait, and what to log.

``Backoff`` is exponential backoff with full jitter: the n-th wait is drawn uniformly from
``[0, min(cap, initial * 2**n))``, so a crowd of clients cut off together (an authority restart)
spreads its reconnects instead of arriving in waves. The randomness is injectable.

``LinkState`` logs a connection's state changes, not its retries: one line when it is lost (with
the reason), one when it is restored (with how long the outage lasted). Retries in between are
DEBUG only, so an authority down for an hour costs its followers two log lines each.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

DEFAULT_INITIAL = 0.5
DEFAULT_CAP = 30.0


class Backoff:
    """Delays for successive retries: full jitter over a doubling window, capped."""

    def __init__(
        self,
        initial: float = DEFAULT_INITIAL,
        cap: float = DEFAULT_CAP,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= cap:
            raise ValueError(f"backoff needs 0 < initial ({initial}) <= cap ({cap})")
        self.initial = initial
        self.cap = cap
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self.attempts = 0  # retries since the last reset

    def window(self) -> float:
        """The upper bound of the next delay."""
        return min(self.cap, self.initial * 2.0 ** min(self.attempts, 64))

    def next_delay(self) -> float:
        """The wait before the next retry; each call widens the window (up to the cap)."""
        delay = self._rng.uniform(0, self.window())
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """The connection works again: the next failure starts from ``initial``."""
        self.attempts = 0


REASON_CHARS = 300  # a failure's reason as logged and reported, at most


def format_seconds(seconds: float) -> str:
    """``43s``, ``5m``, ``2h5m``: a duration as an operator reads it."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    return f"{secs}s"


class Outage:
    """Something that is up or down (a peer, a task), logged once per change of state:
    ``<what> <lost>: <reason>`` when it goes down, ``<what> <restored> after 43s`` when it
    comes back; nothing (DEBUG) while it stays down."""

    def __init__(
        self,
        what: str,
        *,
        lost: str = "failing",
        restored: str = "recovered",
        monotonic: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
    ) -> None:
        self.what = what
        self._lost = lost
        self._restored = restored
        self._monotonic = monotonic
        self._log = logger or logging.getLogger(__name__)
        self.since: float | None = None  # monotonic time it went down; None while up
        self.reason = ""
        self.changes = 0  # times it went down

    @property
    def down(self) -> bool:
        return self.since is not None

    def fail(self, reason: str, exc: BaseException | None = None) -> bool:
        """Down (``reason``); True when it was up until now (then logged at WARNING, with
        ``exc``'s traceback when given; later failures of the same outage at DEBUG)."""
        self.reason = reason[:REASON_CHARS]
        if self.since is not None:
            self._log.debug("%s still %s: %s", self.what, self._lost, self.reason)
            return False
        self.since = self._monotonic()
        self.changes += 1
        self._log.warning("%s %s: %s", self.what, self._lost, self.reason, exc_info=exc)
        return True

    def ok(self) -> float | None:
        """Up; the seconds it was down when it was down until now (then logged), else None."""
        if self.since is None:
            return None
        down_for = self._monotonic() - self.since
        self.since = None
        self.reason = ""
        self._log.info("%s %s after %s", self.what, self._restored, format_seconds(down_for))
        return down_for


class LinkState(Outage):
    """A connection's ``Outage``: ``<name> lost: <reason>`` and ``<name> restored after 43s``,
    each once per outage. ``name`` says what is connected ("revocation feed", ...)."""

    def __init__(
        self,
        name: str,
        logger: logging.Logger,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name, lost="lost", restored="restored", monotonic=monotonic, logger=logger)

    @property
    def up(self) -> bool:
        return self.since is None

    @property
    def outages(self) -> int:
        return self.changes

    def lost(self, reason: str, *, exc_info: BaseException | None = None) -> None:
        """A call failed: the first failure of an outage is logged (WARNING), later ones DEBUG.

        ``exc_info`` (an unexpected exception) adds its traceback to the one WARNING line."""
        self.fail(reason, exc_info)

    def restored(self) -> None:
        """A call succeeded: logged (INFO, with the outage's duration) if the link was down."""
        self.ok()
