"""Wait for a log line of this process, without polling: `await watch.wait_for("text")`.

    with watching() as watch:
        ...
        await watch.wait_for("retrying in 60 s")

The handler sits on the root logger for the block and wakes waiters on every
record (records come from the trio thread in these tests, so the event is
safe to set).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import trio


class LogWatch(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, text: str) -> str:
        """The first message containing `text`, once logged (put a deadline around it)."""
        while True:
            for message in self.messages:
                if text in message:
                    return message
            await self._changed.wait()


@contextmanager
def watching() -> Iterator[LogWatch]:
    watch = LogWatch()
    root = logging.getLogger()
    root.addHandler(watch)
    try:
        yield watch
    finally:
        root.removeHandler(watch)
