"""An /all run's live view is never left behind: its run stays open until the view
has its final line, so a restart in between still finds (and closes) it.

The real manager against the fake Bot API over HTTP, two proxies reduced to their
wire protocol.
"""

from __future__ import annotations

import trio

from codexnet.manager.service import Manager
from codexnet.protocol import Task, TaskAck, TaskResult
from tests.fakes.rawproxy import raw_proxy
from tests.fakes.stack import PROXY_TOKEN, USER
from tests.fakes.telegram_api import FakeTelegram

PROXY2_TOKEN = "proxy2-secret-token-9876543210"  # tests/fakes/stack.py's manager config


def view_text(telegram: FakeTelegram) -> str | None:
    """The run's status message (its progress lines go to a draft in a private chat)."""
    views = [t for t in telegram.texts(USER) if t.startswith(("⏳", "✅"))]
    return views[0] if views else None


async def test_the_run_stays_open_until_its_view_has_its_final_line(
    telegram: FakeTelegram, manager: Manager
) -> None:
    async with (
        raw_proxy(manager.port, "proxy1", PROXY_TOKEN) as one,
        raw_proxy(manager.port, "proxy2", PROXY2_TOKEN) as two,
    ):
        telegram.push_message(USER, "/all hello")
        with trio.fail_after(10):
            tasks = [await one.expect(Task), await two.expect(Task)]
            records = [manager.store.tasks[task.task_id] for task in tasks]
            for proxy, task in zip((one, two), tasks, strict=True):
                await proxy.send(TaskAck(task.task_id))
            await telegram.wait_until(lambda: view_text(telegram) is not None)
        # Telegram fails the view's final edit for a while (retried within 1, then 2 s).
        telegram.fail_next("editMessageText", error_code=502, times=2)
        for proxy, task, name in zip((one, two), tasks, ("one", "two"), strict=True):
            await proxy.send(TaskResult(task.task_id, "completed", text=f"from {name}"))
        with trio.fail_after(20):
            await telegram.wait_until(
                lambda: sum(t.startswith("🖥 proxy") for t in telegram.texts(USER)) == 2
            )
        with trio.fail_after(30):
            for record in records:
                while record.state != "done":
                    await record.changed.wait()
        # The run is done in the store only once its view has its final line: a
        # restart at any moment before finds the run and closes the view; after,
        # nothing is left at "⏳".
        assert (view_text(telegram) or "").startswith("✅ Done")
    assert (view_text(telegram) or "").startswith("✅ Done · 2/2 machines answered")
