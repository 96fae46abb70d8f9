"""Tests of the fake Telegram Bot API (tests/fakes/telegram_api.py) over real HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio

from tests.fakes.telegram_api import (
    ERR_BUTTON_DATA_INVALID,
    ERR_CAPTION_TOO_LONG,
    ERR_CHAT_NOT_FOUND,
    ERR_CONFLICT_OTHER_POLL,
    ERR_CONFLICT_SET_WEBHOOK,
    ERR_CONFLICT_WEBHOOK_ACTIVE,
    ERR_DRAFT_ID_ZERO,
    ERR_DRAFT_PEER_INVALID,
    ERR_FILE_TOO_BIG,
    ERR_INVALID_FILE_ID,
    ERR_MESSAGE_TO_DELETE_NOT_FOUND,
    ERR_MESSAGE_TO_EDIT_NOT_FOUND,
    ERR_MESSAGE_TOO_LONG,
    ERR_NOT_A_FORUM,
    ERR_NOT_MODIFIED,
    ERR_QUERY_TOO_OLD,
    ERR_TEXT_EMPTY,
    ERR_TEXT_MUST_BE_NON_EMPTY,
    ERR_TEXT_TOO_LONG,
    ERR_THREAD_NOT_FOUND,
    ERR_UNSUPPORTED_PARSE_MODE,
    MAX_DOWNLOAD_BYTES,
    MOCK_BASE_URL,
    NGINX_502_HTML,
    FakeTelegram,
)

TOKEN = "123456:TEST-TOKEN-abcdefghijklmnopqrstuvwxyz"
CHAT = 4242
OTHER = 4343
GROUP = -100777

Envelope = dict[str, Any]


async def start(nursery: trio.Nursery, **kwargs: Any) -> FakeTelegram:
    fake = FakeTelegram(TOKEN, **kwargs)
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeTelegram:
    return await start(nursery)


def make_client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"{base_url}/bot{TOKEN}/", timeout=60)


@pytest.fixture
async def client(fake: FakeTelegram) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(fake.base_url) as c:
        yield c


async def call(client: httpx.AsyncClient, method: str, **params: Any) -> tuple[int, Envelope]:
    response = await client.post(method, json=params)
    body: Envelope = response.json()
    assert body["ok"] == (response.status_code == 200)
    if not body["ok"]:
        assert body["error_code"] == response.status_code
    return response.status_code, body


async def ok(client: httpx.AsyncClient, method: str, **params: Any) -> Any:
    status, body = await call(client, method, **params)
    assert status == 200, body
    return body["result"]


async def error(client: httpx.AsyncClient, method: str, **params: Any) -> tuple[int, str]:
    status, body = await call(client, method, **params)
    assert status != 200, body
    return status, body["description"]


def keyboard(*data: str) -> dict[str, Any]:
    return {"inline_keyboard": [[{"text": d, "callback_data": d} for d in data]]}


# ------------------------------------------------------------------ routing & envelope


async def test_routing_tokens_and_envelope(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    me = await ok(client, "getMe")
    assert me["id"] == 123456
    assert me["is_bot"] is True
    assert me["username"] == "codexnet_test_bot"
    assert (await ok(client, "GETME"))["id"] == 123456  # method names are case-insensitive

    async with httpx.AsyncClient(base_url=fake.base_url) as raw:
        r = await raw.post("/bot123456:WRONG/getMe")
        assert (r.status_code, r.json()["description"]) == (401, "Unauthorized")
        r = await raw.get("/favicon.ico")
        assert (r.status_code, r.json()["description"]) == (404, "Not Found")
        r = await raw.post(f"/bot{TOKEN}/sendMessages", json={})
        assert (r.status_code, r.json()) == (
            404,
            {"ok": False, "error_code": 404, "description": "Not Found: method not found"},
        )

    fake.add_chat(CHAT)
    # query string (GET) and form-urlencoded with a JSON-encoded reply_markup
    r = await client.get("sendMessage", params={"chat_id": CHAT, "text": "via query"})
    assert r.json()["result"]["text"] == "via query"
    r = await client.post(
        "sendMessage",
        data={"chat_id": str(CHAT), "text": "via form", "reply_markup": json.dumps(keyboard("a"))},
    )
    message = r.json()["result"]
    assert message["reply_markup"] == keyboard("a")
    assert message["message_id"] == 2
    assert message["chat"] == {"id": CHAT, "type": "private", "first_name": "Tester"}
    assert message["from"]["id"] == 123456
    assert [m.text for m in fake.messages(CHAT)] == ["via query", "via form"]
    assert [r.method for r in fake.requests][-2:] == ["sendMessage", "sendMessage"]
    assert fake.requests[1].method == "getMe"  # canonical spelling for "GETME"
    assert fake.internal_errors == []


async def test_chat_not_found_and_blocked(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    assert await error(client, "sendMessage", chat_id=999, text="hi") == (400, ERR_CHAT_NOT_FOUND)
    assert await error(client, "sendChatAction", chat_id=999, action="typing") == (
        400,
        ERR_CHAT_NOT_FOUND,
    )
    fake.push_my_chat_member(CHAT, blocked=True)
    assert await error(client, "sendMessage", chat_id=CHAT, text="hi") == (
        403,
        "Forbidden: bot was blocked by the user",
    )


# ------------------------------------------------------------------ text validation


async def test_text_limits(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    fake.add_chat(CHAT)
    send = {"chat_id": CHAT}
    assert await error(client, "sendMessage", **send, text="") == (400, ERR_TEXT_EMPTY)
    assert await error(client, "sendMessage", **send) == (400, ERR_TEXT_EMPTY)
    assert await error(client, "sendMessage", **send, text=" \n\t ") == (
        400,
        ERR_TEXT_MUST_BE_NON_EMPTY,
    )
    # 4096 code points are fine even when they are 8192 UTF-16 units
    await ok(client, "sendMessage", **send, text="😀" * 4096)
    assert await error(client, "sendMessage", **send, text="😀" * 4097) == (
        400,
        ERR_MESSAGE_TOO_LONG,
    )
    assert await error(client, "sendMessage", **send, text="a" * 4097) == (
        400,
        ERR_MESSAGE_TOO_LONG,
    )
    # trailing whitespace is trimmed before counting
    await ok(client, "sendMessage", **send, text="a" * 4096 + "\n\n   ")
    # more than 32 KiB of raw text is refused before parsing
    assert await error(client, "sendMessage", **send, text="😀" * 8193) == (400, ERR_TEXT_TOO_LONG)
    assert await error(client, "sendMessage", **send, text="x", parse_mode="Foo") == (
        400,
        ERR_UNSUPPORTED_PARSE_MODE,
    )


async def test_entities_and_trimming(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    fake.add_chat(CHAT)
    bad = [{"type": "bold", "offset": 1, "length": 5}]
    assert await error(client, "sendMessage", chat_id=CHAT, text="hi", entities=bad) == (
        400,
        "Bad Request: can't parse entities: Entity beginning at UTF-16 offset 1 ends after"
        " the end of the text at UTF-16 offset 2",
    )
    # offsets are UTF-16: one emoji is two units
    ents = [{"type": "bold", "offset": 0, "length": 3}]
    await ok(client, "sendMessage", chat_id=CHAT, text="😀x", entities=ents)
    # leading newlines/spaces and trailing whitespace are trimmed, entities shifted
    ents = [{"type": "italic", "offset": 4, "length": 5}]
    msg = await ok(client, "sendMessage", chat_id=CHAT, text="\n\n  hello  \n", entities=ents)
    assert msg["text"] == "hello"
    assert msg["entities"] == [{"type": "italic", "offset": 0, "length": 5}]
    # entities as a JSON string (form encoding) are decoded
    r = await client.post(
        "sendMessage",
        data={
            "chat_id": str(CHAT),
            "text": "bold",
            "entities": json.dumps([{**bad[0], "offset": 0, "length": 4}]),
        },
    )
    assert r.json()["result"]["entities"] == [{"type": "bold", "offset": 0, "length": 4}]


async def test_parse_modes(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    fake.add_chat(CHAT)
    msg = await ok(
        client, "sendMessage", chat_id=CHAT, text="<b>bold</b> &lt;ok&gt;", parse_mode="HTML"
    )
    assert msg["text"] == "bold <ok>"
    assert msg["entities"] == [{"type": "bold", "offset": 0, "length": 4}]
    msg = await ok(
        client,
        "sendMessage",
        chat_id=CHAT,
        text='<pre><code class="language-py">x = 1</code></pre>',
        parse_mode="html",
    )
    assert msg["entities"] == [{"type": "pre", "offset": 0, "length": 5, "language": "py"}]
    prefix = "Bad Request: can't parse entities: "
    cases = [
        ("HTML", "<b>open", 'Can\'t find end tag corresponding to start tag "b"'),
        ("HTML", "a<br>b", 'Unsupported start tag "br" at byte offset 1'),
        ("HTML", "<b>x</i>", 'Unmatched end tag at byte offset 4, expected "</b>", found "</i>"'),
        ("HTML", "x</b>", "Unexpected end tag at byte offset 1"),
        ("HTML", "1 <2", "Unclosed start tag at byte offset 2"),
        ("Markdown", "*bold", "Can't find end of the entity starting at byte offset 0"),
        ("MarkdownV2", "ab _it", "Can't find end of Italic entity at byte offset 3"),
        (
            "MarkdownV2",
            "Hello.",
            "Character '.' is reserved and must be escaped with the preceding '\\'",
        ),
    ]
    for mode, text, detail in cases:
        got = await error(client, "sendMessage", chat_id=CHAT, text=text, parse_mode=mode)
        assert got == (400, prefix + detail), (mode, text)
    await ok(client, "sendMessage", chat_id=CHAT, text="Hello\\. *bold*", parse_mode="MarkdownV2")


async def test_a_keyboard_of_over_100_buttons_is_too_long(
    fake: FakeTelegram, client: httpx.AsyncClient
) -> None:
    fake.add_chat(CHAT)
    rows = [[{"text": str(i), "callback_data": str(i)}] for i in range(100)]
    await ok(client, "sendMessage", chat_id=CHAT, text="k", reply_markup={"inline_keyboard": rows})
    rows.append([{"text": "one more", "callback_data": "x"}])
    got = await error(
        client, "sendMessage", chat_id=CHAT, text="k", reply_markup={"inline_keyboard": rows}
    )
    assert got == (400, "Bad Request: reply markup is too long")


async def test_callback_data_limit(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    fake.add_chat(CHAT)
    await ok(client, "sendMessage", chat_id=CHAT, text="k", reply_markup=keyboard("x" * 64))
    await ok(client, "sendMessage", chat_id=CHAT, text="k", reply_markup=keyboard("é" * 32))
    for data in ("x" * 65, "é" * 33, ""):
        got = await error(
            client, "sendMessage", chat_id=CHAT, text="k", reply_markup=keyboard(data)
        )
        assert got == (400, ERR_BUTTON_DATA_INVALID)
    got = await error(
        client,
        "editMessageReplyMarkup",
        chat_id=CHAT,
        message_id=1,
        reply_markup=keyboard("y" * 99),
    )
    assert got == (400, ERR_BUTTON_DATA_INVALID)


# ------------------------------------------------------------------ edits & deletes


async def test_edits(nursery: trio.Nursery) -> None:
    fake = await start(nursery, rate_limits=False)  # five limited calls in a row
    fake.add_chat(CHAT)
    async with make_client(fake.base_url) as client:
        await check_edits(fake, client)


async def check_edits(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    msg = await ok(client, "sendMessage", chat_id=CHAT, text="v1", reply_markup=keyboard("a"))
    mid = msg["message_id"]
    edit = {"chat_id": CHAT, "message_id": mid}
    assert await error(client, "editMessageText", chat_id=CHAT, message_id=99, text="x") == (
        400,
        ERR_MESSAGE_TO_EDIT_NOT_FOUND,
    )
    got = await error(client, "editMessageText", **edit, text="v1 \n", reply_markup=keyboard("a"))
    assert got == (400, ERR_NOT_MODIFIED)
    # same text without reply_markup removes the keyboard: a real change
    edited = await ok(client, "editMessageText", **edit, text="v1")
    assert "reply_markup" not in edited
    assert "edit_date" in edited
    assert await error(client, "editMessageReplyMarkup", **edit) == (400, ERR_NOT_MODIFIED)
    await ok(client, "editMessageReplyMarkup", **edit, reply_markup=keyboard("b"))
    await ok(client, "editMessageText", **edit, text="v2", reply_markup=keyboard("b"))
    stored = fake.message(CHAT, mid)
    assert (stored.text, stored.edits, stored.history) == ("v2", 3, ["v1", "v1"])
    assert stored.reply_markup == keyboard("b")
    assert await ok(client, "deleteMessage", **edit) is True
    assert await error(client, "deleteMessage", **edit) == (400, ERR_MESSAGE_TO_DELETE_NOT_FOUND)
    assert await error(client, "editMessageText", **edit, text="v3") == (
        400,
        ERR_MESSAGE_TO_EDIT_NOT_FOUND,
    )
    assert fake.messages(CHAT) == []
    assert [m.message_id for m in fake.messages(CHAT, include_deleted=True)] == [mid]


# ------------------------------------------------------------------ drafts, actions, documents


async def test_drafts(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    fake.add_chat(CHAT)
    fake.add_chat(GROUP)
    assert await error(client, "sendMessageDraft", chat_id=GROUP, draft_id=1, text="x") == (
        400,
        ERR_DRAFT_PEER_INVALID,
    )
    assert await error(client, "sendMessageDraft", chat_id=CHAT, draft_id=0, text="x") == (
        400,
        ERR_DRAFT_ID_ZERO,
    )
    assert await error(client, "sendMessageDraft", chat_id=CHAT, text="x") == (
        400,
        ERR_DRAFT_ID_ZERO,
    )
    assert await error(client, "sendMessageDraft", chat_id=CHAT, draft_id=3, text="😀" * 4097) == (
        400,
        ERR_MESSAGE_TOO_LONG,
    )
    await ok(client, "sendMessageDraft", chat_id=CHAT, draft_id=7, text="")
    await ok(client, "sendMessageDraft", chat_id=CHAT, draft_id=7, text="Hel")
    await ok(client, "sendMessageDraft", chat_id=CHAT, draft_id=8, text="Hello")
    assert fake.drafts(CHAT) == {7: ["", "Hel"], 8: ["Hello"]}
    await ok(client, "sendChatAction", chat_id=CHAT, action="typing")
    assert await error(client, "sendChatAction", chat_id=CHAT, action="dancing") == (
        400,
        "Bad Request: wrong parameter action in request",
    )
    assert [a.action for a in fake.chat_actions(CHAT)] == ["typing"]


async def test_send_document_multipart(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    fake.add_chat(CHAT)
    content = b"# Report\r\n\x00\xff binary\r\n--not-a-boundary\r\n"
    r = await client.post(
        "sendDocument",
        data={
            "chat_id": str(CHAT),
            "caption": "Full output",
            "reply_markup": json.dumps(keyboard("z")),
        },
        files={"document": ("report.md", content, "text/markdown")},
    )
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["document"]["file_name"] == "report.md"
    assert result["document"]["file_size"] == len(content)
    assert result["caption"] == "Full output"
    [msg] = fake.messages(CHAT)
    assert msg.document is not None
    assert (msg.document.filename, msg.document.content) == ("report.md", content)
    assert msg.document.mime_type == "text/markdown"
    assert msg.reply_markup == keyboard("z")
    r = await client.post(
        "sendDocument",
        data={"chat_id": str(CHAT), "caption": "c" * 1025},
        files={"document": ("a.txt", b"a")},
    )
    assert (r.status_code, r.json()["description"]) == (400, ERR_CAPTION_TOO_LONG)
    r = await client.post("sendDocument", data={"chat_id": str(CHAT)}, files={"x": ("a", b"a")})
    assert (r.status_code, r.json()["description"]) == (
        400,
        "Bad Request: there is no document in the request",
    )
    assert fake.requests[-1].files["x"].content == b"a"
    # a document has no text to edit
    assert await error(client, "editMessageText", chat_id=CHAT, message_id=1, text="x") == (
        400,
        "Bad Request: there is no text in the message to edit",
    )


# ------------------------------------------------------------------ callbacks & commands


async def test_callback_queries(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    fake.push_message(CHAT, "/start")
    msg = await ok(client, "sendMessage", chat_id=CHAT, text="Approve?", reply_markup=keyboard("y"))
    assert msg["message_id"] == 2  # the user's message took id 1
    query_id = fake.push_callback(CHAT, msg["message_id"], "y")
    updates = await ok(client, "getUpdates", timeout=0)
    assert updates[0]["message"]["entities"] == [{"type": "bot_command", "offset": 0, "length": 6}]
    cq = updates[1]["callback_query"]
    assert (cq["id"], cq["data"], cq["from"]["id"]) == (query_id, "y", CHAT)
    assert cq["message"]["text"] == "Approve?"
    assert cq["message"]["reply_markup"] == keyboard("y")
    assert await ok(client, "answerCallbackQuery", callback_query_id=query_id, text="ok") is True
    assert await error(client, "answerCallbackQuery", callback_query_id=query_id) == (
        400,
        ERR_QUERY_TOO_OLD,
    )
    assert await error(client, "answerCallbackQuery", callback_query_id="123") == (
        400,
        ERR_QUERY_TOO_OLD,
    )
    assert [(a.callback_query_id, a.text) for a in fake.callback_answers] == [(query_id, "ok")]


async def test_commands(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    commands = [{"command": "new", "description": "Start a new session"}]
    assert await ok(client, "setMyCommands", commands=commands) is True
    assert await ok(client, "getMyCommands") == commands
    assert fake.commands == commands
    r = await client.post("setMyCommands", data={"commands": json.dumps(commands * 2)})
    assert r.status_code == 200
    assert await error(
        client, "setMyCommands", commands=[{"command": "New", "description": "x"}]
    ) == (
        400,
        "Bad Request: BOT_COMMAND_INVALID",
    )


# ------------------------------------------------------------------ getUpdates


async def test_long_poll_returns_as_soon_as_a_message_arrives(
    fake: FakeTelegram, client: httpx.AsyncClient
) -> None:
    results: list[list[dict[str, Any]]] = []

    async def poll() -> None:
        results.append(await ok(client, "getUpdates", timeout=30))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await fake.wait_until(lambda: fake.polling)
            started = trio.current_time()
            update_id = fake.push_message(CHAT, "hello", first_name="Ann")
    assert trio.current_time() - started < 1
    [[update]] = results
    assert update["update_id"] == update_id
    message = update["message"]
    assert (message["text"], message["message_id"], message["chat"]["type"]) == (
        "hello",
        1,
        "private",
    )
    assert message["from"] == {
        "id": CHAT,
        "is_bot": False,
        "first_name": "Ann",
        "language_code": "en",
    }
    assert not fake.polling


async def test_offset_confirmation_and_clamping(
    fake: FakeTelegram, client: httpx.AsyncClient
) -> None:
    ids = [fake.push_message(CHAT, f"m{i}") for i in range(4)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 4
    assert [u["update_id"] for u in await ok(client, "getUpdates")] == ids
    # without a higher offset nothing is confirmed
    assert len(await ok(client, "getUpdates", timeout=0)) == 4
    # limit is clamped to 1..100, timeout to 0..50 (no error)
    assert len(await ok(client, "getUpdates", limit=0, timeout=-5)) == 1
    assert len(await ok(client, "getUpdates", limit=1000)) == 4
    batch = await ok(client, "getUpdates", offset=ids[1] + 1)
    assert [u["update_id"] for u in batch] == ids[2:]
    assert [u["update_id"] for u in await ok(client, "getUpdates", offset=-1)] == ids[3:]
    assert await ok(client, "getUpdates", offset=ids[3] + 1, timeout=0) == []
    assert fake.pending_updates == []
    group_update = fake.push_message(GROUP, "hi all", user_id=77)
    [update] = await ok(client, "getUpdates", offset=group_update)
    assert update["message"]["chat"]["type"] == "group"
    assert update["message"]["from"]["id"] == 77


async def test_second_poller_terminates_the_older_one(
    fake: FakeTelegram, client: httpx.AsyncClient
) -> None:
    results: list[tuple[int, Envelope]] = []

    async def poll() -> None:
        results.append(await call(client, "getUpdates", timeout=30))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await fake.wait_until(lambda: fake.polling)
            assert await ok(client, "getUpdates", timeout=0) == []
    [(status, body)] = results
    assert (status, body["description"]) == (409, ERR_CONFLICT_OTHER_POLL)
    assert fake.stats.conflicts == 1


async def test_webhook_conflicts(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    status, body = await call(client, "deleteWebhook")
    assert (status, body["result"], body["description"]) == (
        200,
        True,
        "Webhook is already deleted",
    )
    results: list[tuple[int, str]] = []

    async def poll() -> None:
        results.append(await error(client, "getUpdates", timeout=30))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await fake.wait_until(lambda: fake.polling)
            await ok(client, "setWebhook", url="https://example.invalid/hook")
    assert results == [(409, ERR_CONFLICT_SET_WEBHOOK)]
    assert await error(client, "getUpdates") == (409, ERR_CONFLICT_WEBHOOK_ACTIVE)
    status, body = await call(client, "deleteWebhook", drop_pending_updates=True)
    assert body["description"] == "Webhook was deleted"
    assert await ok(client, "getUpdates") == []


async def test_allowed_updates_is_sticky(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    fake.add_chat(CHAT)
    msg = await ok(client, "sendMessage", chat_id=CHAT, text="q", reply_markup=keyboard("a"))
    await ok(client, "getUpdates", timeout=0, allowed_updates=["callback_query"])
    fake.push_message(CHAT, "ignored")
    fake.push_callback(CHAT, msg["message_id"], "a")
    updates = await ok(client, "getUpdates", timeout=0)  # no allowed_updates: previous setting
    assert [list(u)[1] for u in updates] == ["callback_query"]
    assert len(fake.filtered_updates) == 1
    r = await client.post("getUpdates", data={"allowed_updates": "[]", "timeout": "0"})
    assert r.status_code == 200
    fake.push_message(CHAT, "seen")
    assert len(await ok(client, "getUpdates", timeout=0)) == 2


# ------------------------------------------------------------------ rate limits


async def test_private_chat_flood_limit_and_penalty(nursery: trio.Nursery) -> None:
    fake = await start(nursery, private_rate=0.01, private_burst=2, penalty_extension=5)
    fake.add_chat(CHAT)
    fake.add_chat(OTHER)
    async with make_client(fake.base_url) as client:
        await ok(client, "sendMessage", chat_id=CHAT, text="1")
        await ok(client, "editMessageText", chat_id=CHAT, message_id=1, text="1b")
        status, body = await call(client, "sendMessage", chat_id=CHAT, text="3")
        assert status == 429
        retry_after = body["parameters"]["retry_after"]
        assert 90 <= retry_after <= 100
        assert body["description"] == f"Too Many Requests: retry after {retry_after}"
        # ignoring retry_after: every limited request to the chat is refused, window grows
        status, body = await call(client, "sendMessageDraft", chat_id=CHAT, draft_id=1, text="x")
        assert status == 429
        assert body["parameters"]["retry_after"] >= retry_after + 4
        # invalid requests are still validated first; non-limited methods pass
        assert await error(client, "sendMessage", chat_id=CHAT, text="") == (400, ERR_TEXT_EMPTY)
        await ok(client, "sendChatAction", chat_id=CHAT, action="typing")
        # other chats are unaffected
        await ok(client, "sendMessage", chat_id=OTHER, text="hi")
    assert fake.stats.too_many_requests == 2
    assert fake.stats.violations == 2
    assert fake.stats.early_retries == 1
    assert [(h.reason, h.chat_id) for h in fake.stats.flood_hits] == [
        ("chat", CHAT),
        ("penalty", CHAT),
    ]
    assert [m.text for m in fake.messages(CHAT)] == ["1b"]
    assert [r.status for r in fake.requests if r.method == "sendMessage"] == [200, 429, 400, 200]


async def test_group_and_global_limits(nursery: trio.Nursery) -> None:
    fake = await start(nursery, group_rate=0.01, group_burst=1, global_rate=0.01, global_burst=3)
    fake.add_chat(GROUP)
    for chat in (CHAT, OTHER, 5555):
        fake.add_chat(chat)
    async with make_client(fake.base_url) as client:
        await ok(client, "sendMessage", chat_id=GROUP, text="1")
        status, _ = await call(client, "sendMessage", chat_id=GROUP, text="2")
        assert status == 429
        await ok(client, "sendMessage", chat_id=CHAT, text="1")
        await ok(client, "sendMessage", chat_id=OTHER, text="1")
        status, body = await call(client, "sendMessage", chat_id=5555, text="1")
        assert status == 429
        assert body["parameters"]["retry_after"] >= 1
    assert [h.reason for h in fake.stats.flood_hits] == ["chat", "global"]


async def test_rate_limits_off(nursery: trio.Nursery) -> None:
    fake = await start(nursery, rate_limits=False)
    fake.add_chat(CHAT)
    async with make_client(fake.base_url) as client:
        for i in range(10):
            await ok(client, "sendMessage", chat_id=CHAT, text=str(i))
    assert fake.stats.too_many_requests == 0


async def test_retry_after_is_enough_on_a_virtual_clock(autojump_clock: trio.abc.Clock) -> None:
    """In-process transport: waits are virtual, so retry_after can be honoured for real."""
    fake = FakeTelegram(TOKEN, private_rate=1, private_burst=1, penalty_extension=0)
    fake.add_chat(CHAT)
    async with httpx.AsyncClient(
        base_url=f"{MOCK_BASE_URL}/bot{TOKEN}/", transport=fake.transport(), timeout=60
    ) as client:
        await ok(client, "sendMessage", chat_id=CHAT, text="1")
        status, body = await call(client, "sendMessage", chat_id=CHAT, text="2")
        assert (status, body["parameters"]) == (429, {"retry_after": 1})
        await trio.sleep(body["parameters"]["retry_after"])
        await ok(client, "sendMessage", chat_id=CHAT, text="2")
        # a 50 s long poll (timeout clamped from 90) takes no wall time here
        start_time = trio.current_time()
        assert await ok(client, "getUpdates", timeout=90) == []
        assert trio.current_time() - start_time == pytest.approx(50)
        fake.drop_next("getMe")
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("getMe")
    assert fake.stats.early_retries == 0
    assert fake.stats.violations == 1


# ------------------------------------------------------------------ fault injection


async def test_fault_injection(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    fake.add_chat(CHAT)
    fake.fail_next("sendMessage", error_code=429, retry_after=3)
    status, body = await call(client, "sendMessage", chat_id=CHAT, text="x")
    assert (status, body["description"], body["parameters"]) == (
        429,
        "Too Many Requests: retry after 3",
        {"retry_after": 3},
    )
    # retrying inside the injected window is punished like the real thing
    status, body = await call(client, "sendMessage", chat_id=CHAT, text="x")
    assert status == 429
    assert fake.stats.early_retries == 1
    assert fake.stats.violations == 1
    assert fake.stats.too_many_requests == 2

    fake.fail_next("getme", error_code=500, times=2)
    assert await error(client, "getMe") == (500, "Internal Server Error")
    assert await error(client, "getMe") == (500, "Internal Server Error")
    await ok(client, "getMe")

    fake.fail_next("getUpdates", error_code=502, body=NGINX_502_HTML)
    r = await client.post("getUpdates")
    assert (r.status_code, r.headers["content-type"]) == (502, "text/html")
    assert b"502 Bad Gateway" in r.content

    fake.drop_next("getMe")
    with pytest.raises(httpx.RemoteProtocolError):
        await client.post("getMe")
    await ok(client, "getMe")
    assert [r.status for r in fake.requests if r.method == "getMe"] == [500, 500, 200, 0, 200]


# ------------------------------------------------------------------ waiting helpers


async def test_wait_until_sees_a_bot_reply(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    """A toy bot: long-polls, answers each message; the test waits on the fake's state."""

    async def toy_bot() -> None:
        offset = 0
        while True:
            for update in await ok(client, "getUpdates", offset=offset, timeout=30):
                offset = update["update_id"] + 1
                chat_id = update["message"]["chat"]["id"]
                await ok(client, "sendChatAction", chat_id=chat_id, action="typing")
                await ok(
                    client,
                    "sendMessage",
                    chat_id=chat_id,
                    text="echo: " + update["message"]["text"],
                )

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(toy_bot)
            fake.push_message(CHAT, "ping")
            await fake.wait_until(lambda: len(fake.messages(CHAT)) == 1)
            assert fake.messages(CHAT)[0].text == "echo: ping"
            fake.push_message(CHAT, "pong")
            await fake.wait_until(lambda: len(fake.messages(CHAT)) == 2)
            rec = await fake.wait_for_request(
                "sendMessage", lambda r: r.params["text"] == "echo: pong"
            )
            assert rec.status == 200
            nursery.cancel_scope.cancel()
    assert [m.text for m in fake.transcript(CHAT)] == ["ping", "echo: ping", "pong", "echo: pong"]
    assert [m.message_id for m in fake.transcript(CHAT)] == [1, 2, 3, 4]
    times = [r.time for r in fake.requests if r.method == "sendMessage"]
    assert times == sorted(times)
    assert fake.stats.too_many_requests == 0


# ------------------------------------------------------------------ forum topics & files


async def test_forum_topics_and_message_thread_not_found(
    fake: FakeTelegram, client: httpx.AsyncClient
) -> None:
    forum = fake.add_chat(GROUP, is_forum=True, title="team")
    topic = fake.create_topic(GROUP, "backend")
    fake.push_message(GROUP, "in a topic", message_thread_id=topic)
    [update] = await ok(client, "getUpdates")
    message = update["message"]
    assert (message["message_thread_id"], message["is_topic_message"]) == (topic, True)
    assert message["chat"] == {"id": GROUP, "type": "supergroup", "title": "team", "is_forum": True}
    sent = await ok(client, "sendMessage", chat_id=GROUP, text="hi", message_thread_id=topic)
    assert (sent["message_thread_id"], sent["is_topic_message"]) == (topic, True)
    await ok(client, "sendChatAction", chat_id=GROUP, action="typing", message_thread_id=topic)
    assert fake.chat_actions(GROUP)[-1].message_thread_id == topic
    created = await ok(client, "createForumTopic", chat_id=GROUP, name="ops")
    assert created["message_thread_id"] in forum.topics
    fake.delete_topic(GROUP, topic)
    for method, extra in (
        ("sendMessage", {"text": "x"}),
        ("sendChatAction", {"action": "typing"}),
    ):
        assert await error(client, method, chat_id=GROUP, message_thread_id=topic, **extra) == (
            400,
            ERR_THREAD_NOT_FOUND,
        )
    fake.add_chat(CHAT)  # a private chat without topics
    assert await error(client, "sendMessage", chat_id=CHAT, text="x", message_thread_id=7) == (
        400,
        ERR_THREAD_NOT_FOUND,
    )
    assert await error(client, "createForumTopic", chat_id=CHAT, name="x") == (400, ERR_NOT_A_FORUM)


async def test_get_file_and_the_download_url(fake: FakeTelegram, client: httpx.AsyncClient) -> None:
    content = bytes(range(256)) * 5000  # 1.28 MB
    fake.push_document(CHAT, content, file_name="data.bin", caption="look", media_group_id="g1")
    [update] = await ok(client, "getUpdates")
    document = update["message"]["document"]
    assert (document["file_name"], document["file_size"]) == ("data.bin", len(content))
    assert (update["message"]["caption"], update["message"]["media_group_id"]) == ("look", "g1")
    info = await ok(client, "getFile", file_id=document["file_id"])
    assert info["file_size"] == len(content)
    response = await client.get(fake.file_url(info["file_path"]))
    assert (response.status_code, response.content) == (200, content)
    assert fake.calls("downloadFile")[-1].params == {"file_path": info["file_path"]}
    wrong = fake.file_url(info["file_path"]).replace(TOKEN, "123456:other")
    assert (await client.get(wrong)).status_code == 404
    assert await error(client, "getFile", file_id="nope") == (400, ERR_INVALID_FILE_ID)
    # Over 20 MB: getFile refuses with Telegram's words.
    fake.push_document(CHAT, b"x" * (MAX_DOWNLOAD_BYTES + 1), file_name="big.bin")
    updates = await ok(client, "getUpdates", offset=update["update_id"] + 1)
    big = updates[0]["message"]["document"]["file_id"]
    assert await error(client, "getFile", file_id=big) == (400, ERR_FILE_TOO_BIG)


async def test_a_download_cut_halfway_breaks_the_connection(
    fake: FakeTelegram, client: httpx.AsyncClient
) -> None:
    content = b"y" * 1_000_000
    fake.push_document(CHAT, content, file_name="half.bin")
    [update] = await ok(client, "getUpdates")
    info = await ok(client, "getFile", file_id=update["message"]["document"]["file_id"])
    fake.cut_download_next()
    received = bytearray()

    async def download() -> None:
        async with client.stream("GET", fake.file_url(info["file_path"])) as response:
            assert response.headers["content-length"] == str(len(content))
            async for chunk in response.aiter_bytes():
                received.extend(chunk)

    with pytest.raises(httpx.RemoteProtocolError):
        await download()
    assert 0 < len(received) < len(content)
    fake.fail_download_next(502)
    assert (await client.get(fake.file_url(info["file_path"]))).status_code == 502
    assert (await client.get(fake.file_url(info["file_path"]))).content == content


async def test_photos_come_in_sizes_and_albums_share_a_group() -> None:
    fake = FakeTelegram(TOKEN)  # in memory
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        base = f"{MOCK_BASE_URL}/bot{TOKEN}"
        for n in range(2):
            fake.push_photo(CHAT, b"\xff\xd8photo%d" % n * 100, media_group_id="album")
        body = (await http.post(f"{base}/getUpdates", json={})).json()
        photos = [u["message"]["photo"] for u in body["result"]]
        assert [u["message"]["media_group_id"] for u in body["result"]] == ["album", "album"]
        largest = photos[1][-1]
        assert largest["width"] > photos[1][0]["width"]
        info = (await http.post(f"{base}/getFile", json={"file_id": largest["file_id"]})).json()
        url = f"{MOCK_BASE_URL}/file/bot{TOKEN}/{info['result']['file_path']}"
        assert (await http.get(url)).content == b"\xff\xd8photo1" * 100
        fake.cut_download_next(after=10)
        with pytest.raises(httpx.RemoteProtocolError):
            await http.get(url)
