"""A small Bot API client on httpx: one request, and Telegram's answer classified.

`request` makes exactly one attempt and says what happened in the exception's
type, because what may be retried depends on it:

* `RetryAfter` (429): nothing happened; wait `retry_after`, then it may go again.
* `TelegramUnavailable` with `fate="not_sent"`: the request surely did not take
  effect (connection refused, DNS, TLS, a write that failed, a 5xx answer):
  retrying is always safe.
* `TelegramUnavailable` with `fate="unknown"`: the request was written and the
  connection broke before the answer (read error or timeout, the server hung
  up): Telegram may or may not have acted on it. The Bot API has no
  idempotency key; the outbox decides (docs/ARCHITECTURE.md, "sends whose fate
  is unknown").
* `TelegramFatal` (401, 404 for the token path): the token is wrong.
* `TelegramConflict` (409): another poller or a webhook owns the updates.
* `TelegramError`: Telegram refused this request (4xx) with its own description.

`call` adds a short retry loop for the calls that are not bound to a chat
(`getMe`, `setMyCommands`, `answerCallbackQuery`); messages to chats go
through `codexnet.manager.outbox`, which owns flood limits and delivery.

The token is part of every URL, so URLs are never logged or put in exception
messages here; httpx's own loggers are kept at WARNING by `codexnet.logs`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

import httpx
import trio

from codexnet.backoff import backoff
from codexnet.ratelog import Throttle
from codexnet.resource_errors import resource_problem

log = logging.getLogger(__name__)
_throttled = Throttle()

RETRY_BACKOFF_S: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
MAX_ATTEMPTS: Final = 6

# multipart uploads: field → (file name, bytes or a file on disk, MIME type)
UploadFiles = dict[str, tuple[str, bytes | Path, str]]

# reply_markup that removes a message's inline buttons.
NO_KEYBOARD: Final[dict[str, Any]] = {"inline_keyboard": []}

# httpx errors raised before the request could have reached Telegram.
_NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.WriteError)
_NOT_SENT_TIMEOUTS: Final = (httpx.WriteTimeout,)


class TelegramError(Exception):
    def __init__(self, method: str, code: int, description: str) -> None:
        super().__init__(f"{method}: {code} {description}")
        self.method = method
        self.code = code
        self.description = description

    def matches(self, fragment: str) -> bool:
        return fragment.lower() in self.description.lower()


class TelegramFatal(TelegramError):
    """Retrying cannot help: the bot token is wrong."""


class TelegramConflict(TelegramError):
    """409: another instance polls with this token, or a webhook is set."""


class RetryAfter(TelegramError):
    def __init__(self, method: str, description: str, retry_after: float) -> None:
        super().__init__(method, 429, description)
        self.retry_after = retry_after


class TelegramUnavailable(TelegramError):
    """No answer from Telegram (network or 5xx); `fate` says whether it may have acted.

    `resource`: the request failed because this process ran out of something
    (file descriptors, memory), not because of the network: the description
    says which, and the callers log it once a minute.
    """

    def __init__(
        self,
        method: str,
        description: str,
        fate: Literal["not_sent", "unknown"],
        *,
        resource: bool = False,
    ):
        super().__init__(method, 0, description)
        self.fate = fate
        self.resource = resource


def _unavailable(
    method: str, exc: BaseException, fate: Literal["not_sent", "unknown"], what: str
) -> TelegramUnavailable:
    """The classified error; with no descriptor left, say that rather than what it caused
    (a DNS lookup that cannot open /etc/hosts reports "Name or service not known")."""
    problem = resource_problem(exc)
    if problem is not None:
        return TelegramUnavailable(
            method, f"{what} ({type(exc).__name__}: {problem})", fate, resource=True
        )
    # str(exc) of httpx errors does not carry the URL; the type says enough.
    return TelegramUnavailable(method, f"{what} ({type(exc).__name__})", fate)


def log_unavailable(
    logger: logging.Logger, exc: TelegramUnavailable, msg: str, *args: object
) -> None:
    """A warning for a failed request; once a minute when a resource ran out."""
    if exc.resource:
        _throttled.log(logger, logging.WARNING, "resource", msg, *args)
    else:
        logger.warning(msg, *args)


class TelegramClient:
    def __init__(self, http: httpx.AsyncClient, api_base: str, token: str) -> None:
        self._http = http
        self._base = f"{api_base.rstrip('/')}/bot{token}"
        self._files = f"{api_base.rstrip('/')}/file/bot{token}"
        self.stats: dict[str, int] = {
            "requests": 0,
            "retry_after": 0,
            "server_errors": 0,
            "network_errors": 0,
        }
        self._success = trio.Event()

    def __repr__(self) -> str:
        return "TelegramClient(<token hidden>)"

    def file_url(self, file_path: str) -> str:
        """Where getFile's `file_path` is downloaded (it holds the token: never log it)."""
        return f"{self._files}/{file_path}"

    async def wait_success(self) -> None:
        """Return at the next request that Telegram answers (it is reachable again)."""
        await self._success.wait()

    async def request(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        files: UploadFiles | None = None,
        read_timeout: float = 30.0,
    ) -> Any:
        """One attempt at `method`; its `result`, or a classified `TelegramError`.

        A file given as a `Path` is streamed from disk (opened anew for each
        attempt), so a 50 MB document never sits in memory.
        """
        params = {k: v for k, v in (params or {}).items() if v is not None}
        self.stats["requests"] += 1
        try:
            status, body = await self._post(method, params, files, read_timeout)
        except (*_NOT_SENT, *_NOT_SENT_TIMEOUTS) as exc:
            self.stats["network_errors"] += 1
            raise _unavailable(method, exc, "not_sent", "network error") from None
        except httpx.TransportError as exc:
            self.stats["network_errors"] += 1
            raise _unavailable(
                method, exc, "unknown", "connection lost before the answer"
            ) from None
        except OSError as exc:
            # Not mapped by httpx (its own mapping covers the socket calls): where
            # it came from is not known, so neither is whether Telegram got it.
            self.stats["network_errors"] += 1
            raise _unavailable(method, exc, "unknown", "local error") from None
        self._success.set()
        self._success = trio.Event()
        if body.get("ok"):
            return body.get("result")
        description = str(body.get("description") or f"HTTP {status}")
        code = int(body.get("error_code") or status)
        retry_after = (body.get("parameters") or {}).get("retry_after")
        if code == 429 and isinstance(retry_after, int | float):
            self.stats["retry_after"] += 1
            raise RetryAfter(method, description, float(retry_after))
        if code == 401 or (code == 404 and "method not found" not in description):
            raise TelegramFatal(method, code, f"{description} (is the bot token right?)")
        if code == 409:
            raise TelegramConflict(method, code, description)
        if code >= 500 or code == 429:
            self.stats["server_errors"] += 1
            raise TelegramUnavailable(method, f"{code} {description}", "not_sent")
        raise TelegramError(method, code, description)

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        read_timeout: float = 30.0,
        attempts: int = MAX_ATTEMPTS,
    ) -> Any:
        """`request` retried on 429, network errors and 5xx (`attempts` in all).

        For requests whose repetition is harmless. "message is not modified"
        is success: the message already shows that text.
        """
        for attempt in range(attempts):
            try:
                return await self.request(method, params, read_timeout=read_timeout)
            except RetryAfter as exc:
                if attempt + 1 >= attempts:
                    raise
                log.warning("Telegram 429 on %s: waiting %s s", method, exc.retry_after)
                await trio.sleep(exc.retry_after)
            except TelegramUnavailable as exc:
                if attempt + 1 >= attempts:
                    raise
                delay = backoff(RETRY_BACKOFF_S, attempt)
                log_unavailable(
                    log,
                    exc,
                    "Telegram %s failed (%s); retrying in %.0f s",
                    method,
                    exc.description,
                    delay,
                )
                await trio.sleep(delay)
            except TelegramError as exc:
                if exc.code == 400 and exc.matches("message is not modified"):
                    return None
                raise
        raise AssertionError("unreachable")

    async def _post(
        self,
        method: str,
        params: dict[str, Any],
        files: UploadFiles | None,
        read_timeout: float,
    ) -> tuple[int, dict[str, Any]]:
        timeout = httpx.Timeout(10.0, read=read_timeout)
        url = f"{self._base}/{method}"
        if files:
            # Multipart: nested values (reply_markup, entities) travel as JSON strings.
            form = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
            with contextlib.ExitStack() as opened:
                upload: dict[str, tuple[str, bytes | BinaryIO, str]] = {}
                for field, (name, data, mime) in files.items():
                    if isinstance(data, Path):
                        handle = await trio.to_thread.run_sync(data.open, "rb")
                        opened.callback(handle.close)
                        upload[field] = (name, handle, mime)
                    else:
                        upload[field] = (name, data, mime)
                response = await self._http.post(url, data=form, files=upload, timeout=timeout)
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
