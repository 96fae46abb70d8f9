"""SIGTERM with a backlog: the manager stops at once, and the answers come after the restart."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import trio

from codexnet.protocol import PROTOCOL_VERSION
from tests.fakes.instant_proxy import Arrivals, instant_proxy
from tests.fakes.processes import ManagerProcess, manager_config
from tests.fakes.stack import BOT_TOKEN, free_port
from tests.fakes.telegram_api import FakeTelegram

pytestmark = pytest.mark.e2e  # two manager processes and ~8 s of sending: not for the fast run

CHATS = list(range(20_000, 20_100))


async def test_sigterm_with_100_answers_waiting_stops_at_once_and_loses_none(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    telegram = FakeTelegram(BOT_TOKEN)
    for chat in CHATS:
        telegram.add_chat(chat)
    await nursery.start(telegram.serve)
    port = free_port()
    config = manager_config(
        tmp_path / "state",
        telegram.base_url,
        port,
        telegram_allowed_user_ids=CHATS,
        default_proxy="proxy1",
    )
    env = dict(os.environ)
    arrived = Arrivals()
    prompts = [f"question {i}" for i in range(len(CHATS))]
    async with ManagerProcess(config, tmp_path / "m1", env) as manager, trio.open_nursery() as p:
        await p.start(instant_proxy, port, PROTOCOL_VERSION, arrived)
        for chat, prompt in zip(CHATS, prompts, strict=True):
            telegram.push_message(chat, prompt)
        with trio.fail_after(30):
            await arrived.wait_for(prompts)
            # Every result stored by the manager (a fresh instant proxy would not hold one
            # that was not): ~4 s of sending left.
            await arrived.wait_stored(len(prompts))
        stopped = time.monotonic()
        manager.send_signal(signal.SIGTERM)
        assert await manager.wait(20) == 0
        took = time.monotonic() - stopped
        p.cancel_scope.cancel()
    assert took < 2  # not the 10 s grace: answers still waiting were left for the next start

    def answered(chat: int, prompt: str) -> bool:
        return f"Echo: {prompt}" in telegram.texts(chat)

    pairs = list(zip(CHATS, prompts, strict=True))
    assert not all(answered(chat, prompt) for chat, prompt in pairs)
    async with ManagerProcess(config, tmp_path / "m2", env), trio.open_nursery() as p:
        # The proxy comes back too (an answer's delivery does not need it).
        await p.start(instant_proxy, port, PROTOCOL_VERSION, Arrivals())
        with trio.fail_after(30):
            await telegram.wait_until(lambda: all(answered(c, p) for c, p in pairs))
        p.cancel_scope.cancel()
    for chat, prompt in pairs:
        answers = [t for t in telegram.texts(chat) if not t.startswith(("⏳", "✅"))]
        assert answers == [f"Echo: {prompt}"]  # each exactly once
        # A live view that appeared meanwhile was closed, before or after the restart.
        assert not any(t.startswith("⏳") for t in telegram.texts(chat))
