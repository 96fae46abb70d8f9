"""A manager reduced to its wire protocol, for testing the proxy frame by frame.

A real trio-websocket server on 127.0.0.1; each proxy connection is handed to
the test as a `Link` once its `hello` is in (welcome already sent), so a test
can acknowledge, stay silent, or drop the link exactly where it wants.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from codexnet.protocol import (
    Hello,
    ManagerFrame,
    ProxyFrame,
    Welcome,
    decode_proxy_frame,
    encode,
)


@attrs.define(eq=False)
class Link:
    ws: WebSocketConnection
    hello: Hello
    closed: trio.Event = attrs.Factory(trio.Event)
    received: list[ProxyFrame] = attrs.Factory(list)
    _unclaimed: list[ProxyFrame] = attrs.Factory(list)  # read, not yet returned by expect

    async def send(self, frame: ManagerFrame) -> None:
        await self.ws.send_message(encode(frame))

    async def send_raw(self, text: str) -> None:
        """Send any text as one frame (what a broken or hostile manager might)."""
        await self.ws.send_message(text)

    async def expect(self, kind: type[Any], where: Callable[[Any], bool] = lambda f: True) -> Any:
        """The first frame of `kind` matching `where` not returned yet, in arrival order
        (frames read past while looking for another one are kept for later)."""
        for frame in self._unclaimed:
            if isinstance(frame, kind) and where(frame):
                self._unclaimed.remove(frame)
                return frame
        while True:
            frame = decode_proxy_frame(await self.ws.get_message())
            self.received.append(frame)
            if isinstance(frame, kind) and where(frame):
                return frame
            self._unclaimed.append(frame)

    async def cut(self) -> None:
        """Cut the TCP connection at once, no close handshake (a crashed manager):
        our socket is closed before the proxy even sees the link end."""
        await trio.aclose_forcefully(self.ws._stream)
        self.closed.set()

    async def drop(self) -> None:
        """Close the link (the proxy reconnects)."""
        with trio.move_on_after(2):
            await self.ws.aclose()
        self.closed.set()


class FakeManager:
    def __init__(self) -> None:
        self.port = 0
        self._send, self._receive = trio.open_memory_channel[Link](math.inf)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_websocket, self._handle, "127.0.0.1", 0, None)
            )
            self.port = server.port
            task_status.started(self.port)

    async def _handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            hello = decode_proxy_frame(await ws.get_message())
            assert isinstance(hello, Hello), hello
            await ws.send_message(encode(Welcome()))
        except ConnectionClosed:
            return
        link = Link(ws, hello)
        self._send.send_nowait(link)
        await link.closed.wait()

    async def accept(self) -> Link:
        """The next proxy connection (hello received, welcome sent)."""
        with trio.fail_after(30):
            return await self._receive.receive()
