"""The proxy's durable state: which tasks it took, ran, and finished (`proxy.db`).

This is what lets the proxy keep its two promises across a crash or restart:

* **a task is never run twice on the model.** A task is stored before it is
  acknowledged (`accept`, then `sync`), and marked `started` before its turn
  is started. After a restart, a task still `accepted` runs now (the model
  never saw it); a task that was `started` gets a "the proxy restarted during
  this task" result instead of running again. A repeated `task` frame for a
  known id is acknowledged and not run; finished ids are kept as tombstones
  for `TOMBSTONE_DAYS` so even a late duplicate is recognised.

  A task that starts at once is stored as started by one commit, and its turn
  starts right after that commit, while the commit is made power-safe: the
  fsync (~0.3–1.5 ms here, but up to a few hundred on a disk busy with other
  writes) is then no longer in front of every answer. The ack still waits for
  it. A crash of the proxy keeps the commit, so the promise holds for every
  crash; only a power cut during that fsync can lose the row, and then the
  manager, never acknowledged, sends the task again and the model is asked
  again. (Whatever the first turn did needed the model's answer first, and a
  power cut ends that turn too.) A task that waited for a slot is marked
  started power-safe before its turn, as before.
* **a result is never lost.** It is stored (`finish`), committed while it is
  sent, and kept until the manager's `result_ack`, then replayed after every
  reconnect. (Stored means committed: a crash of the proxy keeps it. A crash
  or power cut before that commit, or a power cut right after it, may take
  it, and then the task is reported as cut short — unless the manager got
  the result first, which is then the answer, and the report a late repeat.)
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import attrs

from codexnet.db import Database, Queued
from codexnet.protocol import Task, TaskResult, decode_manager_frame, decode_proxy_frame, encode

TOMBSTONE_DAYS: Final = 7

MIGRATIONS: Final = (
    """
    CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        frame TEXT NOT NULL,           -- the task frame as received (JSON)
        state TEXT NOT NULL,           -- accepted | started | finished | acked
        accepted REAL NOT NULL,        -- wall clock: the task's timeout counts from here
        result TEXT,                   -- the task_result frame (JSON) once finished
        updated REAL NOT NULL
    );
    CREATE INDEX tasks_state ON tasks(state)
    """,
)

RESTARTED_ERROR: Final = (
    "the proxy restarted while this turn was running, so the turn was stopped; "
    "send the message again to retry"
)


@attrs.frozen
class StoredTask:
    task: Task
    state: str
    accepted: float
    result: TaskResult | None


class ProxyStore:
    def __init__(self, state_dir: Path | str) -> None:
        path = ":memory:" if str(state_dir) == ":memory:" else Path(state_dir) / "proxy.db"
        self.db = Database(path, MIGRATIONS)
        # Ids whose result the manager acknowledged (kept TOMBSTONE_DAYS): a
        # repeated task frame for one of them is acknowledged, never run again.
        self.tombstones: set[str] = set()

    def open(self) -> list[StoredTask]:
        """Open the database and recover: the tasks to run, and the results to send.

        A task that was `started` when the last process died is finished here
        with `RESTARTED_ERROR` (its turn died with that process's app-server).
        """
        self.db.open()
        cutoff = time.time() - TOMBSTONE_DAYS * 86400

        def prune(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM tasks WHERE state = 'acked' AND updated < ?", (cutoff,))

        self.db.write_now(prune)
        self.tombstones = set(
            self.db.read(
                lambda conn: [
                    row[0]
                    for row in conn.execute("SELECT task_id FROM tasks WHERE state = 'acked'")
                ]
            )
        )
        rows = self.db.read(
            lambda conn: conn.execute(
                "SELECT frame, state, accepted, result FROM tasks WHERE state != 'acked' "
                "ORDER BY accepted"
            ).fetchall()
        )
        recovered = []
        for frame, state, accepted, result in rows:
            task = decode_manager_frame(frame)
            assert isinstance(task, Task)
            stored_result = None
            if result is not None:
                decoded = decode_proxy_frame(result)
                assert isinstance(decoded, TaskResult)
                stored_result = decoded
            if state == "started":
                stored_result = TaskResult(
                    task.task_id, "failed", error=RESTARTED_ERROR, thread_id=task.thread_id
                )
                self.db.write_now(self._finish_fn(stored_result))
                state = "finished"
            recovered.append(StoredTask(task, state, float(accepted), stored_result))
        return recovered

    async def accept(self, task: Task, accepted: float, *, started: bool = False) -> None:
        """Store a task (committed: a crash of the proxy keeps it; `sync()` before its
        ack makes it power-safe); `started` if its turn begins right away (it then
        never runs again after a crash)."""
        state = "started" if started else "accepted"

        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO tasks (task_id, frame, state, accepted, updated) "
                "VALUES (?, ?, ?, ?, ?)",
                (task.task_id, encode(task), state, accepted, time.time()),
            )

        await self.db.write(fn)

    async def sync(self) -> None:
        """Wait until every write so far would survive a power cut; raises `StateError`."""
        await self.db.sync()

    async def started(self, task_id: str) -> None:
        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE tasks SET state = 'started', updated = ? WHERE task_id = ?",
                (time.time(), task_id),
            )

        await self.db.write(fn, durable=True)

    def finish(self, result: TaskResult) -> Queued:
        """Queue the result's row: `committed()` waits for it (raises `StateError`).

        Committed (a crash of the proxy keeps it), not synced: if a power cut
        took it, the task is reported as cut short by the restart instead.
        """
        return self.db.begin_write(self._finish_fn(result))

    @staticmethod
    def _finish_fn(result: TaskResult) -> Callable[[sqlite3.Connection], None]:
        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE tasks SET state = 'finished', result = ?, updated = ? WHERE task_id = ?",
                (encode(result), time.time(), result.task_id),
            )

        return fn

    def acked(self, task_id: str) -> None:
        """The manager has the result: keep only a tombstone (losing this write is harmless)."""
        self.tombstones.add(task_id)

        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE tasks SET state = 'acked', result = NULL, frame = '{}', updated = ? "
                "WHERE task_id = ? AND state = 'finished'",
                (time.time(), task_id),
            )

        self.db.write_soon(fn)
