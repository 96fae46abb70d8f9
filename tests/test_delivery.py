"""Answers delivered from the store: formatting, splitting, the document, outages, restarts.

The real store (SQLite in a temp dir), outbox and delivery against the
in-memory fake Bot API, in virtual time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trio.testing

from codexnet.manager.approvals import Approvals
from codexnet.manager.delivery import Delivery
from codexnet.manager.grace import ShutdownGrace
from codexnet.manager.liveview import LiveView
from codexnet.manager.outbox import Outbox, Priority
from codexnet.manager.render import Chunk
from codexnet.manager.replies import Replies, answer_parts
from codexnet.manager.service import open_store
from codexnet.manager.store import ManagerStore, Outcome, TaskRecord
from codexnet.manager.telegram import TelegramClient
from tests.conftest import GROUP
from tests.fakes.responses_api import MARKDOWN_SAMPLE
from tests.fakes.stack import BOT_TOKEN, USER
from tests.fakes.telegram_api import MOCK_BASE_URL, FakeTelegram


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ManagerStore]:
    async with open_store(tmp_path / "state", inline_writes=True) as store:
        yield store


def delivery(store: ManagerStore, replies: Replies, give_up_s: float = 86400) -> Delivery:
    async def no_decisions(approval: object) -> None:
        pass

    approvals = Approvals(
        replies, store, no_decisions, timeout_s=600, is_online=lambda proxy_id: True
    )
    return Delivery(store, replies, approvals, ShutdownGrace(10), give_up_s=give_up_s)


async def finished_task(store: ManagerStore, outcome: Outcome, task_id: str = "t1") -> TaskRecord:
    task = store.new_task(USER, 0, "the prompt", task_id=task_id, timeout_s=60)
    await store.add_task(task)
    await store.mark_dispatched(task, "proxy1", None)
    await store.mark_finished(task, outcome)
    return task


async def test_markdown_goes_out_as_entities(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    autojump_clock: trio.testing.MockClock,
) -> None:
    task = await finished_task(store, Outcome("completed", text=MARKDOWN_SAMPLE))
    await delivery(store, replies).deliver(task, None)
    [message] = fake.messages(USER)
    assert "**" not in (message.text or "")
    assert {e["type"] for e in message.entities or []} >= {"bold", "italic", "pre"}
    assert task.state == "done"
    assert store.tasks == {}


async def test_a_refused_formatted_message_is_sent_plain(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake.fail_next(
        "sendMessage",
        error_code=400,
        description="Bad Request: can't parse entities: Can't find end of the entity",
    )
    task = await finished_task(store, Outcome("completed", text=MARKDOWN_SAMPLE))
    await delivery(store, replies).deliver(task, None)
    [message] = fake.messages(USER)
    assert not message.entities
    assert "Some bold text, some italic text and inline code." in (message.text or "")


async def test_a_long_code_block_is_reopened_in_each_part(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    autojump_clock: trio.testing.MockClock,
) -> None:
    code = "\n".join(f"print({i})  # line {i}" for i in range(400))
    text = f"Here:\n\n```python\n{code}\n```\n\nDone."
    task = await finished_task(store, Outcome("completed", text=text))
    await delivery(store, replies).deliver(task, None)
    parts = fake.messages(USER)
    assert len(parts) >= 2
    for part in parts:
        assert len(part.text or "") <= 4096
        if "print(" in (part.text or ""):
            assert any(
                e["type"] == "pre" and e.get("language") == "python" for e in part.entities or []
            )


async def test_more_than_three_parts_also_arrive_as_a_document(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    autojump_clock: trio.testing.MockClock,
) -> None:
    answer = "\n\n".join(f"Paragraph {i}: " + "word " * 150 for i in range(30))
    task = await finished_task(store, Outcome("completed", text=answer))
    await delivery(store, replies).deliver(task, None)
    messages = fake.messages(USER)
    docs = [m.document for m in messages if m.document]
    assert len(messages) - len(docs) >= 4
    assert len(docs) == 1
    assert docs[0] is not None
    assert docs[0].filename == "answer.md"
    assert docs[0].content == answer.encode()
    assert fake.stats.too_many_requests == 0


async def test_a_manager_line_goes_out_exactly(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    autojump_clock: trio.testing.MockClock,
) -> None:
    line = "⚠️ proxy proxy2 is offline"
    task = await finished_task(store, Outcome("failed", line=line))
    await delivery(store, replies).deliver(task, None)
    assert [m.text for m in fake.messages(USER)] == [line]


async def test_an_answer_survives_an_hour_of_telegram_outage(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Every send fails for well over an hour (500s, then dropped connections).
    fake.fail_next("sendMessage", error_code=500, times=60)
    fake.drop_next("sendMessage", times=20)
    task = await finished_task(store, Outcome("completed", text="worth the wait"))
    start = trio.current_time()
    await delivery(store, replies).deliver(task, None)
    assert trio.current_time() - start > 3600
    assert [m.text for m in fake.messages(USER)] == ["worth the wait"]
    assert task.state == "done"


async def test_delivery_gives_up_at_delivery_give_up_s_and_says_so_in_the_log(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.fail_next("sendMessage", error_code=502, times=10**6)
    task = await finished_task(store, Outcome("completed", text="never"))
    start = trio.current_time()
    with caplog.at_level(logging.ERROR):
        await delivery(store, replies, give_up_s=900).deliver(task, None)
    assert 899 <= trio.current_time() - start < 1000
    assert "gave up on part 1/1" in caplog.text
    assert task.state == "done"


class SendsFailAfter(httpx.AsyncBaseTransport):
    """Telegram becomes unreachable for `method` after the first `ok` of them."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport, ok: int, method: str = "sendMessage"
    ) -> None:
        self.inner, self.ok, self.count, self.method = inner, ok, 0, method

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(f"/{self.method}"):
            self.count += 1
            if self.count > self.ok:
                raise httpx.ConnectError("unreachable", request=request)
        return await self.inner.handle_async_request(request)


@attrs.define
class Process:
    """One manager process's store, outbox and replies (a restart opens them anew)."""

    store: ManagerStore
    outbox: Outbox
    replies: Replies
    nursery: trio.Nursery


@asynccontextmanager
async def manager_process(
    state: Path, transport: httpx.AsyncBaseTransport
) -> AsyncIterator[Process]:
    """Runs until the block ends, or until its nursery is cancelled (a SIGTERM, say)."""
    async with (
        open_store(state, inline_writes=True) as store,
        httpx.AsyncClient(transport=transport) as http,
        trio.open_nursery() as nursery,
    ):
        outbox = Outbox(TelegramClient(http, MOCK_BASE_URL, BOT_TOKEN))
        await nursery.start(outbox.run)
        replies = Replies(outbox)
        replies.nursery = nursery
        yield Process(store, outbox, replies, nursery)
        nursery.cancel_scope.cancel()


async def test_a_shutdown_mid_answer_resumes_at_the_next_part_after_the_restart(
    fake: FakeTelegram,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    answer = "\n\n".join(f"Paragraph {i}: " + "word " * 150 for i in range(10))
    flaky = SendsFailAfter(fake.transport(), ok=1)
    async with manager_process(tmp_path / "state", flaky) as first:
        task = await finished_task(first.store, Outcome("completed", text=answer))
        grace = ShutdownGrace(10)
        work = delivery(first.store, first.replies)
        work._grace = grace
        first.nursery.start_soon(work.deliver, task, None)
        await trio.sleep(300)  # part 1 is in, part 2 keeps failing
        assert task.parts_sent == 1
        grace.begin()  # SIGTERM: protected steps get 10 s, then everything stops
        first.nursery.cancel_scope.cancel()
    assert len(fake.messages(USER)) == 1
    async with manager_process(tmp_path / "state", fake.transport()) as second:
        [again] = second.store.open_tasks()
        assert again.parts_sent == 1
        await delivery(second.store, second.replies).deliver(again, None)
    texts = [m.text or "" for m in fake.messages(USER)]
    assert sum(t.startswith("Paragraph 0:") for t in texts) == 1  # nothing sent twice
    assert " ".join(texts).split() == answer.split()


async def test_the_finished_state_and_the_thread_survive_in_one_write(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_store(tmp_path / "state", inline_writes=True) as store:
        await finished_task(store, Outcome("completed", text="hi", thread_id="thread-9"))
    async with open_store(tmp_path / "state", inline_writes=True) as store:
        [task] = store.open_tasks()
        assert task.state == "finished"
        assert task.outcome == Outcome("completed", text="hi", thread_id="thread-9")
        conv = store.conversation((USER, 0))
        assert conv.threads == {"proxy1": "thread-9"}
        assert conv.proxy == "proxy1"
        assert task.finished is not None
        assert task.finished <= time.time()


async def test_after_a_restart_a_part_already_posted_is_found_not_sent_again(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    tg: TelegramClient,
    autojump_clock: trio.testing.MockClock,
) -> None:
    answer = "\n\n".join(f"Paragraph {i}: " + "word " * 150 for i in range(6))
    parts = answer_parts(answer)
    assert len(parts) >= 2
    task = await finished_task(store, Outcome("completed", text=answer))
    # The process before the restart had sent part 1 and counted it, then sent
    # part 2 and died before counting it.
    first = await tg.request("sendMessage", part_params(parts[0]))
    await store.mark_parts_sent(task, 1, first["message_id"])
    await tg.request("sendMessage", part_params(parts[1]))
    await delivery(store, replies).deliver(task, None)
    texts = [m.text or "" for m in fake.messages(USER)]
    assert len(texts) == len(parts)  # part 2 was found in the chat, not sent twice
    assert " ".join(texts).split() == answer.split()


async def test_a_restart_leaves_alone_another_answer_posted_in_the_chat_meanwhile(
    fake: FakeTelegram,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two answers wait their turn in one group (3 s apart there). The manager is
    restarted after the first went out: the second goes out after the restart,
    and the first is still what it was (the check for a part posted before the
    restart must not take the first answer for it, nor edit it)."""
    fake.push_message(GROUP, "two questions")
    prompt_id = fake.transcript(GROUP)[-1].message_id
    async with manager_process(tmp_path / "state", fake.transport()) as first:
        store = first.store
        grace = ShutdownGrace(10)
        work = delivery(store, first.replies)
        work._grace = grace
        for n in range(3):  # the group's burst is spent: the answers wait their turn
            await first.outbox.send(
                "sendMessage", {"chat_id": GROUP, "text": f"Note {n}."}, priority=Priority.ANSWER
            )
        for n, text in ((1, "First answer."), (2, "Second answer.")):
            task = store.new_task(
                GROUP, 0, "the prompt", task_id=f"t{n}", timeout_s=60, message_id=prompt_id
            )
            await store.add_task(task)
            await store.mark_dispatched(task, "proxy1", None)
            await store.mark_finished(task, Outcome("completed", text=text))
            first.nursery.start_soon(work.deliver, task, None)
        await fake.wait_until(lambda: "First answer." in fake.texts(GROUP))
        grace.begin()  # SIGTERM while the second waits for its turn
        first.nursery.cancel_scope.cancel()
    notes = ["Note 0.", "Note 1.", "Note 2."]
    assert fake.texts(GROUP) == [*notes, "First answer."]
    async with manager_process(tmp_path / "state", fake.transport()) as second:
        [again] = second.store.open_tasks()
        await delivery(second.store, second.replies).deliver(again, None)
    assert fake.texts(GROUP) == [*notes, "First answer.", "Second answer."]


def part_params(part: Chunk) -> dict[str, object]:
    params: dict[str, object] = {"chat_id": USER, "text": part.text}
    if part.entities:
        params["entities"] = list(part.entities)
    return params


def status_view(outbox: Outbox, chat_id: int, message_id: int) -> LiveView:
    """The live view of a task that ran long enough to show its status message."""
    return LiveView(
        outbox,
        chat_id,
        "proxy1",
        interval=1.0,
        use_draft=False,
        cancel_data=f"c:{chat_id}",
        message_id=message_id,
    )


async def test_chats_ending_at_once_get_every_answer_before_any_status_line(
    fake: FakeTelegram,
    store: ManagerStore,
    replies: Replies,
    tg: TelegramClient,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """30 streamed tasks end together: the bot's 25 requests/s are the bottleneck.
    Each chat's answer does not wait behind its own status line, so all the
    answers are in within ~1 s, and only then are the views closed."""
    chats = [USER + 1 + n for n in range(30)]
    views = []
    for chat in chats:
        fake.add_chat(chat)
        status = await tg.request("sendMessage", {"chat_id": chat, "text": "⏳ working"})
        views.append(status_view(replies.outbox, chat, status["message_id"]))
    await trio.sleep(5)  # the fake's own limits forget the status messages
    tasks = []
    for n, chat in enumerate(chats):
        task = store.new_task(chat, 0, "the prompt", task_id=f"t{n}", timeout_s=60)
        await store.add_task(task)
        await store.mark_dispatched(task, "proxy1", None)
        await store.mark_finished(task, Outcome("completed", text=f"Answer {n}."))
        tasks.append(task)
    since = len(fake.requests)
    start = trio.current_time()
    work = delivery(store, replies)
    async with trio.open_nursery() as nursery:
        for task, view in zip(tasks, views, strict=True):
            nursery.start_soon(work.deliver, task, view)
    sent = fake.requests[since:]
    order = [r.method for r in sent if r.status == 200]
    assert order == ["sendMessage"] * 30 + ["editMessageText"] * 30
    answered = max(r.time for r in sent if r.method == "sendMessage")
    assert answered - start <= 30 / 25
    for n, (chat, view) in enumerate(zip(chats, views, strict=True)):
        [closed, answer] = fake.messages(chat)
        assert closed.message_id == view.status_message_id
        assert (closed.text or "").startswith("✅ Done")
        assert answer.text == f"Answer {n}."
    assert all(task.state == "done" for task in tasks)
    assert fake.stats.too_many_requests == 0


async def test_a_shutdown_between_the_answer_and_the_status_line_closes_the_view_after_the_restart(
    fake: FakeTelegram,
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The answer is in; the status line cannot be set (Telegram refuses edits for
    now) when the manager stops. The task is still in the journal: after the
    restart its view is closed, and the answer is not sent again."""
    edits_fail = SendsFailAfter(fake.transport(), ok=0, method="editMessageText")
    async with manager_process(tmp_path / "state", edits_fail) as first:
        store = first.store
        status = await first.outbox.send(
            "sendMessage", {"chat_id": USER, "text": "⏳ working"}, priority=Priority.LIVE
        )
        status_id = status["message_id"]
        task = await finished_task(store, Outcome("completed", text="The answer."))
        task.view_message_id = status_id
        store.save_view(task)
        grace = ShutdownGrace(10)
        work = delivery(store, first.replies)
        work._grace = grace
        first.nursery.start_soon(work.deliver, task, status_view(first.outbox, USER, status_id))
        await fake.wait_until(lambda: "The answer." in fake.texts(USER))
        await trio.sleep(30)  # the status line keeps failing
        grace.begin()  # SIGTERM: protected steps get 10 s, then everything stops
        first.nursery.cancel_scope.cancel()
    assert fake.texts(USER) == ["⏳ working", "The answer."]
    async with manager_process(tmp_path / "state", fake.transport()) as second:
        [again] = second.store.open_tasks()
        assert again.parts_sent == 1
        assert again.view_message_id == status_id
        view = status_view(second.outbox, USER, status_id)
        await delivery(second.store, second.replies).deliver(again, view)
        assert second.store.open_tasks() == []
    [closed, answer] = fake.messages(USER)
    assert (closed.text or "").startswith("✅ Done")
    assert answer.text == "The answer."
