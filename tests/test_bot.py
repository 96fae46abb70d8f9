"""The bot's Telegram lifecycle against the fake Bot API over HTTP (no codex needed)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from codexnet.db import StateError
from codexnet.manager.service import Manager, run_manager
from codexnet.manager.telegram import TelegramFatal
from tests.fakes.stack import BOT_TOKEN, USER, manager_config
from tests.fakes.telegram_api import MOCK_BASE_URL, FakeTelegram


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeTelegram:
    fake = FakeTelegram(BOT_TOKEN)
    await nursery.start(fake.serve)
    return fake


async def test_a_wrong_token_stops_the_manager_with_a_clear_error(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    config = manager_config(fake.base_url, tmp_path, telegram_bot_token="123:wrong-token-xyz")
    with (
        trio.fail_after(10),
        pytest.RaisesGroup(
            pytest.RaisesExc(TelegramFatal, match=r"401 Unauthorized \(is the bot token right\?\)"),
            flatten_subgroups=True,
        ),
    ):
        await run_manager(config)


async def test_another_poller_never_stops_the_manager_and_is_logged_once_a_minute(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeTelegram(BOT_TOKEN)  # in memory: minutes of backoff take no wall time
    fake.add_chat(USER)
    fake.fail_next(
        "getUpdates",
        error_code=409,
        description="Conflict: terminated by other getUpdates request; "
        "make sure that only one bot instance is running",
        times=60,
    )
    config = manager_config(MOCK_BASE_URL, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_manager, config, transport=fake.transport()))
        start = trio.current_time()
        with trio.fail_after(3600):
            await fake.wait_until(lambda: fake.stats.conflicts >= 60)
        minutes = (trio.current_time() - start) / 60
        fake.push_message(USER, "/help")  # the other one stopped: this one takes over
        with trio.fail_after(120):
            await fake.wait_until(lambda: bool(fake.messages(USER)))
        nursery.cancel_scope.cancel()
    lines = [r for r in caplog.records if "another instance is polling" in r.getMessage()]
    assert 1 <= len(lines) <= minutes + 1
    assert "only one bot instance" in lines[0].getMessage()


async def test_a_second_manager_on_the_same_state_dir_is_refused(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    config = manager_config(fake.base_url, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_manager, config)
        with trio.fail_after(10), pytest.raises(StateError, match="another codexnet manager"):
            await run_manager(config)
        nursery.cancel_scope.cancel()


async def test_start_up_clears_a_webhook_and_registers_commands(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    fake.webhook_url = "https://example.invalid/hook"  # someone set a webhook earlier
    async with trio.open_nursery() as nursery:
        await nursery.start(run_manager, manager_config(fake.base_url, tmp_path))
        fake.push_message(USER, "/help")
        with trio.fail_after(10):
            await fake.wait_until(
                lambda: any("/reset" in (m.text or "") for m in fake.messages(USER))
            )
        nursery.cancel_scope.cancel()
    assert fake.webhook_url is None
    assert [c["command"] for c in fake.commands] == [
        "use",
        "reset",
        "cancel",
        "status",
        "get",
        "model",
        "effort",
        "threads",
        "resume",
        "cd",
        "help",
    ]
    [help_text] = [m.text or "" for m in fake.messages(USER) if "/reset" in (m.text or "")]
    for usage in ("/get <path>", "/model <name>", "/effort <level>", "/resume <thread id>"):
        assert usage in help_text


async def test_the_offset_is_confirmed_on_shutdown_and_survives_a_restart(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    config = manager_config(fake.base_url, tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_manager, config)
        update_id = fake.push_message(USER, "/start")
        with trio.fail_after(10):
            await fake.wait_until(lambda: len(fake.messages(USER)) == 1)
        nursery.cancel_scope.cancel()
    # (The aborted long poll may be recorded after it: the fake logs on completion.)
    [confirm] = [
        r for r in fake.requests if r.method == "getUpdates" and r.params.get("timeout") == 0
    ]
    assert confirm.params.get("offset") == update_id + 1
    assert fake.pending_updates == []
    # A new manager does not answer /start again.
    async with trio.open_nursery() as nursery:
        manager: Manager = await nursery.start(run_manager, config)
        assert manager.hub.online == {}
        fake.push_message(USER, "/status")
        with trio.fail_after(10):
            await fake.wait_until(lambda: len(fake.messages(USER)) == 2)
        nursery.cancel_scope.cancel()
    assert "proxy1" in (fake.messages(USER)[1].text or "")


async def test_unknown_commands_and_non_text_messages_get_a_hint(
    fake: FakeTelegram, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(run_manager, manager_config(fake.base_url, tmp_path))
        fake.push_message(USER, "/frobnicate")
        fake.push_update(
            "message",
            {
                "message_id": 99,
                "date": 0,
                "chat": {"id": USER, "type": "private"},
                "from": {"id": USER, "is_bot": False, "first_name": "T"},
                "sticker": {"file_id": "x"},
            },
        )
        with trio.fail_after(10):
            await fake.wait_until(lambda: len(fake.messages(USER)) == 2)
        nursery.cancel_scope.cancel()
    assert [m.text for m in fake.messages(USER)] == [
        "Unknown command /frobnicate. Try /help.",
        "I can read text, documents and photos; not this kind of message.",
    ]


async def test_start_up_waits_out_an_unreachable_telegram(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    fake = FakeTelegram(BOT_TOKEN)  # in memory, so the backoffs take virtual time only
    fake.drop_next("deleteWebhook", times=8)  # more than one call's own retries
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        await nursery.start(
            partial(
                run_manager, manager_config(MOCK_BASE_URL, tmp_path), transport=fake.transport()
            )
        )
        nursery.cancel_scope.cancel()
    assert trio.current_time() - started > 31  # it kept trying past the first give-up
    assert fake.commands[0]["command"] == "use"
