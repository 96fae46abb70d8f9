"""The hub's front door, attacked through real sockets on 127.0.0.1.

Strangers are bounded at every step before an authenticated hello: idle
sockets, unfinished handshakes, missing hellos, browsers, floods of pending
connections, token guessing; one proxy id has one connection.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from codexnet.config import ProxyEntry
from codexnet.manager import frontdoor
from codexnet.manager import hub as hub_module
from codexnet.protocol import (
    CLOSE_DUPLICATE,
    CLOSE_HELLO_TIMEOUT,
    CLOSE_TRY_LATER,
    CLOSE_UNAUTHORIZED,
    PROTOCOL_VERSION,
    Hello,
    Task,
    TaskAck,
    encode,
)
from codexnet.wsclient import connect_websocket
from tests.fakes.hubrun import HubRunner, open_hub
from tests.fakes.rawproxy import raw_proxy
from tests.fakes.relay import TcpRelay

T1 = "right-token-p1-0123456789"
PROXIES = {"p1": ProxyEntry(T1), "p2": ProxyEntry("right-token-p2-0123456789")}


@pytest.fixture(autouse=True)
def short_deadlines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "HANDSHAKE_TIMEOUT_S", 0.5)
    monkeypatch.setattr(hub_module, "HELLO_TIMEOUT_S", 0.5)
    monkeypatch.setattr(hub_module, "DUPLICATE_PROBE_S", 0.5)


@pytest.fixture
async def hub() -> AsyncIterator[HubRunner]:
    async with open_hub(PROXIES, max_pending=20, max_pending_per_address=5) as runner:
        yield runner


async def tcp(port: int, source: str = "127.0.0.1") -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=source)


async def closed_by_hub(stream: trio.SocketStream, within: float) -> bool:
    """Whether the hub closes `stream` within `within` seconds (EOF or reset)."""
    with trio.move_on_after(within):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


def hello(proxy_id: str = "p1", token: str = T1) -> str:
    return encode(Hello(proxy_id=proxy_id, token=token, protocol=PROTOCOL_VERSION, capacity=1))


@asynccontextmanager
async def ws_from(source: str, port: int) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket to the hub from the local address `source` (127.0.0.0/8 is all ours)."""
    stream = await tcp(port, source)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(nursery, stream, "127.0.0.1", "/")
            yield ws
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def refusal(ws: WebSocketConnection) -> tuple[int, str | None]:
    with trio.fail_after(10), pytest.raises(ConnectionClosed) as info:  # noqa: PT012
        while True:
            await ws.get_message()
    assert info.value.reason is not None
    return info.value.reason.code, info.value.reason.reason


async def test_an_idle_socket_is_dropped_after_the_handshake_deadline(
    hub: HubRunner, caplog: pytest.LogCaptureFixture
) -> None:
    async with await tcp(hub.port) as stream:
        started = trio.current_time()
        assert await closed_by_hub(stream, within=5)
    assert 0.4 <= trio.current_time() - started < 3
    assert "no WebSocket handshake within 0.5 s" in caplog.text


async def test_an_unfinished_handshake_is_dropped_too(hub: HubRunner) -> None:
    async with await tcp(hub.port) as stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: hub\r\n")  # and never the rest
        assert await closed_by_hub(stream, within=5)


async def test_no_hello_in_time_is_closed_with_its_code(hub: HubRunner) -> None:
    async with connect_websocket(f"ws://127.0.0.1:{hub.port}") as ws:
        code, reason = await refusal(ws)
    assert (code, reason) == (CLOSE_HELLO_TIMEOUT, "no hello")


async def test_a_browser_is_refused_at_the_handshake(
    hub: HubRunner, caplog: pytest.LogCaptureFixture
) -> None:
    # The upgrade request a browser's `new WebSocket(...)` sends: it always has Origin.
    request = (
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        "Origin: https://evil.example\r\n\r\n"
    )
    async with await tcp(hub.port) as stream:
        await stream.send_all(request.encode())
        with trio.fail_after(5):
            response = await stream.receive_some(4096)
    assert response.startswith(b"HTTP/1.1 403 ")
    assert "it sent an Origin header" in caplog.text


async def test_unknown_id_and_wrong_token_look_the_same_to_the_peer(hub: HubRunner) -> None:
    seen = []
    for proxy_id, token in (("nobody", T1), ("p1", "wrong-token-0123456789")):
        async with connect_websocket(f"ws://127.0.0.1:{hub.port}") as ws:
            await ws.send_message(hello(proxy_id, token))
            seen.append(await refusal(ws))
    assert seen == [(CLOSE_UNAUTHORIZED, "unknown proxy id or wrong token")] * 2


async def test_pending_connections_are_capped_per_address_oldest_first(hub: HubRunner) -> None:
    door = hub.hub._door
    streams = [await tcp(hub.port, "127.0.0.2") for _ in range(5)]
    try:
        with trio.fail_after(5):
            await door.wait_pending(5)
        streams.append(await tcp(hub.port, "127.0.0.2"))  # the sixth from that address
        assert await closed_by_hub(streams[0], within=0.3)  # the oldest went, at once
        assert not await closed_by_hub(streams[1], within=0.1)
        assert door.pending == 5
    finally:
        for stream in streams:
            await stream.aclose()


async def test_a_proxy_gets_in_while_strangers_fill_every_slot(
    hub: HubRunner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    strangers: list[trio.SocketStream] = []
    try:
        for i in range(2, 12):  # 50 strangers, 5 per address: over the cap of 20 in all
            strangers += [await tcp(hub.port, f"127.0.0.{i}") for _ in range(5)]
        with trio.fail_after(5):
            await hub.hub._door.wait_pending(20)
        # The oldest thirty were dropped to make room, without a line each.
        dropped = [s for s in strangers[:30] if await closed_by_hub(s, within=0.05)]
        assert len(dropped) == 30
        async with raw_proxy(hub.port, "p1", T1):  # one more: the oldest stranger makes room
            assert "p1" in hub.hub.online
    finally:
        for stream in strangers:
            await stream.aclose()
    lines = [r for r in caplog.records if "have not said hello yet" in r.getMessage()]
    assert len(lines) == 1  # one line a minute; the rest are counted for the summary
    assert hub.hub.notices.total["connections without a hello dropped over the caps"] == 31
    assert hub.hub.notices.summary() == (
        "strangers at the hub in the last minute, not logged one by one: "
        "30 connections without a hello dropped over the caps"
    )


async def test_failed_authentications_back_off_per_address(
    hub: HubRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frontdoor, "AUTH_BACKOFF_FIRST_S", 0.1)
    guesser = "127.0.0.7"
    times = []
    for _ in range(4):
        async with ws_from(guesser, hub.port) as ws:
            sent = trio.current_time()
            await ws.send_message(hello("p1", "guess-0123456789abcdef"))
            assert (await refusal(ws))[0] == CLOSE_UNAUTHORIZED
            times.append(trio.current_time() - sent)
    # The first verdict at once, then each one a doubling delay later.
    assert times[0] < 0.08
    assert 0.08 <= times[1] < 0.3
    assert 0.18 <= times[2] < 0.5
    assert 0.38 <= times[3] < 0.9
    # Guessing in parallel does not help: a hello whose turn is too far off is
    # told to come back later, without being checked.
    monkeypatch.setattr(frontdoor, "AUTH_BACKOFF_MAX_S", 0.5)
    async with ws_from(guesser, hub.port) as ws:
        await ws.send_message(hello("p1", T1))  # even the right token: not checked now
        code, reason = await refusal(ws)
    assert (code, reason) == (CLOSE_TRY_LATER, "too many failed authentications; retry later")
    # Another address is not held up by this one's failures.
    with trio.fail_after(0.5):
        async with raw_proxy(hub.port, "p2", "right-token-p2-0123456789"):
            pass


async def test_a_second_connection_of_a_live_proxy_is_refused_and_its_task_kept(
    hub: HubRunner, caplog: pytest.LogCaptureFixture
) -> None:
    async with raw_proxy(hub.port, "p1", T1) as first:
        registered = hub.hub.online["p1"]
        task = await hub.start_task("p1", "keep me")
        await first.expect(Task)
        await first.send(TaskAck(task.task_id))
        with trio.fail_after(5):
            while task.state != "acked":
                await task.changed.wait()
        # The same config started on a second machine, with an empty state.
        async with connect_websocket(f"ws://127.0.0.1:{hub.port}") as ws:
            await ws.send_message(hello())
            code, reason = await refusal(ws)
        assert code == CLOSE_DUPLICATE
        assert reason is not None
        assert reason.startswith("proxy p1 is already connected from 127.0.0.1:")
        assert hub.hub.online["p1"] is registered
        assert task.state == "acked"  # not failed on the second connection's word
        assert task.outcome is None
    assert "refusing a second connection of proxy 'p1'" in caplog.text


async def test_a_connection_that_stopped_answering_is_replaced_at_once(
    hub: HubRunner, nursery: trio.Nursery
) -> None:
    relay = TcpRelay("127.0.0.1", hub.port)
    relay_port = await nursery.start(relay.serve)
    async with raw_proxy(relay_port, "p1", T1):
        first = hub.hub.online["p1"]
        relay.blackhole()  # the old link is half-dead: its pings go unanswered
        started = trio.current_time()
        async with raw_proxy(hub.port, "p1", T1):  # the proxy, back on a new link
            took = trio.current_time() - started
            assert hub.hub.online["p1"] is not first
        relay.cut()  # the old socket at last dies too
    assert took < 1.5  # the probe's deadline (0.5 s here), not a heartbeat timeout


async def test_a_peer_that_never_answers_the_close_is_dropped_after_the_close_deadline(
    hub: HubRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused peer that ignores our close frame (a dead link, or on purpose) is not held."""
    monkeypatch.setattr(hub_module, "CLOSE_TIMEOUT_S", 0.5)
    client = WSConnection(ConnectionType.CLIENT)
    stream = await tcp(hub.port)
    async with stream:
        await stream.send_all(client.send(Request(host="127.0.0.1", target="/")))
        with trio.fail_after(5):
            while not any(isinstance(e, AcceptConnection) for e in client.events()):
                client.receive_data(await stream.receive_some(65536))
        await stream.send_all(client.send(TextMessage(hello(token="a-wrong-token-0123456789"))))
        started = trio.current_time()
        # Read, but never feed wsproto again: our close reply is never sent.
        assert await closed_by_hub(stream, within=5)
        took = trio.current_time() - started
    assert 0.4 <= took < 2  # the close deadline, not forever


async def test_plain_http_is_answered_400_and_logged_once_a_minute(
    hub: HubRunner, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(3):
        async with await tcp(hub.port) as stream:
            await stream.send_all(b"POST /x HTTP/1.1\r\nHost: hub\r\nContent-Length: 0\r\n\r\n")
            with trio.fail_after(5):
                response = await stream.receive_some(4096)
            assert response.startswith(b"HTTP/1.1 400 ")
            assert await closed_by_hub(stream, within=5)
    assert hub.hub.notices.total["connections that did not speak WebSocket"] == 3
    [line] = [
        r.getMessage() for r in caplog.records if "Request method must be GET" in r.getMessage()
    ]
    assert line.startswith("dropping a connection from 127.0.0.1:")


def test_a_fleet_coming_online_at_once_is_twenty_lines_and_a_count() -> None:
    budget = hub_module.LineBudget(20)
    assert budget.renew(1000.0) == 0  # the first minute starts
    assert [budget.take() for _ in range(5000)].count(True) == 20
    assert budget.renew(1030.0) == 0  # not a minute yet
    assert budget.renew(1060.0) == 4980
    assert budget.take()  # a fresh minute, a fresh budget
