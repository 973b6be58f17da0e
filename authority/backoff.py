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


class LinkState:
    """A connection's state changes, logged once each: lost (with the reason), restored (with
    the outage's duration). ``name`` says what is connected ("revocation feed", ...)."""

    def __init__(
        self,
        name: str,
        logger: logging.Logger,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._log = logger
        self._monotonic = monotonic
        self.down_since: float | None = None  # monotonic time of the loss, None while up
        self.outages = 0

    @property
    def up(self) -> bool:
        return self.down_since is None

    def lost(self, reason: str, *, exc_info: BaseException | None = None) -> None:
        """A call failed: the first failure of an outage is logged (WARNING), later ones DEBUG.

        ``exc_info`` (an unexpected exception) adds its traceback to the one WARNING line."""
        if self.down_since is None:
            self.down_since = self._monotonic()
            self.outages += 1
            self._log.warning(
                "%s lost (%s); reconnecting with backoff", self.name, reason, exc_info=exc_info
            )
        else:
            self._log.debug("%s still down (%s)", self.name, reason)

    def restored(self) -> None:
        """A call succeeded: logged (INFO, with the outage's duration) if the link was down."""
        if self.down_since is None:
            return
        outage = self._monotonic() - self.down_since
        self.down_since = None
        self._log.info("%s restored after %.1fs", self.name, outage)
