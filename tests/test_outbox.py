"""The Bot API client and the outbox, in memory with virtual time.

The fake Bot API runs in-process through httpx's MockTransport, so 429
windows, backoffs and hours-long outages take no wall time and can be
asserted to the second.
"""

from __future__ import annotations

import itertools
from functools import partial

import httpx
import pytest
import trio
import trio.testing

from codexnet.manager.outbox import ABANDONED, Outbox, Priority
from codexnet.manager.telegram import (
    RetryAfter,
    TelegramClient,
    TelegramError,
    TelegramFatal,
    TelegramUnavailable,
)
from tests.conftest import GROUP
from tests.fakes.stack import USER
from tests.fakes.telegram_api import MOCK_BASE_URL, FakeTelegram


def sends(text: str, chat_id: int = USER) -> dict[str, object]:
    return {"chat_id": chat_id, "text": text}


async def test_a_burst_to_one_chat_is_paced_and_never_429s(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    for i in range(10):
        await outbox.send("sendMessage", sends(f"message {i}"), priority=Priority.ANSWER)
    assert fake.stats.too_many_requests == 0
    assert [m.text for m in fake.messages(USER)] == [f"message {i}" for i in range(10)]
    # 3 at once (the burst), then about one a second.
    assert 6 <= trio.current_time() - start <= 9


async def test_429_waits_out_retry_after_and_sends_nothing_inside_the_window(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    fake.fail_next("sendMessage", error_code=429, retry_after=7)
    start = trio.current_time()
    until = start + 3600
    await outbox.send("sendMessage", sends("hello"), priority=Priority.ANSWER, until=until)
    assert trio.current_time() - start >= 7
    assert [m.text for m in fake.messages(USER)] == ["hello"]
    assert fake.stats.early_retries == 0  # nothing arrived inside the penalty window


async def test_a_429_without_retrying_is_raised_and_pauses_only_that_chat(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    fake.fail_next("sendMessage", error_code=429, retry_after=30)
    with pytest.raises(RetryAfter):
        await outbox.send("sendMessage", sends("live"), priority=Priority.LIVE)
    start = trio.current_time()
    await outbox.send("sendMessage", sends("other chat", GROUP), priority=Priority.REPLY)
    assert trio.current_time() == start  # another chat is not held back
    await outbox.send("sendMessage", sends("later"), priority=Priority.REPLY, until=start + 60)
    assert trio.current_time() - start >= 29
    assert fake.stats.early_retries == 0


async def test_5xx_and_dropped_connections_are_retried_with_backoff(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    fake.fail_next("sendMessage", error_code=502, description="Bad Gateway", times=2)
    fake.drop_next("sendMessage")
    until = trio.current_time() + 600
    await outbox.send(
        "sendMessage",
        sends("eventually"),
        priority=Priority.ANSWER,
        until=until,
        on_unknown="probe",
    )
    assert [m.text for m in fake.messages(USER)] == ["eventually"]


async def test_an_answer_waits_out_hours_of_telegram_trouble(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    # About two hours of 500s (the backoff tops out at a minute between tries).
    fake.fail_next("sendMessage", error_code=500, times=130)
    start = trio.current_time()
    await outbox.send(
        "sendMessage", sends("still here"), priority=Priority.ANSWER, until=start + 86400
    )
    assert [m.text for m in fake.messages(USER)] == ["still here"]
    assert trio.current_time() - start > 3600


async def test_the_retry_gives_up_at_its_deadline(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    fake.fail_next("sendMessage", error_code=500, times=999)
    start = trio.current_time()
    with pytest.raises(TelegramUnavailable, match="500"):
        await outbox.send("sendMessage", sends("x"), priority=Priority.ANSWER, until=start + 120)
    assert 120 <= trio.current_time() - start <= 200


async def test_a_retry_comes_back_as_soon_as_telegram_answers_again(
    fake: FakeTelegram,
    tg: TelegramClient,
    outbox: Outbox,
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake.fail_next("sendMessage", error_code=500, times=6)  # backoff is now at 30-60 s
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: outbox.send("sendMessage", sends("soon"), priority=Priority.ANSWER, until=10**6)
        )
        with trio.fail_after(600):
            await fake.wait_until(lambda: fake.stats.by_status[500] == 6)
        await trio.sleep(2)
        back = trio.current_time()
        await tg.request("getMe")  # Telegram answers something: it is back
        with trio.fail_after(600):
            await fake.wait_until(lambda: bool(fake.messages(USER)))
        assert trio.current_time() - back < 2


async def test_not_modified_is_success_and_other_400s_raise(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    sent = await outbox.send("sendMessage", sends("same"), priority=Priority.REPLY)
    edit = {"chat_id": USER, "message_id": sent["message_id"], "text": "same"}
    assert await outbox.send("editMessageText", edit, priority=Priority.LIVE) is None
    with pytest.raises(TelegramError, match="message is too long") as info:
        await outbox.send("sendMessage", sends("x" * 4097), priority=Priority.REPLY)
    assert info.value.code == 400
    with pytest.raises(TelegramError, match="message to edit not found"):
        await outbox.send(
            "editMessageText",
            {"chat_id": USER, "message_id": 999, "text": "y"},
            priority=Priority.LIVE,
        )


async def test_a_wrong_token_is_fatal(
    fake: FakeTelegram, autojump_clock: trio.testing.MockClock
) -> None:
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        tg = TelegramClient(http, MOCK_BASE_URL, "123456789:not-the-right-token-at-all")
        with pytest.raises(TelegramFatal, match="401 Unauthorized"):
            await tg.call("getMe")
    assert "not-the-right" not in repr(tg)


async def test_the_whole_bot_stays_under_30_per_second(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    for chat in range(1, 101):
        fake.add_chat(chat)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for chat in range(1, 101):  # 100 different chats, one message each
            nursery.start_soon(
                partial(outbox.send, priority=Priority.REPLY), "sendMessage", sends("hi", chat)
            )
    elapsed = trio.current_time() - start
    assert 100 / elapsed <= 30
    assert fake.stats.too_many_requests == 0


async def test_answers_go_before_live_updates_and_live_updates_coalesce(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    status = await outbox.send("sendMessage", sends("⏳"), priority=Priority.LIVE)
    # Use up the chat's burst, so everything below has to wait its turn.
    for i in range(3):
        await outbox.send("sendMessage", sends(f"filler {i}"), priority=Priority.REPLY)
    order: list[str] = []

    async def live(i: int) -> None:
        edit = {"chat_id": USER, "message_id": status["message_id"], "text": f"live {i}"}
        await outbox.send(
            "editMessageText", edit, priority=Priority.LIVE, coalesce=("edit", status["message_id"])
        )
        order.append(f"live {i}")

    async def answer() -> None:
        await outbox.send("sendMessage", sends("the answer"), priority=Priority.ANSWER)
        order.append("answer")

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(live, i)
            await trio.sleep(0.01)
        nursery.start_soon(answer)
    edits = [r.params["text"] for r in fake.requests if r.method == "editMessageText"]
    assert edits == ["live 4"]  # only the newest live text was ever sent
    assert outbox.stats.coalesced == 4
    # The answer went first although the live updates were queued before it.
    sent = [
        r.params.get("text")
        for r in fake.requests
        if r.method in ("sendMessage", "editMessageText")
    ]
    assert sent.index("the answer") < sent.index("live 4")
    assert fake.stats.too_many_requests == 0


async def test_each_waiting_send_is_woken_once(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    for chat in range(1, 201):
        fake.add_chat(chat)
    async with trio.open_nursery() as nursery:
        for chat in range(1, 201):
            for i in range(2):
                nursery.start_soon(
                    partial(outbox.send, priority=Priority.REPLY),
                    "sendMessage",
                    sends(f"m{i}", chat),
                )
    assert outbox.stats.sent == 400
    # One wake-up per send, however long it waited (the first went at once).
    assert outbox.stats.wakeups + outbox.stats.at_once == 400
    assert fake.stats.too_many_requests == 0


async def test_a_send_to_an_idle_outbox_goes_without_waking_the_scheduler(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    """The usual case, one answer and nothing else waiting: it goes at once, not two
    passes of the event loop later (the scheduler's, then its own)."""
    await trio.testing.wait_all_tasks_blocked()
    before = outbox.stats.scheduler_wakeups
    await outbox.send("sendMessage", sends("the answer"), priority=Priority.ANSWER)
    await outbox.send("sendMessage", sends("and a second one"), priority=Priority.ANSWER)
    assert fake.texts(USER) == ["the answer", "and a second one"]
    assert (outbox.stats.at_once, outbox.stats.wakeups) == (2, 0)
    assert outbox.stats.scheduler_wakeups == before


async def test_a_send_lost_before_telegram_got_it_is_sent_once(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    await outbox.send("sendMessage", sends("before"), priority=Priority.ANSWER)
    fake.drop_next("sendMessage")  # the connection breaks before Telegram acts on it
    until = trio.current_time() + 600
    await outbox.send(
        "sendMessage",
        sends("the answer"),
        priority=Priority.ANSWER,
        until=until,
        on_unknown="probe",
    )
    assert [m.text for m in fake.messages(USER)] == ["before", "the answer"]
    assert outbox.stats.probes == 1
    assert outbox.stats.probe_hits == 0


async def test_a_chat_action_never_waits_and_skips_a_paused_chat(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    fake.fail_next("sendMessage", error_code=429, retry_after=20)
    with pytest.raises(RetryAfter):
        await outbox.send("sendMessage", sends("hi"), priority=Priority.LIVE)
    start = trio.current_time()
    await outbox.chat_action(USER)
    assert trio.current_time() == start
    assert fake.chat_actions(USER) == []  # nothing at all inside the window
    assert fake.stats.early_retries == 0
    await trio.sleep(21)
    await outbox.chat_action(USER)
    assert len(fake.chat_actions(USER)) == 1


async def test_a_send_whose_answer_was_lost_is_found_in_the_chat_not_sent_again(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    await outbox.send("sendMessage", sends("before"), priority=Priority.ANSWER)
    fake.push_message(USER, "the person types meanwhile")  # an id in between, not ours
    fake.drop_after_next("sendMessage")  # posted, but the connection dies before the answer
    until = trio.current_time() + 600
    posted = await outbox.send(
        "sendMessage",
        sends("the answer"),
        priority=Priority.ANSWER,
        until=until,
        on_unknown="probe",
    )
    assert fake.count_messages(USER, "the answer") == 1
    assert posted["message_id"] == fake.messages(USER)[-1].message_id
    assert outbox.stats.probe_hits == 1
    assert fake.stats.too_many_requests == 0


async def test_without_a_probe_a_lost_answer_is_sent_again(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    # Nothing known about the chat yet (a fresh start): the answer is never lost,
    # at the price of a duplicate in this rare case.
    fake.drop_after_next("sendMessage")
    until = trio.current_time() + 600
    await outbox.send(
        "sendMessage",
        sends("the answer"),
        priority=Priority.ANSWER,
        until=until,
        on_unknown="probe",
    )
    assert fake.count_messages(USER, "the answer") == 2


async def test_stop_abandons_the_waiting_answers_and_lets_the_rest_finish(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    for i in range(3):  # the chat's burst is used up: what follows has to wait
        await outbox.send("sendMessage", sends(f"filler {i}"), priority=Priority.REPLY)
    results: list[object] = []

    async def answer(i: int) -> None:
        results.append(
            await outbox.send(
                "sendMessage", sends(f"part {i}"), priority=Priority.ANSWER, abandonable=True
            )
        )

    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(answer, i)
        await trio.sleep(1.5)  # one or two went out meanwhile
        outbox.stop()  # shutdown
    sent = [t for t in fake.texts(USER) if t.startswith("part")]
    assert 1 <= len(sent) < 5
    assert results.count(ABANDONED) == 5 - len(sent)
    assert outbox.stats.sent == 3 + len(sent)


async def test_chats_take_turns_when_the_bots_budget_is_the_bottleneck(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    chats = list(range(1, 41))
    others = list(range(101, 106))
    for chat in chats + others:
        fake.add_chat(chat)
    # The bot's burst is spent (on other chats), so every answer below waits:
    # sent at once, the first few would go in the order they came.
    for chat in others:
        await outbox.send("sendMessage", sends("note", chat), priority=Priority.ANSWER)
    start = trio.current_time()
    first_at: dict[int, float] = {}
    queued = {chat: itertools.count() for chat in chats}

    async def answer(chat: int) -> None:
        part = next(queued[chat])  # numbered as queued: a chat's parts go in this order
        await outbox.send("sendMessage", sends(f"part {part}", chat), priority=Priority.ANSWER)
        if part == 0:
            first_at[chat] = trio.current_time() - start

    async with trio.open_nursery() as nursery:
        for chat in chats:  # all queued at once, four parts per chat
            for _ in range(4):
                nursery.start_soon(answer, chat)
    sent = [
        (int(r.params["chat_id"]), int(str(r.params["text"]).split()[1]))
        for r in fake.requests
        if r.method == "sendMessage" and r.params["chat_id"] in chats
    ]
    assert len(sent) == 160
    # Round robin: every chat's first part before any chat's second, and so on.
    assert [part for _, part in sent] == sorted(part for _, part in sent)
    # So the last chat's answer starts after 40 requests (25/s), not after 120.
    assert max(first_at.values()) <= 40 / 25 + 0.5
    assert fake.stats.too_many_requests == 0


async def test_2000_waiting_sends_cost_2000_wakeups(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    chats = range(1, 201)
    for chat in chats:
        fake.add_chat(chat)
    async with trio.open_nursery() as nursery:
        for chat in chats:
            for i in range(10):
                nursery.start_soon(
                    partial(outbox.send, priority=Priority.REPLY),
                    "sendMessage",
                    sends(f"m{i}", chat),
                )
    assert outbox.stats.sent == 2000
    # Each waiting send woken once, when it may go (the first went at once).
    assert outbox.stats.wakeups + outbox.stats.at_once == 2000
    assert outbox.stats.at_once <= 5  # the bot's burst, then everyone waits its turn
    # The scheduler wakes at most once per send too: only when something may go.
    assert outbox.stats.scheduler_wakeups <= 2000
    assert fake.stats.too_many_requests == 0


async def test_a_chat_kept_waiting_by_the_bots_budget_keeps_to_its_own(
    fake: FakeTelegram, outbox: Outbox, autojump_clock: trio.testing.MockClock
) -> None:
    # 60 other chats take the bot's budget for ~2 s; chat USER's five messages
    # wait behind them with a full bucket. Waiting earns it no extra burst:
    # three go at once, then about one a second.
    for chat in range(1, 61):
        fake.add_chat(chat)
    async with trio.open_nursery() as nursery:
        for chat in range(1, 61):
            nursery.start_soon(
                partial(outbox.send, priority=Priority.REPLY), "sendMessage", sends("hi", chat)
            )
        await trio.lowlevel.checkpoint()
        for i in range(5):
            nursery.start_soon(
                partial(outbox.send, priority=Priority.REPLY), "sendMessage", sends(f"m{i}")
            )
    assert fake.stats.too_many_requests == 0
    times = [
        r.time for r in fake.requests if r.method == "sendMessage" and r.params["chat_id"] == USER
    ]
    assert len(times) == 5
    assert times[3] - times[0] >= 0.9
