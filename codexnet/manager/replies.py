"""Sending text into a chat: formatted, split at 4096 characters, never lost.

The agent's Markdown goes out as text plus explicit entities (no parse_mode,
so nothing can fail to parse); if Telegram still refuses a formatted part,
the same part goes out plain. An answer longer than `DOCUMENT_AFTER_PARTS`
messages also arrives as an `answer.md` document, easier to read and keep.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from codexnet.manager.render import Chunk, render_markdown, render_plain_parts, split_chunk
from codexnet.manager.telegram import TelegramClient, TelegramError

log = logging.getLogger(__name__)

DOCUMENT_AFTER_PARTS: Final = 3


class Replies:
    def __init__(self, tg: TelegramClient) -> None:
        self.tg = tg

    async def send_text(
        self, chat_id: int, text: str, *, reply_markup: dict[str, Any] | None = None
    ) -> int | None:
        """Send plain `text` in as many messages as needed; the id of the last one."""
        parts = render_plain_parts(text) or ["(empty)"]
        message_id = None
        for index, part in enumerate(parts):
            markup = reply_markup if index == len(parts) - 1 else None
            message_id = await self._send(chat_id, Chunk(part), markup)
        return message_id

    async def send_answer(self, chat_id: int, markdown: str) -> None:
        """Send the agent's Markdown rendered as Telegram formatting."""
        parts = split_chunk(render_markdown(markdown)) or [Chunk("(empty)")]
        for part in parts:
            await self._send(chat_id, part, None)
        if len(parts) > DOCUMENT_AFTER_PARTS:
            await self._send_document(chat_id, markdown, len(parts))

    async def _send(self, chat_id: int, part: Chunk, markup: dict[str, Any] | None) -> int | None:
        params: dict[str, Any] = {"chat_id": chat_id, "text": part.text, "reply_markup": markup}
        if part.entities:
            params["entities"] = list(part.entities)
        try:
            message = await self.tg.call("sendMessage", params)
        except TelegramError as exc:
            if not (part.entities and exc.code == 400):
                log.error("could not send a message to chat %s: %s", chat_id, exc.description)
                return None
            # Formatting refused (entities out of range, too many, …): the words matter more.
            log.warning(
                "chat %s: formatted message refused (%s); sending it plain",
                chat_id,
                exc.description,
            )
            return await self._send(chat_id, Chunk(part.text), markup)
        return message.get("message_id") if isinstance(message, dict) else None

    async def _send_document(self, chat_id: int, markdown: str, parts: int) -> None:
        try:
            await self.tg.call(
                "sendDocument",
                {"chat_id": chat_id, "caption": f"The whole answer ({parts} messages above)."},
                files={"document": ("answer.md", markdown.encode(), "text/markdown")},
            )
        except TelegramError as exc:
            log.error("could not send the answer document to chat %s: %s", chat_id, exc.description)
