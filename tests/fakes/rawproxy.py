"""A proxy reduced to its wire protocol, driven by the test frame by frame.

It speaks to the real hub over a real WebSocket, so tests can do what a real
proxy never would on its own: drop the link right after a frame, answer
twice, stay silent, speak for another proxy's task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from codexnet.protocol import (
    PROTOCOL_VERSION,
    Hello,
    ManagerFrame,
    ProxyFrame,
    Welcome,
    decode_manager_frame,
    encode,
)
from codexnet.wsclient import connect_websocket


@attrs.define
class RawProxy:
    ws: WebSocketConnection
    received: list[ManagerFrame] = attrs.Factory(list)
    _unclaimed: list[ManagerFrame] = attrs.Factory(list)  # read, not yet returned by expect

    async def send(self, frame: ProxyFrame) -> None:
        await self.ws.send_message(encode(frame))

    async def send_raw(self, text: str) -> None:
        """Send any text as one frame (what a broken or hostile proxy might)."""
        await self.ws.send_message(text)

    async def closed(self) -> CloseReason:
        """Wait until the hub closes the link; its close code and reason."""
        reason: CloseReason | None = None
        with trio.fail_after(10):
            while reason is None:
                try:
                    await self.ws.get_message()
                except ConnectionClosed as exc:
                    reason = exc.reason
        return reason

    async def expect(
        self, kind: type[Any], where: Callable[[Any], bool] = lambda frame: True
    ) -> Any:
        """The first frame of `kind` matching `where` not returned yet, in arrival order
        (frames read past while looking for another one are kept for later)."""
        for frame in self._unclaimed:
            if isinstance(frame, kind) and where(frame):
                self._unclaimed.remove(frame)
                return frame
        while True:
            frame = decode_manager_frame(await self.ws.get_message())
            self.received.append(frame)
            if isinstance(frame, kind) and where(frame):
                return frame
            self._unclaimed.append(frame)

    async def nothing_for(self, seconds: float) -> list[ManagerFrame]:
        """Frames that arrive within `seconds` (to assert that something is not sent)."""
        got: list[ManagerFrame] = []
        with trio.move_on_after(seconds):
            while True:
                got.append(decode_manager_frame(await self.ws.get_message()))
        self.received.extend(got)
        return got


@asynccontextmanager
async def raw_proxy(
    port: int,
    proxy_id: str,
    token: str,
    *,
    running: list[str] | None = None,
    finished: list[str] | None = None,
    version: str = "",
) -> AsyncIterator[RawProxy]:
    """Connect, say hello, wait for welcome; the link closes when the block ends."""
    async with connect_websocket(f"ws://127.0.0.1:{port}") as ws:
        hello = Hello(
            proxy_id=proxy_id,
            token=token,
            protocol=PROTOCOL_VERSION,
            capacity=2,
            running=running or [],
            finished=finished or [],
            version=version,
        )
        await ws.send_message(encode(hello))
        with trio.fail_after(10):
            welcome = decode_manager_frame(await ws.get_message())
        assert isinstance(welcome, Welcome), welcome
        yield RawProxy(ws)


@asynccontextmanager
async def raw_connection(port: int) -> AsyncIterator[RawProxy]:
    """Connect without saying hello: the test sends whatever it likes first."""
    async with connect_websocket(f"ws://127.0.0.1:{port}") as ws:
        yield RawProxy(ws)
