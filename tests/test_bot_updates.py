"""Malformed updates from the Bot API: each skipped with one WARNING, nothing else lost.

The real manager against the fake Bot API over HTTP, which hands out the
updates exactly as given (`push_raw_update`), and a proxy reduced to its wire
protocol to see what gets dispatched.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from codexnet.manager import bot
from codexnet.manager.service import Manager
from codexnet.protocol import Task, TaskAck, TaskResult
from tests.fakes.rawproxy import RawProxy
from tests.fakes.stack import USER
from tests.fakes.telegram_api import FakeTelegram

OWNER = {"id": USER, "is_bot": False, "first_name": "Owner"}
CHAT = {"id": USER, "type": "private", "first_name": "Owner"}


def message(text: Any, **changes: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"message_id": 50, "date": 0, "chat": CHAT, "from": OWNER, "text": text}
    msg.update(changes)
    return msg


# (what is wrong, the update without its update_id)
MALFORMED: list[tuple[str, dict[str, Any]]] = [
    ("message not an object", {"message": "hello"}),
    ("message a list", {"message": [1, 2]}),
    ("no chat", {"message": {"message_id": 1, "from": OWNER, "text": "x"}}),
    ("chat not an object", {"message": message("x", chat="me")}),
    ("chat id a string", {"message": message("x", chat={"id": "1001"})}),
    ("chat id a bool", {"message": message("x", chat={"id": True})}),
    ("chat id beyond 64 bits", {"message": message("x", chat={"id": 2**80})}),
    ("from not an object", {"message": message("x", **{"from": 7})}),
    ("user id a float", {"message": message("x", **{"from": {"id": 1001.0}})}),
    ("message_id a string", {"message": message("x", message_id="50")}),
    ("topic id a string", {"message": message("x", message_thread_id="5")}),
    ("is_topic_message a string", {"message": message("x", is_topic_message="yes")}),
    ("document not an object", {"message": message(None, document="report.txt")}),
    ("document without file_id", {"message": message(None, document={"file_name": "a"})}),
    ("file_size a string", {"message": message(None, document={"file_id": "d", "file_size": "9"})}),
    ("photo not a list", {"message": message(None, photo={"file_id": "p"})}),
    ("photo size without file_id", {"message": message(None, photo=[{"width": 90}])}),
    ("caption a number", {"message": message(None, caption=5, document={"file_id": "d"})}),
    ("callback not an object", {"callback_query": ["a:b:y"]}),
    ("callback without id", {"callback_query": {"from": OWNER, "data": "c:x"}}),
    ("callback data a list", {"callback_query": {"id": "q", "from": OWNER, "data": ["c"]}}),
    (
        "callback message not an object",
        {"callback_query": {"id": "q", "from": OWNER, "data": "c:x", "message": 3}},
    ),
]


async def finish(proxy: RawProxy, task: Task) -> None:
    await proxy.send(TaskAck(task.task_id))
    await proxy.send(TaskResult(task.task_id, "completed", text=f"answer to {task.task_id}"))


async def test_malformed_updates_are_skipped_and_the_rest_of_the_batch_is_handled(
    telegram: FakeTelegram,
    manager: Manager,
    proxy: RawProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    ids = []
    # One batch: a good prompt first and last, every kind of garbage between.
    telegram.push_message(USER, "first prompt")
    for _, update in MALFORMED:
        ids.append(telegram.push_raw_update(update))
    telegram.push_raw_update("not an update")
    telegram.push_raw_update({"message": message("no update_id")}, numbered=False)
    telegram.push_raw_update(
        {"update_id": "1", "message": message("a string update_id")}, numbered=False
    )
    last = telegram.push_message(USER, "/help")
    with trio.fail_after(10):
        task = await proxy.expect(Task)
        await telegram.wait_until(lambda: any("/reset" in t for t in telegram.texts(USER)))
        # The offset moved past all of them: the next poll confirmed the lot.
        await telegram.wait_until(lambda: not telegram.pending_updates)
    assert task.prompt == "first prompt"
    assert manager.store.offset == last + 1
    warnings = [r for r in caplog.records if r.name == "codexnet.manager.bot"]
    # One line each, none with a traceback.
    assert len(warnings) == len(MALFORMED) + 3, [r.getMessage() for r in warnings]
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in warnings)
    for update_id in ids:
        assert sum(f"update {update_id} " in r.getMessage() for r in warnings) == 1
    # Escaped: what the update held cannot start a line of its own.
    assert all("\n" not in r.getMessage() for r in warnings)
    assert manager.hub.online  # still serving


async def test_odd_text_is_made_safe_and_still_answered(
    telegram: FakeTelegram, proxy: RawProxy, caplog: pytest.LogCaptureFixture
) -> None:
    # Lone surrogates (JSON "\ud800") cannot be written to the state database
    # or to a UTF-8 log: they become U+FFFD; a text far beyond Telegram's
    # 4096 characters is still a prompt; a newline in a name forges no log line.
    telegram.push_raw_update({"message": message("fix \ud800 this")})
    with trio.fail_after(10):
        task = await proxy.expect(Task)
    assert task.prompt == "fix \ufffd this"
    await finish(proxy, task)
    huge = "y" * 100_000
    telegram.push_raw_update({"message": message(huge, message_id=51)})
    with trio.fail_after(10):
        task = await proxy.expect(Task, lambda t: t.prompt.startswith("y"))
    assert task.prompt == huge
    await finish(proxy, task)
    telegram.add_chat(7)
    stranger = {
        "id": 7,
        "is_bot": False,
        "first_name": "x\nERROR forged \udc00",
        "username": "\ud83d",
    }
    telegram.push_raw_update(
        {"message": message("hi", chat={"id": 7, "type": "private"}, **{"from": stranger})}
    )
    with trio.fail_after(10):
        await telegram.wait_until(lambda: bool(telegram.texts(7)))
    assert telegram.texts(7) == ["Sorry, you are not allowed to use this bot (your user id: 7)."]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_batch_is_synced_once_its_prompts_are_acknowledged(
    telegram: FakeTelegram, manager: Manager, proxy: RawProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's fsync, which the next getUpdates waits for, waits itself for the ack
    of the prompt it sent (on a shared disk the proxy's fsync for that task would queue
    behind ours); a proxy that never acknowledges holds it back only briefly."""
    monkeypatch.setattr(bot, "SYNC_AFTER_ACKS_S", 5.0)
    syncs = manager.store.db.syncs
    telegram.push_message(USER, "hello")
    with trio.fail_after(10):
        task = await proxy.expect(Task)
    await trio.sleep(0.2)
    assert manager.store.db.syncs == syncs  # waiting for the ack
    assert telegram.pending_updates  # so not confirmed yet
    await proxy.send(TaskAck(task.task_id))
    with trio.fail_after(2):
        await telegram.wait_until(lambda: not telegram.pending_updates)
    assert manager.store.db.syncs == syncs + 1
    await proxy.send(TaskResult(task.task_id, "completed", text="hi"))
    with trio.fail_after(10):
        await telegram.wait_until(lambda: "hi" in telegram.texts(USER))

    monkeypatch.setattr(bot, "SYNC_AFTER_ACKS_S", 0.3)
    telegram.push_message(USER, "again")
    with trio.fail_after(10):
        await proxy.expect(Task, lambda t: t.prompt == "again")
    sent = trio.current_time()
    with trio.fail_after(5):  # never acknowledged
        await telegram.wait_until(lambda: not telegram.pending_updates)
    assert trio.current_time() - sent >= 0.2
