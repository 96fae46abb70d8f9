"""Fault injection of the fake Bot API: answers lost after the effect, outages, 5xx storms.

Every test runs twice: over real HTTP on 127.0.0.1 and in memory (`transport()`),
because the bot meets both and they must fail the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import pytest
import trio

from tests.fakes.telegram_api import MOCK_BASE_URL, NGINX_502_HTML, FakeTelegram

TOKEN = "123456:TEST-TOKEN-abcdefghijklmnopqrstuvwxyz"
CHAT = 4242


@attrs.frozen
class Setup:
    fake: FakeTelegram
    client: httpx.AsyncClient
    mode: str


@pytest.fixture(params=["http", "memory"])
async def setup(request: pytest.FixtureRequest, nursery: trio.Nursery) -> AsyncIterator[Setup]:
    fake = FakeTelegram(TOKEN, rate_limits=False)
    fake.add_chat(CHAT)
    if request.param == "http":
        await nursery.start(fake.serve)
        client = httpx.AsyncClient(base_url=f"{fake.base_url}/bot{TOKEN}/", timeout=10)
    else:
        client = httpx.AsyncClient(
            base_url=f"{MOCK_BASE_URL}/bot{TOKEN}/", transport=fake.transport(), timeout=10
        )
    async with client:
        yield Setup(fake, client, request.param)


async def call(setup: Setup, method: str, **params: Any) -> httpx.Response:
    with trio.fail_after(5):
        return await setup.client.post(method, json=params)


async def send(setup: Setup, text: str) -> httpx.Response:
    return await call(setup, "sendMessage", chat_id=CHAT, text=text)


# ------------------------------------------------------------------ lost answers


async def test_drop_after_next_posts_the_message_and_loses_the_answer(setup: Setup) -> None:
    fake = setup.fake
    fake.drop_after_next("sendmessage")  # any spelling of the method
    with pytest.raises(httpx.RemoteProtocolError):
        await send(setup, "the answer")
    assert fake.count_messages(CHAT, "the answer") == 1  # posted although the bot never heard
    # the bot retries (it cannot know): now the person sees it twice
    assert (await send(setup, "the answer")).status_code == 200
    assert fake.count_messages(CHAT, "the answer") == 2
    assert [
        (r.status, r.dropped, r.processed_status, r.took_effect) for r in fake.calls("sendMessage")
    ] == [
        (0, "after", 200, True),
        (200, None, 200, True),
    ]


async def test_drop_after_next_of_a_refused_request_has_no_effect(setup: Setup) -> None:
    setup.fake.drop_after_next("sendMessage", times=2)
    for _ in range(2):
        with pytest.raises(httpx.RemoteProtocolError):
            await send(setup, "")  # 400 "message text is empty", and that answer is lost too
    assert (await send(setup, "ok")).status_code == 200
    records = setup.fake.calls("sendMessage")
    assert [(r.dropped, r.processed_status, r.took_effect) for r in records] == [
        ("after", 400, False),
        ("after", 400, False),
        (None, 200, True),
    ]
    assert setup.fake.texts(CHAT) == ["ok"]


async def test_drop_next_drops_before_any_effect(setup: Setup) -> None:
    setup.fake.drop_next("sendMessage")
    with pytest.raises(httpx.RemoteProtocolError):
        await send(setup, "lost")
    assert setup.fake.count_messages(CHAT) == 0
    [record] = setup.fake.calls("sendMessage")
    assert (record.status, record.dropped, record.took_effect) == (0, "before", False)


# ------------------------------------------------------------------ 5xx for minutes


async def test_fail_all_fails_every_method_until_stopped(setup: Setup) -> None:
    fake = setup.fake
    fake.fail_all()
    requests: list[tuple[str, dict[str, Any]]] = [
        ("getMe", {}),
        ("getUpdates", {"timeout": 30}),  # answered at once, not after the poll timeout
        ("sendMessage", {"chat_id": CHAT, "text": "hi"}),
        ("noSuchMethod", {}),
    ]
    for method, params in requests:
        response = await call(setup, method, **params)
        assert (response.status_code, response.json()) == (
            502,
            {"ok": False, "error_code": 502, "description": "Bad Gateway"},
        )
    assert fake.count_messages(CHAT) == 0
    assert [r.status for r in fake.requests] == [502] * 4
    assert fake.calls("sendMessage")[0].params["text"] == "hi"  # still recorded in full

    fake.fail_all(500, description="Internal Server Error: restart")
    response = await call(setup, "getMe")
    assert (response.status_code, response.json()["description"]) == (
        500,
        "Internal Server Error: restart",
    )
    fake.fail_all(body=NGINX_502_HTML)
    response = await send(setup, "hi")
    assert (response.status_code, response.headers["content-type"]) == (502, "text/html")
    assert response.content == NGINX_502_HTML

    fake.stop_failing()
    assert (await send(setup, "hi")).status_code == 200
    assert fake.count_messages(CHAT, "hi") == 1


# ------------------------------------------------------------------ unreachable


async def test_go_down_refuses_connections_and_come_up_serves_the_same_url(setup: Setup) -> None:
    fake = setup.fake
    assert (await call(setup, "getMe")).status_code == 200  # leaves a keep-alive connection
    url = fake.base_url if setup.mode == "http" else None
    with trio.fail_after(5):
        await fake.go_down()
    assert fake.is_down
    for _ in range(2):
        with pytest.raises(httpx.ConnectError):
            await send(setup, "while down")
    with trio.fail_after(5):
        await fake.come_up()
    assert not fake.is_down
    if url is not None:
        assert fake.base_url == url
    assert (await send(setup, "back")).status_code == 200  # the same client, pool and all
    assert fake.texts(CHAT) == ["back"]
    assert [r.method for r in fake.requests] == ["getMe", "sendMessage"]  # nothing reached it


async def test_go_down_closes_a_pending_long_poll(setup: Setup) -> None:
    fake = setup.fake
    failures: list[BaseException] = []

    async def poll() -> None:
        try:
            await call(setup, "getUpdates", timeout=30)
        except httpx.RemoteProtocolError as exc:
            failures.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll)
            await fake.wait_until(lambda: fake.polling)
            await fake.go_down()
    assert len(failures) == 1
    assert not fake.polling
    [record] = fake.calls("getUpdates")
    assert (record.status, record.dropped) == (0, "down")
    with trio.fail_after(5):
        await fake.come_up()
    fake.push_message(CHAT, "hello")
    updates = (await call(setup, "getUpdates", timeout=30)).json()["result"]
    assert [u["message"]["text"] for u in updates] == ["hello"]


async def test_going_down_twice_and_up_twice_is_harmless(setup: Setup) -> None:
    with trio.fail_after(5):
        await setup.fake.go_down()
        await setup.fake.go_down()
        await setup.fake.come_up()
        await setup.fake.come_up()
    assert (await call(setup, "getMe")).status_code == 200


# ------------------------------------------------------------------ counting


async def test_count_messages_and_calls(setup: Setup) -> None:
    fake = setup.fake
    for text in ("a", "b", "a"):
        await send(setup, text)
    first = fake.messages(CHAT)[0].message_id
    await call(setup, "editMessageText", chat_id=CHAT, message_id=first, text="c")
    assert fake.texts(CHAT) == ["c", "b", "a"]
    assert fake.count_messages(CHAT, "a") == 1  # what the person sees now
    assert fake.count_messages(CHAT, lambda text: text in "abc") == 3
    assert fake.count_messages(CHAT) == 3
    await call(setup, "deleteMessage", chat_id=CHAT, message_id=first)
    assert fake.count_messages(CHAT) == 2
    assert fake.count_messages(CHAT, "c", include_deleted=True) == 1
    assert len(fake.calls("sendMessage", lambda r: r.params["text"] == "a")) == 2
    assert [r.method for r in fake.calls()] == [
        "sendMessage",
        "sendMessage",
        "sendMessage",
        "editMessageText",
        "deleteMessage",
    ]
