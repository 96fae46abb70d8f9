"""Approval questions: asked once, answerable across restarts, timed out, bound to their chat.

The real store, outbox and approvals against the in-memory fake Bot API, in
virtual time. The decision sink records what would go to the proxy.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from codexnet.manager.approvals import Approvals
from codexnet.manager.replies import Replies
from codexnet.manager.service import open_store
from codexnet.manager.store import ApprovalRecord, ManagerStore, TaskRecord
from codexnet.protocol import ApprovalRequest
from tests.conftest import GROUP
from tests.fakes.stack import USER
from tests.fakes.telegram_api import FakeTelegram

REQUEST = ApprovalRequest("t1", "a1", "command", "rm -rf build", "in /srv")


class Sink:
    """What the dispatcher would send to the proxy."""

    def __init__(self) -> None:
        self.decisions: list[tuple[str, str, str | None]] = []

    async def __call__(self, approval: ApprovalRecord) -> None:
        self.decisions.append((approval.task_id, approval.approval_id, approval.decision))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ManagerStore]:
    async with open_store(tmp_path / "state", inline_writes=True) as store:
        yield store


async def running_task(store: ManagerStore, chat_id: int = USER) -> TaskRecord:
    task = store.new_task(chat_id, 0, "p", task_id="t1", timeout_s=600)
    await store.add_task(task)
    await store.mark_dispatched(task, "proxy1", None)
    return task


def approvals_for(
    store: ManagerStore, replies: Replies, sink: Sink, nursery: trio.Nursery
) -> Approvals:
    approvals = Approvals(replies, store, sink, timeout_s=600, is_online=lambda p: True)
    approvals.nursery = nursery
    return approvals


def press(chat_id: int, data: str, user: int = USER) -> dict[str, object]:
    return {
        "id": f"q-{data}",
        "from": {"id": user, "username": "owner"},
        "data": data,
        "message": {"chat": {"id": chat_id}},
    }


async def test_an_unanswered_approval_is_denied_after_the_timeout(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    approvals = approvals_for(store, replies, sink, nursery)
    task = await running_task(store)
    start = trio.current_time()
    await approvals.on_request(task, REQUEST)
    await trio.sleep(700)
    assert sink.decisions == [("t1", "a1", "decline")]
    [question] = fake.messages(USER)
    assert question.text == (
        "🔐 Codex wants to run:\n\nrm -rf build\n\nin /srv\n\n⌛ No answer within 10 min: denied."
    )
    assert question.reply_markup in (None, {"inline_keyboard": []})
    assert trio.current_time() - start >= 600


async def test_a_request_sent_again_is_asked_once(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    approvals = approvals_for(store, replies, Sink(), nursery)
    task = await running_task(store)
    for _ in range(3):  # the proxy re-sends open requests after every reconnect
        await approvals.on_request(task, REQUEST)
        await trio.sleep(1)
    assert len(fake.messages(USER)) == 1


async def test_the_buttons_work_after_a_restart_and_the_clock_keeps_counting(
    fake: FakeTelegram,
    tmp_path: Path,
    replies: Replies,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with (
        open_store(tmp_path / "s", inline_writes=True) as store,
        trio.open_nursery() as inner,
    ):
        approvals = approvals_for(store, replies, Sink(), inner)
        task = await running_task(store)
        await approvals.on_request(task, REQUEST)
        await trio.sleep(5)
        inner.cancel_scope.cancel()  # the manager stops with the question open
    [question] = fake.messages(USER)
    [row] = question.reply_markup["inline_keyboard"] if question.reply_markup else [[]]
    approve = row[0]["callback_data"]
    assert len(approve.encode()) <= 64
    async with open_store(tmp_path / "s", inline_writes=True) as store:
        sink = Sink()
        approvals = approvals_for(store, replies, sink, nursery)
        approvals.resume()
        await trio.sleep(1)
        assert len(fake.messages(USER)) == 1  # not asked again
        await approvals.on_press(press(USER, approve), *approve.split(":")[1:])
        await trio.sleep(1)
        assert sink.decisions == [("t1", "a1", "accept")]
        assert (fake.messages(USER)[0].text or "").endswith("✅ Approved by @owner.")


async def test_the_timeout_counts_from_the_first_ask_across_a_restart(
    fake: FakeTelegram,
    tmp_path: Path,
    replies: Replies,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_store(tmp_path / "s", inline_writes=True) as store:
        task = await running_task(store)
        asked = time.time() - 500  # asked 500 s before this start
        await store.add_approval(
            ApprovalRecord("t1", "a1", "k1", USER, 0, "command", "ls", "", asked, message_id=None)
        )
        sink = Sink()
        approvals = approvals_for(store, replies, sink, nursery)
        approvals.resume()
        await trio.sleep(95)
        assert sink.decisions == []
        await trio.sleep(10)
        assert sink.decisions == [("t1", "a1", "decline")]
        assert task.state == "sent"


async def test_a_press_from_another_chat_or_an_unknown_key_is_refused(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    approvals = approvals_for(store, replies, sink, nursery)
    task = await running_task(store)
    await approvals.on_request(task, REQUEST)
    await trio.sleep(1)
    [key] = [a.key for a in store.approvals.values()]
    await approvals.on_press(press(GROUP, f"a:{key}:y"), key, "y")
    await approvals.on_press(press(USER, "a:zz:y"), "zz", "y")
    await trio.sleep(1)
    assert sink.decisions == []
    toasts = [r.params["text"] for r in fake.requests if r.method == "answerCallbackQuery"]
    # (Each toast goes out in its own task: in either order.)
    assert sorted(toasts) == [
        "This button belongs to another chat.",
        "This request is no longer pending.",
    ]


async def test_the_end_of_the_task_closes_its_open_questions(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    approvals = approvals_for(store, replies, sink, nursery)
    task = await running_task(store)
    await approvals.on_request(task, REQUEST)
    await trio.sleep(1)
    await approvals.expire_task(task)
    await trio.sleep(1)
    assert sink.decisions == []  # nothing to tell the proxy: the turn is over
    assert (fake.messages(USER)[0].text or "").endswith("The task ended before an answer.")
    assert store.approvals == {}
