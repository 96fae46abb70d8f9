"""A small Bot API client on httpx, with Telegram's failure modes handled once.

* 429: the chat (or the whole bot, for requests not bound to a chat) is paused
  for `retry_after` in the rate limiter, then the request is retried; no
  request to that chat goes out inside the window.
* 5xx and network errors: retried with capped exponential backoff.
* 401, and 404 for the token path: `TelegramFatal` — the token is wrong and
  retrying cannot help. 409 on getUpdates: `TelegramFatal` too (another
  instance polls with this token, or a webhook is set).
* "message is not modified" is success: the message already shows that text.
* everything else: `TelegramError` with Telegram's own description.

The token is part of every URL, so URLs are never logged or put in exception
messages here; httpx's own loggers are kept at WARNING by `codexnet.logs`.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Final

import httpx
import trio

from codexnet.backoff import backoff
from codexnet.manager.ratelimit import RateLimiter

log = logging.getLogger(__name__)

RETRY_BACKOFF_S: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
MAX_ATTEMPTS: Final = 6
# Methods that put something into a chat: these count against flood limits.
CHAT_LIMITED: Final = frozenset(
    {
        "sendMessage",
        "editMessageText",
        "editMessageReplyMarkup",
        "sendDocument",
        "sendMessageDraft",
        "deleteMessage",
    }
)


# reply_markup that removes a message's inline buttons.
NO_KEYBOARD: Final[dict[str, Any]] = {"inline_keyboard": []}


class TelegramError(Exception):
    def __init__(self, method: str, code: int, description: str) -> None:
        super().__init__(f"{method}: {code} {description}")
        self.method = method
        self.code = code
        self.description = description

    def matches(self, fragment: str) -> bool:
        return fragment.lower() in self.description.lower()


class TelegramFatal(TelegramError):
    """Retrying cannot help: bad token, or another poller/webhook owns the updates."""


class TelegramClient:
    def __init__(
        self,
        http: httpx.AsyncClient,
        api_base: str,
        token: str,
        *,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._http = http
        self._base = f"{api_base.rstrip('/')}/bot{token}"
        self.limiter = limiter if limiter is not None else RateLimiter()
        self.stats: dict[str, int] = {"requests": 0, "retry_after": 0, "server_errors": 0}

    def __repr__(self) -> str:
        return "TelegramClient(<token hidden>)"

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        files: dict[str, tuple[str, bytes, str]] | None = None,
        read_timeout: float = 30.0,
        attempts: int = MAX_ATTEMPTS,
    ) -> Any:
        """Call `method`; return its `result`. See the module doc for error handling."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        chat_id = params.get("chat_id")
        chat_id = chat_id if isinstance(chat_id, int) else None
        counts = method in CHAT_LIMITED
        for attempt in range(attempts):
            await self.limiter.acquire(chat_id, counts=counts)
            try:
                status, body = await self._post(method, params, files, read_timeout)
            except httpx.TransportError as exc:
                # str(exc) of httpx errors does not carry the URL; the type says enough.
                failure = f"network error ({type(exc).__name__})"
            else:
                if body.get("ok"):
                    return body.get("result")
                description = str(body.get("description", f"HTTP {status}"))
                code = int(body.get("error_code", status))
                retry_after = (body.get("parameters") or {}).get("retry_after")
                if code == 429 and isinstance(retry_after, int | float):
                    self.stats["retry_after"] += 1
                    log.warning(
                        "Telegram 429 on %s: pausing %s for %s s",
                        method,
                        f"chat {chat_id}" if chat_id else "the bot",
                        retry_after,
                    )
                    self.limiter.pause(chat_id, float(retry_after) + 0.1)
                    continue
                if code == 400 and "message is not modified" in description:
                    return None
                if code == 401 or (code == 404 and "method not found" not in description):
                    raise TelegramFatal(method, code, f"{description} (is the bot token right?)")
                if code == 409:
                    raise TelegramFatal(method, code, description)
                if code < 500:
                    raise TelegramError(method, code, description)
                self.stats["server_errors"] += 1
                failure = f"{code} {description}"
            if attempt + 1 >= attempts:
                raise TelegramError(method, 0, f"giving up after {attempts} attempts: {failure}")
            delay = backoff(RETRY_BACKOFF_S, attempt)
            log.warning("Telegram %s failed (%s); retrying in %.0f s", method, failure, delay)
            await trio.sleep(delay)
        raise TelegramError(method, 429, "still rate limited after retries")

    async def toast(self, query: dict[str, Any], text: str) -> None:
        """Answer a button press with a short notice; best effort.

        Telegram shows a spinner on the button until it is answered, and a
        callback query older than ~15 s can no longer be answered at all, so a
        failure here is logged, never raised.
        """
        try:
            await self.call(
                "answerCallbackQuery",
                {"callback_query_id": query["id"], "text": text},
                attempts=2,
            )
        except TelegramError as exc:
            log.info("could not answer a button press: %s", exc.description)

    async def _post(
        self,
        method: str,
        params: dict[str, Any],
        files: dict[str, tuple[str, bytes, str]] | None,
        read_timeout: float,
    ) -> tuple[int, dict[str, Any]]:
        self.stats["requests"] += 1
        timeout = httpx.Timeout(10.0, read=read_timeout)
        url = f"{self._base}/{method}"
        if files:
            # Multipart: nested values (reply_markup, entities) travel as JSON strings.
            form = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
            response = await self._http.post(url, data=form, files=files, timeout=timeout)
        else:
            response = await self._http.post(url, json=params, timeout=timeout)
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        body.setdefault("error_code", response.status_code)
        return response.status_code, body
