"""The SQLite store: what survives a restart, imports, group commit, and bad databases."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from codexnet.db import Database, StateError
from codexnet.manager.service import open_store
from codexnet.manager.store import ApprovalRecord, ManagerStore, Outcome
from codexnet.statelock import hold_state_lock


async def test_conversations_offset_and_tasks_survive_a_restart(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        conv = store.conversation((42, 0))
        conv.proxy = "proxy1"
        conv.threads["proxy1"] = "thread-a"
        await store.save_conversation((42, 0))
        await store.save_offset(1007)
        task = store.new_task(42, 0, "do it", task_id="t1", timeout_s=60, update_id=1006)
        await store.add_task(task)
        await store.mark_dispatched(task, "proxy1", "thread-a")
        store.mark_acked(task)
        task.view_message_id, task.view_key = 7, "k"
        store.save_view(task)
        await store.set_cancel(task, "requested")
    async with open_store(tmp_path) as again:
        assert again.conversation((42, 0)).proxy == "proxy1"
        assert again.conversation((42, 0)).threads == {"proxy1": "thread-a"}
        assert again.offset == 1007
        [task] = again.open_tasks()
        assert (task.task_id, task.prompt, task.state, task.proxy_id) == (
            "t1",
            "do it",
            "acked",
            "proxy1",
        )
        assert (task.thread_id, task.view_message_id, task.view_key) == ("thread-a", 7, "k")
        assert task.cancel == "requested"
        assert 1006 in again.updates  # a redelivered update is recognised


async def test_a_done_task_leaves_the_journal_but_is_remembered(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        task = store.new_task(1, 0, "p", task_id="t1", timeout_s=60, update_id=5)
        await store.add_task(task)
        await store.mark_dispatched(task, "proxy1", None)
        await store.mark_finished(task, Outcome("completed", text="a"))
        await store.mark_done(task)
    async with open_store(tmp_path) as again:
        assert again.open_tasks() == []
        assert "t1" in again.done
        assert 5 in again.updates


async def test_approvals_are_kept_until_closed_and_acknowledged(tmp_path: Path) -> None:
    approval = ApprovalRecord("t1", "a1", "key", 1, 0, "command", "ls", "", time.time())
    async with open_store(tmp_path) as store:
        await store.add_approval(approval)
        await store.add_approval(approval)  # asked again after a reconnect: one row
    async with open_store(tmp_path) as store:
        again = store.approvals["key"]
        assert store.approval("t1", "a1") is again
        again.state, again.decision = "closed", "accept"
        await store.save_approval(again)
    async with open_store(tmp_path) as store:
        again = store.approvals["key"]  # the decision has not reached the proxy yet
        again.decision_acked = True
        await store.save_approval(again)
        assert store.approvals == {}
    async with open_store(tmp_path) as store:
        assert store.approvals == {}


async def test_old_json_state_is_imported_once_and_renamed(tmp_path: Path) -> None:
    (tmp_path / "sessions.json").write_text(
        json.dumps(
            {
                "chats": {
                    "42": {"proxy": "p", "threads": {"p": "t"}, "reset": False},
                    "x": {},
                }
            }
        )
    )
    (tmp_path / "offset.json").write_text(json.dumps({"offset": 77}))
    (tmp_path / "tasks.json").write_text(
        json.dumps({"tasks": [{"task_id": "old", "chat_id": 42, "proxy_id": "p", "started": 1.0}]})
    )
    async with open_store(tmp_path) as store:
        assert store.conversation((42, 0)).threads == {"p": "t"}
        assert store.offset == 77
        [task] = store.open_tasks()
        assert (task.task_id, task.state, task.proxy_id) == ("old", "acked", "p")
    assert sorted(p.name for p in tmp_path.glob("*.imported")) == [
        "offset.json.imported",
        "sessions.json.imported",
        "tasks.json.imported",
    ]
    async with open_store(tmp_path) as store:  # not imported twice
        assert len(store.open_tasks()) == 1


async def test_writes_queued_together_commit_together(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        before = store.db.commits
        async with trio.open_nursery() as nursery:
            for i in range(200):
                task = store.new_task(i, 0, f"p{i}", task_id=f"t{i}", timeout_s=60)
                nursery.start_soon(store.add_task, task)
        assert store.db.commits - before <= 5  # group commit: not 200 fsyncs
    async with open_store(tmp_path) as store:
        assert len(store.open_tasks()) == 200


def test_a_corrupt_database_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "codexnet.db").write_bytes(b"this is not sqlite" * 100)
    store = ManagerStore(tmp_path)
    with pytest.raises(StateError) as info:
        store.open()
    message = str(info.value)
    assert message.startswith(str(tmp_path / "codexnet.db"))
    assert "not a valid SQLite database" in message
    assert "\n" not in message


@contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make `directory` unwritable, for root too (the immutable flag; chmod for others)."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("root without chattr: cannot make a directory read-only")
        subprocess.run(["chattr", "+i", str(directory)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
    else:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o700)


def test_a_read_only_state_dir_is_one_clear_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with read_only(state), pytest.raises(StateError) as info:
        ManagerStore(state).open()
    message = str(info.value)
    assert message.startswith(str(state / "codexnet.db"))
    assert "\n" not in message


async def test_a_state_dir_turned_read_only_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with open_store(state) as store:
        store.conversation((7, 0)).proxy = "p"
        await store.save_conversation((7, 0))
    with read_only(state), pytest.raises(StateError, match=r"codexnet\.db"):
        ManagerStore(state).open()
    async with open_store(state) as store:  # writable again: all there
        assert store.conversation((7, 0)).proxy == "p"


async def test_a_full_disk_fails_the_write_not_the_service(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db", ["CREATE TABLE t (v TEXT)"])
    db.open()
    db.write_now(lambda c: c.execute("PRAGMA max_page_count = 10"))
    async with db.serving():
        await db.write(lambda c: c.execute("INSERT INTO t VALUES ('kept')"))
        with pytest.raises(StateError, match="disk is full"):
            await db.write(lambda c: c.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,)))
        await db.write(lambda c: c.execute("INSERT INTO t VALUES ('still works')"))
    rows = db.read(lambda c: c.execute("SELECT v FROM t").fetchall())
    assert rows == [("kept",), ("still works",)]  # nothing already stored was lost
    db.close()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "codexnet.db") as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StateError, match="newer than this codexnet knows"):
        ManagerStore(tmp_path).open()


def test_a_second_process_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from codexnet.statelock import hold_state_lock\n"
            f"with hold_state_lock(Path({str(tmp_path)!r}), 'manager'):\n"
            "    print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StateError) as info, hold_state_lock(tmp_path, "manager"):
            pass
        assert f"another codexnet manager (pid {holder.pid})" in str(info.value)
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    with hold_state_lock(tmp_path, "manager"):  # released when that process died
        pass


async def test_a_write_begun_is_queued_in_order_and_its_commit_awaited_later(
    tmp_path: Path,
) -> None:
    """`begin_write` queues at once (so a write queued after it comes after it) and
    `committed()` reports that write's own fate."""
    db = Database(tmp_path / "x.db", ["CREATE TABLE t (v TEXT)"])
    db.open()
    db.write_now(lambda c: c.execute("PRAGMA max_page_count = 10"))
    async with db.serving():
        first = db.begin_write(lambda c: c.execute("INSERT INTO t VALUES ('a')"))
        too_big = db.begin_write(lambda c: c.execute("INSERT INTO t VALUES (?)", ("x" * 100_000,)))
        db.write_soon(lambda c: c.execute("UPDATE t SET v = 'b' WHERE v = 'a'"))
        await first.committed()
        with pytest.raises(StateError, match="disk is full"):
            await too_big.committed()
        await db.write(lambda c: c.execute("INSERT INTO t VALUES ('c')"))
    assert db.read(lambda c: c.execute("SELECT v FROM t ORDER BY rowid").fetchall()) == [
        ("b",),
        ("c",),
    ]
    db.close()
