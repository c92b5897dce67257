"""Group commit: every write waiting at one moment shares ONE transaction and ONE COMMIT.

A durable commit costs an fsync (SQLite synchronous=FULL) or a WAL flush
(PostgreSQL), so 200 SMTP deliveries arriving together should not pay 200 of
them. Writers submit a job (an async function of the connection) and wait for
its future. A single runner task takes every job queued at that moment (up to
MAX_BATCH_JOBS), runs each in its own SAVEPOINT so a failing job rolls back
only itself and fails only its own caller, issues one COMMIT, and only after
COMMIT returned resolves the futures and publishes the jobs' change events.
(A batch first runs without savepoints, the common case being that no job
fails; if one does, the transaction is rolled back and the batch runs again,
one savepoint per job. Jobs are therefore re-runnable: they only touch the
connection and their events list, as the deadlock retry already requires.)
Jobs arriving meanwhile form the next batch: no timer, no added latency for
a job that arrives alone.

On PostgreSQL the batch's change events also go out as NOTIFYs inside the
transaction (notify.py), so other daemons hear of exactly the committed ones.

Invariants: a future resolves with a result only if its job's writes are
committed; change events of a job are published only if it committed; a job
whose savepoint hit a PostgreSQL deadlock (two daemons locking mailboxes in
different orders) is retried in the next batch, after this one released its
locks.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runbox_mta.errors import RunboxError
from runbox_mta.store.changes import ChangeEvent
from runbox_mta.store.db import (
    InThreadConnection,
    connect,
    describe,
    run_job,
    thread_writer,
    writer,
)
from runbox_mta.store.notify import new_origin, notify

T = TypeVar("T")
# A job gets the batch's connection and a list to append its change events to.
Job = Callable[[AsyncConnection, list[ChangeEvent]], Awaitable[T]]

# Bounds how long one transaction holds mailbox row locks (other daemons wait
# on them) and how many callers one failed COMMIT can fail.
MAX_BATCH_JOBS = 500
# PostgreSQL deadlock_detected and serialization_failure: the job did nothing
# wrong and succeeds once the other transaction is done.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
MAX_RETRIES = 3


class _JobFailed(Exception):
    """A job failed in a batch run without savepoints: the batch runs again with them."""


class CommitFailed(RunboxError):
    """The batch's transaction could not be started or committed: nothing of it is stored."""


@dataclass
class CommitStats:
    commits: int = 0  # COMMITs the committer issued
    jobs: int = 0  # jobs run, whether they succeeded or failed


@dataclass(eq=False)
class _Pending(Generic[T]):
    job: Job[T]
    future: asyncio.Future[T]
    retries: int = 0
    events: list[ChangeEvent] = field(default_factory=list)
    result: Any = None
    error: BaseException | None = None


class Committer:
    def __init__(self, engine: AsyncEngine, publish: Callable[[list[ChangeEvent]], None],
                 max_batch: int = MAX_BATCH_JOBS) -> None:
        self._engine = writer(engine)
        self._thread_engine = thread_writer(engine)  # SQLite: batches run in a worker thread
        self._publish = publish
        self._max_batch = max_batch
        self._pending: deque[_Pending[Any]] = deque()
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self.stats = CommitStats()
        # Tags this store's NOTIFYs, so its own relay can skip them (published here already).
        self.origin = new_origin()

    @property
    def committing_engine(self) -> Engine:
        """The (synchronous) engine whose COMMITs store the batches: for tests and diagnostics."""
        return self._thread_engine or self._engine.sync_engine

    async def submit(self, job: Job[T]) -> T:
        """Run `job` in the next batch; return its result once it is committed."""
        if self._closed:
            raise RunboxError("the store is closed")
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="store-committer")
        pending: _Pending[T] = _Pending(job, asyncio.get_running_loop().create_future())
        self._pending.append(pending)
        self._wakeup.set()
        return await pending.future

    async def close(self) -> None:
        """Refuse new jobs, finish the queued ones, stop the runner."""
        self._closed = True
        if self._runner is not None:
            self._wakeup.set()
            await self._runner
        if self._thread_engine is not None:
            self._thread_engine.dispose()

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                size = min(len(self._pending), self._max_batch)
                await self._commit([self._pending.popleft() for _ in range(size)])
            if self._closed:
                return

    async def _commit(self, batch: list[_Pending[Any]]) -> None:
        # A caller that gave up (cancelled) before its batch started needs nothing stored.
        batch = [pending for pending in batch if not pending.future.done()]
        if not batch:
            return
        self.stats.jobs += len(batch)
        try:
            # Jobs rarely fail, and a SAVEPOINT and its RELEASE are two more statements
            # per job: run the batch without them first, and only if a job fails, roll
            # the whole batch back and run it again with one savepoint per job.
            if not await self._transaction(batch, savepoints=False):
                await self._transaction(batch, savepoints=True)
        except Exception as error:
            self._fail_batch(batch, error)
            return
        retry: list[_Pending[Any]] = []
        done: list[_Pending[Any]] = []
        for pending in batch:
            (retry if _should_retry(pending) else done).append(pending)
        for pending in retry:
            pending.retries, pending.error = pending.retries + 1, None
        self._pending.extendleft(reversed(retry))
        self._resolve(done)

    async def _transaction(self, batch: list[_Pending[Any]], *, savepoints: bool) -> bool:
        """Run the batch in one transaction and commit; False (nothing stored) if, without
        savepoints, a job failed."""
        if self._thread_engine is not None:
            return await asyncio.to_thread(self._transaction_in_thread, batch, savepoints)
        try:
            async with connect(self._engine) as conn:
                async with conn.begin():
                    for pending in batch:
                        await (self._run_job(conn, pending) if savepoints else self._run_bare(conn, pending))
                    if conn.dialect.name == "postgresql":
                        await notify(conn, self.origin, [event for pending in batch if pending.error is None
                                                         for event in pending.events])
                # Leaving conn.begin() has committed.
        except _JobFailed:
            self._reset(batch)
            return False
        self.stats.commits += 1
        return True

    def _transaction_in_thread(self, batch: list[_Pending[Any]], savepoints: bool) -> bool:
        """_transaction for SQLite, in a worker thread: the whole batch and its COMMIT (the
        fsync) in one trip instead of several per statement through aiosqlite's thread."""
        assert self._thread_engine is not None
        try:
            try:
                sync_conn = self._thread_engine.connect()
            except (OSError, DBAPIError) as error:
                raise RunboxError(f"cannot open database {describe(self._thread_engine.url)}: {error}") from error
            with sync_conn, sync_conn.begin():
                conn = cast(AsyncConnection, InThreadConnection(sync_conn))
                for pending in batch:
                    run_job(self._run_job(conn, pending) if savepoints else self._run_bare(conn, pending))
        except _JobFailed:
            self._reset(batch)
            return False
        self.stats.commits += 1
        return True

    @staticmethod
    def _reset(batch: list[_Pending[Any]]) -> None:
        for pending in batch:
            pending.result, pending.error = None, None
            pending.events.clear()

    @staticmethod
    async def _run_bare(conn: AsyncConnection, pending: _Pending[Any]) -> None:
        try:
            pending.result = await pending.job(conn, pending.events)
        except Exception as error:
            raise _JobFailed from error

    async def _run_job(self, conn: AsyncConnection, pending: _Pending[Any]) -> None:
        try:
            async with conn.begin_nested():
                pending.result = await pending.job(conn, pending.events)
        except Exception as error:
            pending.error = error
            pending.events.clear()

    def _resolve(self, batch: list[_Pending[Any]]) -> None:
        for pending in batch:
            if pending.future.done():
                continue
            if pending.error is not None:
                pending.future.set_exception(pending.error)
            else:
                pending.future.set_result(pending.result)
        self._publish([event for pending in batch if pending.error is None for event in pending.events])

    @staticmethod
    def _fail_batch(batch: list[_Pending[Any]], error: Exception) -> None:
        """BEGIN or COMMIT failed: jobs that had succeeded are not stored after all."""
        for pending in batch:
            if pending.future.done():
                continue
            if pending.error is None:
                failure = CommitFailed(f"the database did not store the change: {error}")
                failure.__cause__ = error
                pending.future.set_exception(failure)
            else:
                pending.future.set_exception(pending.error)


def _should_retry(pending: _Pending[Any]) -> bool:
    error = pending.error
    return (
        isinstance(error, DBAPIError)
        and getattr(error.orig, "sqlstate", None) in RETRYABLE_SQLSTATES
        and pending.retries < MAX_RETRIES
    )
