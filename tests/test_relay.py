"""The fault relay (tests/fakes/relay.py) between real trio-websocket peers on 127.0.0.1."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from codexnet.config import ProxyEntry
from codexnet.proxy.appserver import AppServer
from codexnet.proxy.service import ProxyService
from codexnet.wsclient import connect_websocket
from tests.fakes.hubrun import serve_hub
from tests.fakes.relay import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Chunk,
    FrameParser,
    RelayError,
    TcpRelay,
    encode_frame,
)
from tests.fakes.stack import free_port
from tests.test_appserver import fake_codex, proxy_config

# What the test server answers to a message type (a tiny imitation of the hub).
REPLIES = {"hello": "welcome", "task_result": "result_ack", "ping_me": "pong_you"}
MASK = b"\x01\x02\x03\x04"
# A bound for things that must NOT happen (a pong through a black hole): a loopback
# round trip takes well under a millisecond, measured in each test before the fault.
SILENCE_S = 0.3


@attrs.define(eq=False)
class EchoServer:
    """A trio-websocket server that records what it receives and answers REPLIES."""

    port: int = 0
    received: list[dict[str, Any]] = attrs.Factory(list)
    connections: list[WebSocketConnection] = attrs.Factory(list)
    closed: list[int] = attrs.Factory(list)  # close codes seen by the handlers
    _changed: trio.Event = attrs.Factory(trio.Event)

    def notify(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def handler(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        self.connections.append(ws)
        self.notify()
        try:
            while True:
                message = json.loads(await ws.get_message())
                self.received.append(message)
                self.notify()
                reply = REPLIES.get(message.get("type"))
                if reply is not None:
                    await ws.send_message(json.dumps({"type": reply, "n": message.get("n")}))
        except ConnectionClosed as exc:
            self.closed.append(exc.reason.code if exc.reason else 0)
            self.notify()

    def types(self) -> list[str]:
        return [m["type"] for m in self.received]


@pytest.fixture
async def server(nursery: trio.Nursery) -> EchoServer:
    echo = EchoServer()
    ws_server = await nursery.start(
        lambda task_status: serve_websocket(
            echo.handler, "127.0.0.1", 0, None, task_status=task_status
        )
    )
    echo.port = ws_server.port
    return echo


@pytest.fixture
async def relay(nursery: trio.Nursery, server: EchoServer) -> TcpRelay:
    relay = TcpRelay("127.0.0.1", server.port)
    await nursery.start(relay.serve)
    return relay


@asynccontextmanager
async def client(relay: TcpRelay, connect_timeout: float = 5) -> AsyncIterator[WebSocketConnection]:
    url = f"ws://127.0.0.1:{relay.port}"
    async with connect_websocket(url, connect_timeout=connect_timeout) as ws:
        yield ws


async def send(ws: WebSocketConnection, kind: str, **fields: Any) -> None:
    await ws.send_message(json.dumps({"type": kind, **fields}))


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await ws.get_message())
    return message


async def expect_closed(ws: WebSocketConnection) -> int:
    """The close code the client sees; fails if any message arrives first."""
    try:
        message = await ws.get_message()
    except ConnectionClosed as exc:
        return exc.reason.code if exc.reason else 0
    pytest.fail(f"expected the connection closed, got {message!r}")


async def no_pong(ws: WebSocketConnection) -> bool:
    """True if a ping got no pong within SILENCE_S."""
    with trio.move_on_after(SILENCE_S) as scope:
        await ws.ping()
    return scope.cancelled_caught


# ------------------------------------------------------------------ passing through


async def test_messages_pass_both_ways_and_are_logged(relay: TcpRelay, server: EchoServer) -> None:
    with trio.fail_after(5):
        async with client(relay) as ws:
            await send(ws, "hello", n=1)
            assert await receive(ws) == {"type": "welcome", "n": 1}
            # 16-bit and 64-bit payload lengths, in both directions
            for size in (300, 70_000):
                await send(ws, "ping_me", n=size, pad="x" * size)
                assert await receive(ws) == {"type": "pong_you", "n": size}
            await ws.ping(b"beat")
    assert server.types() == ["hello", "ping_me", "ping_me"]
    assert [(f.direction, f.type, f.fate) for f in relay.frames] == [
        ("up", "hello", "forwarded"),
        ("down", "welcome", "forwarded"),
        ("up", "ping_me", "forwarded"),
        ("down", "pong_you", "forwarded"),
        ("up", "ping_me", "forwarded"),
        ("down", "pong_you", "forwarded"),
    ]
    assert relay.frames[4].message["pad"] == "x" * 70_000
    assert [f.connection for f in relay.frames] == [1] * 6
    times = [f.time for f in relay.frames]
    assert times == sorted(times)
    pings = [(c.direction, c.opcode, c.payload) for c in relay.controls]
    assert pings[:2] == [("up", "ping", b"beat"), ("down", "pong", b"beat")]
    assert ("up", "close") in [(c.direction, c.opcode) for c in relay.controls]


async def test_wait_for_frame_sees_past_and_future_messages(
    relay: TcpRelay, server: EchoServer
) -> None:
    with trio.fail_after(5):
        async with client(relay) as ws:
            await send(ws, "hello", n=1)
            assert (await relay.wait_for_frame("up", "hello")).message["n"] == 1  # past or now
            async with trio.open_nursery() as nursery:
                got: list[int] = []

                async def waiter() -> None:
                    frame = await relay.wait_for_frame("down", lambda m: m.get("n") == 7)
                    got.append(frame.message["n"])

                nursery.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []
                await send(ws, "hello", n=7)
            assert got == [7]
    assert len(relay.messages("down", "welcome")) == 2


# ------------------------------------------------------------------ cut


async def test_cut_resets_both_sides_and_new_connections_work(
    relay: TcpRelay, server: EchoServer
) -> None:
    with trio.fail_after(5):
        async with client(relay) as ws:
            await send(ws, "hello")
            await receive(ws)
            relay.cut()
            assert await expect_closed(ws) == 1006  # abnormal: no close handshake
            await server.wait_until(lambda: len(server.closed) == 1)
        assert server.closed == [1006]
        await relay.wait_until(lambda: not relay.live)
        async with client(relay) as ws:
            await send(ws, "hello", n=2)
            assert await receive(ws) == {"type": "welcome", "n": 2}
    assert relay.accepted == 2


async def test_target_down_resets_the_accepted_connection(nursery: trio.Nursery) -> None:
    """The client sees its connect fail; once the target is up, it works (same relay)."""
    port = free_port()
    relay = TcpRelay("127.0.0.1", port)
    await nursery.start(relay.serve)
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port or 0)
        async with stream:
            with pytest.raises(trio.BrokenResourceError):  # ECONNRESET
                await stream.receive_some(10)
        assert relay.refused == 1
        echo = EchoServer()
        await nursery.start(
            lambda task_status: serve_websocket(
                echo.handler, "127.0.0.1", port, None, task_status=task_status
            )
        )
        async with client(relay) as ws:
            await send(ws, "hello")
            assert (await receive(ws))["type"] == "welcome"


# ------------------------------------------------------------------ black hole


async def test_blackhole_swallows_everything_and_nobody_sees_a_close(
    relay: TcpRelay, server: EchoServer
) -> None:
    with trio.fail_after(5):
        async with client(relay) as ws:
            await send(ws, "hello")
            await receive(ws)
            await ws.ping()  # a round trip works before
            relay.blackhole()
            assert await no_pong(ws)
            await send(ws, "hello", n=2)  # the write succeeds; the bytes vanish
            server_ws = server.connections[0]
            assert await no_pong(server_ws)
            assert ws.closed is None
            assert server_ws.closed is None
            assert server.types() == ["hello"]
            assert relay.messages("up", "hello", fate="discarded")[0].message["n"] == 2

            # A new connection ("hang"): accepted, then the handshake never completes.
            with pytest.RaisesGroup(trio.TooSlowError, flatten_subgroups=True):
                async with client(relay, connect_timeout=SILENCE_S):
                    pass
            assert len(server.connections) == 1

            relay.restore()
            assert await expect_closed(ws) == 1006
            await server.wait_until(lambda: server.closed == [1006])
        async with client(relay) as ws:
            await send(ws, "hello", n=3)
            assert await receive(ws) == {"type": "welcome", "n": 3}


async def test_blackhole_work_mode_lets_new_connections_through(
    relay: TcpRelay, server: EchoServer
) -> None:
    with trio.fail_after(5):
        async with client(relay) as old:
            await send(old, "hello", n=1)
            await receive(old)
            relay.blackhole(new_connections="work")
            async with client(relay) as new:
                await send(new, "hello", n=2)
                assert await receive(new) == {"type": "welcome", "n": 2}
                assert await no_pong(old)
                assert old.closed is None
                relay.restore()
                assert await expect_closed(old) == 1006
                await new.ping()  # untouched by restore()


# ------------------------------------------------------------------ traps


async def test_cut_on_drops_exactly_the_matching_message(
    relay: TcpRelay, server: EchoServer
) -> None:
    trap = relay.cut_on("up", "task_result")
    with trio.fail_after(5):
        async with client(relay) as ws:
            await send(ws, "hello")
            await receive(ws)
            await send(ws, "task_event", seq=1)
            await send(ws, "task_result", task_id="t1")
            frame = await trap.wait()
            assert await expect_closed(ws) == 1006
            await server.wait_until(lambda: bool(server.closed))
    assert frame.message == {"type": "task_result", "task_id": "t1"}
    assert frame.fate == "dropped"
    assert server.types() == ["hello", "task_event"]
    assert relay.messages("up", "task_result", fate="forwarded") == []
    # one-shot: the next connection's task_result passes
    async with client(relay) as ws:
        await send(ws, "task_result", n=5)
        assert await receive(ws) == {"type": "result_ack", "n": 5}


async def test_cut_on_after_delivers_the_message_and_loses_the_answer(
    relay: TcpRelay, server: EchoServer
) -> None:
    trap = relay.cut_on("up", "task_result", mode="after")
    with trio.fail_after(5):
        async with client(relay) as ws:
            await send(ws, "task_result", n=1)
            assert await expect_closed(ws) == 1006  # no result_ack came back
            await server.wait_until(lambda: bool(server.closed))
    assert (await trap.wait()).fate == "forwarded"
    assert server.received == [{"type": "task_result", "n": 1}]


async def test_cut_on_down_frame(relay: TcpRelay, server: EchoServer) -> None:
    trap = relay.cut_on("down", "welcome")
    with trio.fail_after(5):
        async with client(relay) as ws:
            await send(ws, "hello")
            assert await expect_closed(ws) == 1006
            await trap.wait()
    assert server.types() == ["hello"]
    assert [(f.direction, f.type, f.fate) for f in relay.frames] == [
        ("up", "hello", "forwarded"),
        ("down", "welcome", "dropped"),
    ]


async def test_blackhole_on_turns_only_that_connection_half_dead(
    relay: TcpRelay, server: EchoServer
) -> None:
    trap = relay.blackhole_on("down", "result_ack")
    with trio.fail_after(5):
        async with client(relay) as ws:
            await send(ws, "task_result", n=1)
            frame = await trap.wait()
            assert frame.fate == "dropped"
            assert await no_pong(ws)
            assert ws.closed is None
            async with client(relay) as other:  # new connections are not affected
                await send(other, "hello")
                assert (await receive(other))["type"] == "welcome"
            relay.restore()
            assert await expect_closed(ws) == 1006
    assert server.types() == ["task_result", "hello"]


async def test_a_disarmed_trap_never_fires(relay: TcpRelay, server: EchoServer) -> None:
    trap = relay.cut_on("up", "hello")
    trap.disarm()
    with trio.fail_after(5):
        async with client(relay) as ws:
            await send(ws, "hello")
            assert (await receive(ws))["type"] == "welcome"
    assert trap.frame is None


# ------------------------------------------------------------------ raw WebSocket


async def raw_handshake(port: int) -> trio.SocketStream:
    """A WebSocket client handshake by hand, for tests that write frames themselves."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(4096)
            if not data:
                raise trio.BrokenResourceError("closed during the handshake")
            head += data
        assert head.startswith(b"HTTP/1.1 101 ")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def test_fragmented_message_with_a_ping_in_between(
    relay: TcpRelay, server: EchoServer
) -> None:
    """The relay holds fragments until the last one; the ping passes at once."""
    text = json.dumps({"type": "hello", "n": 9}).encode()
    with trio.fail_after(5):
        stream = await raw_handshake(relay.port or 0)
        async with stream:
            await stream.send_all(encode_frame(OP_TEXT, text[:5], fin=False, mask=MASK))
            await stream.send_all(encode_frame(OP_PING, b"p1", mask=MASK))
            parser = FrameParser(masked=False)
            chunks: list[Chunk] = []
            while not chunks:
                chunks += parser.feed(await stream.receive_some(4096))
            assert chunks == [Chunk("control", encode_frame(OP_PONG, b"p1"), OP_PONG, b"p1")]
            assert relay.frames == []
            await stream.send_all(encode_frame(OP_CONTINUATION, text[5:], mask=MASK))
            await server.wait_until(lambda: bool(server.received))
    assert server.received == [{"type": "hello", "n": 9}]
    assert relay.frames[0].message == {"type": "hello", "n": 9}


async def test_a_trapped_fragmented_message_never_reaches_the_server(
    relay: TcpRelay, server: EchoServer
) -> None:
    trap = relay.cut_on("up", "task_result")
    text = json.dumps({"type": "task_result"}).encode()
    with trio.fail_after(5):
        stream = await raw_handshake(relay.port or 0)
        async with stream:
            await stream.send_all(encode_frame(OP_TEXT, text[:4], fin=False, mask=MASK))
            await stream.send_all(encode_frame(OP_CONTINUATION, text[4:], mask=MASK))
            await trap.wait()
            await server.wait_until(lambda: bool(server.closed))
    assert server.received == []


async def test_negotiated_compression_is_refused() -> None:
    """A server that agrees to permessage-deflate: the relay fails loudly."""

    async def deflating_server(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: x\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        )
        await trio.sleep_forever()

    with (
        trio.fail_after(5),
        pytest.RaisesGroup(RelayError, flatten_subgroups=True, match=None),
    ):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, deflating_server, 0, host="127.0.0.1")
            )
            relay = TcpRelay("127.0.0.1", listeners[0].socket.getsockname()[1])
            await nursery.start(relay.serve)
            with pytest.raises(trio.BrokenResourceError):  # the relay died and closed us
                await raw_handshake(relay.port or 0)
            await trio.sleep_forever()


async def test_wss_passes_through_as_opaque_bytes(nursery: trio.Nursery) -> None:
    """TLS cannot be read: no frames are logged and no trap can fire, but cut() works."""
    import trustme

    ca = trustme.CA()
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ssl)
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    echo = EchoServer()
    ws_server = await nursery.start(
        lambda task_status: serve_websocket(
            echo.handler, "127.0.0.1", 0, server_ssl, task_status=task_status
        )
    )
    relay = TcpRelay("127.0.0.1", ws_server.port)
    await nursery.start(relay.serve)
    with trio.fail_after(5):
        url = f"wss://127.0.0.1:{relay.port}"
        async with connect_websocket(url, ssl_context=client_ssl) as ws:
            await send(ws, "hello")
            assert (await receive(ws))["type"] == "welcome"
            assert relay.frames == []
            relay.cut()
            assert await expect_closed(ws) == 1006


async def test_raw_mode_relays_any_bytes(nursery: trio.Nursery) -> None:
    async def upper(stream: trio.SocketStream) -> None:
        async for data in stream:
            await stream.send_all(data.upper())

    listeners = await nursery.start(partial(trio.serve_tcp, upper, 0, host="127.0.0.1"))
    relay = TcpRelay("127.0.0.1", listeners[0].socket.getsockname()[1], websocket=False)
    await nursery.start(relay.serve)
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port or 0)
        async with stream:
            await stream.send_all(b"not http at all")
            assert await stream.receive_some(100) == b"NOT HTTP AT ALL"
            relay.cut()
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some(100)


# ------------------------------------------------------------------ the parser alone


def test_parser_lengths_masks_and_fragments_fed_byte_by_byte() -> None:
    big = bytes(range(256)) * 300  # 76 800 bytes: a 64-bit length
    mid = b"m" * 1000  # a 16-bit length
    stream = (
        encode_frame(OP_TEXT, b'{"type": "a"}', mask=MASK)
        + encode_frame(OP_BINARY, big, mask=MASK)
        + encode_frame(OP_TEXT, mid[:10], fin=False, mask=MASK)
        + encode_frame(OP_PING, b"x", mask=MASK)
        + encode_frame(OP_CONTINUATION, mid[10:500], fin=False, mask=MASK)
        + encode_frame(OP_CONTINUATION, mid[500:], mask=MASK)
        + encode_frame(OP_CLOSE, b"\x03\xe8", mask=MASK)
    )
    parser = FrameParser(masked=True)
    chunks: list[Chunk] = []
    for i in range(0, len(stream), 7):
        chunks += parser.feed(stream[i : i + 7])
    assert [(c.kind, c.opcode) for c in chunks] == [
        ("message", OP_TEXT),
        ("message", OP_BINARY),
        ("control", OP_PING),
        ("message", OP_TEXT),
        ("control", OP_CLOSE),
    ]
    assert chunks[0].payload == b'{"type": "a"}'
    assert chunks[1].payload == big
    assert chunks[3].payload == mid
    assert b"".join(c.raw for c in chunks) != stream  # the ping moved ahead of the fragments
    assert sorted(b"".join(c.raw for c in chunks)) == sorted(stream)


def test_parser_close_inside_a_fragmented_message_releases_the_fragments() -> None:
    first = encode_frame(OP_TEXT, b"abc", fin=False)
    close = encode_frame(OP_CLOSE, b"")
    chunks = FrameParser(masked=False).feed(first + close)
    assert chunks == [Chunk("raw", first), Chunk("control", close, OP_CLOSE, b"")]


@pytest.mark.parametrize(
    ("data", "masked", "error"),
    [
        (bytes([0xC1, 0x00]), False, "RSV bits"),  # RSV1: permessage-deflate
        (encode_frame(OP_TEXT, b"x"), True, "client frame with mask bit 0"),
        (encode_frame(OP_TEXT, b"x", mask=MASK), False, "server frame with mask bit 1"),
        (encode_frame(OP_CONTINUATION, b"x"), False, "continuation"),
        (encode_frame(OP_PING, b"x", fin=False), False, "control"),
        (encode_frame(0x3, b""), False, "reserved opcode"),
    ],
)
def test_parser_refuses_what_it_cannot_read(data: bytes, masked: bool, error: str) -> None:
    with pytest.raises(RelayError, match=error):
        FrameParser(masked=masked).feed(data)


async def test_cut_on_after_delivers_a_big_message_whole(
    relay: TcpRelay, server: EchoServer
) -> None:
    """The RST waits for the kernel to send the frame: an RST drops unsent bytes."""
    trap = relay.cut_on("up", "task_result", mode="after")
    text = "y" * 900_000  # under trio-websocket's default 1 MiB message limit
    with trio.fail_after(5):
        async with client(relay) as ws:
            await send(ws, "task_result", text=text)
            assert await expect_closed(ws) == 1006
            await server.wait_until(lambda: bool(server.closed))
    await trap.wait()
    assert [m.get("text") == text for m in server.received] == [True]


# ------------------------------------------------------------------ with codexnet's hub and proxy


async def test_between_the_real_hub_and_proxy(tmp_path: Path, nursery: trio.Nursery) -> None:
    """The relay speaks codexnet's protocol: hello/welcome seen, a cut makes it reconnect."""
    runner = await nursery.start(serve_hub, {"p1": ProxyEntry("right-token-p1")})
    hub = runner.hub
    relay = TcpRelay("127.0.0.1", hub.port)
    await nursery.start(relay.serve)
    config = attrs.evolve(
        proxy_config(tmp_path, fake_codex(tmp_path)),
        manager_ws=f"ws://127.0.0.1:{relay.port}",
        proxy_id="p1",
        proxy_token="right-token-p1",
    )
    service = ProxyService(config, AppServer(config))
    with trio.fail_after(10):
        async with trio.open_nursery() as proxy_nursery:
            proxy_nursery.start_soon(service.run)
            hello = await relay.wait_for_frame("up", "hello")
            assert hello.message["proxy_id"] == "p1"
            await relay.wait_for_frame("down", "welcome")
            await hub.wait_online("p1")
            trap = relay.cut_on("up", "task_result")  # the answer dies on the wire…
            result = await runner.run_task("p1", "hello")  # …the proxy re-sends it on reconnect
            proxy_nursery.cancel_scope.cancel()
    assert (result.status, result.text) == ("completed", "Echo: hello")
    assert (await trap.wait()).fate == "dropped"
    sent = relay.messages("up", "task_result")
    assert [(f.connection, f.fate) for f in sent] == [(1, "dropped"), (2, "forwarded")]
    assert [f.type for f in relay.messages("up", "hello")] == ["hello", "hello"]
