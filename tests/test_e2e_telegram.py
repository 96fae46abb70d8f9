"""End to end: fake Telegram over HTTP → manager → proxy → real codex → fake model.

Each test asserts what the person sees in the chat. Real processes and
sockets, so the real clock, with deadlines instead of sleeps.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.fakes.responses_api import long_text
from tests.fakes.stack import STRANGER, USER, Stack, free_port, open_stack

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path) as stack:
        yield stack


def journal(stack: Stack) -> list[str]:
    """The states of the manager's journalled tasks, read from its database."""
    with sqlite3.connect(stack.state_dir / "codexnet.db") as conn:
        return [state for (state,) in conn.execute("SELECT state FROM tasks ORDER BY seq")]


async def wait_journal(stack: Stack, states: list[str], seconds: float = 60) -> None:
    """Wait until the journal holds exactly `states` (another process's database
    sends no notification, so it is looked at every 50 ms, under a deadline)."""
    with trio.fail_after(seconds):
        while journal(stack) != states:  # noqa: ASYNC110 - nothing to wait on but the file
            await trio.sleep(0.05)


STATUS = re.compile(r"^(⏳|✅ Done|⏹ Cancelled|⏱ Timed out|⚠️ Failed)( ·|\s|$)")


def texts(stack: Stack, chat_id: int = USER) -> list[str]:
    """What the chat shows from the bot, without the per-task status lines."""
    return [
        m.text or "" for m in stack.telegram.messages(chat_id) if not STATUS.match(m.text or "")
    ]


def statuses(stack: Stack, chat_id: int = USER) -> list[str]:
    return [m.text or "" for m in stack.telegram.messages(chat_id) if STATUS.match(m.text or "")]


async def closed_status(stack: Stack, chat_id: int = USER, seconds: float = 20) -> str:
    """The chat's newest status line, once the task's final line replaced "⏳"
    (it follows the answer, so it may still be on its way when the answer is in)."""

    def closed() -> bool:
        lines = statuses(stack, chat_id)
        return bool(lines) and not lines[-1].startswith("⏳")

    with trio.fail_after(seconds):
        await stack.telegram.wait_until(closed)
    return statuses(stack, chat_id)[-1]


async def say(stack: Stack, text: str, *, expect: str, chat_id: int = USER) -> list[str]:
    """Write `text` as the user and wait until a bot message contains `expect`."""
    before = len(texts(stack, chat_id))
    stack.telegram.push_message(chat_id, text)
    with trio.fail_after(60):
        await stack.telegram.wait_until(
            lambda: any(expect in t for t in texts(stack, chat_id)[before:])
        )
    return texts(stack, chat_id)[before:]


async def test_hello_is_answered_and_the_next_message_continues_the_thread(
    stack: Stack,
) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        new = await say(stack, "hello", expect="Echo: hello")
        assert new[-1] == "Echo: hello (turn 1)"
        new = await say(stack, "and again", expect="Echo: and again")
        assert new[-1] == "Echo: and again (turn 2)"  # Codex saw the first turn
    # The bot registered its commands; a quick answer cost no "typing" action
    # (typing starts with the live view, after a second).
    assert {c["command"] for c in stack.telegram.commands} >= {"use", "reset", "status"}
    assert stack.telegram.chat_actions(USER) == []
    assert stack.telegram.stats.too_many_requests == 0


async def test_a_stranger_is_refused_and_nothing_is_dispatched(stack: Stack) -> None:
    stack.telegram.add_chat(STRANGER)
    async with stack.manager() as hub, stack.proxy(hub):
        new = await say(stack, "rm -rf /", expect="not allowed", chat_id=STRANGER)
        assert new == [f"Sorry, you are not allowed to use this bot (your user id: {STRANGER})."]
    assert stack.model.requests == []


async def test_use_status_and_reset(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        new = await say(stack, "/use nowhere", expect="Unknown proxy")
        assert new == ["Unknown proxy 'nowhere'. Known: proxy1, proxy2."]
        new = await say(stack, "/use proxy1", expect="now uses")
        assert new == ["This chat now uses proxy1 (online)."]
        await say(stack, "first", expect="Echo: first (turn 1)")
        await say(stack, "second", expect="Echo: second (turn 2)")
        [status] = await say(stack, "/status", expect="This chat:")
        assert "🟢 proxy1: online since " in status
        assert ", healthy, 0/2 running, 0 queued, labels: linux, codexnet" in status
        assert "⚪ proxy2: offline since " in status
        assert "This chat: pinned to proxy1; current machine: proxy1 (chosen for this chat)." in (
            status
        )
        await say(stack, "/reset", expect="new conversation")
        await say(stack, "third", expect="Echo: third (turn 1)")  # a fresh Codex thread


async def test_a_restarted_manager_continues_the_thread_and_never_reruns_old_messages(
    stack: Stack,
) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        await say(stack, "remember me", expect="Echo: remember me (turn 1)")
    asked = len(stack.model.requests)
    # Both come back (the proxy too: a thread is loaded in one app-server only).
    async with stack.manager() as hub, stack.proxy(hub):
        await say(stack, "still there?", expect="Echo: still there? (turn 2)")
    assert len(stack.model.requests) == asked + 1  # "remember me" did not run again
    assert (stack.state_dir / "codexnet.db").exists()


async def test_a_long_answer_arrives_whole_in_messages_of_at_most_4096(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        stack.telegram.push_message(USER, "[[long:10000]]")
        with trio.fail_after(60):
            await stack.telegram.wait_until(lambda: sum(len(t) for t in texts(stack)) >= 9900)
    parts = texts(stack)
    assert len(parts) >= 3
    assert all(len(p) <= 4096 for p in parts)
    # Nothing lost or reordered: only whitespace at the cuts may differ.
    assert " ".join(parts).split() == long_text(10000).split()
    assert stack.telegram.stats.too_many_requests == 0


async def test_a_model_failure_is_one_clear_line(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        [line] = await say(stack, "[[http400]]", expect="Codex failed")
    assert line.startswith("⚠️ Codex failed:")
    # It failed at once: no live view was worth showing, just the one line.
    assert statuses(stack) == []


async def test_no_proxy_online_is_explained(stack: Stack) -> None:
    async with stack.manager(proxy_wait_s=0.5):
        [line] = await say(stack, "hello", expect="No proxy is online")
        assert line == "No proxy is online right now. Start one, then try again."
        await say(stack, "/use proxy2", expect="now uses")
        [line] = await say(stack, "hello", expect="offline")
        assert line == "⚠️ proxy proxy2 is offline"


async def test_a_message_sent_while_the_proxy_connects_waits_for_it(stack: Stack) -> None:
    async with stack.manager() as hub:
        stack.telegram.push_message(USER, "early bird")
        async with stack.proxy(hub):
            with trio.fail_after(60):
                await stack.telegram.wait_until(lambda: "Echo: early bird (turn 1)" in texts(stack))
    assert texts(stack) == ["Echo: early bird (turn 1)"]


async def test_an_answer_survives_a_manager_restart_mid_task(stack: Stack) -> None:
    listen = ("127.0.0.1", free_port())
    async with stack.proxy(port=listen[1]):
        async with stack.manager(manager_ws_listen=listen) as hub:
            with trio.fail_after(60):
                await hub.hub.wait_online("proxy1")
            stack.telegram.push_message(USER, "[[slow:8]]")
            with trio.fail_after(60):
                await stack.telegram.wait_until(
                    lambda: any(
                        "tick 1" in t for ts in stack.telegram.drafts(USER).values() for t in ts
                    )
                )
        # The manager is gone mid-task; the turn goes on on the proxy.
        assert journal(stack) == ["acked"]
        async with stack.manager(manager_ws_listen=listen):
            with trio.fail_after(60):
                await stack.telegram.wait_until(lambda: any("tick 8" in t for t in texts(stack)))
    assert texts(stack)[-1] == " ".join(f"tick {i}" for i in range(1, 9))
    assert len(stack.model.requests) == 1  # answered once, not run again
    assert journal(stack) == ["done"]


async def test_a_task_cut_short_by_a_restart_of_both_is_reported_once(stack: Stack) -> None:
    listen = ("127.0.0.1", free_port())
    async with stack.manager(manager_ws_listen=listen) as hub, stack.proxy(hub):
        stack.telegram.push_message(USER, "[[slow:60]]")
        with trio.fail_after(60):
            await stack.telegram.wait_until(
                lambda: any(
                    "tick 1" in t for ts in stack.telegram.drafts(USER).values() for t in ts
                )
            )
    # Both went down mid-turn: the proxy remembers it had started the task.
    async with stack.manager(manager_ws_listen=listen) as hub, stack.proxy(hub):
        with trio.fail_after(60):
            await stack.telegram.wait_until(lambda: any("restarted" in t for t in texts(stack)))
    assert texts(stack) == [
        "⚠️ Codex failed: the proxy restarted while this turn was running, so the turn was "
        "stopped; send the message again to retry"
    ]
    assert len(stack.model.requests) == 1  # never run twice on the model
