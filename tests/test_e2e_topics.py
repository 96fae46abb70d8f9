"""End to end: forum topics are conversations of their own.

Fake Telegram over HTTP → manager → proxy → real codex → fake model. A forum
supergroup with two topics: each has its own Codex thread and machine choice,
and everything the bot sends for a topic lands in that topic.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.fakes.stack import USER, Stack, open_stack
from tests.fakes.telegram_api import StoredMessage

pytestmark = pytest.mark.e2e

FORUM = -1001234567890


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path) as stack:
        stack.telegram.add_chat(FORUM, is_forum=True, title="team")
        yield stack


def in_topic(stack: Stack, topic: int | None) -> list[StoredMessage]:
    return [m for m in stack.telegram.messages(FORUM) if m.message_thread_id == topic]


async def say(stack: Stack, topic: int | None, text: str, *, expect: str) -> str:
    """Write `text` in `topic` as the allowed user; the bot message in that topic with `expect`."""
    before = {m.message_id for m in stack.telegram.messages(FORUM)}
    stack.telegram.push_message(FORUM, text, user_id=USER, message_thread_id=topic)

    def found() -> list[StoredMessage]:
        return [
            m
            for m in stack.telegram.messages(FORUM)
            if m.message_id not in before and expect in (m.text or "")
        ]

    with trio.fail_after(60):
        await stack.telegram.wait_until(lambda: bool(found()))
    [message] = found()
    assert message.message_thread_id == topic, f"{message.text!r} went to the wrong topic"
    return message.text or ""


async def test_each_topic_is_its_own_conversation_and_gets_its_own_replies(stack: Stack) -> None:
    backend = stack.telegram.create_topic(FORUM, "backend")
    frontend = stack.telegram.create_topic(FORUM, "frontend")
    async with stack.manager() as hub, stack.proxy(hub):
        assert await say(stack, backend, "hello", expect="Echo") == "Echo: hello (turn 1)"
        # Another topic: a Codex thread of its own.
        assert await say(stack, frontend, "hi", expect="Echo") == "Echo: hi (turn 1)"
        assert await say(stack, backend, "again", expect="Echo") == "Echo: again (turn 2)"
        # The General topic is the chat as before: a conversation of its own too.
        assert await say(stack, None, "general", expect="Echo") == "Echo: general (turn 1)"
        # /use in a topic is that topic's choice only.
        await say(stack, frontend, "/use proxy2", expect="now uses proxy2")
        status = await say(stack, frontend, "/status", expect="This chat uses")
        assert "This chat uses proxy2 (chosen for this chat)." in status
        status = await say(stack, backend, "/status", expect="This chat uses")
        assert "This chat uses proxy1 (chosen for this chat)." in status
        # A slow one: its status message, its edits and its typing are in the topic.
        before = len(stack.telegram.chat_actions(FORUM))
        await say(stack, backend, "[[slow:6]]", expect="tick 6")
        # A document sent in a topic is answered there, and /get sends files to the topic.
        stack.telegram.push_document(
            FORUM, b"a,b\n", file_name="t.csv", user_id=USER, message_thread_id=backend
        )
        with trio.fail_after(60):
            await stack.telegram.wait_until(
                lambda: any(
                    "📎 telegram-files/t.csv" in (m.text or "") for m in in_topic(stack, backend)
                )
            )
        stack.telegram.push_message(
            FORUM, "/get telegram-files/t.csv", user_id=USER, message_thread_id=backend
        )
        with trio.fail_after(60):
            await stack.telegram.wait_until(
                lambda: any(m.document for m in stack.telegram.messages(FORUM))
            )
    [sent] = [m for m in stack.telegram.messages(FORUM) if m.document]
    assert sent.message_thread_id == backend
    assert sent.document is not None
    assert sent.document.content == b"a,b\n"
    views = [m for m in stack.telegram.messages(FORUM) if (m.text or "").startswith("✅ Done")]
    assert views
    assert {m.message_thread_id for m in views} == {backend}
    actions = stack.telegram.chat_actions(FORUM)[before:]
    assert actions
    assert {a.message_thread_id for a in actions} == {backend}
    assert stack.telegram.stats.too_many_requests == 0


async def test_an_answer_for_a_deleted_topic_arrives_in_the_chat(stack: Stack) -> None:
    doomed = stack.telegram.create_topic(FORUM, "doomed")
    async with stack.manager() as hub, stack.proxy(hub):
        stack.telegram.push_message(FORUM, "[[slow:4]]", user_id=USER, message_thread_id=doomed)
        with trio.fail_after(60):
            await stack.telegram.wait_until(lambda: bool(in_topic(stack, doomed)))
        stack.telegram.delete_topic(FORUM, doomed)
        with trio.fail_after(60):
            await stack.telegram.wait_until(
                lambda: any("tick 4" in (m.text or "") for m in in_topic(stack, None))
            )
    refused = stack.telegram.calls(
        "sendMessage", lambda r: r.description == "Bad Request: message thread not found"
    )
    assert refused  # Telegram said so, and the answer still arrived
