"""The owner first: strangers, floods and queued updates never hold up the owner.

The real manager against the fake Bot API over HTTP (which enforces Telegram's
flood limits) and a proxy reduced to its wire protocol (tests/fakes/rawproxy.py),
on the real clock. Times are the ones the fake and the proxy record when a
request or frame arrives, measured from when the update was queued.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from codexnet.manager.bot import REFUSALS_PER_MINUTE
from codexnet.manager.service import Manager, run_manager
from codexnet.protocol import (
    ApprovalDecision,
    ApprovalRequest,
    ResultAck,
    Task,
    TaskAck,
    TaskResult,
)
from tests.conftest import GROUP
from tests.fakes.rawproxy import RawProxy, raw_proxy
from tests.fakes.stack import BOT_TOKEN, STRANGER, USER, manager_config
from tests.fakes.telegram_api import MOCK_BASE_URL, FakeTelegram

OWNER_DEADLINE_S = 1.0  # what the owner may wait, whatever else is queued


def refusals(telegram: FakeTelegram, chat_id: int) -> list[str]:
    return [t for t in telegram.texts(chat_id) if t.startswith("Sorry, you are not allowed")]


async def test_twenty_strangers_do_not_delay_the_owners_prompt(
    telegram: FakeTelegram, proxy: RawProxy
) -> None:
    # Ten strangers in their own chats, ten more messages from one of them.
    for n in range(10):
        telegram.push_message(STRANGER + n, f"hello {n}")
    for n in range(10):
        telegram.push_message(STRANGER, f"again {n}")
    queued = trio.current_time()
    telegram.push_message(USER, "the owner's prompt")  # in the same batch
    with trio.fail_after(5):
        task = await proxy.expect(Task)
    assert task.prompt == "the owner's prompt"
    assert trio.current_time() - queued < OWNER_DEADLINE_S
    await proxy.send(TaskAck(task.task_id))
    await proxy.send(TaskResult(task.task_id, "completed", text="done"))
    with trio.fail_after(5):
        await proxy.expect(ResultAck)
    # ... and in the batch after the strangers'.
    for n in range(20):
        telegram.push_message(STRANGER + 100 + n, f"hello {n}")
    with trio.fail_after(5):
        await telegram.wait_until(lambda: not telegram.pending_updates)
    queued = trio.current_time()
    telegram.push_message(USER, "the owner's next prompt")
    with trio.fail_after(5):
        task = await proxy.expect(Task, lambda t: t.prompt == "the owner's next prompt")
    assert trio.current_time() - queued < OWNER_DEADLINE_S
    # One refusal per chat (the stranger who wrote eleven times got one), and
    # no more than REFUSALS_PER_MINUTE in all: thirty strangers do not get thirty.
    strangers = [STRANGER + n for n in range(10)] + [STRANGER + 100 + n for n in range(20)]

    def told() -> int:
        return sum(len(refusals(telegram, chat)) for chat in strangers)

    with trio.fail_after(10):
        await telegram.wait_until(lambda: told() == REFUSALS_PER_MINUTE)
    assert len(refusals(telegram, STRANGER)) == 1
    assert telegram.stats.violations == 0


async def test_the_owners_approve_press_is_answered_and_applied_at_once(
    telegram: FakeTelegram, proxy: RawProxy
) -> None:
    """9 strangers in a group, the group's send budget spent: the press still counts at once."""
    telegram.push_message(GROUP, "deploy it", user_id=USER)
    with trio.fail_after(5):
        task = await proxy.expect(Task)
    await proxy.send(TaskAck(task.task_id))
    with trio.fail_after(10):  # the live view, after a second: the group's budget goes down
        await telegram.wait_until(lambda: len(telegram.messages(GROUP)) >= 1)
    await proxy.send(ApprovalRequest(task.task_id, "a1", "command", "make deploy", "in /srv"))
    with trio.fail_after(10):
        await telegram.wait_until(lambda: any("make deploy" in t for t in telegram.texts(GROUP)))
    [question] = [m for m in telegram.messages(GROUP) if "make deploy" in (m.text or "")]
    assert question.reply_markup is not None
    approve = question.reply_markup["inline_keyboard"][0][0]["callback_data"]

    # Nine strangers write in the group; the one refusal they get spends the
    # group's last message of its burst (Telegram allows 20 a minute there).
    for n in range(9):
        telegram.push_message(GROUP, f"spam {n}", user_id=STRANGER + n)
    with trio.fail_after(10):
        await telegram.wait_until(lambda: len(refusals(telegram, GROUP)) == 1)
    queued = trio.current_time()
    query_id = telegram.push_callback(GROUP, question.message_id, approve, user_id=USER)
    with trio.fail_after(5):
        answered = await telegram.wait_for_request("answerCallbackQuery")
        decision = await proxy.expect(ApprovalDecision)
    decided = trio.current_time()
    assert answered.params["callback_query_id"] == query_id
    assert answered.params["text"] == "✅ Approved"
    assert answered.time - queued < OWNER_DEADLINE_S
    assert (decision.approval_id, decision.decision) == ("a1", "accept")
    assert decided - queued < OWNER_DEADLINE_S

    # The owner's next prompt (the next batch) is not held up by the question's
    # edit, which waits for the group's budget.
    queued = trio.current_time()
    telegram.push_message(USER, "and now this")
    with trio.fail_after(5):
        await proxy.expect(Task, lambda t: t.prompt == "and now this")
    assert trio.current_time() - queued < OWNER_DEADLINE_S
    # (The question's edit to "✅ Approved by …" follows when the group's budget
    # allows: tests/test_approvals.py.)
    assert len(refusals(telegram, GROUP)) == 1  # one for the nine
    assert telegram.stats.violations == 0


async def test_a_stranger_is_told_at_most_once_an_hour_per_chat(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # In memory, Bot API and state (an fsync on a worker thread would let the
    # virtual clock race ahead): an hour takes no wall time.
    fake = FakeTelegram(BOT_TOKEN)
    config = manager_config(MOCK_BASE_URL, Path(":memory:"))

    async def handled() -> None:
        with trio.fail_after(60):
            await fake.wait_until(lambda: not fake.pending_updates)

    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_manager, config, transport=fake.transport()))
        for minute in range(0, 60, 5):  # a message every 5 minutes for an hour
            fake.push_message(STRANGER, f"minute {minute}")
            fake.push_message(STRANGER + 1, f"minute {minute}")
            await handled()
            await trio.sleep(300)
        [first] = fake.calls("sendMessage", lambda r: r.params["chat_id"] == STRANGER)
        assert trio.current_time() - first.time < 3600 + 60
        await trio.sleep(first.time + 3600 + 1 - trio.current_time())
        fake.push_message(STRANGER, "an hour later")
        await handled()
        with trio.fail_after(60):
            await fake.wait_until(lambda: len(refusals(fake, STRANGER)) == 2)
        nursery.cancel_scope.cancel()
    assert len(refusals(fake, STRANGER + 1)) == 1
    assert refusals(fake, STRANGER)[0] == (
        f"Sorry, you are not allowed to use this bot (your user id: {STRANGER})."
    )
    # The log names who was refused, without a line per message.
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 3, lines


async def test_one_chats_updates_keep_their_order_while_others_run_alongside(
    telegram: FakeTelegram, manager: Manager, proxy: RawProxy
) -> None:
    """One batch, two chats interleaved, each `/use <proxy>` then a prompt: each
    prompt goes where its own chat's /use said (in order), both at once."""
    async with raw_proxy(manager.port, "proxy2", "proxy2-secret-token-9876543210") as proxy2:
        telegram.push_message(GROUP, "/use proxy2", user_id=USER)
        telegram.push_message(USER, "/use proxy1")
        telegram.push_message(GROUP, "after the group's /use", user_id=USER)
        telegram.push_message(USER, "after the owner's /use")
        queued = trio.current_time()
        with trio.fail_after(5):
            on_proxy2 = await proxy2.expect(Task)
            on_proxy1 = await proxy.expect(Task)
        assert trio.current_time() - queued < OWNER_DEADLINE_S
    assert on_proxy2.prompt == "after the group's /use"
    assert on_proxy1.prompt == "after the owner's /use"
