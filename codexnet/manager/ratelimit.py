"""Keep the bot under Telegram's flood limits before Telegram has to say so.

Two layers, both waited on before a chat-bound request goes out:

* per chat, a token bucket: private chats about one request per second with a
  small burst, groups 20 per minute (Telegram's documented limits);
* one global bucket, ~25 requests per second (Telegram allows ~30).

A 429 pauses the chat for `retry_after` seconds: nothing is sent to it inside
that window (retrying inside it is what turns a 30 s penalty into hours).
"""

from __future__ import annotations

from typing import Final

import attrs
import trio

PRIVATE_RATE: Final = 1.0  # requests per second
GROUP_RATE: Final = 20 / 60
CHAT_BURST: Final = 3.0
GLOBAL_RATE: Final = 25.0
GLOBAL_BURST: Final = 5.0


@attrs.define
class _Bucket:
    rate: float
    burst: float
    tokens: float
    stamp: float

    def ready_at(self, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return now if self.tokens >= 1 else now + (1 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1


class RateLimiter:
    def __init__(
        self,
        *,
        private_rate: float = PRIVATE_RATE,
        group_rate: float = GROUP_RATE,
        chat_burst: float = CHAT_BURST,
        global_rate: float = GLOBAL_RATE,
        global_burst: float = GLOBAL_BURST,
    ) -> None:
        self._private_rate = private_rate
        self._group_rate = group_rate
        self._chat_burst = chat_burst
        self._global = _Bucket(global_rate, global_burst, global_burst, trio.current_time())
        self._chats: dict[int, _Bucket] = {}
        self._paused_until: dict[int, float] = {}
        self._global_paused_until = 0.0

    def _bucket(self, chat_id: int) -> _Bucket:
        bucket = self._chats.get(chat_id)
        if bucket is None:
            rate = self._private_rate if chat_id > 0 else self._group_rate
            bucket = _Bucket(rate, self._chat_burst, self._chat_burst, trio.current_time())
            self._chats[chat_id] = bucket
        return bucket

    def paused_until(self, chat_id: int) -> float:
        return self._paused_until.get(chat_id, 0.0)

    def pause(self, chat_id: int | None, seconds: float) -> None:
        """Telegram said 429: nothing goes to this chat (or anywhere) for `seconds`."""
        until = trio.current_time() + seconds
        if chat_id is None:
            self._global_paused_until = max(self._global_paused_until, until)
            return
        self._paused_until[chat_id] = max(self.paused_until(chat_id), until)

    async def acquire(self, chat_id: int | None, *, counts: bool = True) -> None:
        """Wait until a request to `chat_id` (None: not chat-bound) may go out; book it.

        A paused chat gets nothing at all inside its window, chat actions
        included; only requests that `counts` (messages, edits) use its bucket.
        """
        while True:
            now = trio.current_time()
            at = max(self._global.ready_at(now), self._global_paused_until)
            if chat_id is not None:
                at = max(at, self.paused_until(chat_id))
                if counts:
                    at = max(at, self._bucket(chat_id).ready_at(now))
            if at <= now:
                self._global.take()
                if chat_id is not None and counts:
                    self._bucket(chat_id).take()
                return
            await trio.sleep_until(at)
