"""One SQLite database per service for its durable state, the disk waited for off the loop.

* WAL mode, `synchronous=NORMAL`: a commit appends to the WAL and survives a
  crash of the process (SIGKILL, OOM) at once, without waiting for the disk.
  What must also survive a power cut is made so by `sync()`: one fsync of the
  WAL on a worker thread, shared by every commit made before it (~0.3 ms
  here). A caller decides where it needs that, and usually it is not on the
  way to the person's answer — e.g. a result is stored, delivered, and only
  after `sync()` acknowledged to the proxy that keeps it until then.
  `write(fn, durable=True)` is `write` then `sync`.
* One writer. `write(fn)` queues `fn(connection)`; the writer service applies
  every queued function in one transaction (group commit: 200 messages
  arriving at once cost a few commits, not 200). The caller awaits the commit
  (`write`) or only queues it (`write_soon`) when losing the row in a crash is
  harmless. Writes are applied in the order they were queued.
* Reads happen once, at start-up (`read`), to fill the service's in-memory
  mirror; the running service never waits for a read.
* Every sqlite3 failure becomes one `StateError` whose message names the file
  and the problem ("disk is full", "not a database (corrupt?)", ...): never a
  traceback for the person running it.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final, TypeVar

import attrs
import trio

from codexnet.ratelog import Throttle
from codexnet.resource_errors import resource_problem

log = logging.getLogger(__name__)
_throttled = Throttle()

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
    # No descriptor left: SQLite only says "unable to open database file".
    resource = resource_problem(exc, probe=isinstance(exc, OSError) or "unable to open" in lower)
    if resource is not None:
        problem = f"cannot be used now: {resource}"
    elif "not a database" in lower or "malformed" in lower or "corrupt" in lower:
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
    done: trio.Event | None  # None: nobody waits (write_soon)
    error: StateError | None = None


@attrs.define(eq=False)
class Queued:
    """A write queued by `Database.begin_write`; `committed()` waits for its commit."""

    _pending: _Pending

    async def committed(self) -> None:
        """Wait until the write is committed; raises `StateError`."""
        assert self._pending.done is not None
        await self._pending.done.wait()
        if self._pending.error is not None:
            raise self._pending.error


class Database:
    """The database at `path`, brought to the newest schema by `migrations`.

    `migrations[i]` is an SQL script taking the schema from version i to i+1
    (tracked in `PRAGMA user_version`).
    """

    def __init__(
        self, path: Path | str, migrations: Sequence[str], *, inline: bool = False
    ) -> None:
        self.path = Path(path)
        self._memory = str(path) == ":memory:"
        # inline: fsyncs and checkpoints on the event loop too, no worker thread.
        # Only for tests on trio's virtual clock, which races ahead while a thread works.
        self._inline = inline
        self._migrations = tuple(migrations)
        self._conn: sqlite3.Connection | None = None
        send, receive = trio.open_memory_channel[_Pending](math.inf)
        # Unbounded on purpose: a write is a few hundred bytes and is queued by
        # handlers that must not block; the writer drains it in large batches.
        self._send, self._receive = send, receive
        self._limiter = trio.CapacityLimiter(1)
        self.commits = 0  # transactions committed (for the bench)
        self.syncs = 0  # fsyncs made for `sync()` (for the bench)
        self._wal_path: Path | None = None
        self._wal_fd: int | None = None  # the WAL, open for fsync once it exists
        # sync(): a commit is power-safe once an fsync that started after it ends.
        self._synced_upto = 0  # commits covered by the last finished fsync
        self._sync_running: trio.Event | None = None

    # ------------------------------------------------------------------ start-up

    def open(self) -> None:
        """Open (creating if needed), check, and migrate; raises `StateError`."""
        memory = self._memory
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
            conn.execute("PRAGMA wal_autocheckpoint=0")  # see _apply
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"database disk image is malformed: {check}")
            self._migrate(conn)
            if not memory:
                self._wal_path = self.path.with_name(self.path.name + "-wal")
                # Opened now, for every later fsync: running out of descriptors
                # later must not stop a commit from being made power-safe.
                self._open_wal()
        except (sqlite3.Error, OSError) as exc:
            conn.close()
            raise StateError(describe_sqlite_error(self.path, exc)) from None
        self._conn = conn

    def _open_wal(self) -> None:
        """Open the WAL for fsync once it exists; raises OSError."""
        if self._wal_fd is None and self._wal_path is not None and self._wal_path.exists():
            self._wal_fd = os.open(self._wal_path, os.O_RDONLY)

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

    def write_now(self, fn: Write) -> None:
        """A write at start-up, before the writer service runs (imports, recovery)."""
        try:
            self._apply([_Pending(fn, None)])
        except sqlite3.Error as exc:
            raise StateError(describe_sqlite_error(self.path, exc)) from None

    def close(self) -> None:
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(f"{self.path}: not open")
        return self._conn

    # ------------------------------------------------------------------ writing

    async def write(self, fn: Write, *, durable: bool = False) -> None:
        """Queue `fn` and wait until it is committed; raises `StateError`.

        `durable`: and until it survives a power cut (`sync`).
        """
        await self.begin_write(fn).committed()
        if durable:
            await self.sync()

    def begin_write(self, fn: Write) -> Queued:
        """Queue `fn` now (in order with every other write) and return at once:
        for a caller with something else to do while it is committed. Raises
        `StateError` if the writer has stopped."""
        pending = _Pending(fn, trio.Event())
        self._queue(pending)
        return Queued(pending)

    def write_soon(self, fn: Write) -> None:
        """Queue `fn` without waiting; a failure is logged (the row was not essential)."""
        self._queue(_Pending(fn, None))

    async def sync(self) -> None:
        """Wait until every commit made so far would survive a power cut.

        One fsync of the WAL on the worker thread serves every caller whose
        commits it covers: callers arriving while one runs wait for the next.
        """
        if self._memory:
            return  # nothing to sync
        if self._wal_fd is None:
            try:
                self._open_wal()
            except OSError as exc:
                raise StateError(describe_sqlite_error(self.path, exc)) from None
            if self._wal_fd is None:
                return  # no WAL yet: nothing was committed
        target = self.commits
        while self._synced_upto < target:
            if self._sync_running is not None:
                await self._sync_running.wait()
                continue
            self._sync_running = done = trio.Event()
            covered = self.commits
            try:
                with trio.CancelScope(shield=True):  # an fsync cannot be abandoned half-way
                    if self._inline:
                        os.fsync(self._wal_fd)
                        await trio.lowlevel.checkpoint()
                    else:
                        await trio.to_thread.run_sync(os.fsync, self._wal_fd, limiter=self._limiter)
                self.syncs += 1
                self._synced_upto = max(self._synced_upto, covered)
            except (OSError, RuntimeError) as exc:  # RuntimeError: no thread could be started
                raise StateError(describe_sqlite_error(self.path, exc)) from None
            finally:
                self._sync_running = None
                done.set()

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
                self._commit(self._batch(first))
                # After the waiters were woken, not before: a commit on the way
                # to an answer costs one pass of the scheduler less.
                await trio.lowlevel.checkpoint()
                if self.commits % CHECKPOINT_EVERY == 0:
                    await self._checkpoint()

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
        except (sqlite3.Error, OSError, RuntimeError) as exc:
            # A checkpoint is housekeeping; the WAL keeps the data meanwhile.
            problem = describe_sqlite_error(self.path, exc)
            _throttled.log(log, logging.WARNING, "checkpoint", "%s (checkpoint skipped)", problem)

    def _commit(self, batch: list[_Pending]) -> None:
        """Commit `batch`; a write that fails gets its `StateError`, the writer goes on.

        The writer must outlive any failure (disk full, no descriptor or
        memory left, a bug in one write): if it stopped, every later write
        would wait forever.
        """
        try:
            self._apply(batch)
        except Exception:
            # One bad write must not fail the others: commit them one by one.
            for pending in batch:
                try:
                    self._apply([pending])
                except Exception as exc:
                    pending.error = StateError(describe_sqlite_error(self.path, exc))
                    if not isinstance(exc, sqlite3.Error | OSError | MemoryError):
                        log.error("a state write failed", exc_info=exc)  # a bug: say where
                    if pending.done is None:
                        _throttled.log(
                            log,
                            logging.ERROR,
                            "dropped",
                            "%s (a non-essential write was dropped)",
                            pending.error,
                        )
        for pending in batch:
            if pending.done is not None:
                pending.done.set()

    def _apply(self, batch: list[_Pending]) -> None:
        """Apply `batch` in one transaction, here on the event loop.

        The statements and a `synchronous=NORMAL` commit only touch SQLite's
        page cache and append to the WAL: no disk wait. The disk waits — the
        fsync of `sync()`, and a WAL checkpoint every `CHECKPOINT_EVERY`
        commits (it fsyncs the database) — run on the worker thread. (Running
        the statements there too would cost a GIL hand-over per statement,
        which under a busy event loop waits up to the interpreter's 5 ms switch
        interval each: 100 writes took ~150 ms that way.) Auto-checkpoints are
        off for this reason.
        """
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
