"""A few in-process measurements, for operators and benchmarks: bounded samples, percentiles."""

from __future__ import annotations

import collections
import threading
from collections.abc import Mapping

MAX_SAMPLES = 20_000


class Samples:
    """The most recent values of one measurement; thread-safe. Durations are added in seconds
    and reported in microseconds (``p50_us``...); counts (``unit=""``) as they are (``p50``...)."""

    def __init__(self, size: int = MAX_SAMPLES, *, unit: str = "us") -> None:
        self._scale = 1e6 if unit == "us" else 1.0
        self._suffix = f"_{unit}" if unit else ""
        self._values: collections.deque[float] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self.count = 0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._values.append(seconds)
            self.count += 1

    def reset(self) -> None:
        with self._lock:
            self._values.clear()
            self.count = 0

    def summary(self) -> dict[str, float]:
        with self._lock:
            ordered = sorted(self._values)
            count = self.count
        if not ordered:
            return {"count": count}

        def pick(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * self._scale

        return {
            "count": count,
            f"p50{self._suffix}": pick(0.50),
            f"p99{self._suffix}": pick(0.99),
            f"mean{self._suffix}": sum(ordered) / len(ordered) * self._scale,
        }


class Registry:
    def __init__(self) -> None:
        self._samples: dict[str, Samples] = {}
        self._lock = threading.Lock()

    def samples(self, name: str, *, unit: str = "us") -> Samples:
        with self._lock:
            return self._samples.setdefault(name, Samples(unit=unit))

    def snapshot(self) -> Mapping[str, dict[str, float]]:
        with self._lock:
            items = list(self._samples.items())
        return {name: s.summary() for name, s in sorted(items)}

    def reset(self) -> None:
        with self._lock:
            items = list(self._samples.values())
        for s in items:
            s.reset()


METRICS = Registry()
