"""Sending text into a chat through the outbox: formatted, split, never lost.

* `send_part`: one part of an answer, retried until its deadline, checked
  before it is sent again when its fate is unknown (see `outbox.py`). If
  Telegram refuses the formatting (entities), the same part goes out plain.
* `post`: a reply to a command or a notice, sent in the background (the update
  handler never waits for Telegram); retried for a few minutes.
* `toast`: the answer to a button press (`answerCallbackQuery`). Telegram shows
  a spinner on the button until it comes, and a press older than ~15 s cannot
  be answered at all: it goes straight out, outside the chats' lanes.

The agent's Markdown goes out as text plus explicit entities (no parse_mode,
so nothing can fail to parse). An answer longer than `DOCUMENT_AFTER_PARTS`
messages also arrives as an `answer.md` document, easier to read and keep.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Final, NamedTuple

import trio

from codexnet.manager.outbox import Abandoned, Outbox, Priority
from codexnet.manager.render import Chunk, render_markdown, render_plain_parts, split_chunk
from codexnet.manager.telegram import TelegramError

log = logging.getLogger(__name__)

DOCUMENT_AFTER_PARTS: Final = 3
REPLY_RETRY_S: Final = 300.0  # command replies are worth a few minutes of retrying, not more


def answer_parts(markdown: str) -> list[Chunk]:
    """The messages an answer becomes (deterministic: a restart resumes at the same part)."""
    return split_chunk(render_markdown(markdown)) or [Chunk("(empty)")]


def plain_parts(text: str) -> list[Chunk]:
    return [Chunk(part) for part in render_plain_parts(text)] or [Chunk("(empty)")]


class _Post(NamedTuple):
    text: str
    reply_markup: dict[str, Any] | None
    priority: Priority


class Replies:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.nursery: trio.Nursery | None = None  # for `post`; set when the bot runs
        self._posts: dict[int, collections.deque[_Post]] = {}

    async def send_part(
        self,
        chat_id: int,
        part: Chunk,
        *,
        priority: Priority = Priority.ANSWER,
        until: float | None = None,
        reply_markup: dict[str, Any] | None = None,
    ) -> int | None:
        """Send one message; its id, or None if Telegram refused it for good (logged)."""
        sent = await self._send(chat_id, part, priority, until, reply_markup, abandonable=False)
        assert not isinstance(sent, Abandoned)
        return sent

    async def send_answer_part(
        self, chat_id: int, part: Chunk, *, until: float | None
    ) -> int | Abandoned | None:
        """`send_part` for a part of an answer: `ABANDONED` if shutdown came before it went."""
        return await self._send(chat_id, part, Priority.ANSWER, until, None, abandonable=True)

    async def _send(
        self,
        chat_id: int,
        part: Chunk,
        priority: Priority,
        until: float | None,
        reply_markup: dict[str, Any] | None,
        *,
        abandonable: bool,
    ) -> int | Abandoned | None:
        params: dict[str, Any] = {
            "chat_id": chat_id,
            "text": part.text,
            "reply_markup": reply_markup,
        }
        if part.entities:
            params["entities"] = list(part.entities)
        try:
            message = await self.outbox.send(
                "sendMessage",
                params,
                priority=priority,
                until=until,
                on_unknown="probe",
                abandonable=abandonable,
            )
        except TelegramError as exc:
            if part.entities and exc.code == 400:
                # Formatting refused (entities out of range, too many, …): the words matter more.
                log.warning(
                    "chat %s: formatted message refused (%s); sending it plain",
                    chat_id,
                    exc.description,
                )
                plain = Chunk(part.text)
                return await self._send(
                    chat_id, plain, priority, until, reply_markup, abandonable=abandonable
                )
            log.error("could not send a message to chat %s: %s", chat_id, exc.description)
            return None
        if isinstance(message, Abandoned):
            return message
        message_id = message.get("message_id") if isinstance(message, dict) else None
        return message_id if isinstance(message_id, int) else None

    async def send_text(
        self,
        chat_id: int,
        text: str,
        *,
        reply_markup: dict[str, Any] | None = None,
        priority: Priority = Priority.REPLY,
        until: float | None = None,
    ) -> int | None:
        """Send plain `text` in as many messages as needed; the id of the last one."""
        if until is None:
            until = trio.current_time() + REPLY_RETRY_S
        parts = plain_parts(text)
        message_id = None
        for index, part in enumerate(parts):
            markup = reply_markup if index == len(parts) - 1 else None
            message_id = await self.send_part(
                chat_id, part, priority=priority, until=until, reply_markup=markup
            )
        return message_id

    def post(
        self,
        chat_id: int,
        text: str,
        *,
        reply_markup: dict[str, Any] | None = None,
        priority: Priority = Priority.REPLY,
    ) -> None:
        """`send_text` in the background: the caller never waits for Telegram.

        A chat's posts go out in the order they were made (one sender per chat).
        """
        assert self.nursery is not None, "Replies.post before the bot runs"
        post = _Post(text, reply_markup, priority)
        queue = self._posts.get(chat_id)
        if queue is not None:
            queue.append(post)
            return
        self._posts[chat_id] = collections.deque([post])
        self.nursery.start_soon(self._drain_posts, chat_id)

    async def _drain_posts(self, chat_id: int) -> None:
        queue = self._posts[chat_id]
        try:
            while queue:
                text, reply_markup, priority = queue[0]
                try:
                    await self.send_text(
                        chat_id, text, reply_markup=reply_markup, priority=priority
                    )
                except TelegramError as exc:
                    log.warning("chat %s: a reply was not delivered: %s", chat_id, exc.description)
                queue.popleft()
        finally:
            del self._posts[chat_id]

    async def send_document(
        self, chat_id: int, name: str, data: bytes, caption: str, *, until: float | None
    ) -> bool:
        try:
            await self.outbox.send(
                "sendDocument",
                {"chat_id": chat_id, "caption": caption},
                priority=Priority.ANSWER,
                until=until,
                files={"document": (name, data, "text/markdown")},
            )
        except TelegramError as exc:
            log.error("could not send %s to chat %s: %s", name, chat_id, exc.description)
            return False
        return True

    def toast(self, query: dict[str, Any], text: str) -> None:
        """Answer a button press with a short notice, at once and in the background."""
        assert self.nursery is not None
        self.nursery.start_soon(self._toast, query, text)

    async def _toast(self, query: dict[str, Any], text: str) -> None:
        try:
            await self.outbox.client.call(
                "answerCallbackQuery",
                {"callback_query_id": query["id"], "text": text},
                attempts=2,
            )
        except TelegramError as exc:
            log.info("could not answer a button press: %s", exc.description)
