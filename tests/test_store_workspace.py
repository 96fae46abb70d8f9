"""The store's workspace (schema 2): settings per conversation, a task's files, Diff keys."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from codexnet.manager.service import open_store
from codexnet.manager.store import MIGRATIONS, Attachment, Outcome


async def test_settings_files_and_diffs_survive_a_restart(tmp_path: Path) -> None:
    async with open_store(tmp_path) as store:
        conv = store.conversation((-100, 7))  # a forum topic
        conv.model, conv.effort = "gpt-5.5", "high"
        conv.workdirs["proxy1"] = "/srv/project/sub"
        conv.threads["proxy1"] = "thread-a"
        await store.save_conversation((-100, 7))
        photo = Attachment("", 0, "photo", "file-a", "", 10, update_id=11)
        task = store.new_task(
            -100, 7, "", task_id="t1", timeout_s=60, update_id=11, files=[photo], media_group="g"
        )
        await store.add_task(task)
        await store.add_attachment(
            task, Attachment("", 0, "photo", "file-b", "", 20, update_id=12), caption="compare"
        )
        await store.attachment_stored(task.files[0], 10, "aa")
        await store.mark_dispatched(task, "proxy1", "thread-a")
        # The settings it was dispatched with are the task's: later choices do not change it.
        conv.model = "other"
        await store.save_conversation((-100, 7))
        await store.mark_finished(task, Outcome("completed", text="x", diff_bytes=99))
        key = task.diff_key
        assert key is not None
    async with open_store(tmp_path) as again:
        conv = again.conversation((-100, 7))
        assert (conv.model, conv.effort, conv.workdirs) == (
            "other",
            "high",
            {"proxy1": "/srv/project/sub"},
        )
        assert conv.threads == {"proxy1": "thread-a"}
        [task] = again.open_tasks()
        assert (task.prompt, task.media_group) == ("compare", "g")
        assert (task.model, task.effort, task.cwd) == ("gpt-5.5", "high", "/srv/project/sub")
        assert [(f.file_id, f.sha256) for f in task.files] == [("file-a", "aa"), ("file-b", None)]
        assert {11, 12} <= again.updates  # the album's every update is recognised
        assert again.diffs[key].task_id == "t1"
        await again.mark_done(task, 1)
    async with open_store(tmp_path) as third:
        assert third.diffs[key].chat_id == -100  # the button keeps working for days
        assert not third.open_tasks()


async def test_a_schema_1_database_is_migrated_and_keeps_its_conversations(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "codexnet.db") as conn:
        for statement in MIGRATIONS[0].split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(
            "INSERT INTO conversations (chat_id, topic, proxy, reset, updated)"
            " VALUES (5, 0, 'proxy1', 0, 0)"
        )
        conn.execute("INSERT INTO threads VALUES (5, 0, 'proxy1', 'thread-old')")
        conn.execute("PRAGMA user_version=1")
    async with open_store(tmp_path) as store:
        conv = store.conversation((5, 0))
        assert (conv.proxy, conv.threads, conv.model, conv.workdirs) == (
            "proxy1",
            {"proxy1": "thread-old"},
            None,
            {},
        )
    with sqlite3.connect(tmp_path / "codexnet.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
