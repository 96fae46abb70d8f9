"""Small waiting helpers on trio.Event."""

from __future__ import annotations

import trio


async def wait_first(*events: trio.Event) -> None:
    """Return as soon as any of `events` is set."""
    if any(event.is_set() for event in events):
        return
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait_then_stop(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait_then_stop)
