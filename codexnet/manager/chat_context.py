"""Where a command or button press happened: the conversation (chat, topic) and who."""

from __future__ import annotations

from typing import Any

import attrs

from codexnet.manager.store import ConversationKey


@attrs.frozen
class Context:
    chat_id: int
    topic: int
    user: dict[str, Any]

    @property
    def key(self) -> ConversationKey:
        return (self.chat_id, self.topic)


def topic_of(message: dict[str, Any]) -> int:
    """The forum topic a message is in (its `message_thread_id`); 0 outside topics.

    In a forum supergroup (or a private chat with topics) `is_topic_message`
    marks a message in a topic; the General topic and plain chats are 0. A
    `message_thread_id` without it is a reply thread, not a topic.
    """
    thread_id = message.get("message_thread_id")
    if message.get("is_topic_message") and isinstance(thread_id, int):
        return thread_id
    return 0
