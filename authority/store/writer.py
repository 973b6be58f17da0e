"""One thread per store that runs every job, with group commit, on either database.

The thread takes the first waiting job and whatever else is already queued (up to
``MAX_BATCH``), runs them in one transaction with a savepoint per job, appends the audit records
of the jobs that succeeded (last, so that the audit chain's head is held only from there to the
commit), commits, and only then settles the futures. A job that raises is rolled back to its
savepoint alone. A transaction the database aborts for a conflict with another replica (a
deadlock, a serialization failure) is run again, whole. A lost connection fails the batch with
UNAVAILABLE; the next batch connects afresh, at most once per ``RECONNECT_SECONDS``, and the
jobs that arrive in between fail at once rather than wait.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Protocol

from authority.audit import AuditEvent
from authority.errors import AuthorityError, Internal, Unavailable
from authority.metrics import METRICS
from authority.store.sql import Tx

log = logging.getLogger(__name__)

MAX_BATCH: Final = 256
LINGER_SECONDS: Final = 0.0005
RECONNECT_SECONDS: Final = 0.5
CONFLICT_RETRIES: Final = 5

# Measured in the writer thread: appending audit records (its CPU time), the durable commit
# (wall time) of a batch, and the batch sizes (jobs).
_AUDIT_APPEND: Final = METRICS.samples("store.audit_append")
_COMMIT: Final = METRICS.samples("store.commit")
_BATCH: Final = METRICS.samples("store.batch_jobs", unit="")


class Connection(Tx, Protocol):
    """A database connection the writer drives."""

    topics: list[str]  # announced by the jobs of the open transaction, in order

    @property
    def in_transaction(self) -> bool: ...

    def begin(self) -> None: ...

    def savepoint(self) -> None: ...

    def release(self) -> None: ...

    def rollback_to(self) -> None: ...

    def commit(self) -> None:
        """Announce ``topics`` to the other replicas (where there are any), then commit."""
        ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """How to reach one database, and what its errors mean."""

    name: str

    def connect(self) -> Connection: ...

    def error(self, exc: Exception) -> tuple[AuthorityError, bool, bool] | None:
        """For a driver's exception: (what to tell the caller, whether to run the transaction
        again, whether the connection is lost); None for an exception that is not the
        driver's."""
        ...


AuditAppender = Callable[[Tx, Sequence[AuditEvent]], list[Any]]


@dataclasses.dataclass(slots=True)
class Job:
    fn: Callable[[Tx], object]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    audit: Sequence[AuditEvent] = ()
    # The job is "append these records": its value is the records appended.
    returns_records: bool = False


_STOP: Final = object()
_Outcome = tuple["asyncio.Future[Any]", BaseException | None, object]
_Result = tuple[Job, BaseException | None, object]


def _settle(outcomes: list[_Outcome]) -> None:
    for future, error, value in outcomes:
        if future.done():  # the caller was cancelled: nobody is waiting
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


class _Conflict(Exception):
    """The database aborted the transaction for a conflict: run the batch again."""


class Writer:
    """Owns the connection; runs batches of jobs in one transaction each."""

    def __init__(
        self,
        backend: Backend,
        append_audit: AuditAppender,
        on_commit: Callable[[set[str]], None],
    ) -> None:
        self.queue: queue.SimpleQueue[Job | object] = queue.SimpleQueue()
        # Both futures are marked running at once so that a cancelled waiter cannot cancel them.
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.ready.set_running_or_notify_cancel()
        self.done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.done.set_running_or_notify_cancel()
        self.commits = 0
        self.retries = 0
        self.connected = False
        self._backend = backend
        self._append_audit = append_audit
        self._on_commit = on_commit
        # Called in this thread after each commit: (its wall time, the audit events committed).
        self.observers: list[Callable[[float, Sequence[AuditEvent]], None]] = []
        self._conn: Connection | None = None
        self._next_connect = 0.0
        self.thread = threading.Thread(target=self._main, name=f"store:{backend.name}", daemon=True)

    def _main(self) -> None:
        try:
            self._conn = self._backend.connect()
            self.connected = True
        except BaseException as exc:
            self.ready.set_exception(exc)
            self.done.set_result(None)
            return
        self.ready.set_result(None)
        try:
            self._serve()
        finally:
            self._fail_leftovers()
            self._drop_connection()
            self.done.set_result(None)

    def _serve(self) -> None:
        stop = False
        while not stop:
            batch: list[Job] = []
            item = self.queue.get()
            # Linger a moment for more work: under load, one commit (one fsync, one BEGIN and
            # COMMIT) then serves many requests, and the writer holds the GIL far less.
            deadline = time.monotonic() + LINGER_SECONDS
            while True:
                if item is _STOP:
                    stop = True
                    break
                assert isinstance(item, Job)
                batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        item = self.queue.get(timeout=remaining)
                    except queue.Empty:
                        break
            if batch:
                self._deliver(self._run(batch))

    def _fail_leftovers(self) -> None:
        leftovers: list[Job] = []
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job):
                leftovers.append(item)
        closed = Unavailable("the store is closed", reason="STORE_CLOSED")
        self._deliver([(job, closed, None) for job in leftovers])

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self.connected = False
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _connection(self) -> Connection:
        if self._conn is not None:
            return self._conn
        now = time.monotonic()
        if now < self._next_connect:
            raise Unavailable("the database is unreachable", reason="STORE_UNREACHABLE")
        self._next_connect = now + RECONNECT_SECONDS
        try:
            self._conn = self._backend.connect()
        except Exception as exc:
            log.warning("store: cannot reach the %s database: %s", self._backend.name, exc)
            error = Unavailable("the database is unreachable", reason="STORE_UNREACHABLE")
            raise error from exc
        self.connected = True
        log.info("store: connected to the %s database again", self._backend.name)
        return self._conn

    def _run(self, batch: list[Job]) -> list[_Result]:
        live = [job for job in batch if not job.future.cancelled()]
        if not live:
            return []
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                conn = self._connection()
            except Unavailable as exc:
                return [(job, exc, None) for job in live]
            try:
                return self._run_batch(conn, live)
            except _Conflict:
                self.retries += 1
                time.sleep(0.001 * (attempt + 1))
        error = Unavailable(
            "the write kept conflicting with other replicas' writes", reason="STORE_CONFLICT"
        )
        return [(job, error, None) for job in live]

    def _run_batch(self, conn: Connection, batch: list[Job]) -> list[_Result]:
        results: list[_Result] = []
        in_flight: list[int] = []  # indexes in results of jobs whose writes are not yet committed
        audited: list[tuple[int, Sequence[AuditEvent]]] = []
        try:
            conn.topics.clear()
            conn.begin()
            for job in batch:
                conn.savepoint()
                announced = len(conn.topics)
                try:
                    value = job.fn(conn)
                except Exception as exc:
                    error = self._job_error(exc)
                    del conn.topics[announced:]
                    conn.cache.clear()
                    conn.rollback_to()
                    results.append((job, error, None))
                else:
                    conn.release()
                    if job.audit and value is not False:  # a delete that found nothing: no record
                        audited.append((len(results), job.audit))
                    in_flight.append(len(results))
                    results.append((job, None, value))
            if audited:
                self._append(conn, results, audited)
            started = time.perf_counter()
            conn.commit()
            elapsed = time.perf_counter() - started
            _COMMIT.add(elapsed)
            if self.observers:
                self._observe(elapsed, audited)
            _BATCH.add(len(batch))
            self.commits += 1
            topics = set(conn.topics)
            conn.topics.clear()
            if topics:
                self._on_commit(topics)
        except Exception as exc:  # the transaction itself failed: none of it is committed
            cause = self._abandon(conn, exc)
            self._lose(results, in_flight, cause)
            done = {id(job) for job, _, _ in results}
            results.extend((job, cause, None) for job in batch if id(job) not in done)
        return results

    def _observe(self, elapsed: float, audited: list[tuple[int, Sequence[AuditEvent]]]) -> None:
        events = [event for _, job_events in audited for event in job_events]
        for observer in self.observers:
            try:
                observer(elapsed, events)
            except Exception:
                log.exception("commit observer failed")

    def _append(
        self,
        conn: Connection,
        results: list[_Result],
        audited: list[tuple[int, Sequence[AuditEvent]]],
    ) -> None:
        # The writer thread's CPU time: what the records cost, not time spent waiting for the
        # GIL while the event loop runs.
        started = time.thread_time()
        events = [event for _, job_events in audited for event in job_events]
        records = self._append_audit(conn, events)
        _AUDIT_APPEND.add(time.thread_time() - started)
        offset = 0
        for index, job_events in audited:
            job, error, _ = results[index]
            if job.returns_records:
                results[index] = (job, error, records[offset : offset + len(job_events)])
            offset += len(job_events)

    def _job_error(self, exc: Exception) -> BaseException:
        known = self._backend.error(exc)
        if known is None:
            return exc
        error, retry, lost = known
        if retry or lost:  # the whole transaction is gone, not just this job's savepoint
            raise exc
        return error

    def _abandon(self, conn: Connection, exc: Exception) -> AuthorityError:
        """Roll back after a failed transaction; what to tell its callers. Raises _Conflict when
        the database aborted it for a conflict (the batch is to run again)."""
        conn.cache.clear()
        conn.topics.clear()
        known = self._backend.error(exc)
        retry = lost = False
        if known is not None:
            error, retry, lost = known
            error.__cause__ = exc
        elif isinstance(exc, AuthorityError):
            error = exc
        else:
            error = Internal(f"the store failed: {type(exc).__name__}")
            error.__cause__ = exc
        if lost and not retry:
            self._drop_connection()
            return error
        try:
            if conn.in_transaction:
                conn.rollback()
        except Exception:  # a connection that cannot roll back is dropped
            self._drop_connection()
        if retry:
            raise _Conflict from exc
        return error

    @staticmethod
    def _lose(results: list[_Result], in_flight: list[int], cause: AuthorityError) -> None:
        for index in in_flight:
            job = results[index][0]
            error = Unavailable("the write was rolled back", reason=cause.reason or "STORE_ERROR")
            error.__cause__ = cause
            results[index] = (job, error, None)
        in_flight.clear()

    @staticmethod
    def _deliver(results: Iterable[_Result]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for job, error, value in results:
            by_loop.setdefault(job.loop, []).append((job.future, error, value))
        for loop, outcomes in by_loop.items():
            # RuntimeError: that loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, outcomes)

    def stop(self) -> None:
        self.queue.put(_STOP)
