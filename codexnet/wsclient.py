"""Open a client WebSocket whose TCP stream we own and always close.

trio-websocket's `open_websocket_url` leaks the client socket when the server
closes the connection and the body exits on that `ConnectionClosed` (the
client waits for the server's TCP close in a reader task that is cancelled
first). A proxy that reconnects for weeks cannot leak a socket per refusal,
so the stream is opened here and closed in `finally`, whatever happened. The
TLS handshake is done here too, so a bad certificate fails at once and says why.
A block that ends normally closes with a close handshake; one that is
cancelled or fails just drops the stream (the peer sees the link end at once).

trio-websocket's client handshake also never ends when the server closes the
connection before answering it (a hub dropping the oldest of too many
pending connections does): it would wait out the whole connect timeout. The
stream is watched for its end, which fails the handshake at once.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
from trio_websocket import HandshakeError, WebSocketConnection, wrap_client_stream

from codexnet.protocol import MAX_FRAME_BYTES
from codexnet.streams import PassThroughStream


@asynccontextmanager
async def connect_websocket(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 20.0,
    max_message_size: int = MAX_FRAME_BYTES,
    local_address: str | None = None,
) -> AsyncIterator[WebSocketConnection]:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with trio.fail_after(connect_timeout):
        tcp = await trio.open_tcp_stream(parts.hostname, port, local_address=local_address)
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] = tcp
        if secure:
            tls = trio.SSLStream(
                tcp, ssl_context or ssl.create_default_context(), server_hostname=parts.hostname
            )
            try:
                # Handshake here: trio-websocket would wait out the whole connect
                # timeout on a certificate it cannot verify instead of failing.
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
            stream = tls
    watched = _EndWatch(stream)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                ws = await _handshake(nursery, watched, parts.hostname, resource, max_message_size)
            try:
                yield ws
            except BaseException:
                # Cancelled (shutting down) or failing: the reader task that
                # would see the server's close reply is being cancelled too, so
                # a close handshake could only time out. Drop the stream.
                nursery.cancel_scope.cancel()
                raise
            else:
                with trio.move_on_after(2, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def _handshake(
    nursery: trio.Nursery, stream: _EndWatch, host: str, resource: str, max_message_size: int
) -> WebSocketConnection:
    """`wrap_client_stream`, failing at once if the server closes before it answers."""
    done: list[WebSocketConnection] = []
    async with trio.open_nursery() as race:

        async def handshake() -> None:
            # Typed for socket streams; any trio stream works (it only reads and writes).
            connection = await wrap_client_stream(
                nursery,
                stream,  # type: ignore[arg-type]
                host,
                resource,
                max_message_size=max_message_size,
            )
            done.append(connection)
            race.cancel_scope.cancel()

        async def server_closed() -> None:
            await stream.ended.wait()
            race.cancel_scope.cancel()

        race.start_soon(handshake)
        race.start_soon(server_closed)
    if not done:
        raise HandshakeError("the server closed the connection during the WebSocket handshake")
    return done[0]


class _EndWatch(PassThroughStream):
    """A stream that says when the peer ended it (EOF or a reset); otherwise transparent."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        super().__init__(inner)
        self.ended = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except trio.BrokenResourceError:
            self.ended.set()
            raise
        if not data:
            self.ended.set()
        return data
