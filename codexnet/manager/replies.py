"""Sending text into a chat: split at Telegram's 4096-character limit, never lost.

A message Telegram refuses for its formatting goes out again as plain text, so
the person always gets the answer.
"""

from __future__ import annotations

import logging
from typing import Any

from codexnet.manager.render import render_plain_parts
from codexnet.manager.telegram import TelegramClient, TelegramError

log = logging.getLogger(__name__)


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
            try:
                message = await self.tg.call(
                    "sendMessage", {"chat_id": chat_id, "text": part, "reply_markup": markup}
                )
            except TelegramError as exc:
                log.error("could not send a message to chat %s: %s", chat_id, exc.description)
                return None
            message_id = message.get("message_id") if isinstance(message, dict) else None
        return message_id
