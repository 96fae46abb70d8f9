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
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from codexnet.manager.hubsocket import HandshakeFailed, ServerWebSocket, read_upgrade

LIMIT = 100_000


async def accepted(stream: trio.abc.Stream) -> ServerWebSocket:
    upgrade = await read_upgrade(stream)
    return await upgrade.accept(max_message_size=LIMIT)


async def close_code(server: ServerWebSocket) -> int:
    """The code the server's reader ends with (it must end)."""
    with pytest.raises(ConnectionClosed) as info:
        await server.get_message()
    assert info.value.reason is not None
    return info.value.reason.code


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
        await client.send(TextMessage(data="x" * 40_000, message_finished=False))
    assert await close_code(server) == 1009
    close = await client.wait_for(CloseConnection)
    assert isinstance(close, CloseConnection)
    assert close.code == 1009


async def test_bad_utf8_closes_1007(raw: tuple[RawClient, ServerWebSocket]) -> None:
    client, server = raw
    await client.stream.send_all(masked(0x81, b"\xff\xfe"))  # \xff is never UTF-8
    assert await close_code(server) == 1007


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


async def test_long_frames_arrive_whole(raw: tuple[RawClient, ServerWebSocket]) -> None:
    client, server = raw
    await client.send(BytesMessage(data=b"\x01" * 300))  # a 16-bit length
    await client.send(TextMessage(data="é" * 35_000))  # 70 000 bytes: a 64-bit length
    assert await server.get_message() == b"\x01" * 300
    assert await server.get_message() == "é" * 35_000
    await server.send_message("y" * 70_000)
    text = ""
    while True:  # wsproto hands a long frame over in the pieces it came in
        part = await client.wait_for(TextMessage)
        assert isinstance(part, TextMessage)
        text += part.data
        if part.message_finished:
            break
    assert text == "y" * 70_000


def masked(first: int, payload: bytes) -> bytes:
    """A client frame by hand: first byte (FIN, RSV, opcode), masked payload (< 126)."""
    mask = b"\x0a\x0b\x0c\x0d"
    return (
        bytes((first, 0x80 | len(payload)))
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x81\x02hi", 1002),  # not masked
        (masked(0xC1, b"hi"), 1002),  # a reserved bit (no extension was agreed)
        (masked(0x83, b"hi"), 1002),  # an unknown opcode
        (masked(0x80, b"hi"), 1002),  # a continuation of nothing
        (masked(0x09, b"hi"), 1002),  # a fragmented ping
        (masked(0x88, b"\x03"), 1002),  # a close frame of one byte
        (masked(0x88, b"\x03\xed"), 1002),  # close code 1005 may not be sent
        (masked(0x88, b"\x03\xe8\xff"), 1007),  # a close reason that is not UTF-8
    ],
)
async def test_a_frame_against_the_protocol_closes_with_its_code(
    raw: tuple[RawClient, ServerWebSocket], frame: bytes, code: int
) -> None:
    client, server = raw
    await client.stream.send_all(frame)
    assert await close_code(server) == code


async def test_a_new_message_inside_a_fragmented_one_closes_1002(
    raw: tuple[RawClient, ServerWebSocket],
) -> None:
    client, server = raw
    await client.stream.send_all(masked(0x01, b"first ") + masked(0x81, b"second"))
    assert await close_code(server) == 1002


async def test_a_close_without_a_code_is_answered_without_one(
    raw: tuple[RawClient, ServerWebSocket],
) -> None:
    client, server = raw
    await client.stream.send_all(masked(0x88, b""))
    assert await close_code(server) == 1005
    assert await client.stream.receive_some() == b"\x88\x00"


UPGRADE = (
    "GET / HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: {version}\r\n\r\n"
)


async def test_the_accept_key_and_frames_sent_with_the_request() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    # A client that does not wait for the 101 before its first frame.
    await client_end.send_all(UPGRADE.format(version=13).encode() + masked(0x81, b"hello"))
    upgrade = await read_upgrade(server_end)
    server = await upgrade.accept(max_message_size=LIMIT)
    response = await client_end.receive_some()
    assert response.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response  # RFC 6455 1.3
    assert await server.get_message() == "hello"


async def test_a_wrong_websocket_version_gets_426_naming_ours() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    await client_end.send_all(UPGRADE.format(version=8).encode())
    with pytest.raises(HandshakeFailed):
        await read_upgrade(server_end)
    response = await client_end.receive_some()
    assert response.startswith(b"HTTP/1.1 426 ")
    assert b"sec-websocket-version: 13\r\n" in response.lower()


async def test_a_request_head_over_16_kib_is_refused() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    await client_end.send_all(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 20_000)
    with pytest.raises(HandshakeFailed):
        await read_upgrade(server_end)
    assert (await client_end.receive_some()).startswith(b"HTTP/1.1 431 ")
