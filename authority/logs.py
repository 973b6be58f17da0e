"""Logging for the long-running programs (``authority serve``, ``authority agent``): the
handler set-up, a JSON line format for log shippers, and a rate limit for lines a caller can
provoke (refusals), so that a flood of bad calls writes a bounded number of lines.

Only the standard ``logging`` module: a line is one ``LogRecord``; the JSON format writes its
time, level, logger and message, and the structured fields a caller passed in ``extra``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from authority.backoff import format_seconds
from authority.config import LOG_FORMATS

_LATE: Final = 0.05  # a timer fires this much after its window ends, never just before
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord carries; anything else on a record came in ``extra``.
_STANDARD: Final = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601, milliseconds), ``level``,
    ``logger``, ``message``, then the record's ``extra`` fields (values that are not JSON
    become strings), and ``exception`` with the traceback when there is one. Newlines in a
    message stay inside its JSON string: a line is always one record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure(level: str | int, log_format: str = "text") -> None:
    """Log to stderr at ``level`` in ``log_format`` (``text`` or ``json``), replacing any
    handler set before (so a second call, in tests, does not write every line twice)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)


@dataclass(slots=True)
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0
    flush_scheduled: bool = False


class RateLimitedLog:
    """Lines grouped by a key (a stable reason): at most ``burst`` lines per key in a window of
    ``window`` seconds; the rest are counted, and one summary line per key says how many were
    left out (``12 more refused (TOKEN_EXPIRED) in the last 10s``) when the window closes: at
    the next line of that key, or, under a running event loop, by a timer set at the first line
    left out. Keys beyond ``max_keys`` in one window share the key ``(other)``.

    ``clock``: monotonic seconds (tests pass their own)."""

    OTHER: Final = "(other)"

    def __init__(
        self,
        logger: logging.Logger,
        *,
        burst: int = 10,
        window: float = 10.0,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
        summary: str = "refused",
    ) -> None:
        if burst <= 0 or window <= 0 or max_keys <= 0:
            raise ValueError("a log rate limit needs positive bounds")
        self._log = logger
        self._burst = burst
        self._window = window
        self._max_keys = max_keys
        self._clock = clock
        self._summary = summary
        self._windows: dict[str, _Window] = {}

    def admit(self, key: str) -> bool:
        """Whether a line of ``key`` may be written now (it is then counted as written); if
        not, it is counted as left out."""
        now = self._clock()
        self.flush(now)
        if key not in self._windows and len(self._windows) >= self._max_keys:
            key = self.OTHER
        window = self._windows.setdefault(key, _Window(now))
        if window.logged < self._burst:
            window.logged += 1
            return True
        window.suppressed += 1
        if not window.flush_scheduled:
            window.flush_scheduled = self._schedule_flush(window.started + self._window - now)
        return False

    def log(
        self,
        key: str,
        level: int,
        message: str,
        *args: object,
        extra: Mapping[str, object] | None = None,
    ) -> bool:
        """Write the line unless ``key`` spent its burst in this window; whether it was."""
        if not self.admit(key):
            return False
        self._log.log(level, message, *args, extra=dict(extra or {}))
        return True

    def flush(self, now: float | None = None) -> None:
        """Close the windows that have ended: one summary line for each that left lines out."""
        now = self._clock() if now is None else now
        for key, window in list(self._windows.items()):
            if now - window.started < self._window:
                continue
            del self._windows[key]
            if window.suppressed:
                self._log.warning(
                    "%d more %s (%s) in the last %s",
                    window.suppressed,
                    self._summary,
                    key,
                    format_seconds(self._window),
                    extra={"reason": key, "suppressed": window.suppressed},
                )

    def _schedule_flush(self, delay: float) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False  # no loop: the next line of the key closes the window
        loop.call_later(max(delay, 0.0) + _LATE, self.flush)
        return True


__all__ = ["LOG_FORMATS", "JsonFormatter", "RateLimitedLog", "configure"]
