"""One SQLite database per service for its durable state, written off the event loop.

* WAL mode. A write that would lose an answer if a power cut undid it asks for
  `durable=True` and its commit runs with `synchronous=FULL` (one fsync of the
  WAL, ~0.3 ms here, on a worker thread); everything else commits with
  `synchronous=NORMAL`, which survives a crash of the process (SIGKILL, OOM)
  but may lose the last commits on a power cut — for those rows that only
  means a frame is sent again. Such a commit does no disk wait at all.
* One writer. `write(fn)` queues `fn(connection)`; the writer service applies
  every queued function in one transaction and commits it on a worker thread
  (group commit; see `_run_apply` for why the statements are not on it too),
  so 200 messages arriving at once cost a few commits, not 200. The caller
  awaits the commit (`write`) or only queues it (`write_soon`) when losing the
  row in a crash is harmless. Writes are applied in the order they were queued.
* Reads happen once, at start-up (`read`), to fill the service's in-memory
  mirror; the running service never waits for a read.
* Every sqlite3 failure becomes one `StateError` whose message names the file
  and the problem ("disk is full", "not a database (corrupt?)", ...): never a
  traceback for the person running it.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final, TypeVar

import attrs
import trio

log = logging.getLogger(__name__)

T = TypeVar("T")
Write = Callable[[sqlite3.Connection], object]

MAX_BATCH: Final = 512  # writes per transaction; bounds one commit's latency
CHECKPOINT_EVERY: Final = 500  # commits between WAL checkpoints (~2 MB of WAL at most)


class StateError(Exception):
    """The state database cannot be used; the message names the file and the problem."""


def describe_sqlite_error(path: Path, exc: BaseException) -> str:
    """One line for a person: which file, what is wrong with it."""
    text = str(exc)
    lower = text.lower()
    if "not a database" in lower or "malformed" in lower or "corrupt" in lower:
        problem = "is not a valid SQLite database (corrupt?); move it aside to start empty"
    elif "readonly" in lower or "read-only" in lower:
        problem = "is read-only (check the permissions of the file and its directory)"
    elif "disk is full" in lower or "database or disk is full" in lower:
        problem = "cannot be written: the disk is full"
    elif "unable to open" in lower:
        problem = "cannot be opened (does its directory exist, and is it writable?)"
    elif "locked" in lower or "busy" in lower:
        problem = "is locked by another process"
    elif isinstance(exc, OSError) and exc.strerror:
        problem = f"cannot be used: {exc.strerror}"
    else:
        problem = f"cannot be used: {text or type(exc).__name__}"
    return f"{path}: {problem}"


@attrs.define(eq=False)
class _Pending:
    fn: Write
    durable: bool
    done: trio.Event | None  # None: nobody waits (write_soon)
    error: StateError | None = None


class Database:
    """The database at `path`, brought to the newest schema by `migrations`.

    `migrations[i]` is an SQL script taking the schema from version i to i+1
    (tracked in `PRAGMA user_version`).
    """

    def __init__(
        self, path: Path | str, migrations: Sequence[str], *, inline: bool = False
    ) -> None:
        self.path = Path(path)
        # inline: commit on the event loop instead of a worker thread. Only for
        # tests on trio's virtual clock, which would race ahead while a thread works.
        self._inline = inline
        self._migrations = tuple(migrations)
        self._conn: sqlite3.Connection | None = None
        send, receive = trio.open_memory_channel[_Pending](math.inf)
        # Unbounded on purpose: a write is a few hundred bytes and is queued by
        # handlers that must not block; the writer drains it in large batches.
        self._send, self._receive = send, receive
        self._limiter = trio.CapacityLimiter(1)
        self.commits = 0  # transactions committed (for the bench)

    # ------------------------------------------------------------------ start-up

    def open(self) -> None:
        """Open (creating if needed), check, and migrate; raises `StateError`."""
        memory = str(self.path) == ":memory:"
        try:
            if not memory:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False, timeout=5.0
            )
        except (sqlite3.Error, OSError) as exc:
            raise StateError(describe_sqlite_error(self.path, exc)) from None
        try:
            if not memory:
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise sqlite3.OperationalError(f"cannot switch to WAL (got {mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # see _run_apply
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {check}")
            self._migrate(conn)
        except (sqlite3.Error, OSError) as exc:
            conn.close()
            raise StateError(describe_sqlite_error(self.path, exc)) from None
        self._conn = conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > len(self._migrations):
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this codexnet knows "
                f"({len(self._migrations)}); was it written by a newer version?"
            )
        for target in range(version + 1, len(self._migrations) + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _statements(self._migrations[target - 1]):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version={target}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            log.info("%s: schema migrated to version %d", self.path, target)

    def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read at start-up (before the writer serves); raises `StateError`."""
        try:
            return fn(self._connection())
        except sqlite3.Error as exc:
            raise StateError(describe_sqlite_error(self.path, exc)) from None

    def write_now(self, fn: Write, *, durable: bool = True) -> None:
        """A write at start-up, before the writer service runs (imports, recovery)."""
        try:
            self._apply([_Pending(fn, durable, None)])
        except sqlite3.Error as exc:
            raise StateError(describe_sqlite_error(self.path, exc)) from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(f"{self.path}: not open")
        return self._conn

    # ------------------------------------------------------------------ writing

    async def write(self, fn: Write, *, durable: bool = False) -> None:
        """Queue `fn` and wait until it is committed; raises `StateError`."""
        pending = _Pending(fn, durable, trio.Event())
        self._queue(pending)
        assert pending.done is not None
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error

    def write_soon(self, fn: Write, *, durable: bool = False) -> None:
        """Queue `fn` without waiting; a failure is logged (the row was not essential)."""
        self._queue(_Pending(fn, durable, None))

    def _queue(self, pending: _Pending) -> None:
        try:
            self._send.send_nowait(pending)
        except trio.ClosedResourceError:
            raise StateError(f"{self.path}: the state writer has stopped") from None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer service: commit queued writes in batches until `stop()`.

        Shielded from cancellation on purpose: when a service shuts down, its
        last steps (an answer part sent, now to be counted) still write; the
        service calls `stop()` once they are done, and everything queued by
        then is committed before this returns.
        """
        with trio.CancelScope(shield=True):
            task_status.started()
            async for first in self._receive:
                await self._commit(self._batch(first))

    def stop(self) -> None:
        """No more writes: `run` commits what is queued and returns."""
        self._send.close()

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Run the writer around the block: `async with db.serving(): <the service>`.

        The writer outlives everything in the block, so writes made while the
        block shuts down are committed too.
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            try:
                yield
            finally:
                self.stop()

    def _batch(self, first: _Pending) -> list[_Pending]:
        batch = [first]
        while len(batch) < MAX_BATCH:
            try:
                batch.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return batch

    async def _run_apply(self, batch: list[_Pending]) -> None:
        """Apply `batch` in one transaction; only a commit that waits for the disk leaves the loop.

        The statements only touch SQLite's page cache (microseconds each), and
        so does a `synchronous=NORMAL` commit in WAL mode: it appends to the
        WAL without an fsync. Those run here, on the event loop. A durable
        commit fsyncs the WAL, and a checkpoint fsyncs the database: those run
        on the worker thread. (Running the statements on the thread too would
        cost a GIL hand-over per statement, which under a busy event loop waits
        up to the interpreter's switch interval, 5 ms, each: 100 writes took
        ~150 ms that way.) Auto-checkpoints are off for this reason; `_checkpoint`
        runs one on the thread every `CHECKPOINT_EVERY` commits.
        """
        conn = self._connection()
        durable = any(p.durable for p in batch)
        if durable:
            conn.execute("PRAGMA synchronous=FULL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for pending in batch:
                    pending.fn(conn)
                if durable and not self._inline:
                    # Shielded: a commit cannot be abandoned half-way on the thread.
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(conn.execute, "COMMIT", limiter=self._limiter)
                else:
                    conn.execute("COMMIT")
                    await trio.lowlevel.checkpoint()
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                    conn.execute("ROLLBACK")
                raise
        finally:
            if durable:
                conn.execute("PRAGMA synchronous=NORMAL")
        self.commits += 1
        if self.commits % CHECKPOINT_EVERY == 0:
            await self._checkpoint()

    async def _checkpoint(self) -> None:
        """Copy the WAL into the database (fsyncs: on the worker thread)."""
        conn = self._connection()
        try:
            with trio.CancelScope(shield=True):
                if self._inline:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                else:
                    await trio.to_thread.run_sync(
                        conn.execute, "PRAGMA wal_checkpoint(PASSIVE)", limiter=self._limiter
                    )
        except sqlite3.Error as exc:  # a checkpoint is housekeeping; the WAL keeps the data
            log.warning("%s (checkpoint skipped)", describe_sqlite_error(self.path, exc))

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            await self._run_apply(batch)
        except sqlite3.Error:
            # One bad write must not fail the others: commit them one by one.
            for pending in batch:
                try:
                    await self._run_apply([pending])
                except sqlite3.Error as exc:
                    pending.error = StateError(describe_sqlite_error(self.path, exc))
                    if pending.done is None:
                        log.error("%s (a non-essential write was dropped)", pending.error)
        for pending in batch:
            if pending.done is not None:
                pending.done.set()

    def _apply(self, batch: list[_Pending]) -> None:
        """Apply `batch` in one transaction, synchronously (start-up writes)."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for pending in batch:
                pending.fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.commits += 1


def _statements(script: str) -> list[str]:
    """Split a migration script into statements (no semicolons inside our SQL strings)."""
    return [s.strip() for s in script.split(";") if s.strip()]
