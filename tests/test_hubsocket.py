"""The hub's end of a WebSocket (codexnet/manager/hubsocket.py), in memory: the real
trio-websocket client (what proxies run) and a raw wsproto client for what a well-behaved
client never sends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, ConnectionRejected, wrap_client_stream
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from codexnet.manager.hubsocket import HandshakeFailed, ServerWebSocket, read_upgrade

LIMIT = 1000


async def accepted(stream: trio.abc.Stream) -> ServerWebSocket:
    upgrade = await read_upgrade(stream)
    return await upgrade.accept(max_message_size=LIMIT)


class RawClient:
    """A WebSocket client that sends whatever it is told to."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []

    async def open(self) -> None:
        await self.send(Request(host="hub", target="/"))
        while not any(isinstance(e, AcceptConnection) for e in self.events):
            await self.receive()

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def receive(self) -> None:
        data = await self.stream.receive_some()
        self.ws.receive_data(bytes(data) if data else None)
        self.events.extend(self.ws.events())

    async def wait_for(self, kind: type[Event]) -> Event:
        while True:
            for event in self.events:
                if isinstance(event, kind):
                    self.events.remove(event)
                    return event
            await self.receive()


async def stream_pair(kind: str) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """Memory streams, or a real TCP connection (where the hub reads the descriptor itself)."""
    if kind == "memory":
        return trio.testing.memory_stream_pair()
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        client_end = await trio.open_tcp_stream("127.0.0.1", port)
        return client_end, await listener.accept()


@pytest.fixture(params=["memory", "tcp"])
async def raw(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RawClient, ServerWebSocket]]:
    client_end, server_end = await stream_pair(request.param)
    client = RawClient(client_end)
    got: list[ServerWebSocket] = []

    async def serve() -> None:
        got.append(await accepted(server_end))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.open()
    yield client, got[0]
    await trio.aclose_forcefully(client_end)
    await trio.aclose_forcefully(server_end)


async def test_messages_both_ways_with_the_proxies_own_client() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        got: list[ServerWebSocket] = []
        ready = trio.Event()

        async def serve() -> None:
            got.append(await accepted(server_end))
            ready.set()

        nursery.start_soon(serve)
        client = await wrap_client_stream(nursery, client_end, "hub", "/")  # type: ignore[arg-type]
        await client.send_message('{"type": "hello"}')
        await ready.wait()
        server = got[0]
        assert await server.get_message() == '{"type": "hello"}'
        await server.send_message('{"type": "welcome"}')
        assert await client.get_message() == '{"type": "welcome"}'
        await client.send_message(b"\x00bytes")
        assert await server.get_message() == b"\x00bytes"
        # The client's ping is answered by the task reading for a message.
        with trio.fail_after(5):
            async with trio.open_nursery() as inner:
                inner.start_soon(server.get_message)
                await client.ping(b"hb")
                inner.cancel_scope.cancel()
        # Our ping: its pong is seen by the reader.
        with trio.fail_after(5):
            async with trio.open_nursery() as inner:
                inner.start_soon(server.get_message)
                await server.ping()
                inner.cancel_scope.cancel()
        # A close from the proxy's side ends the reader with its code and reason.
        nursery.start_soon(client.aclose, 4401, "bye")
        with pytest.raises(ConnectionClosed) as info:
            await server.get_message()
        assert info.value.reason is not None
        assert (info.value.reason.code, info.value.reason.reason) == (4401, "bye")
        nursery.cancel_scope.cancel()


async def test_a_close_from_our_side_reaches_the_client_with_its_code() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        got: list[ServerWebSocket] = []
        ready = trio.Event()

        async def serve() -> None:
            server = await accepted(server_end)
            got.append(server)
            ready.set()
            with pytest.raises(ConnectionClosed):  # the hub's handler, reading meanwhile
                await server.get_message()

        nursery.start_soon(serve)
        client = await wrap_client_stream(nursery, client_end, "hub", "/")  # type: ignore[arg-type]
        await ready.wait()
        with trio.fail_after(5):
            await got[0].aclose(4409, "proxy p1 is already connected")  # from another task
        with pytest.raises(ConnectionClosed) as info:
            await client.get_message()
        assert info.value.reason is not None
        assert info.value.reason.code == 4409
        assert info.value.reason.reason == "proxy p1 is already connected"
        nursery.cancel_scope.cancel()


async def test_a_rejected_upgrade_gets_its_status_and_body() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()

    async def serve() -> None:
        upgrade = await read_upgrade(server_end)
        assert upgrade.header(b"origin") == b"https://evil.example"
        await upgrade.reject(403, b"codexnet hub: no browsers\n")

    rejected: list[ConnectionRejected] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            origin = [(b"Origin", b"https://evil.example")]
            await wrap_client_stream(nursery, client_end, "hub", "/", extra_headers=origin)  # type: ignore[arg-type]
    except* ConnectionRejected as group:  # raised in the client's reader task
        rejected = [e for e in group.exceptions if isinstance(e, ConnectionRejected)]
    assert rejected[0].status_code == 403
    assert rejected[0].body == b"codexnet hub: no browsers\n"


async def test_plain_http_gets_a_400_and_no_websocket() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    await client_end.send_all(b"POST / HTTP/1.1\r\nHost: hub\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(HandshakeFailed):
        await read_upgrade(server_end)
    assert (await client_end.receive_some()).startswith(b"HTTP/1.1 400 ")


async def test_a_client_gone_before_its_request_is_a_plain_close() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    await client_end.aclose()
    with pytest.raises(ConnectionClosed):
        await read_upgrade(server_end)


async def test_pings_inside_a_fragmented_message_are_answered_and_it_arrives_whole(
    raw: tuple[RawClient, ServerWebSocket],
) -> None:
    client, server = raw
    heard = server.heard_at
    await trio.sleep(1)
    await client.send(TextMessage(data="first half, ", message_finished=False))
    await client.send(Ping(payload=b"in between"))
    await client.send(TextMessage(data="second half", message_finished=True))
    assert await server.get_message() == "first half, second half"
    assert server.heard_at > heard
    pong = await client.wait_for(Pong)
    assert isinstance(pong, Pong)
    assert pong.payload == b"in between"


async def test_a_message_over_the_limit_closes_1009_before_it_is_all_held(
    raw: tuple[RawClient, ServerWebSocket],
) -> None:
    client, server = raw
    for _ in range(3):
        await client.send(TextMessage(data="x" * 400, message_finished=False))
    with pytest.raises(ConnectionClosed) as info:
        await server.get_message()
    assert info.value.reason is not None
    assert info.value.reason.code == 1009
    close = await client.wait_for(CloseConnection)
    assert isinstance(close, CloseConnection)
    assert close.code == 1009


async def test_bad_utf8_closes_1007(raw: tuple[RawClient, ServerWebSocket]) -> None:
    client, server = raw
    # A text frame by hand (masked, as a client must): \xff is never UTF-8.
    mask = b"\x01\x02\x03\x04"
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"\xff\xfe"))
    await client.stream.send_all(b"\x81\x82" + mask + payload)
    with pytest.raises(ConnectionClosed) as info:
        await server.get_message()
    assert info.value.reason is not None
    assert info.value.reason.code == 1007


async def test_a_pong_answers_its_ping_and_the_earlier_ones_and_a_stray_one_nothing(
    raw: tuple[RawClient, ServerWebSocket],
) -> None:
    client, server = raw
    answered: list[int] = []
    both = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.get_message)  # the reader

        async def ping(n: int) -> None:
            await server.ping()
            answered.append(n)
            if len(answered) == 2:
                both.set()

        nursery.start_soon(ping, 1)
        first = await client.wait_for(Ping)
        nursery.start_soon(ping, 2)
        second = await client.wait_for(Ping)
        assert isinstance(first, Ping)
        assert isinstance(second, Ping)
        await client.send(Pong(payload=b"never sent"))
        await trio.testing.wait_all_tasks_blocked()
        assert answered == []
        await client.send(second.response())
        with trio.fail_after(5):
            await both.wait()
        assert sorted(answered) == [1, 2]
        nursery.cancel_scope.cancel()


async def test_a_ping_on_a_link_that_ends_raises(raw: tuple[RawClient, ServerWebSocket]) -> None:
    client, server = raw
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_until_closed, server)
        await client.stream.aclose()  # gone, without a close frame
        with pytest.raises(ConnectionClosed) as info, trio.fail_after(5):
            await server.ping()
    assert info.value.reason is not None
    assert info.value.reason.code == 1006


async def test_aclose_with_nobody_reading_reads_the_answer_itself(
    raw: tuple[RawClient, ServerWebSocket],
) -> None:
    client, server = raw
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.aclose, 4400, "bad frame")
        close = await client.wait_for(CloseConnection)
        assert isinstance(close, CloseConnection)
        assert (close.code, close.reason) == (4400, "bad frame")
        await client.send(close.response())
    assert server.closed is not None
    assert server.closed.code == 4400
    with pytest.raises(ConnectionClosed):
        await server.send_message("too late")


async def _read_until_closed(server: ServerWebSocket) -> None:
    try:
        while True:
            await server.get_message()
    except ConnectionClosed:
        return
