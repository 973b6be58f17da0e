"""``authority.logs``: the JSON line format and the rate limit on lines a caller can provoke."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import pytest

from authority.logs import JsonFormatter, RateLimitedLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    logger = logging.getLogger("authority.test")
    record = logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, message, args, None, extra=extra
    )
    return record


def test_a_json_line_carries_time_level_logger_message_and_extras() -> None:
    line = JsonFormatter().format(_record("refused %s", "UNAUTHENTICATED", reason="TOKEN_EXPIRED"))
    doc = json.loads(line)
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "authority.test"
    assert doc["message"] == "refused UNAUTHENTICATED"
    assert doc["reason"] == "TOKEN_EXPIRED"
    assert doc["time"].endswith("+00:00")
    assert "args" not in doc  # the record's own fields stay out
    assert "msg" not in doc


def test_a_message_with_newlines_stays_one_json_line() -> None:
    line = JsonFormatter().format(_record("a\nforged 2026-01-01 INFO line"))
    assert "\n" not in line
    assert json.loads(line)["message"] == "a\nforged 2026-01-01 INFO line"


def test_an_exception_and_values_json_cannot_hold_are_strings() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logger = logging.getLogger("authority.test")
        record = logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "failed", (), sys.exc_info(), extra={"x": {1}}
        )
    doc = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in doc["exception"]
    assert doc["x"] == "{1}"


def _limited(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> RateLimitedLog:
    caplog.set_level(logging.INFO, logger="authority.test")
    return RateLimitedLog(logging.getLogger("authority.test"), burst=3, window=10.0, clock=clock)


def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "authority.test"]


def test_a_flood_writes_the_burst_then_one_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limited = _limited(clock, caplog)
    for i in range(100):
        limited.log("TOKEN_EXPIRED", logging.WARNING, "refused %d", i)
    assert _messages(caplog) == ["refused 0", "refused 1", "refused 2"]
    clock.now += 10.0
    limited.log("TOKEN_EXPIRED", logging.WARNING, "refused again")
    assert _messages(caplog)[3:] == [
        "97 more refused (TOKEN_EXPIRED) in the last 10s",
        "refused again",
    ]


def test_each_reason_has_its_own_burst(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limited = _limited(clock, caplog)
    for _ in range(10):
        limited.log("TOKEN_EXPIRED", logging.WARNING, "expired")
    assert limited.log("POLICY_DENIED", logging.WARNING, "denied")
    assert _messages(caplog).count("denied") == 1
    assert _messages(caplog).count("expired") == 3


def test_a_window_without_suppressed_lines_closes_silently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    limited = _limited(clock, caplog)
    limited.log("A", logging.WARNING, "one")
    clock.now += 60
    limited.flush()
    assert _messages(caplog) == ["one"]


def test_keys_beyond_the_bound_share_one(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="authority.test")
    clock = FakeClock()
    limited = RateLimitedLog(
        logging.getLogger("authority.test"), burst=1, window=10.0, max_keys=2, clock=clock
    )
    written = [limited.log(f"K{i}", logging.WARNING, "k") for i in range(50)]
    assert written.count(True) == 3  # K0, K1, then the first of the shared "(other)"
    clock.now += 10
    limited.flush()
    assert _messages(caplog)[-1] == "47 more refused ((other)) in the last 10s"


async def test_under_a_loop_the_count_is_written_when_the_window_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="authority.test")
    limited = RateLimitedLog(logging.getLogger("authority.test"), burst=1, window=0.2)
    for _ in range(5):
        limited.log("R", logging.WARNING, "refused")
    async with asyncio.timeout(10):
        while "4 more refused (R) in the last 0s" not in _messages(caplog):  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # the log has no event to wait on


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimitedLog(logging.getLogger("x"), burst=0)
