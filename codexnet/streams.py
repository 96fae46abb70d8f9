"""A transparent wrapper around a trio stream, for watching what comes in."""

from __future__ import annotations

import trio


class PassThroughStream(trio.abc.Stream):
    """Hands every call to `inner`; a subclass overrides `receive_some` to watch the
    bytes (trio-websocket reads the socket in its own task and tells nobody)."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()
