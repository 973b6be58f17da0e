"""Long-lived tasks kept alive: one ``Supervisor`` per process (the authority, a node agent).

A supervised task that raises, returns, or ends in a ``CancelledError`` the supervisor did not
ask for (a gRPC call cancelled under it) is failing: the failure is logged once with its reason,
the task is started again after an exponential backoff with full jitter (capped), and the
recovery is logged once with how long the task was down. A task that keeps failing logs nothing
more. Health asks ``down()``/``healthy()``: a process says NOT_SERVING while a task it depends
on is down.

A run that began on a channel the process has since replaced (its own SVID renewed: the old
channel closes and its calls end cancelled) is not a failure: it is started again at once, on
the new channel, without a log line. The process tells the supervisor its channel generation.

Restarts wait as ``authority.backoff.Backoff`` says (full jitter, capped). Time and randomness
are injected (``sleep``, ``monotonic``, ``rng``) so tests drive them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from authority.backoff import DEFAULT_CAP, DEFAULT_INITIAL, Backoff, Outage, format_seconds
from authority.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]


def describe(exc: BaseException) -> str:
    """A failure's reason in one line (the message is the exception's own, never a secret:
    the supervised code does not put tokens or keys in exceptions)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class TaskReturned(Exception):
    """A supervised task ended on its own: they are meant to run until stopped."""


@dataclass(slots=True, eq=False)
class _Job:
    name: str
    run: Callable[[], Awaitable[None]]
    critical: bool
    outage: Outage
    backoff: Backoff
    restarts: int = 0
    swaps: int = 0
    runs: int = 0
    task: asyncio.Task[None] | None = None
    settle: asyncio.Task[None] | None = None


class Supervisor:
    """Runs named tasks, restarts them when they fail, and knows which are down.

    ``expected``: exception types whose failures are logged without a traceback (a peer gone,
    a refused file); any other is logged with one, once. ``generation``: the process's channel
    generation (see the module's docstring). ``settle``: how long a restarted task must run
    before it counts as recovered, when it does not say so itself with ``ok(name)`` (None: only
    ``ok`` says so).
    ``on_change(name, up)``: called on every change of a task's state (health)."""

    def __init__(
        self,
        *,
        backoff_initial: float = DEFAULT_INITIAL,
        backoff_cap: float = DEFAULT_CAP,
        sleep: Sleep = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        generation: Callable[[], int] = lambda: 0,
        expected: tuple[type[BaseException], ...] = (),
        settle: float | None = 5.0,
        on_change: Callable[[str, bool], None] | None = None,
        logger: logging.Logger = log,
    ) -> None:
        Backoff(backoff_initial, backoff_cap)  # checks the bounds now, not at the first failure
        self._backoff = (backoff_initial, backoff_cap)
        self._sleep = sleep
        self._monotonic = monotonic
        self._rng = rng
        self._generation = generation
        self._expected = expected
        self._settle = settle
        self._on_change = on_change
        self._log = logger
        self._jobs: dict[str, _Job] = {}
        self._stopping = False

    # --- starting ---------------------------------------------------------------------------

    def start(
        self,
        name: str,
        run: Callable[[], Awaitable[None]],
        *,
        critical: bool = True,
        backoff_cap: float | None = None,
    ) -> None:
        """Run ``run()`` as the task ``name`` until ``stop``; ``critical``: health depends on it;
        ``backoff_cap``: a shorter cap of its retry delays than the supervisor's (a cheap probe
        whose recovery should show at once)."""
        if name in self._jobs:
            raise ValueError(f"a task named {name!r} is already supervised")
        outage = Outage(
            f"task {name}",
            lost="failing",
            restored="recovered",
            monotonic=self._monotonic,
            logger=self._log,
        )
        initial, cap = self._backoff
        if backoff_cap is not None:
            initial, cap = min(initial, backoff_cap), backoff_cap
        backoff = Backoff(initial, cap, rng=self._rng)
        job = _Job(name, run, critical, outage, backoff)
        self._jobs[name] = job
        job.task = asyncio.create_task(self._runner(job), name=name)

    def every(
        self,
        name: str,
        interval: float,
        step: Callable[[], Awaitable[object]],
        *,
        critical: bool = True,
        backoff_cap: float | None = None,
    ) -> None:
        """Run ``step()`` every ``interval`` seconds as the task ``name``: a step that raises
        marks it failing and is tried again after the backoff (at once after the delay, not
        an interval later); the next step that succeeds marks it recovered."""

        async def periodic() -> None:
            if not self._jobs[name].outage.down:
                await self._sleep(interval)
            while True:
                await step()
                self.ok(name)
                await self._sleep(interval)

        self.start(name, periodic, critical=critical, backoff_cap=backoff_cap)

    # --- what health asks -------------------------------------------------------------------

    def ok(self, name: str) -> None:
        """Task ``name`` made progress: it is up (its recovery logged once when it was down)."""
        job = self._jobs.get(name)
        if job is None:
            return
        job.backoff.reset()
        if job.outage.ok() is not None and self._on_change is not None:
            self._on_change(name, True)

    def down(self) -> dict[str, str]:
        """The tasks failing now, each with its reason."""
        return {n: j.outage.reason for n, j in self._jobs.items() if j.outage.down}

    def healthy(self, *names: str) -> bool:
        """No critical task down (or none of ``names``, when given)."""
        if names:
            return not any(self._jobs[n].outage.down for n in names if n in self._jobs)
        return not any(j.outage.down for j in self._jobs.values() if j.critical)

    def is_down(self, name: str) -> bool:
        job = self._jobs.get(name)
        return job is not None and job.outage.down

    def restarts(self, name: str) -> int:
        return self._jobs[name].restarts

    def swaps(self, name: str) -> int:
        """Runs of ``name`` started again at once after the process's own channel swap."""
        return self._jobs[name].swaps

    @property
    def names(self) -> list[str]:
        return list(self._jobs)

    # --- stopping ---------------------------------------------------------------------------

    async def stop(self) -> None:
        self._stopping = True
        jobs = list(self._jobs.values())
        await cancel_and_wait([j.task for j in jobs] + [j.settle for j in jobs])

    # --- the loop around one task -------------------------------------------------------------

    async def _runner(self, job: _Job) -> None:
        while True:
            generation = self._generation()
            job.runs += 1
            if job.settle is not None:
                job.settle.cancel()
                job.settle = None
            if job.outage.down and self._settle is not None:
                job.settle = asyncio.create_task(self._settled(job, job.runs))
            try:
                await job.run()
                failure: BaseException = TaskReturned("the task returned")
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if self._stopping or (task is not None and task.cancelling() > 0):
                    raise
                failure = exc  # a call cancelled under it, not the task
            except Exception as exc:
                failure = exc
            if self._stopping:
                return
            if self._generation() != generation:
                job.swaps += 1  # its channel was replaced: again at once, on the new one
                continue
            job.restarts += 1
            reason = describe(failure)
            if isinstance(failure, asyncio.CancelledError):
                reason = "a call was cancelled under the task (CancelledError)"
            quiet = isinstance(failure, (asyncio.CancelledError, TaskReturned, *self._expected))
            went_down = job.outage.fail(reason, None if quiet else failure)
            if went_down and self._on_change is not None:
                self._on_change(job.name, False)
            await self._sleep(job.backoff.next_delay())

    async def _settled(self, job: _Job, run: int) -> None:
        """A restarted run still going after ``settle`` seconds has recovered."""
        assert self._settle is not None
        await self._sleep(self._settle)
        if job.runs == run and not self._stopping:
            self.ok(job.name)


__all__ = [
    "Outage",
    "Supervisor",
    "TaskReturned",
    "describe",
    "format_seconds",
]
