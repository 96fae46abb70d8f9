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

Forum topics: every send takes the conversation's `topic` (its
`message_thread_id`; 0 outside topics). When Telegram answers "message thread
not found" (the topic was deleted) the message goes to the chat's General
topic instead, once logged: an answer is worth more than its place.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any, Final, NamedTuple

import trio

from codexnet.manager.outbox import Abandoned, BeforeRequest, Outbox, Priority
from codexnet.manager.render import Chunk, render_markdown, render_plain_parts, split_chunk
from codexnet.manager.telegram import TelegramError

log = logging.getLogger(__name__)

DOCUMENT_AFTER_PARTS: Final = 3
REPLY_RETRY_S: Final = 300.0  # command replies are worth a few minutes of retrying, not more


def in_topic(topic: int) -> dict[str, Any]:
    """The send parameter that puts a message into forum topic `topic` (0: none)."""
    return {"message_thread_id": topic} if topic else {}


def thread_gone(exc: TelegramError) -> bool:
    return exc.code == 400 and exc.matches("message thread not found")


def answer_parts(markdown: str) -> list[Chunk]:
    """The messages an answer becomes (deterministic: a restart resumes at the same part)."""
    return split_chunk(render_markdown(markdown)) or [Chunk("(empty)")]


def plain_parts(text: str) -> list[Chunk]:
    return [Chunk(part) for part in render_plain_parts(text)] or [Chunk("(empty)")]


class _Post(NamedTuple):
    topic: int
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
        topic: int = 0,
        priority: Priority = Priority.ANSWER,
        until: float | None = None,
        reply_markup: dict[str, Any] | None = None,
    ) -> int | None:
        """Send one message; its id, or None if Telegram refused it for good (logged)."""
        sent = await self._send(
            chat_id, topic, part, priority, until, reply_markup, abandonable=False
        )
        assert not isinstance(sent, Abandoned)
        return sent

    async def send_answer_part(
        self,
        chat_id: int,
        part: Chunk,
        *,
        topic: int = 0,
        until: float | None,
        reply_markup: dict[str, Any] | None = None,
        before_request: BeforeRequest | None = None,
    ) -> int | Abandoned | None:
        """`send_part` for a part of an answer: `ABANDONED` if shutdown came before it
        went. `before_request`: see `Outbox.send`."""
        return await self._send(
            chat_id,
            topic,
            part,
            Priority.ANSWER,
            until,
            reply_markup,
            abandonable=True,
            before_request=before_request,
        )

    async def _send(
        self,
        chat_id: int,
        topic: int,
        part: Chunk,
        priority: Priority,
        until: float | None,
        reply_markup: dict[str, Any] | None,
        *,
        abandonable: bool,
        before_request: BeforeRequest | None = None,
    ) -> int | Abandoned | None:
        params: dict[str, Any] = {
            "chat_id": chat_id,
            **in_topic(topic),
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
                before_request=before_request,
            )
        except TelegramError as exc:
            if topic and thread_gone(exc):
                log.warning("chat %s: topic %s is gone; sending to the chat", chat_id, topic)
                return await self._send(
                    chat_id,
                    0,
                    part,
                    priority,
                    until,
                    reply_markup,
                    abandonable=abandonable,
                    before_request=before_request,
                )
            if part.entities and exc.code == 400:
                # Formatting refused (entities out of range, too many, …): the words matter more.
                log.warning(
                    "chat %s: formatted message refused (%s); sending it plain",
                    chat_id,
                    exc.description,
                )
                plain = Chunk(part.text)
                return await self._send(
                    chat_id,
                    topic,
                    plain,
                    priority,
                    until,
                    reply_markup,
                    abandonable=abandonable,
                    before_request=before_request,
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
        topic: int = 0,
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
                chat_id, part, topic=topic, priority=priority, until=until, reply_markup=markup
            )
        return message_id

    def post(
        self,
        chat_id: int,
        text: str,
        *,
        topic: int = 0,
        reply_markup: dict[str, Any] | None = None,
        priority: Priority = Priority.REPLY,
    ) -> None:
        """`send_text` in the background: the caller never waits for Telegram.

        A chat's posts go out in the order they were made (one sender per chat).
        """
        assert self.nursery is not None, "Replies.post before the bot runs"
        post = _Post(topic, text, reply_markup, priority)
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
                topic, text, reply_markup, priority = queue[0]
                try:
                    await self.send_text(
                        chat_id, text, topic=topic, reply_markup=reply_markup, priority=priority
                    )
                except TelegramError as exc:
                    log.warning("chat %s: a reply was not delivered: %s", chat_id, exc.description)
                queue.popleft()
        finally:
            del self._posts[chat_id]

    async def send_document(
        self,
        chat_id: int,
        name: str,
        data: bytes | Path,
        caption: str,
        *,
        topic: int = 0,
        until: float | None,
        mime_type: str = "text/markdown",
        priority: Priority = Priority.ANSWER,
        reply_markup: dict[str, Any] | None = None,
    ) -> bool:
        """Send a document (bytes, or a file streamed from disk); False if refused (logged)."""
        params: dict[str, Any] = {
            "chat_id": chat_id,
            **in_topic(topic),
            "caption": caption,
            "reply_markup": reply_markup,
        }
        try:
            await self.outbox.send(
                "sendDocument",
                params,
                priority=priority,
                until=until,
                files={"document": (name, data, mime_type)},
            )
        except TelegramError as exc:
            if topic and thread_gone(exc):
                log.warning("chat %s: topic %s is gone; sending to the chat", chat_id, topic)
                return await self.send_document(
                    chat_id,
                    name,
                    data,
                    caption,
                    until=until,
                    mime_type=mime_type,
                    priority=priority,
                    reply_markup=reply_markup,
                )
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
