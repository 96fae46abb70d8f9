"""Hostile connections to the hub, kept open: `await nursery.start(flood.run, 1000)`.

Each stranger connects from its own loopback address (127.0.0.0/8 is all
local, ten strangers per address), does one of three things and holds the
socket until the hub drops it, then comes straight back (after 0.1 s):

- "idle": connects and says nothing;
- "half": sends the start of an HTTP upgrade request and never the rest;
- "mute": completes the WebSocket handshake and never says hello.
"""

from __future__ import annotations

import attrs
import trio

UPGRADE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
KINDS = ("idle", "half", "mute")
PER_ADDRESS = 10
COME_BACK_S = 0.1


@attrs.define
class Flood:
    port: int
    connects: int = 0  # connections made, in all
    dropped: int = 0  # of them closed by the hub
    _all_in: trio.Event = attrs.Factory(trio.Event)
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def wait_connects(self, count: int) -> None:
        while self.connects < count:
            await self._changed.wait()

    async def run(self, count: int, *, task_status: trio.TaskStatus[None]) -> None:
        """Keep `count` strangers at the door; `started()` once each has connected once."""
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(self._stranger, i, count)
            await self._all_in.wait()
            task_status.started()

    async def _stranger(self, i: int, count: int) -> None:
        source = f"127.0.{i // PER_ADDRESS // 250}.{2 + i // PER_ADDRESS % 250}"
        kind = KINDS[i % len(KINDS)]
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", self.port, local_address=source)
            except OSError:
                await trio.sleep(COME_BACK_S)
                continue
            self.connects += 1
            self._changed.set()
            self._changed = trio.Event()
            if self.connects >= count:
                self._all_in.set()
            async with stream:
                try:
                    if kind == "half":
                        await stream.send_all(UPGRADE[:40])
                    elif kind == "mute":
                        await stream.send_all(UPGRADE)
                    while await stream.receive_some(4096):
                        pass  # the 101 response, then nothing until the hub drops us
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            self.dropped += 1
            await trio.sleep(COME_BACK_S)
