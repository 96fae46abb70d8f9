"""Open a client WebSocket whose TCP stream we own and always close.

trio-websocket's `open_websocket_url` leaks the client socket when the server
closes the connection and the body exits on that `ConnectionClosed` (the
client waits for the server's TCP close in a reader task that is cancelled
first). A proxy that reconnects for weeks cannot leak a socket per refusal,
so the stream is opened here and closed in `finally`, whatever happened. The
TLS handshake is done here too, so a bad certificate fails at once and says why.
A block that ends normally closes with a close handshake; one that is
cancelled or fails just drops the stream (the peer sees the link end at once).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
from trio_websocket import WebSocketConnection, wrap_client_stream

from codexnet.protocol import MAX_FRAME_BYTES


@asynccontextmanager
async def connect_websocket(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 20.0,
    max_message_size: int = MAX_FRAME_BYTES,
) -> AsyncIterator[WebSocketConnection]:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with trio.fail_after(connect_timeout):
        tcp = await trio.open_tcp_stream(parts.hostname, port)
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
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                ws = await wrap_client_stream(
                    nursery, stream, parts.hostname, resource, max_message_size=max_message_size
                )
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
