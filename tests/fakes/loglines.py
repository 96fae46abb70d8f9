"""Log records as they happen, so a test waits for a line instead of sleeping.

Use the `logged` fixture (import it into the test module): every record of
every logger at DEBUG and up while the test runs; `await logged.wait_for(
"fragment")` returns once a line containing it was logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
import trio


class LogLines(logging.Handler):
    """Every record logged while installed; `wait_for` a line instead of sleeping."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._changed = trio.Event()
        self.hooks: list[tuple[str, Callable[[], None]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        for fragment, hook in self.hooks:  # at once, before the logging code goes on
            if fragment in record.getMessage():
                hook()
        self._changed.set()
        self._changed = trio.Event()

    def lines(self, fragment: str = "") -> list[str]:
        return [r.getMessage() for r in self.records if fragment in r.getMessage()]

    async def wait_for(self, fragment: str, count: int = 1, *, seconds: float = 20) -> None:
        """Until `count` lines containing `fragment` were logged (`seconds` at most)."""
        with trio.fail_after(seconds):
            while len(self.lines(fragment)) < count:
                await self._changed.wait()


@pytest.fixture
def logged() -> Iterator[LogLines]:
    """Every log record while the test runs (the root logger at DEBUG meanwhile)."""
    handler = LogLines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
