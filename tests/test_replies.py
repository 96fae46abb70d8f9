"""Answers into the chat: formatting, the plain fallback, splitting, the document."""

from __future__ import annotations

import pytest
import trio.testing

from codexnet.manager.replies import Replies
from codexnet.manager.telegram import TelegramClient
from tests.fakes.responses_api import MARKDOWN_SAMPLE
from tests.fakes.stack import USER
from tests.fakes.telegram_api import FakeTelegram


@pytest.fixture
def replies(tg: TelegramClient) -> Replies:
    return Replies(tg)


async def test_markdown_goes_out_as_entities(
    fake: FakeTelegram, replies: Replies, autojump_clock: trio.testing.MockClock
) -> None:
    await replies.send_answer(USER, MARKDOWN_SAMPLE)
    [message] = fake.messages(USER)
    assert "**" not in (message.text or "")
    assert {e["type"] for e in message.entities or []} >= {"bold", "italic", "pre"}


async def test_a_refused_formatted_message_is_sent_plain(
    fake: FakeTelegram, replies: Replies, autojump_clock: trio.testing.MockClock
) -> None:
    fake.fail_next(
        "sendMessage",
        error_code=400,
        description="Bad Request: can't parse entities: Can't find end of the entity",
    )
    await replies.send_answer(USER, MARKDOWN_SAMPLE)
    [message] = fake.messages(USER)
    assert not message.entities
    assert "Some bold text, some italic text and inline code." in (message.text or "")


async def test_a_long_code_block_is_reopened_in_each_part(
    fake: FakeTelegram, replies: Replies, autojump_clock: trio.testing.MockClock
) -> None:
    code = "\n".join(f"print({i})  # line {i}" for i in range(400))
    await replies.send_answer(USER, f"Here:\n\n```python\n{code}\n```\n\nDone.")
    parts = fake.messages(USER)
    assert len(parts) >= 2
    for part in parts:
        assert len(part.text or "") <= 4096
        if "print(" in (part.text or ""):
            assert any(
                e["type"] == "pre" and e.get("language") == "python" for e in part.entities or []
            )


async def test_more_than_three_parts_also_arrive_as_a_document(
    fake: FakeTelegram, replies: Replies, autojump_clock: trio.testing.MockClock
) -> None:
    answer = "\n\n".join(f"Paragraph {i}: " + "word " * 150 for i in range(30))
    await replies.send_answer(USER, answer)
    messages = fake.messages(USER)
    docs = [m.document for m in messages if m.document]
    assert len(messages) - len(docs) >= 4
    assert len(docs) == 1
    assert docs[0] is not None
    assert docs[0].filename == "answer.md"
    assert docs[0].content == answer.encode()
    assert fake.stats.too_many_requests == 0
