"""A fake Telegram Bot API server for end-to-end tests of the bot.

The fake speaks real HTTP on 127.0.0.1 (`FakeTelegram.serve`) or in-process
through `httpx.MockTransport` (`FakeTelegram.transport`, for tests that run on
`trio.testing.MockClock`). It enforces the limits and exact error strings of
the real service (see /work/shared/notes/telegram-bot-api.md §1-§3, §7.4) so
that a bot that passes against the fake behaves against api.telegram.org.

Deliberate simplifications (the real server is the reference):

* Text is trimmed like TDLib: leading spaces/newlines before the first entity
  and trailing ASCII whitespace are removed; entity offsets are shifted and
  clipped accordingly. Automatic entity detection (urls, mentions) is not done.
* ``parse_mode="HTML"`` is parsed (supported tags only, errors as TDLib words
  them). ``Markdown``/``MarkdownV2`` text is stored literally; it is only
  checked for unbalanced markers (and, for V2, unescaped ``>#+-={}.!``).
* Rate limits: per-chat and global token buckets for message-producing methods;
  a chat that got a 429 is penalised until ``retry_after`` has passed, and every
  request inside that window gets another 429 and extends the window by
  ``penalty_extension`` seconds. Only requests that pass validation consume
  tokens. The 3 s throttling of tight getUpdates loops and of repeated 409s is
  not modelled.
* ``allowed_updates`` is applied when an update is pushed (like the real server,
  which does not store unwanted updates), not when it is delivered.

Faults, for tests of what the bot does when Telegram misbehaves (each works
over HTTP and in memory):

* ``fail_next(method, error_code=…)``: the next calls fail (429 with
  ``retry_after``, 5xx, raw ``NGINX_502_HTML``); ``delay_next``: answered late.
* ``drop_next(method)``: the connection is closed before the request is
  processed (nothing happened). ``drop_after_next(method)``: the request takes
  effect (the message is in the chat), then the connection is closed without
  an answer: the bot cannot know whether it was posted.
* ``fail_all(502)`` … ``stop_failing()``: every request fails ("Telegram
  answering 5xx for minutes").
* ``await go_down()`` … ``await come_up()``: unreachable. Over HTTP the port
  stops listening (connection refused) and every open connection, a pending
  long poll included, is closed; then it listens on the same port again. In
  memory requests raise ``httpx.ConnectError`` and those in flight
  ``httpx.RemoteProtocolError``.

``requests`` records every request that reached the fake, with ``dropped``
telling an answer that was never sent ("before"/"after" processing, "down")
and ``processed_status`` what the fake did; ``count_messages(chat_id, text)``
counts what the person sees.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, unquote

import attrs
import httpx
import trio

from .httpserver import HttpServer, Request, Response

# --------------------------------------------------------------------------------------
# Limits and exact error strings
# --------------------------------------------------------------------------------------

MAX_TEXT_LENGTH = 4096  # code points, after parsing and trimming
MAX_CAPTION_LENGTH = 1024
MAX_RAW_TEXT_BYTES = 1 << 15
MAX_CALLBACK_DATA_BYTES = 64
MAX_DOCUMENT_BYTES = 50 * 1024 * 1024  # sendDocument uploads
MAX_DOWNLOAD_BYTES = 20 * 1024 * 1024  # getFile ("bots can download files of up to 20 MB")
LONG_POLL_MAX_TIMEOUT = 50

ERR_UNAUTHORIZED = "Unauthorized"
ERR_INVALID_TOKEN = "Unauthorized: invalid token specified"
ERR_NOT_FOUND = "Not Found"
ERR_METHOD_NOT_FOUND = "Not Found: method not found"
ERR_TEXT_EMPTY = "Bad Request: message text is empty"
ERR_TEXT_MUST_BE_NON_EMPTY = "Bad Request: text must be non-empty"
ERR_MESSAGE_TOO_LONG = "Bad Request: message is too long"
# Telegram refuses bigger keyboards with "reply markup is too long"; 100 buttons is
# the bound bots report (the documentation gives none).
MAX_INLINE_BUTTONS = 100
ERR_TEXT_TOO_LONG = "Bad Request: text is too long"
ERR_CAPTION_TOO_LONG = "Bad Request: message caption is too long"
ERR_PARSE_ENTITIES = "Bad Request: can't parse entities: "
ERR_UNSUPPORTED_PARSE_MODE = "Bad Request: unsupported parse_mode"
ERR_BUTTON_DATA_INVALID = "Bad Request: BUTTON_DATA_INVALID"
ERR_MESSAGE_TO_EDIT_NOT_FOUND = "Bad Request: message to edit not found"
ERR_MESSAGE_TO_DELETE_NOT_FOUND = "Bad Request: message to delete not found"
ERR_MESSAGE_CANT_BE_EDITED = "Bad Request: message can't be edited"
ERR_NO_TEXT_TO_EDIT = "Bad Request: there is no text in the message to edit"
ERR_NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup"
    " are exactly the same as a current content and reply markup of the message"
)
ERR_DRAFT_PEER_INVALID = "Bad Request: TEXTDRAFT_PEER_INVALID"
ERR_DRAFT_ID_ZERO = "Bad Request: draft_id must be non-zero"
ERR_QUERY_TOO_OLD = (
    "Bad Request: query is too old and response timeout expired or query ID is invalid"
)
ERR_CHAT_NOT_FOUND = "Bad Request: chat not found"
ERR_CHAT_ID_EMPTY = "Bad Request: chat_id is empty"
ERR_MESSAGE_ID_MISSING = "Bad Request: message identifier is not specified"
ERR_NO_DOCUMENT = "Bad Request: there is no document in the request"
ERR_WRONG_ACTION = "Bad Request: wrong parameter action in request"
ERR_BOT_BLOCKED = "Forbidden: bot was blocked by the user"
ERR_THREAD_NOT_FOUND = "Bad Request: message thread not found"
ERR_FILE_TOO_BIG = "Bad Request: file is too big"  # getFile over 20 MB (tdlib/telegram-bot-api#51)
ERR_INVALID_FILE_ID = "Bad Request: invalid file_id"
ERR_NOT_A_FORUM = "Bad Request: the chat is not a forum"
ERR_ENTITY_TOO_LARGE = "Request Entity Too Large"
ERR_CONFLICT_OTHER_POLL = (
    "Conflict: terminated by other getUpdates request;"
    " make sure that only one bot instance is running"
)
ERR_CONFLICT_WEBHOOK_ACTIVE = (
    "Conflict: can't use getUpdates method while webhook is active;"
    " use deleteWebhook to delete the webhook first"
)
ERR_CONFLICT_SET_WEBHOOK = "Conflict: terminated by setWebhook request"


def too_many_requests(retry_after: int) -> str:
    return f"Too Many Requests: retry after {retry_after}"


_DEFAULT_DESCRIPTIONS = {
    400: "Bad Request",
    401: ERR_UNAUTHORIZED,
    403: ERR_BOT_BLOCKED,
    404: ERR_NOT_FOUND,
    409: ERR_CONFLICT_OTHER_POLL,
    500: "Internal Server Error",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}

NGINX_502_HTML = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.18.0</center>\r\n"
    b"</body>\r\n</html>\r\n"
)

#: Methods whose requests go through the flood limiter by default.
LIMITED_METHODS = frozenset(
    {"sendMessage", "editMessageText", "editMessageReplyMarkup", "sendDocument", "sendMessageDraft"}
)

ALL_UPDATE_TYPES = (
    "message edited_message channel_post edited_channel_post business_connection"
    " business_message edited_business_message deleted_business_messages guest_message"
    " message_reaction message_reaction_count inline_query chosen_inline_result callback_query"
    " shipping_query pre_checkout_query purchased_paid_media poll poll_answer my_chat_member"
    " chat_member chat_join_request chat_boost removed_chat_boost managed_bot"
    " stopped_message_generation"
).split()
DEFAULT_ALLOWED_UPDATES = frozenset(ALL_UPDATE_TYPES) - {
    "chat_member",
    "message_reaction",
    "message_reaction_count",
}

CHAT_ACTIONS = frozenset(
    "typing upload_photo record_video upload_video record_voice upload_voice upload_document"
    " choose_sticker find_location record_video_note upload_video_note".split()
)

ENTITY_TYPES = frozenset(
    "mention hashtag cashtag bot_command url email phone_number bold italic underline"
    " strikethrough spoiler blockquote expandable_blockquote code pre text_link text_mention"
    " custom_emoji date_time".split()
)
_ENTITY_EXTRA_KEYS = ("url", "language", "user", "custom_emoji_id", "unix_time", "date_time_format")

_JSON_FIELDS = (
    "reply_markup",
    "entities",
    "caption_entities",
    "allowed_updates",
    "commands",
    "scope",
    "link_preview_options",
    "reply_parameters",
)

_RTRIM = " \t\r\n\v\f"
_COMMAND_RE = re.compile(r"^[a-z0-9_]{1,32}$")

MOCK_BASE_URL = "http://fake-telegram.test"

# --------------------------------------------------------------------------------------
# Records visible to tests
# --------------------------------------------------------------------------------------


@attrs.frozen
class UploadedFile:
    filename: str | None
    content: bytes
    content_type: str | None


@attrs.frozen
class Document:
    file_id: str
    filename: str | None
    content: bytes | None  # None when the bot sent a file_id/URL instead of an upload
    mime_type: str | None

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file_id": self.file_id, "file_unique_id": self.file_id[-10:]}
        if self.filename is not None:
            out["file_name"] = self.filename
        if self.mime_type is not None:
            out["mime_type"] = self.mime_type
        if self.content is not None:
            out["file_size"] = len(self.content)
        return out


@attrs.define
class Chat:
    id: int
    type: str
    first_name: str | None = None
    title: str | None = None
    is_forum: bool = False  # a supergroup with topics
    topics: dict[int, str] = attrs.field(factory=dict)  # message_thread_id → name (open ones)

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": self.type}
        if self.type == "private":
            out["first_name"] = self.first_name or "Tester"
        else:
            out["title"] = self.title or f"Group {self.id}"
        if self.is_forum:
            out["is_forum"] = True
        return out


@attrs.frozen
class StoredFile:
    """A file a user sent: what getFile describes and the download URL serves."""

    file_id: str
    file_unique_id: str
    file_path: str
    content: bytes


@attrs.define
class StoredMessage:
    """A message in a chat: sent by the bot (`from_bot`) or pushed by the test."""

    message_id: int
    chat: Chat
    sender: dict[str, Any]
    date: int
    from_bot: bool
    text: str | None = None
    entities: list[dict[str, Any]] | None = None
    reply_markup: dict[str, Any] | None = None
    caption: str | None = None
    caption_entities: list[dict[str, Any]] | None = None
    document: Document | None = None
    photo: list[dict[str, Any]] | None = None  # PhotoSize objects, smallest first
    media_group_id: str | None = None
    message_thread_id: int | None = None
    is_topic_message: bool = False
    edits: int = 0
    edit_date: int | None = None
    history: list[str] = attrs.field(factory=list)  # texts before each edit
    deleted: bool = False

    @property
    def chat_id(self) -> int:
        return self.chat.id

    def to_api(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "message_id": self.message_id,
            "from": dict(self.sender),
            "chat": self.chat.to_api(),
            "date": self.date,
        }
        if self.message_thread_id is not None:
            out["message_thread_id"] = self.message_thread_id
        if self.is_topic_message:
            out["is_topic_message"] = True
        if self.media_group_id is not None:
            out["media_group_id"] = self.media_group_id
        if self.photo is not None:
            out["photo"] = self.photo
        if self.edit_date is not None:
            out["edit_date"] = self.edit_date
        if self.text is not None:
            out["text"] = self.text
        if self.entities:
            out["entities"] = self.entities
        if self.document is not None:
            out["document"] = self.document.to_api()
        if self.caption is not None:
            out["caption"] = self.caption
        if self.caption_entities:
            out["caption_entities"] = self.caption_entities
        if self.reply_markup is not None:
            out["reply_markup"] = self.reply_markup
        return out


@attrs.frozen
class DraftUpdate:
    draft_id: int
    text: str
    entities: list[dict[str, Any]] | None
    time: float
    message_thread_id: int | None


@attrs.frozen
class ChatAction:
    action: str
    time: float
    message_thread_id: int | None


@attrs.frozen
class CallbackAnswer:
    callback_query_id: str
    text: str | None
    show_alert: bool
    url: str | None
    time: float


DropKind = Literal["before", "after", "down"]


@attrs.frozen
class RecordedRequest:
    method: str  # canonical spelling, e.g. "sendMessage"; the raw name for unknown methods
    params: dict[str, Any]
    time: float  # trio.current_time() when the request arrived
    status: int  # HTTP status returned; 0 when no answer was sent (see `dropped`)
    description: str | None = None
    files: dict[str, UploadedFile] = attrs.field(factory=dict)
    finished: float = 0.0  # trio.current_time() when the answer was produced
    # Why no answer was sent: "before" processing (drop_next: no effect), "after"
    # it (drop_after_next: the effect happened, the answer was lost), or "down"
    # (go_down with the request in flight: cut wherever it was).
    dropped: DropKind | None = None
    processed_status: int = 0  # what the fake decided, also when the answer was lost

    @property
    def ok(self) -> bool:
        """The client got a 200."""
        return self.status == 200

    @property
    def took_effect(self) -> bool:
        """The request was processed successfully, whether or not the client heard."""
        return self.processed_status == 200


@attrs.frozen
class FloodHit:
    time: float
    method: str
    chat_id: int | None
    retry_after: int
    reason: str  # "chat" | "global" | "penalty" | "injected"


@attrs.define
class Stats:
    too_many_requests: int = 0  # every 429 sent, injected ones included
    violations: int = 0  # 429s the bot caused (limiter + requests inside a penalty window)
    early_retries: int = 0  # requests that arrived inside a penalty window
    conflicts: int = 0  # 409s sent
    flood_hits: list[FloodHit] = attrs.field(factory=list)
    by_status: Counter[int] = attrs.field(factory=Counter)


@attrs.define
class TokenBucket:
    rate: float  # tokens per second
    capacity: float
    tokens: float
    stamp: float

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_time(self, now: float) -> float:
        self._refill(now)
        if self.tokens >= 1.0:
            return 0.0
        return (1.0 - self.tokens) / self.rate if self.rate > 0 else math.inf

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0


@attrs.define
class _Fault:
    kind: str  # "fail" | "drop" | "drop_after" | "delay"
    times: int
    error_code: int = 0
    description: str | None = None
    retry_after: int | None = None
    body: bytes | None = None
    seconds: float = 0.0


@attrs.define
class _CallbackState:
    chat_id: int
    message_id: int
    answered: bool = False


class ApiError(Exception):
    def __init__(
        self, code: int, description: str, parameters: dict[str, Any] | None = None
    ) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.parameters = parameters


_RAW: Final = "raw update"  # push_raw_update's payload, under its stand-in update id


class _DropConnection(Exception):
    pass


def _bad(description: str) -> ApiError:
    return ApiError(400, description)


@attrs.define
class _Call:
    method: str
    params: dict[str, Any]
    files: dict[str, UploadedFile]
    now: float
    drop_answer: bool = False  # set by a drop_after_next fault


_Result = tuple[Any, str | None]  # result, optional description
_Handler = Callable[["FakeTelegram", _Call], Awaitable[_Result]]

# --------------------------------------------------------------------------------------
# The fake
# --------------------------------------------------------------------------------------


class FakeTelegram:
    """Fake Bot API: `await nursery.start(fake.serve)` → base URL; then push updates."""

    def __init__(
        self,
        token: str,
        *,
        bot_username: str = "codexnet_test_bot",
        bot_first_name: str = "Codexnet Test",
        rate_limits: bool = True,
        private_rate: float = 1.0,
        private_burst: float = 3,
        group_rate: float = 20 / 60,
        group_burst: float = 3,
        global_rate: float = 30.0,
        global_burst: float = 30,
        penalty_extension: float = 1.0,
        limited_methods: Iterable[str] = LIMITED_METHODS,
        penalise_injected: bool = True,
        first_update_id: int = 1000,
    ) -> None:
        bot_id, sep, secret = token.partition(":")
        if not sep or not bot_id.isdigit() or not secret:
            raise ValueError("token must look like '<digits>:<secret>'")
        self.token = token
        self.bot_id = int(bot_id)
        self.bot_username = bot_username
        self.bot_first_name = bot_first_name
        self.rate_limits = rate_limits
        self.private_rate = private_rate
        self.private_burst = private_burst
        self.group_rate = group_rate
        self.group_burst = group_burst
        self.global_rate = global_rate
        self.global_burst = global_burst
        self.penalty_extension = penalty_extension
        self.limited_methods = frozenset(limited_methods)
        self.penalise_injected = penalise_injected

        self.stats = Stats()
        self.requests: list[RecordedRequest] = []
        self.callback_answers: list[CallbackAnswer] = []
        self.internal_errors: list[BaseException] = []
        self.webhook_url: str | None = None
        self.allowed_updates: frozenset[str] = DEFAULT_ALLOWED_UPDATES
        self.filtered_updates: list[dict[str, Any]] = []  # pushed but not allowed

        self._base_url: str | None = None
        self._chats: dict[int, Chat] = {}
        self._users: dict[int, dict[str, Any]] = {}
        self._blocked: set[int] = set()
        self._messages: dict[int, dict[int, StoredMessage]] = defaultdict(dict)
        self._next_message_id: dict[int, int] = defaultdict(lambda: 1)
        self._drafts: dict[int, list[DraftUpdate]] = defaultdict(list)
        self._actions: dict[int, list[ChatAction]] = defaultdict(list)
        self._callbacks: dict[str, _CallbackState] = {}
        self._commands: dict[tuple[str, str], list[dict[str, str]]] = {}
        self._updates: list[dict[str, Any]] = []
        self._next_update_id = first_update_id
        self._ids = itertools.count(1)
        self._faults: dict[str, list[_Fault]] = defaultdict(list)
        self._buckets: dict[int, TokenBucket] = {}
        self._global_bucket: TokenBucket | None = None
        self._penalties: dict[tuple[str, int | str], float] = {}
        self._poll_seq = 0
        self._pending_poll: int | None = None
        self._poll_wake = trio.Event()
        self._changed = trio.Event()
        self._http: HttpServer | None = None
        self._down = False
        self._outage: _Fault | None = None  # fail_all
        self._in_flight: set[trio.CancelScope] = set()  # in-memory requests being handled
        self._files: dict[str, StoredFile] = {}  # file_id → what users sent
        self._download_faults: list[_Fault] = []

    # ----------------------------------------------------------------- serving

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("FakeTelegram.serve() has not started yet")
        return self._base_url

    def api_url(self, method: str) -> str:
        return f"{self.base_url}/bot{self.token}/{method}"

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve on 127.0.0.1 until cancelled; `task_status.started(base_url)`."""
        self._http = HttpServer(self.handle_request)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(self._http.serve)
            self._base_url = f"http://127.0.0.1:{port}"
            task_status.started(self._base_url)

    def transport(self) -> httpx.MockTransport:
        """An in-process transport (use with base URL `MOCK_BASE_URL`); no sockets."""

        async def handler(request: httpx.Request) -> httpx.Response:
            if self._down:
                raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
            body = await request.aread()
            req = Request(
                method=request.method,
                target=request.url.raw_path.decode("ascii"),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
            disconnected = httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            )
            response: Response | None = None
            with trio.CancelScope() as scope:  # cancelled by go_down()
                self._in_flight.add(scope)
                try:
                    response = await self._respond(req)
                except _DropConnection:
                    raise disconnected from None
                finally:
                    self._in_flight.discard(scope)
            if response is None:
                raise disconnected
            if not isinstance(response.body, bytes):  # a file download
                return httpx.Response(
                    response.status,
                    headers=response.headers,
                    stream=_MemoryStream(response.body, request),
                )
            return httpx.Response(response.status, headers=response.headers, content=response.body)

        return httpx.MockTransport(handler)

    async def handle_request(self, request: Request) -> Response:
        """The `serve_http` handler. A dropped request closes the connection unanswered."""
        try:
            if self._down:  # a request that slipped in while going down
                raise _DropConnection
            return await self._respond(request)
        except _DropConnection:
            # serve_http treats BrokenResourceError as "client went away" and closes.
            raise trio.BrokenResourceError("fake telegram: dropped on purpose") from None

    # ----------------------------------------------------------------- outages

    @property
    def is_down(self) -> bool:
        return self._down

    async def go_down(self) -> None:
        """Become unreachable: refuse connections, close open ones (in-flight requests too)."""
        self._down = True
        for scope in list(self._in_flight):
            scope.cancel()
        if self._http is not None:
            await self._http.go_down()
        self._notify()

    async def come_up(self) -> None:
        """Reachable again, on the same port (`base_url` is unchanged)."""
        self._down = False
        if self._http is not None:
            await self._http.come_up()
        self._notify()

    def fail_all(
        self, error_code: int = 502, *, description: str | None = None, body: bytes | None = None
    ) -> None:
        """Every request, of any method, fails with `error_code` until `stop_failing()`.

        The answer is Telegram's JSON envelope (`description` defaults to the usual
        text, "Bad Gateway" for 502), or `body` as raw text/html (`NGINX_502_HTML`).
        """
        self._outage = _Fault("fail", 0, error_code=error_code, description=description, body=body)

    def stop_failing(self) -> None:
        self._outage = None

    # ----------------------------------------------------------------- waiting

    def _notify(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds; re-checked after every request and push."""
        while not predicate():
            await self._changed.wait()

    async def wait_for_request(
        self,
        method: str,
        where: Callable[[RecordedRequest], bool] | None = None,
        *,
        since: int = 0,
    ) -> RecordedRequest:
        """The first finished request of `method` (index >= since) matching `where`."""
        found: list[RecordedRequest] = []

        def check() -> bool:
            for rec in self.requests[since:]:
                if rec.method.lower() == method.lower() and (where is None or where(rec)):
                    found.append(rec)
                    return True
            return False

        await self.wait_until(check)
        return found[0]

    @property
    def polling(self) -> bool:
        """True while a getUpdates request is pending (the bot is idle and listening)."""
        return self._pending_poll is not None

    # ----------------------------------------------------------------- test-side state

    def add_chat(
        self,
        chat_id: int,
        *,
        chat_type: str | None = None,
        first_name: str = "Tester",
        title: str | None = None,
        is_forum: bool = False,
    ) -> Chat:
        chat = self._chats.get(chat_id)
        if chat is None:
            default = "private" if chat_id > 0 else "group"
            kind = chat_type or ("supergroup" if is_forum else default)
            chat = Chat(chat_id, kind, first_name=first_name, title=title, is_forum=is_forum)
            self._chats[chat_id] = chat
        return chat

    def create_topic(self, chat_id: int, name: str) -> int:
        """A topic in forum `chat_id` (as a user creates it); its `message_thread_id`.

        Like Telegram, the id is that of the topic's creation message in the chat.
        """
        chat = self._chats[chat_id]
        if not chat.is_forum:
            raise ValueError(f"chat {chat_id} is not a forum")
        thread_id = self._take_message_id(chat_id)
        chat.topics[thread_id] = name
        return thread_id

    def delete_topic(self, chat_id: int, thread_id: int) -> None:
        """The topic is deleted: sends to it fail with "message thread not found"."""
        self._chats[chat_id].topics.pop(thread_id, None)

    def block(self, chat_id: int, blocked: bool = True) -> None:
        """Make requests to this chat fail with 403 `Forbidden: bot was blocked by the user`."""
        if blocked:
            self._blocked.add(chat_id)
        else:
            self._blocked.discard(chat_id)

    def _user(self, user_id: int, first_name: str) -> dict[str, Any]:
        user = self._users.get(user_id)
        if user is None:
            user = {"id": user_id, "is_bot": False, "first_name": first_name, "language_code": "en"}
            self._users[user_id] = user
        return user

    def push_update(self, kind: str, payload: dict[str, Any]) -> int:
        """Queue an arbitrary update; returns its update_id."""
        update_id = self._next_update_id
        self._next_update_id += 1
        update = {"update_id": update_id, kind: payload}
        if kind in self.allowed_updates:
            self._updates.append(update)
        else:
            self.filtered_updates.append(update)
        self._kick_poll()
        self._notify()
        return update_id

    def push_raw_update(self, update: object, *, numbered: bool = True) -> int:
        """Queue `update` as given, malformed or not; returns the update id it takes.

        With `numbered`, a dict gets that id as its `update_id` (first), like any
        update; without, it goes out exactly as given (no or a wrong `update_id`,
        not an object at all). Either way it is dropped once an offset beyond its
        id is confirmed."""
        update_id = self._next_update_id
        self._next_update_id += 1
        if numbered and isinstance(update, dict):
            update = {"update_id": update_id} | update
        self._updates.append({"update_id": update_id, _RAW: update})
        self._kick_poll()
        self._notify()
        return update_id

    def push_message(
        self,
        chat_id: int,
        text: str,
        *,
        user_id: int | None = None,
        chat_type: str | None = None,
        first_name: str = "Tester",
        message_thread_id: int | None = None,
    ) -> int:
        """A user writes `text` in `chat_id`; returns the update_id."""
        msg = self._user_message(chat_id, user_id, chat_type, first_name, message_thread_id)
        msg.text = text
        command = re.match(r"/[A-Za-z0-9_]+(@[A-Za-z0-9_]+)?", text)
        if command:
            msg.entities = [{"type": "bot_command", "offset": 0, "length": command.end()}]
        return self._push_user_message(msg)

    def push_document(
        self,
        chat_id: int,
        content: bytes,
        *,
        file_name: str | None,
        mime_type: str | None = "application/octet-stream",
        caption: str | None = None,
        media_group_id: str | None = None,
        user_id: int | None = None,
        message_thread_id: int | None = None,
    ) -> int:
        """A user sends a file (any size: getFile refuses what is over 20 MB)."""
        msg = self._user_message(chat_id, user_id, None, "Tester", message_thread_id)
        stored = self._store_file(content, f"documents/file_{len(self._files)}")
        msg.document = Document(stored.file_id, file_name, content, mime_type)
        msg.caption = caption
        msg.media_group_id = media_group_id
        return self._push_user_message(msg)

    def push_photo(
        self,
        chat_id: int,
        content: bytes,
        *,
        caption: str | None = None,
        media_group_id: str | None = None,
        user_id: int | None = None,
        message_thread_id: int | None = None,
    ) -> int:
        """A user sends a photo: a thumbnail and the full size, as Telegram offers them."""
        msg = self._user_message(chat_id, user_id, None, "Tester", message_thread_id)
        sizes = []
        for width, data in ((90, content[:64] or b"\0"), (1280, content)):
            stored = self._store_file(data, f"photos/file_{len(self._files)}.jpg")
            sizes.append(
                {
                    "file_id": stored.file_id,
                    "file_unique_id": stored.file_unique_id,
                    "file_size": len(data),
                    "width": width,
                    "height": width * 3 // 4,
                }
            )
        msg.photo = sizes
        msg.caption = caption
        msg.media_group_id = media_group_id
        return self._push_user_message(msg)

    def _user_message(
        self,
        chat_id: int,
        user_id: int | None,
        chat_type: str | None,
        first_name: str,
        message_thread_id: int | None,
    ) -> StoredMessage:
        chat = self.add_chat(chat_id, chat_type=chat_type, first_name=first_name)
        if user_id is None:
            user_id = chat_id if chat_id > 0 else 100_001
        return StoredMessage(
            message_id=self._take_message_id(chat_id),
            chat=chat,
            sender=self._user(user_id, first_name),
            date=int(time.time()),
            from_bot=False,
            message_thread_id=message_thread_id,
            is_topic_message=chat.is_forum and message_thread_id in chat.topics,
        )

    def _push_user_message(self, msg: StoredMessage) -> int:
        self._messages[msg.chat.id][msg.message_id] = msg
        return self.push_update("message", msg.to_api())

    def _store_file(self, content: bytes, file_path: str) -> StoredFile:
        n = next(self._ids)
        stored = StoredFile(f"BQACAgIAAxkBAAI{n:012d}", f"AgAD{n:08d}", file_path, content)
        self._files[stored.file_id] = stored
        return stored

    def push_callback(
        self,
        chat_id: int,
        message_id: int,
        data: str,
        *,
        user_id: int | None = None,
        first_name: str = "Tester",
    ) -> str:
        """A user presses a button under bot message `message_id`; returns the query id."""
        msg = self._messages.get(chat_id, {}).get(message_id)
        if msg is None:
            raise KeyError(f"no message {message_id} in chat {chat_id}")
        if user_id is None:
            user_id = chat_id if chat_id > 0 else 100_001
        query_id = str(4_000_000_000_000_000_000 + next(self._ids))
        self._callbacks[query_id] = _CallbackState(chat_id, message_id)
        message: dict[str, Any]
        if msg.deleted:
            message = {"chat": msg.chat.to_api(), "message_id": message_id, "date": 0}
        else:
            message = msg.to_api()
        self.push_update(
            "callback_query",
            {
                "id": query_id,
                "from": self._user(user_id, first_name),
                "message": message,
                "chat_instance": str(-abs(hash((self.bot_id, chat_id))) % 10**18),
                "data": data,
            },
        )
        return query_id

    def push_my_chat_member(self, chat_id: int, *, blocked: bool) -> int:
        """The user blocks (status `kicked`) or unblocks (`member`) the bot."""
        chat = self.add_chat(chat_id)
        self.block(chat_id, blocked)
        me = self._me()
        old, new = ("member", "kicked") if blocked else ("kicked", "member")
        return self.push_update(
            "my_chat_member",
            {
                "chat": chat.to_api(),
                "from": self._user(chat_id, chat.first_name or "Tester"),
                "date": int(time.time()),
                "old_chat_member": {"user": me, "status": old},
                "new_chat_member": {"user": me, "status": new},
            },
        )

    def messages(self, chat_id: int, *, include_deleted: bool = False) -> list[StoredMessage]:
        """Bot messages in the chat, oldest first, with their current content."""
        return [
            m
            for m in self._messages.get(chat_id, {}).values()
            if m.from_bot and (include_deleted or not m.deleted)
        ]

    def texts(self, chat_id: int) -> list[str]:
        """The current text (or caption) of each bot message in the chat, oldest first."""
        return [m.text or m.caption or "" for m in self.messages(chat_id)]

    def count_messages(
        self,
        chat_id: int,
        text: str | Callable[[str], bool] | None = None,
        *,
        include_deleted: bool = False,
    ) -> int:
        """How many bot messages in the chat show `text` (equal, or a predicate on the
        text or caption; None: any). An answer posted twice counts 2."""
        if text is None:
            return len(self.messages(chat_id, include_deleted=include_deleted))
        check = text if callable(text) else text.__eq__
        return sum(
            1
            for m in self.messages(chat_id, include_deleted=include_deleted)
            if check(m.text or m.caption or "")
        )

    def calls(
        self, method: str | None = None, where: Callable[[RecordedRequest], bool] | None = None
    ) -> list[RecordedRequest]:
        """Recorded requests of `method` (any spelling; None: all) matching `where`."""
        name = None if method is None else self._canonical(method)
        return [
            r
            for r in self.requests
            if (name is None or r.method == name) and (where is None or where(r))
        ]

    def transcript(self, chat_id: int) -> list[StoredMessage]:
        """All (not deleted) messages in the chat, the user's and the bot's."""
        return [m for m in self._messages.get(chat_id, {}).values() if not m.deleted]

    def message(self, chat_id: int, message_id: int) -> StoredMessage:
        return self._messages[chat_id][message_id]

    def drafts(self, chat_id: int) -> dict[int, list[str]]:
        """draft_id → the texts sent for it, in order."""
        out: dict[int, list[str]] = {}
        for d in self._drafts.get(chat_id, []):
            out.setdefault(d.draft_id, []).append(d.text)
        return out

    def draft_updates(self, chat_id: int) -> list[DraftUpdate]:
        return list(self._drafts.get(chat_id, []))

    def chat_actions(self, chat_id: int) -> list[ChatAction]:
        return list(self._actions.get(chat_id, []))

    @property
    def commands(self) -> list[dict[str, str]]:
        """Commands set for the default scope and no language."""
        return list(self._commands.get(('{"type": "default"}', ""), []))

    @property
    def pending_updates(self) -> list[dict[str, Any]]:
        return list(self._updates)

    # ----------------------------------------------------------------- fault injection

    def fail_next(
        self,
        method: str,
        *,
        error_code: int,
        description: str | None = None,
        retry_after: int | None = None,
        times: int = 1,
        body: bytes | None = None,
    ) -> None:
        """The next `times` calls of `method` fail with `error_code`.

        `description` defaults to the usual text for the code (429 → "Too Many
        Requests: retry after N"). `body` replaces the JSON envelope with raw bytes
        (e.g. `NGINX_502_HTML`). An injected 429 with `retry_after` also opens a
        penalty window (see module docstring) unless `penalise_injected=False`.
        """
        self._faults[self._canonical(method)].append(
            _Fault(
                "fail",
                times,
                error_code=error_code,
                description=description,
                retry_after=retry_after,
                body=body,
            )
        )

    def drop_next(self, method: str, *, times: int = 1) -> None:
        """The next `times` calls of `method` get their connection closed, unanswered."""
        self._faults[self._canonical(method)].append(_Fault("drop", times))

    def drop_after_next(self, method: str, *, times: int = 1) -> None:
        """The next `times` calls of `method` are processed (a message is posted), then
        their connection is closed unanswered: the client cannot tell what happened."""
        self._faults[self._canonical(method)].append(_Fault("drop_after", times))

    def delay_next(self, method: str, seconds: float, *, times: int = 1) -> None:
        """The next `times` calls of `method` are answered normally after `seconds`."""
        self._faults[self._canonical(method)].append(_Fault("delay", times, seconds=seconds))

    def cut_download_next(self, *, after: int | None = None, times: int = 1) -> None:
        """The next `times` file downloads stop after `after` bytes (default: half) and
        their connection is closed: the client gets less than Content-Length says."""
        self._download_faults.append(_Fault("cut", times, retry_after=after))

    def fail_download_next(self, error_code: int = 502, *, times: int = 1) -> None:
        """The next `times` file downloads are answered `error_code`."""
        self._download_faults.append(_Fault("fail", times, error_code=error_code))

    def file_url(self, file_path: str) -> str:
        return f"{self.base_url}/file/bot{self.token}/{file_path}"

    # ----------------------------------------------------------------- HTTP layer

    @staticmethod
    def _canonical(method: str) -> str:
        entry = _METHODS.get(method.lower())
        return entry[0] if entry else method

    async def _respond(self, request: Request) -> Response:
        arrived = trio.current_time()
        path = request.path
        if path.startswith("/file/") and self._outage is None:
            return self._download(path, arrived)
        token, sep, method = path[4:].partition("/")
        early: ApiError | None = None
        if not path.startswith("/bot"):
            early = ApiError(404, ERR_NOT_FOUND)
        elif ":" not in token:
            early = ApiError(401, ERR_INVALID_TOKEN)
        elif token != self.token:
            early = ApiError(401, ERR_UNAUTHORIZED)
        elif not sep or "/" in method:
            early = ApiError(404, ERR_NOT_FOUND)
        entry = _METHODS.get(method.lower())
        name = entry[0] if entry else method
        if early is not None:  # never log the path: it may hold a token
            name = "<not found>" if early.code == 404 else "<bad token>"
        if self._outage is not None:  # a broken front end answers before any check
            return self._answer_outage(request, name, arrived)
        if early is not None:
            self._record(name, {}, {}, arrived, early.code, early.description)
            return _envelope_error(early)
        params: dict[str, Any] = {}
        files: dict[str, UploadedFile] = {}
        status = 0
        description: str | None = None
        dropped: DropKind | None = None
        call: _Call | None = None
        try:
            try:
                if entry is None:
                    raise ApiError(404, ERR_METHOD_NOT_FOUND)
                params, files = _parse_params(request)
                self._notify()
                call = _Call(name, params, files, arrived)
                result, description = await self._dispatch(entry[1], call)
                status = 200
                response = _envelope_ok(result, description)
            except ApiError as exc:
                status, description = exc.code, exc.description
                response = _envelope_error(exc)
            except _FaultBody as exc:
                status = exc.status
                response = Response(exc.status, exc.body, {"content-type": "text/html"})
            except _DropConnection:
                dropped = "before"
                raise
            except trio.Cancelled:
                if self._down:
                    dropped = "down"
                raise
            except Exception as exc:  # a bug in the fake: answer 500, keep the evidence
                self.internal_errors.append(exc)
                status, description = 500, f"Internal Server Error: fake telegram bug: {exc!r}"
                response = _envelope_error(ApiError(500, description))
            if call is not None and call.drop_answer:
                dropped = "after"
                raise _DropConnection
            return response
        finally:
            processed = status
            if dropped is not None:
                status = 0
            self._record(name, params, files, arrived, status, description, dropped, processed)

    def _download(self, path: str, arrived: float) -> Response:
        """`GET /file/bot<token>/<file_path>`: the bytes of a file getFile described.

        Recorded as method "downloadFile" with the file_path only (never the token).
        """
        token, _, file_path = path.removeprefix("/file/bot").partition("/")
        stored = next((f for f in self._files.values() if f.file_path == file_path), None)
        if token != self.token or stored is None or len(stored.content) > MAX_DOWNLOAD_BYTES:
            self._record("downloadFile", {"file_path": file_path}, {}, arrived, 404, ERR_NOT_FOUND)
            return _envelope_error(ApiError(404, ERR_NOT_FOUND))
        fault = self._download_faults[0] if self._download_faults else None
        if fault is not None:
            fault.times -= 1
            if fault.times <= 0:
                self._download_faults.pop(0)
        if fault is not None and fault.kind == "fail":
            code = fault.error_code
            description = _DEFAULT_DESCRIPTIONS.get(code, "Error")
            self._record("downloadFile", {"file_path": file_path}, {}, arrived, code, description)
            return _envelope_error(ApiError(code, description))
        content = stored.content
        cut_at: int | None = None
        if fault is not None and fault.kind == "cut":
            cut_at = fault.retry_after if fault.retry_after is not None else len(content) // 2
        self._record(
            "downloadFile",
            {"file_path": file_path},
            {},
            arrived,
            0 if cut_at is not None else 200,
            None,
            "after" if cut_at is not None else None,
            200,
        )
        return Response(
            200,
            _file_chunks(content, cut_at),
            {"content-type": "application/octet-stream", "content-length": str(len(content))},
        )

    def _answer_outage(self, request: Request, name: str, arrived: float) -> Response:
        """fail_all(): the answer of a broken front end, before any routing or checks."""
        fault = self._outage
        assert fault is not None
        try:
            params, files = _parse_params(request)
        except (ApiError, ValueError):  # only for the record: an outage answers anything
            params, files = {}, {}
        description = fault.description or _DEFAULT_DESCRIPTIONS.get(fault.error_code, "Error")
        self._record(name, params, files, arrived, fault.error_code, description)
        if fault.body is not None:
            return Response(fault.error_code, fault.body, {"content-type": "text/html"})
        return _envelope_error(ApiError(fault.error_code, description))

    def _record(
        self,
        method: str,
        params: dict[str, Any],
        files: dict[str, UploadedFile],
        arrived: float,
        status: int,
        description: str | None,
        dropped: DropKind | None = None,
        processed_status: int | None = None,
    ) -> None:
        self.requests.append(
            RecordedRequest(
                method,
                params,
                arrived,
                status,
                description,
                files,
                trio.current_time(),
                dropped,
                status if processed_status is None else processed_status,
            )
        )
        self.stats.by_status[status] += 1
        if status == 429:
            self.stats.too_many_requests += 1
        elif status == 409:
            self.stats.conflicts += 1
        self._notify()

    async def _dispatch(self, handler: _Handler, call: _Call) -> _Result:
        faults = self._faults.get(call.method)
        if faults:
            fault = faults[0]
            fault.times -= 1
            if fault.times <= 0:
                faults.pop(0)
            if fault.kind == "drop":
                raise _DropConnection
            if fault.kind == "drop_after":
                call.drop_answer = True
            elif fault.kind == "delay":
                await trio.sleep(fault.seconds)
            else:
                self._raise_injected(fault, call)
        self._check_penalty(("method", call.method), call)
        return await handler(self, call)

    def _raise_injected(self, fault: _Fault, call: _Call) -> None:
        if fault.body is not None:
            raise _FaultBody(fault.error_code, fault.body)
        parameters: dict[str, Any] | None = None
        description = fault.description
        if fault.retry_after is not None:
            parameters = {"retry_after": fault.retry_after}
        if description is None:
            if fault.error_code == 429:
                description = too_many_requests(fault.retry_after or 1)
            else:
                description = _DEFAULT_DESCRIPTIONS.get(fault.error_code, "Error")
        if fault.error_code == 429 and fault.retry_after is not None:
            chat_id = _to_int(call.params.get("chat_id"))
            self.stats.flood_hits.append(
                FloodHit(call.now, call.method, chat_id, fault.retry_after, "injected")
            )
            if self.penalise_injected:
                key: tuple[str, int | str]
                if chat_id is not None and call.method in self.limited_methods:
                    key = ("chat", chat_id)
                else:
                    key = ("method", call.method)
                self._penalties[key] = call.now + fault.retry_after
        raise ApiError(fault.error_code, description, parameters)

    # ----------------------------------------------------------------- flood control

    def _flood(self, call: _Call, chat_id: int | None, retry_after: int, reason: str) -> ApiError:
        self.stats.violations += 1
        self.stats.flood_hits.append(FloodHit(call.now, call.method, chat_id, retry_after, reason))
        return ApiError(429, too_many_requests(retry_after), {"retry_after": retry_after})

    def _check_penalty(self, key: tuple[str, int | str], call: _Call) -> None:
        deadline = self._penalties.get(key)
        if deadline is None:
            return
        if call.now >= deadline:
            del self._penalties[key]
            return
        deadline += self.penalty_extension
        self._penalties[key] = deadline
        self.stats.early_retries += 1
        retry_after = max(1, math.ceil(deadline - call.now - 1e-9))
        chat_id = key[1] if key[0] == "chat" and isinstance(key[1], int) else None
        raise self._flood(call, chat_id, retry_after, "penalty")

    def _throttle(self, call: _Call, chat: Chat) -> None:
        """Called by limited methods after validation, right before they take effect."""
        if call.method not in self.limited_methods:
            return
        self._check_penalty(("chat", chat.id), call)
        if not self.rate_limits:
            return
        now = call.now
        bucket = self._buckets.get(chat.id)
        if bucket is None:
            if chat.id > 0:
                rate, burst = self.private_rate, self.private_burst
            else:
                rate, burst = self.group_rate, self.group_burst
            bucket = self._buckets[chat.id] = TokenBucket(rate, burst, burst, now)
        if self._global_bucket is None:
            self._global_bucket = TokenBucket(
                self.global_rate, self.global_burst, self.global_burst, now
            )
        chat_wait = bucket.wait_time(now)
        global_wait = self._global_bucket.wait_time(now)
        wait = max(chat_wait, global_wait)
        if wait > 0:
            retry_after = max(1, math.ceil(wait - 1e-9))
            self._penalties[("chat", chat.id)] = now + retry_after
            reason = "chat" if chat_wait >= global_wait else "global"
            raise self._flood(call, chat.id, retry_after, reason)
        bucket.take(now)
        self._global_bucket.take(now)

    # ----------------------------------------------------------------- helpers

    def _me(self) -> dict[str, Any]:
        return {
            "id": self.bot_id,
            "is_bot": True,
            "first_name": self.bot_first_name,
            "username": self.bot_username,
        }

    def _take_message_id(self, chat_id: int) -> int:
        message_id = self._next_message_id[chat_id]
        self._next_message_id[chat_id] = message_id + 1
        return message_id

    def _chat(self, params: Mapping[str, Any]) -> Chat:
        raw = params.get("chat_id")
        if raw is None or raw == "":
            raise _bad(ERR_CHAT_ID_EMPTY)
        chat_id = _to_int(raw)
        chat = self._chats.get(chat_id) if chat_id is not None else None
        if chat is None:
            raise _bad(ERR_CHAT_NOT_FOUND)
        if chat.id in self._blocked:
            raise ApiError(403, ERR_BOT_BLOCKED)
        return chat

    def _target(self, params: Mapping[str, Any], missing: str) -> tuple[Chat, StoredMessage]:
        if params.get("inline_message_id"):
            raise _bad("Bad Request: inline messages are not supported by the fake")
        chat = self._chat(params)
        message_id = _to_int(params.get("message_id"))
        if message_id is None:
            raise _bad(ERR_MESSAGE_ID_MISSING)
        msg = self._messages.get(chat.id, {}).get(message_id)
        if msg is None or msg.deleted:
            raise _bad(missing)
        return chat, msg

    def _kick_poll(self) -> None:
        event, self._poll_wake = self._poll_wake, trio.Event()
        event.set()

    # ----------------------------------------------------------------- methods

    async def _get_me(self, call: _Call) -> _Result:
        me = self._me()
        me.update(
            can_join_groups=True,
            can_read_all_group_messages=False,
            supports_inline_queries=False,
            can_connect_to_business=False,
            has_main_web_app=False,
            has_topics_enabled=False,
        )
        return me, None

    async def _log_out(self, call: _Call) -> _Result:
        return True, None

    async def _set_webhook(self, call: _Call) -> _Result:
        url = str(call.params.get("url") or "")
        if not url:
            return await self._delete_webhook(call)
        self.webhook_url = url
        if _to_bool(call.params.get("drop_pending_updates")):
            self._updates.clear()
        self._kick_poll()
        return True, "Webhook was set"

    async def _delete_webhook(self, call: _Call) -> _Result:
        if _to_bool(call.params.get("drop_pending_updates")):
            self._updates.clear()
        if self.webhook_url is None:
            return True, "Webhook is already deleted"
        self.webhook_url = None
        return True, "Webhook was deleted"

    async def _get_webhook_info(self, call: _Call) -> _Result:
        return {
            "url": self.webhook_url or "",
            "has_custom_certificate": False,
            "pending_update_count": len(self._updates),
        }, None

    async def _get_updates(self, call: _Call) -> _Result:
        if self.webhook_url is not None:
            raise ApiError(409, ERR_CONFLICT_WEBHOOK_ACTIVE)
        p = call.params
        offset = _to_int(p.get("offset")) or 0
        limit = _clamp(_to_int(p.get("limit")), 100, 1, 100)
        timeout = _clamp(_to_int(p.get("timeout")), 0, 0, LONG_POLL_MAX_TIMEOUT)
        allowed = p.get("allowed_updates")
        if allowed is not None:
            if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
                raise _bad("Bad Request: can't parse allowed_updates JSON object")
            known = {a for a in allowed if a in ALL_UPDATE_TYPES}
            self.allowed_updates = frozenset(known) if known else DEFAULT_ALLOWED_UPDATES
        before = len(self._updates)
        if offset > 0:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
        elif offset < 0:
            self._updates = self._updates[offset:]
        if len(self._updates) != before:
            self._notify()  # confirmed: whoever waits on pending_updates may look

        self._poll_seq += 1
        me = self._poll_seq
        self._kick_poll()  # an older pending poll wakes up and sees it was superseded
        self._pending_poll = me
        deadline = call.now + timeout
        try:
            while True:
                if self._poll_seq != me:
                    raise ApiError(409, ERR_CONFLICT_OTHER_POLL)
                if self.webhook_url is not None:
                    raise ApiError(409, ERR_CONFLICT_SET_WEBHOOK)
                batch = self._updates[:limit]
                if batch or trio.current_time() >= deadline:
                    return [u[_RAW] if _RAW in u else u for u in batch], None
                wake = self._poll_wake
                with trio.move_on_at(deadline):
                    await wake.wait()
        finally:
            if self._pending_poll == me:
                self._pending_poll = None

    async def _send_message(self, call: _Call) -> _Result:
        p = call.params
        text, entities = _formatted(
            p.get("text"), p.get("parse_mode"), p.get("entities"), caption=False
        )
        markup = _reply_markup(p.get("reply_markup"), inline_only=False)
        chat = self._chat(p)
        thread_id = self._thread(chat, p)
        self._throttle(call, chat)
        msg = StoredMessage(
            message_id=self._take_message_id(chat.id),
            chat=chat,
            sender=self._me(),
            date=int(time.time()),
            from_bot=True,
            text=text,
            entities=entities or None,
            reply_markup=markup if markup and "inline_keyboard" in markup else None,
            message_thread_id=thread_id,
            is_topic_message=thread_id is not None,
        )
        self._messages[chat.id][msg.message_id] = msg
        return msg.to_api(), None

    async def _edit_message_text(self, call: _Call) -> _Result:
        p = call.params
        text, entities = _formatted(
            p.get("text"), p.get("parse_mode"), p.get("entities"), caption=False
        )
        markup = _reply_markup(p.get("reply_markup"), inline_only=True)
        chat, msg = self._target(p, ERR_MESSAGE_TO_EDIT_NOT_FOUND)
        if not msg.from_bot:
            raise _bad(ERR_MESSAGE_CANT_BE_EDITED)
        if msg.text is None:
            raise _bad(ERR_NO_TEXT_TO_EDIT)
        new_entities = entities or None
        if (msg.text, msg.entities, msg.reply_markup) == (text, new_entities, markup):
            raise _bad(ERR_NOT_MODIFIED)
        self._throttle(call, chat)
        msg.history.append(msg.text)
        msg.text, msg.entities, msg.reply_markup = text, new_entities, markup
        msg.edits += 1
        msg.edit_date = int(time.time())
        return msg.to_api(), None

    async def _edit_message_reply_markup(self, call: _Call) -> _Result:
        p = call.params
        markup = _reply_markup(p.get("reply_markup"), inline_only=True)
        chat, msg = self._target(p, ERR_MESSAGE_TO_EDIT_NOT_FOUND)
        if not msg.from_bot:
            raise _bad(ERR_MESSAGE_CANT_BE_EDITED)
        if msg.reply_markup == markup:
            raise _bad(ERR_NOT_MODIFIED)
        self._throttle(call, chat)
        msg.reply_markup = markup
        msg.edits += 1
        msg.edit_date = int(time.time())
        return msg.to_api(), None

    async def _delete_message(self, call: _Call) -> _Result:
        chat, msg = self._target(call.params, ERR_MESSAGE_TO_DELETE_NOT_FOUND)
        self._throttle(call, chat)
        msg.deleted = True
        return True, None

    async def _send_message_draft(self, call: _Call) -> _Result:
        p = call.params
        raw_draft = p.get("draft_id")
        draft_id = _to_int(raw_draft)
        if raw_draft is None or draft_id is None or draft_id == 0:
            raise _bad(ERR_DRAFT_ID_ZERO)
        text, entities = _formatted(
            p.get("text") or "",
            p.get("parse_mode"),
            p.get("entities"),
            caption=False,
            allow_empty=True,
        )
        chat = self._chat(p)
        if chat.type != "private":
            raise _bad(ERR_DRAFT_PEER_INVALID)
        thread_id = self._thread(chat, p)
        self._throttle(call, chat)
        self._drafts[chat.id].append(
            DraftUpdate(draft_id, text, entities or None, call.now, thread_id)
        )
        return True, None

    async def _send_chat_action(self, call: _Call) -> _Result:
        p = call.params
        action = p.get("action")
        if action not in CHAT_ACTIONS:
            raise _bad(ERR_WRONG_ACTION)
        chat = self._chat(p)
        thread_id = self._thread(chat, p)
        self._throttle(call, chat)
        self._actions[chat.id].append(ChatAction(str(action), call.now, thread_id))
        return True, None

    async def _send_document(self, call: _Call) -> _Result:
        p = call.params
        caption: str | None = None
        caption_entities: list[dict[str, Any]] = []
        if p.get("caption"):
            caption, caption_entities = _formatted(
                p.get("caption"), p.get("parse_mode"), p.get("caption_entities"), caption=True
            )
        markup = _reply_markup(p.get("reply_markup"), inline_only=False)
        upload = call.files.get("document")
        ref = p.get("document")
        if upload is None and isinstance(ref, str) and ref.startswith("attach://"):
            upload = call.files.get(ref[len("attach://") :])
        if upload is None and not (isinstance(ref, str) and ref):
            raise _bad(ERR_NO_DOCUMENT)
        if upload is not None and len(upload.content) > MAX_DOCUMENT_BYTES:
            raise ApiError(413, ERR_ENTITY_TOO_LARGE)
        chat = self._chat(p)
        thread_id = self._thread(chat, p)
        self._throttle(call, chat)
        file_id = f"BQACAgIAAxkDAAI{next(self._ids):012d}"
        if upload is not None:
            document = Document(file_id, upload.filename, upload.content, upload.content_type)
        else:
            document = Document(str(ref), None, None, None)
        msg = StoredMessage(
            message_id=self._take_message_id(chat.id),
            chat=chat,
            sender=self._me(),
            date=int(time.time()),
            from_bot=True,
            caption=caption or None,
            caption_entities=caption_entities or None,
            document=document,
            reply_markup=markup if markup and "inline_keyboard" in markup else None,
            message_thread_id=thread_id,
            is_topic_message=thread_id is not None,
        )
        self._messages[chat.id][msg.message_id] = msg
        return msg.to_api(), None

    async def _get_file(self, call: _Call) -> _Result:
        stored = self._files.get(str(call.params.get("file_id") or ""))
        if stored is None:
            raise _bad(ERR_INVALID_FILE_ID)
        if len(stored.content) > MAX_DOWNLOAD_BYTES:
            raise _bad(ERR_FILE_TOO_BIG)
        return {
            "file_id": stored.file_id,
            "file_unique_id": stored.file_unique_id,
            "file_size": len(stored.content),
            "file_path": stored.file_path,
        }, None

    async def _create_forum_topic(self, call: _Call) -> _Result:
        chat = self._chat(call.params)
        name = str(call.params.get("name") or "")
        if not 1 <= len(name) <= 128:
            raise _bad("Bad Request: invalid forum topic name specified")
        if not chat.is_forum:
            raise _bad(ERR_NOT_A_FORUM)
        thread_id = self.create_topic(chat.id, name)
        return {"message_thread_id": thread_id, "name": name, "icon_color": 7322096}, None

    async def _delete_forum_topic(self, call: _Call) -> _Result:
        chat = self._chat(call.params)
        thread_id = _to_int(call.params.get("message_thread_id"))
        if thread_id is None or thread_id not in chat.topics:
            raise _bad(ERR_THREAD_NOT_FOUND)
        self.delete_topic(chat.id, thread_id)
        return True, None

    def _thread(self, chat: Chat, params: Mapping[str, Any]) -> int | None:
        """The topic a send goes to; "message thread not found" unless it is open."""
        thread_id = _to_int(params.get("message_thread_id"))
        if not thread_id:
            return None
        if thread_id not in chat.topics:
            raise _bad(ERR_THREAD_NOT_FOUND)
        return thread_id

    async def _answer_callback_query(self, call: _Call) -> _Result:
        p = call.params
        query_id = str(p.get("callback_query_id") or "")
        state = self._callbacks.get(query_id)
        if state is None or state.answered:
            raise _bad(ERR_QUERY_TOO_OLD)
        text = p.get("text")
        if text is not None and len(str(text)) > 200:
            raise _bad("Bad Request: MESSAGE_TOO_LONG")
        state.answered = True
        self.callback_answers.append(
            CallbackAnswer(
                query_id,
                None if text is None else str(text),
                _to_bool(p.get("show_alert")),
                None if p.get("url") is None else str(p.get("url")),
                call.now,
            )
        )
        return True, None

    def _commands_key(self, params: Mapping[str, Any]) -> tuple[str, str]:
        scope = params.get("scope") or {"type": "default"}
        if not isinstance(scope, dict):
            raise _bad("Bad Request: can't parse BotCommandScope JSON object")
        return json.dumps(scope, sort_keys=True), str(params.get("language_code") or "")

    async def _set_my_commands(self, call: _Call) -> _Result:
        raw = call.params.get("commands")
        if not isinstance(raw, list):
            raise _bad("Bad Request: can't parse commands JSON object")
        if len(raw) > 100:
            raise _bad("Bad Request: too many commands specified")
        commands: list[dict[str, str]] = []
        for item in raw:
            if not isinstance(item, dict):
                raise _bad("Bad Request: can't parse BotCommand JSON object")
            command = item.get("command")
            description = item.get("description")
            if not isinstance(command, str) or not _COMMAND_RE.match(command):
                raise _bad("Bad Request: BOT_COMMAND_INVALID")
            if not isinstance(description, str) or not 1 <= len(description) <= 256:
                raise _bad("Bad Request: command description is invalid")
            commands.append({"command": command, "description": description})
        self._commands[self._commands_key(call.params)] = commands
        return True, None

    async def _get_my_commands(self, call: _Call) -> _Result:
        return list(self._commands.get(self._commands_key(call.params), [])), None

    async def _delete_my_commands(self, call: _Call) -> _Result:
        self._commands.pop(self._commands_key(call.params), None)
        return True, None


_METHODS: dict[str, tuple[str, _Handler]] = {
    name.lower(): (name, handler)
    for name, handler in [
        ("getMe", FakeTelegram._get_me),
        ("logOut", FakeTelegram._log_out),
        ("setWebhook", FakeTelegram._set_webhook),
        ("deleteWebhook", FakeTelegram._delete_webhook),
        ("getWebhookInfo", FakeTelegram._get_webhook_info),
        ("getUpdates", FakeTelegram._get_updates),
        ("sendMessage", FakeTelegram._send_message),
        ("editMessageText", FakeTelegram._edit_message_text),
        ("editMessageReplyMarkup", FakeTelegram._edit_message_reply_markup),
        ("deleteMessage", FakeTelegram._delete_message),
        ("sendMessageDraft", FakeTelegram._send_message_draft),
        ("sendChatAction", FakeTelegram._send_chat_action),
        ("sendDocument", FakeTelegram._send_document),
        ("answerCallbackQuery", FakeTelegram._answer_callback_query),
        ("getFile", FakeTelegram._get_file),
        ("createForumTopic", FakeTelegram._create_forum_topic),
        ("deleteForumTopic", FakeTelegram._delete_forum_topic),
        ("setMyCommands", FakeTelegram._set_my_commands),
        ("getMyCommands", FakeTelegram._get_my_commands),
        ("deleteMyCommands", FakeTelegram._delete_my_commands),
    ]
}


class _FaultBody(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.body = body


# --------------------------------------------------------------------------------------
# Envelopes and parameter parsing
# --------------------------------------------------------------------------------------


DOWNLOAD_CHUNK = 256 * 1024


class _CutDownload(trio.BrokenResourceError):
    """Raised inside a download body: the connection closes short of Content-Length."""


async def _file_chunks(content: bytes, cut_at: int | None) -> AsyncIterator[bytes]:
    end = len(content) if cut_at is None else cut_at
    for start in range(0, end, DOWNLOAD_CHUNK):
        yield content[start : min(end, start + DOWNLOAD_CHUNK)]
        await trio.lowlevel.checkpoint()
    if cut_at is not None:
        raise _CutDownload("fake telegram: download cut short on purpose")


class _MemoryStream(httpx.AsyncByteStream):
    """A streamed body in memory; a download cut short ends as a broken connection would."""

    def __init__(self, body: AsyncIterator[bytes], request: httpx.Request) -> None:
        self._body = body
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._body:
                yield chunk
        except _CutDownload:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body",
                request=self._request,
            ) from None


def _envelope_ok(result: Any, description: str | None) -> Response:
    payload: dict[str, Any] = {"ok": True, "result": result}
    if description is not None:
        payload["description"] = description
    return Response.json(200, payload)


def _envelope_error(exc: ApiError) -> Response:
    payload: dict[str, Any] = {
        "ok": False,
        "error_code": exc.code,
        "description": exc.description,
    }
    if exc.parameters:
        payload["parameters"] = exc.parameters
    return Response.json(exc.code, payload)


def _parse_params(request: Request) -> tuple[dict[str, Any], dict[str, UploadedFile]]:
    params: dict[str, Any] = dict(request.query)
    files: dict[str, UploadedFile] = {}
    content_type = request.headers.get("content-type", "")
    mime = content_type.split(";")[0].strip().lower()
    if request.body:
        if mime == "application/json":
            try:
                data = json.loads(request.body)
            except ValueError:
                raise _bad("Bad Request: can't parse JSON encoded request body") from None
            if not isinstance(data, dict):
                raise _bad("Bad Request: JSON request body must be an object")
            params.update(data)
        elif mime == "application/x-www-form-urlencoded":
            params.update(parse_qsl(request.body.decode("utf-8"), keep_blank_values=True))
        elif mime == "multipart/form-data":
            fields, files = _parse_multipart(content_type, request.body)
            params.update(fields)
    for key in _JSON_FIELDS:
        value = params.get(key)
        if isinstance(value, str):
            try:
                params[key] = json.loads(value)
            except ValueError:
                what = "reply keyboard markup" if key == "reply_markup" else key
                raise _bad(f"Bad Request: can't parse {what} JSON object") from None
    return params, files


_DISPOSITION_PARAM = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _parse_multipart(
    content_type: str, body: bytes
) -> tuple[dict[str, str], dict[str, UploadedFile]]:
    match = re.search(r'boundary=("?)([^";]+)\1', content_type)
    if match is None:
        raise _bad("Bad Request: multipart boundary is missing")
    delimiter = b"\r\n--" + match.group(2).encode()
    fields: dict[str, str] = {}
    files: dict[str, UploadedFile] = {}
    for chunk in (b"\r\n" + body).split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        disposition: dict[str, str] = {}
        for key, value in _DISPOSITION_PARAM.findall(headers.get("content-disposition", "")):
            if value.startswith('"'):
                value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            disposition[key.lower()] = value
        name = disposition.get("name")
        if name is None:
            continue
        filename = disposition.get("filename")
        if "filename*" in disposition:
            filename = unquote(disposition["filename*"].split("''", 1)[-1])
        if filename is not None:
            files[name] = UploadedFile(filename, data, headers.get("content-type"))
        else:
            fields[name] = data.decode("utf-8")
    return fields, files


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _to_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    return bool(value)


def _clamp(value: int | None, default: int, low: int, high: int) -> int:
    return max(low, min(high, default if value is None else value))


# --------------------------------------------------------------------------------------
# Text, entities, markup
# --------------------------------------------------------------------------------------


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _formatted(
    raw: Any,
    parse_mode: Any,
    raw_entities: Any,
    *,
    caption: bool,
    allow_empty: bool = False,
) -> tuple[str, list[dict[str, Any]]]:
    """Validate and normalise a text/caption like the Bot API server + TDLib do."""
    text = "" if raw is None else raw if isinstance(raw, str) else json.dumps(raw)
    if not text and not allow_empty and not caption:
        raise _bad(ERR_TEXT_EMPTY)
    if len(text.encode("utf-8")) > MAX_RAW_TEXT_BYTES:
        raise _bad(ERR_TEXT_TOO_LONG)
    mode = "" if parse_mode is None else str(parse_mode).strip().lower()
    if mode not in ("", "none", "markdown", "markdownv2", "html"):
        raise _bad(ERR_UNSUPPORTED_PARSE_MODE)
    entities: list[dict[str, Any]]
    if raw_entities is not None and raw_entities != []:
        entities = _check_entities(text, raw_entities)
    elif mode == "html":
        text, entities = _parse_html(text)
    elif mode in ("markdown", "markdownv2"):
        _check_markdown(text, v2=mode == "markdownv2")
        entities = []
    else:
        entities = []
    text, entities = _trim(text, entities)
    if not text and not allow_empty and not caption:
        raise _bad(ERR_TEXT_MUST_BE_NON_EMPTY)
    if caption and len(text) > MAX_CAPTION_LENGTH:
        raise _bad(ERR_CAPTION_TOO_LONG)
    if len(text) > MAX_TEXT_LENGTH:
        raise _bad(ERR_MESSAGE_TOO_LONG)
    return text, entities


def _check_entities(text: str, raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise _bad("Bad Request: can't parse entities JSON object")
    total = utf16_len(text)
    out: list[dict[str, Any]] = []
    for item in raw:
        if not isinstance(item, dict):
            raise _bad("Bad Request: can't parse MessageEntity: expected an Object")
        kind, offset, length = item.get("type"), item.get("offset"), item.get("length")
        if kind not in ENTITY_TYPES:
            raise _bad("Bad Request: can't parse MessageEntity: Unsupported type specified")
        if not isinstance(offset, int) or not isinstance(length, int):
            raise _bad('Bad Request: can\'t parse MessageEntity: Field "offset" must be a Number')
        if offset < 0 or length < 0:
            raise _bad(ERR_PARSE_ENTITIES + f"Entity has negative offset or length at {offset}")
        if offset + length > total:
            raise _bad(
                ERR_PARSE_ENTITIES + f"Entity beginning at UTF-16 offset {offset} ends after"
                f" the end of the text at UTF-16 offset {total}"
            )
        if length == 0:
            continue  # TDLib drops empty entities
        if kind == "text_link" and not isinstance(item.get("url"), str):
            raise _bad('Bad Request: can\'t parse MessageEntity: Field "url" must be a String')
        entity: dict[str, Any] = {"type": kind, "offset": offset, "length": length}
        for key in _ENTITY_EXTRA_KEYS:
            if key in item:
                entity[key] = item[key]
        out.append(entity)
    return out


def _trim(text: str, entities: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """TDLib's trimming: leading ' '/'\\n' before the first entity, trailing whitespace."""
    first = min((e["offset"] for e in entities), default=None)
    lead = 0
    while lead < len(text) and text[lead] in " \n" and (first is None or lead < first):
        lead += 1
    text = text[lead:].rstrip(_RTRIM)
    end = utf16_len(text)
    out: list[dict[str, Any]] = []
    for entity in entities:
        offset = entity["offset"] - lead
        stop = min(offset + entity["length"], end)
        if stop - offset > 0:
            out.append({**entity, "offset": offset, "length": stop - offset})
    out.sort(key=lambda e: (e["offset"], -e["length"]))
    return text, out


_HTML_TAGS = {
    "b": "bold",
    "strong": "bold",
    "i": "italic",
    "em": "italic",
    "u": "underline",
    "ins": "underline",
    "s": "strikethrough",
    "strike": "strikethrough",
    "del": "strikethrough",
    "span": "spoiler",
    "tg-spoiler": "spoiler",
    "a": "text_link",
    "code": "code",
    "pre": "pre",
    "blockquote": "blockquote",
    "tg-emoji": "custom_emoji",
}
_HTML_ENTITY = re.compile(r"&(lt|gt|amp|quot|#[0-9]+|#[xX][0-9a-fA-F]+);")
_HTML_ATTR = re.compile(r"""([A-Za-z_-]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"']+))""")
_NAMED = {"lt": "<", "gt": ">", "amp": "&", "quot": '"'}


def _parse_html(src: str) -> tuple[str, list[dict[str, Any]]]:
    """A strict subset of TDLib's parse_html: supported tags, escapes, nesting errors."""
    out: list[str] = []
    pos16 = 0
    stack: list[tuple[str, int, dict[str, Any]]] = []
    entities: list[dict[str, Any]] = []

    def fail(detail: str) -> ApiError:
        return _bad(ERR_PARSE_ENTITIES + detail)

    i = 0
    while i < len(src):
        ch = src[i]
        if ch == "&":
            m = _HTML_ENTITY.match(src, i)
            if m:
                name = m.group(1)
                if name in _NAMED:
                    ch = _NAMED[name]
                else:
                    ch = chr(int(name[2:], 16) if name[1] in "xX" else int(name[1:]))
                i = m.end()
            else:
                i += 1
            out.append(ch)
            pos16 += utf16_len(ch)
            continue
        if ch != "<":
            out.append(ch)
            pos16 += utf16_len(ch)
            i += 1
            continue
        byte_offset = len(src[:i].encode("utf-8"))
        end = src.find(">", i)
        if end == -1:
            raise fail(f"Unclosed start tag at byte offset {byte_offset}")
        inner = src[i + 1 : end]
        if inner.startswith("/"):
            name = inner[1:].strip().lower()
            if not stack:
                raise fail(f"Unexpected end tag at byte offset {byte_offset}")
            tag, start, attrs_ = stack.pop()
            if name != tag:
                raise fail(
                    f'Unmatched end tag at byte offset {byte_offset}, expected "</{tag}>",'
                    f' found "</{name}>"'
                )
            if tag == "code" and stack and stack[-1][0] == "pre":  # <pre><code class=…>
                if "language" in attrs_:
                    stack[-1][2]["language"] = attrs_["language"]
            elif pos16 > start and attrs_.get("type"):
                entities.append({**attrs_, "offset": start, "length": pos16 - start})
        else:
            m = re.match(r"([A-Za-z][A-Za-z0-9-]*)(.*)$", inner, re.S)
            name = m.group(1).lower() if m else ""
            if name not in _HTML_TAGS:
                raise fail(f'Unsupported start tag "{name}" at byte offset {byte_offset}')
            found = {
                k.lower(): a or b or c for k, a, b, c in _HTML_ATTR.findall(m.group(2) if m else "")
            }
            extra: dict[str, Any] = {"type": _HTML_TAGS[name]}
            if name == "span" and found.get("class") != "tg-spoiler":
                raise fail(f'Tag "span" must have class "tg-spoiler" at byte offset {byte_offset}')
            if name == "a":
                if "href" in found:
                    extra["url"] = found["href"]
                else:
                    extra = {}
            if name == "blockquote" and "expandable" in inner.lower():
                extra["type"] = "expandable_blockquote"
            if name == "tg-emoji":
                extra["custom_emoji_id"] = found.get("emoji-id", "")
            if name == "code" and stack and stack[-1][0] == "pre":
                language = found.get("class", "")
                if language.startswith("language-"):
                    extra["language"] = language[len("language-") :]
            stack.append((name, pos16, extra))
        i = end + 1
    if stack:
        raise fail(f'Can\'t find end tag corresponding to start tag "{stack[-1][0]}"')
    return "".join(out), entities


def _check_markdown(text: str, *, v2: bool) -> None:
    """Markdown text is kept literally; only unbalanced markers are rejected."""
    names = {"*": "Bold", "_": "Italic", "__": "Underline", "~": "Strikethrough", "||": "Spoiler"}
    opened: dict[str, int] = {}
    code: tuple[str, int] | None = None
    i = 0
    while i < len(text):
        ch = text[i]
        if v2 and ch == "\\":
            i += 2
            continue
        byte_offset = len(text[:i].encode("utf-8"))
        if ch == "`":
            fence = "```" if text.startswith("```", i) else "`"
            if code is None:
                code = (fence, byte_offset)
            elif code[0] == fence:
                code = None
            i += len(fence)
            continue
        if code is not None:
            i += 1
            continue
        marker = ch
        if v2 and text.startswith("__", i):
            marker = "__"
        elif v2 and text.startswith("||", i):
            marker = "||"
        if marker in ("*", "_") or (v2 and marker in ("__", "~", "||")):
            if marker in opened:
                del opened[marker]
            else:
                opened[marker] = byte_offset
            i += len(marker)
            continue
        if v2 and ch in ">#+-={}.!|":
            raise _bad(
                ERR_PARSE_ENTITIES
                + f"Character '{ch}' is reserved and must be escaped with the preceding '\\'"
            )
        i += 1
    if code is not None:
        opened["`"] = code[1]
    if opened:
        marker, offset = min(opened.items(), key=lambda kv: kv[1])
        if v2:
            is_pre = marker == "`" and code is not None and code[0] == "```"
            kind = "Pre" if is_pre else names.get(marker, "Code")
            detail = f"Can't find end of {kind} entity at byte offset {offset}"
        else:
            detail = f"Can't find end of the entity starting at byte offset {offset}"
        raise _bad(ERR_PARSE_ENTITIES + detail)


def _reply_markup(raw: Any, *, inline_only: bool) -> dict[str, Any] | None:
    """Validate a reply markup; an empty inline keyboard means "no markup"."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, dict):
        raise _bad("Bad Request: can't parse reply keyboard markup JSON object")
    if "inline_keyboard" not in raw:
        if inline_only:
            raise _bad("Bad Request: inline keyboard expected")
        return raw
    rows = raw["inline_keyboard"]
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        raise _bad(
            'Bad Request: field "inline_keyboard" of the InlineKeyboardMarkup must be an Array'
            " of Arrays"
        )
    for row in rows:
        for button in row:
            if not isinstance(button, dict) or not isinstance(button.get("text"), str):
                raise _bad("Bad Request: can't parse inline keyboard button: Text must be a String")
            if "callback_data" in button:
                data = button["callback_data"]
                if not isinstance(data, str) or not (
                    1 <= len(data.encode("utf-8")) <= MAX_CALLBACK_DATA_BYTES
                ):
                    raise _bad(ERR_BUTTON_DATA_INVALID)
            elif not any(
                k in button
                for k in (
                    "url",
                    "web_app",
                    "login_url",
                    "switch_inline_query",
                    "switch_inline_query_current_chat",
                    "switch_inline_query_chosen_chat",
                    "copy_text",
                    "callback_game",
                    "pay",
                )
            ):
                raise _bad(
                    "Bad Request: can't parse inline keyboard button: InlineKeyboardButton must"
                    " have exactly one of the optional fields"
                )
    if sum(len(row) for row in rows) > MAX_INLINE_BUTTONS:
        raise _bad("Bad Request: reply markup is too long")
    if not any(rows):
        return None
    return {"inline_keyboard": rows}
