"""Buttons cannot be guessed or carried to another chat.

A modified Telegram client can send any callback data under any message it
sees, so every button is checked where it is pressed. The real manager against
the fake Bot API over HTTP, a proxy reduced to its wire protocol.
"""

from __future__ import annotations

import re

import trio

from codexnet.manager.hub import ProxyConn
from codexnet.manager.service import Manager
from codexnet.protocol import (
    ApprovalDecision,
    ApprovalRequest,
    ReadFile,
    Task,
    TaskAck,
    TaskCancel,
    TaskResult,
)
from tests.conftest import GROUP
from tests.fakes.rawproxy import RawProxy, raw_proxy
from tests.fakes.stack import PROXY_TOKEN, STRANGER, USER
from tests.fakes.telegram_api import FakeTelegram, StoredMessage

KEY = r"[A-Za-z0-9_-]{12}"  # 72 random bits (token_urlsafe(9))
NOT_HERE = "This button belongs to another chat."


def buttons(message: StoredMessage) -> list[str]:
    markup = message.reply_markup or {}
    return [b["callback_data"] for row in markup.get("inline_keyboard", []) for b in row]


async def bot_message(telegram: FakeTelegram, chat_id: int, where: str) -> StoredMessage:
    with trio.fail_after(10):
        await telegram.wait_until(
            lambda: any(where in (m.text or "") for m in telegram.messages(chat_id))
        )
    return next(m for m in telegram.messages(chat_id) if where in (m.text or ""))


async def toast_for(telegram: FakeTelegram, query_id: str) -> str | None:
    with trio.fail_after(5):
        answer = await telegram.wait_for_request(
            "answerCallbackQuery", lambda r: r.params["callback_query_id"] == query_id
        )
    return answer.params.get("text")


async def group_message(telegram: FakeTelegram) -> StoredMessage:
    """A message of the bot's in the group, to press foreign buttons under."""
    telegram.push_message(GROUP, "/help", user_id=USER)
    return await bot_message(telegram, GROUP, "/reset")


async def test_the_cancel_button_works_only_in_its_chat(
    telegram: FakeTelegram, proxy: RawProxy
) -> None:
    telegram.push_message(USER, "a long task")
    with trio.fail_after(5):
        task = await proxy.expect(Task)
    await proxy.send(TaskAck(task.task_id))
    status = await bot_message(telegram, USER, "Working on it")
    [cancel] = buttons(status)
    assert re.fullmatch(f"c:{KEY}", cancel)
    elsewhere = await group_message(telegram)

    foreign = telegram.push_callback(GROUP, elsewhere.message_id, cancel, user_id=USER)
    unknown = telegram.push_callback(USER, status.message_id, "c:AAAAAAAAAAAA")
    stranger = telegram.push_callback(GROUP, elsewhere.message_id, cancel, user_id=STRANGER)
    assert await toast_for(telegram, foreign) == NOT_HERE
    assert await toast_for(telegram, unknown) == "That task has already finished."
    assert await toast_for(telegram, stranger) == "You are not allowed to do that."
    assert [f for f in await proxy.nothing_for(0.5) if isinstance(f, TaskCancel)] == []

    pressed = telegram.push_callback(USER, status.message_id, cancel)
    assert await toast_for(telegram, pressed) == "Cancelling…"
    with trio.fail_after(5):
        assert (await proxy.expect(TaskCancel)).task_id == task.task_id


async def test_an_approval_button_works_only_in_its_chat(
    telegram: FakeTelegram, proxy: RawProxy
) -> None:
    telegram.push_message(USER, "needs approval")
    with trio.fail_after(5):
        task = await proxy.expect(Task)
    await proxy.send(TaskAck(task.task_id))
    await proxy.send(ApprovalRequest(task.task_id, "a1", "command", "rm -rf build", ""))
    question = await bot_message(telegram, USER, "rm -rf build")
    approve, session, deny = buttons(question)
    key = approve.split(":")[1]
    assert re.fullmatch(f"a:{KEY}:y", approve)
    assert (session, deny) == (f"a:{key}:s", f"a:{key}:n")
    elsewhere = await group_message(telegram)

    foreign = telegram.push_callback(GROUP, elsewhere.message_id, approve, user_id=USER)
    guessed = telegram.push_callback(USER, question.message_id, "a:AAAAAAAAAAAA:y")
    bad_choice = telegram.push_callback(USER, question.message_id, f"a:{key}:yes")
    assert await toast_for(telegram, foreign) == NOT_HERE
    assert await toast_for(telegram, guessed) == "This request is no longer pending."
    assert await toast_for(telegram, bad_choice) == "This request is no longer pending."
    assert [f for f in await proxy.nothing_for(0.5) if isinstance(f, ApprovalDecision)] == []
    assert buttons(telegram.message(USER, question.message_id)) == [approve, session, deny]

    pressed = telegram.push_callback(USER, question.message_id, deny)
    assert await toast_for(telegram, pressed) == "🚫 Denied"
    with trio.fail_after(5):
        decision = await proxy.expect(ApprovalDecision)
    assert (decision.approval_id, decision.decision) == ("a1", "decline")


async def test_a_use_button_works_only_in_the_chat_it_was_offered_in(
    telegram: FakeTelegram, manager: Manager, proxy: RawProxy
) -> None:
    telegram.push_message(USER, "/use")
    offer = await bot_message(telegram, USER, "Pick the machine")
    # The online machine, each label, and auto: every one bound to this chat.
    use, *others = buttons(offer)
    tag = use.split(":")[1]
    assert re.fullmatch(f"u:{KEY}:proxy1", use)
    assert [b.split(":", 2)[2] for b in others] == ["label:linux", "auto"]
    assert all(re.fullmatch(f"u:{KEY}:.+", b) for b in others)
    elsewhere = await group_message(telegram)
    telegram.push_message(GROUP, "/use", user_id=USER)
    group_offer = await bot_message(telegram, GROUP, "Pick the machine")
    assert buttons(group_offer)[0] != use  # each chat gets its own

    presses = [
        telegram.push_callback(GROUP, elsewhere.message_id, use, user_id=USER),
        telegram.push_callback(USER, offer.message_id, "u:proxy1"),  # the old, unbound form
        telegram.push_callback(USER, offer.message_id, f"u:{tag}:proxy2"),  # tag moved
        telegram.push_callback(USER, offer.message_id, "u:AAAAAAAAAAAA:proxy1"),
        telegram.push_callback(USER, offer.message_id, "zz:what"),
    ]
    for query_id in presses:
        assert await toast_for(telegram, query_id) == "This button is no longer valid."
    assert manager.store.conversation((GROUP, 0)).proxy is None
    assert manager.store.conversation((USER, 0)).proxy is None

    pressed = telegram.push_callback(USER, offer.message_id, use)
    assert await toast_for(telegram, pressed) == "Using proxy1"
    await bot_message(telegram, USER, "This chat now uses proxy1 (online).")
    assert manager.store.conversation((USER, 0)).proxy == "proxy1"
    assert manager.store.conversation((GROUP, 0)).proxy is None


async def test_keys_differ_for_every_task(telegram: FakeTelegram, manager: Manager) -> None:
    chats = [USER + n for n in range(3)]
    async with raw_proxy(manager.port, "proxy1", PROXY_TOKEN, capacity=3) as proxy:
        for chat in chats:
            telegram.add_chat(chat)
            telegram.push_message(chat, f"task in {chat}", user_id=USER)
        for _ in chats:
            with trio.fail_after(5):
                await proxy.send(TaskAck((await proxy.expect(Task)).task_id))
        keys = set()
        for chat in chats:
            keys.update(buttons(await bot_message(telegram, chat, "Working on it")))
    assert len(keys) == 3


async def test_a_diff_button_works_only_in_its_chat(
    telegram: FakeTelegram, proxy: RawProxy
) -> None:
    telegram.push_message(USER, "change a file")
    with trio.fail_after(5):
        task = await proxy.expect(Task)
    await proxy.send(TaskAck(task.task_id))
    await proxy.send(TaskResult(task.task_id, "completed", text="Changed it.", diff_bytes=42))
    answer = await bot_message(telegram, USER, "Changed it.")
    holder = next(m for m in telegram.messages(USER) if any(b.startswith("d:") for b in buttons(m)))
    [diff] = buttons(holder)
    assert re.fullmatch(f"d:{KEY}", diff)
    assert holder.message_id in (answer.message_id, answer.message_id - 1)
    elsewhere = await group_message(telegram)

    foreign = telegram.push_callback(GROUP, elsewhere.message_id, diff, user_id=USER)
    unknown = telegram.push_callback(USER, holder.message_id, "d:AAAAAAAAAAAA")
    assert await toast_for(telegram, foreign) == NOT_HERE
    assert await toast_for(telegram, unknown) == "This button is no longer valid."
    # Nothing was asked of the machine, and nothing sent to either chat.
    assert [f for f in await proxy.nothing_for(0.5) if isinstance(f, ReadFile)] == []
    assert not telegram.calls("sendDocument")


async def test_use_in_a_fleet_of_hundreds_offers_the_first_few_and_says_so(
    telegram: FakeTelegram, manager: Manager, proxy: RawProxy
) -> None:
    # Registered as a hello would (the buttons need only the registry): 150 machines
    # would be 150 buttons, more than Telegram takes ("reply markup is too long").
    for i in range(149):
        manager.hub.online[f"m{i:03}"] = ProxyConn(f"m{i:03}", None, 1, (), "test")  # type: ignore[arg-type]
    telegram.push_message(USER, "/use")
    offer = await bot_message(telegram, USER, "Pick the machine")
    assert offer.text == (
        "Pick the machine (or a pool of machines by label) for this chat — the first 40 of "
        "150 machines online; /use <name> or /use label:<label> for the others:"
    )
    offered = [b.split(":", 2)[2] for b in buttons(offer)]
    assert offered[:2] == ["m000", "m001"]
    assert offered[40:] == ["label:linux", "auto"]
