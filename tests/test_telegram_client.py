"""The Bot API client and rate limiter, in memory with virtual time.

The fake Bot API runs in-process through httpx's MockTransport, so 429
windows and backoffs take no wall time and can be asserted to the second.
"""

from __future__ import annotations

import httpx
import pytest
import trio
import trio.testing

from codexnet.manager.ratelimit import RateLimiter
from codexnet.manager.telegram import TelegramClient, TelegramError, TelegramFatal
from tests.fakes.stack import USER
from tests.fakes.telegram_api import MOCK_BASE_URL, FakeTelegram


async def test_a_burst_to_one_chat_is_paced_and_never_429s(
    fake: FakeTelegram, tg: TelegramClient, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    for i in range(10):
        await tg.call("sendMessage", {"chat_id": USER, "text": f"message {i}"})
    assert fake.stats.too_many_requests == 0
    assert [m.text for m in fake.messages(USER)] == [f"message {i}" for i in range(10)]
    # 3 at once (the burst), then about one a second.
    assert 6 <= trio.current_time() - start <= 9


async def test_429_waits_out_retry_after_and_sends_nothing_inside_the_window(
    fake: FakeTelegram, tg: TelegramClient, autojump_clock: trio.testing.MockClock
) -> None:
    fake.fail_next("sendMessage", error_code=429, retry_after=7)
    start = trio.current_time()
    await tg.call("sendMessage", {"chat_id": USER, "text": "hello"})
    assert trio.current_time() - start >= 7
    assert [m.text for m in fake.messages(USER)] == ["hello"]
    assert fake.stats.early_retries == 0  # nothing arrived inside the penalty window
    assert tg.stats["retry_after"] == 1


async def test_5xx_and_dropped_connections_are_retried_with_backoff(
    fake: FakeTelegram, tg: TelegramClient, autojump_clock: trio.testing.MockClock
) -> None:
    fake.fail_next("sendMessage", error_code=502, description="Bad Gateway", times=2)
    fake.drop_next("sendMessage")
    await tg.call("sendMessage", {"chat_id": USER, "text": "eventually"})
    assert [m.text for m in fake.messages(USER)] == ["eventually"]


async def test_a_persistent_server_error_gives_up_with_a_clear_error(
    fake: FakeTelegram, tg: TelegramClient, autojump_clock: trio.testing.MockClock
) -> None:
    fake.fail_next("sendMessage", error_code=500, description="Internal Server Error", times=99)
    with pytest.raises(TelegramError, match="giving up after 6 attempts: 500"):
        await tg.call("sendMessage", {"chat_id": USER, "text": "x"})


async def test_not_modified_is_success_and_other_400s_raise(
    fake: FakeTelegram, tg: TelegramClient, autojump_clock: trio.testing.MockClock
) -> None:
    sent = await tg.call("sendMessage", {"chat_id": USER, "text": "same"})
    edit = {"chat_id": USER, "message_id": sent["message_id"], "text": "same"}
    assert await tg.call("editMessageText", edit) is None
    with pytest.raises(TelegramError, match="message is too long") as info:
        await tg.call("sendMessage", {"chat_id": USER, "text": "x" * 4097})
    assert info.value.code == 400
    with pytest.raises(TelegramError, match="message to edit not found"):
        await tg.call("editMessageText", {"chat_id": USER, "message_id": 999, "text": "y"})


async def test_a_wrong_token_is_fatal(
    fake: FakeTelegram, autojump_clock: trio.testing.MockClock
) -> None:
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        tg = TelegramClient(http, MOCK_BASE_URL, "123456789:not-the-right-token-at-all")
        with pytest.raises(TelegramFatal, match="401 Unauthorized"):
            await tg.call("getMe")
    assert "not-the-right" not in repr(tg)


async def test_limiter_pause_blocks_only_that_chat(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter()
    limiter.pause(USER, 30)
    start = trio.current_time()
    await limiter.acquire(USER + 1)
    assert trio.current_time() == start  # another chat is not held back
    await limiter.acquire(USER)
    assert trio.current_time() - start >= 30


async def test_limiter_keeps_the_whole_bot_under_30_per_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter()
    start = trio.current_time()
    for chat in range(1, 101):  # 100 different chats, one request each
        await limiter.acquire(chat)
    elapsed = trio.current_time() - start
    assert 100 / elapsed <= 30


async def test_a_paused_chat_gets_no_chat_action_either(
    fake: FakeTelegram, tg: TelegramClient, autojump_clock: trio.testing.MockClock
) -> None:
    fake.fail_next("sendMessage", error_code=429, retry_after=20)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(tg.call, "sendMessage", {"chat_id": USER, "text": "hi"})
        await fake.wait_for_request("sendMessage")
        start = trio.current_time()
        await tg.call("sendChatAction", {"chat_id": USER, "action": "typing"})
        assert trio.current_time() - start >= 19  # held until the window closed
    assert fake.stats.early_retries == 0
