"""Let a step that must not be split finish on shutdown, for a bounded time.

Trio has no soft cancellation: cancelling the manager would cut an answer in
half between "sent to the chat" and "forgotten in the journal", or between
"update handled" and "offset saved", and the next start would repeat it. Such
steps run under `grace.protect()`: shielded from the shutdown, and given
`seconds` to finish once `grace.begin()` is called (bounded, so a stuck send
cannot hold the process up).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class ShutdownGrace:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._scopes: set[trio.CancelScope] = set()
        self._deadline: float | None = None

    @property
    def stopping(self) -> bool:
        return self._deadline is not None

    @contextmanager
    def protect(self) -> Iterator[trio.CancelScope]:
        scope = trio.CancelScope(shield=True)
        if self._deadline is not None:
            scope.deadline = self._deadline
        self._scopes.add(scope)
        try:
            with scope:
                yield scope
        finally:
            self._scopes.discard(scope)

    def begin(self) -> None:
        """Shutdown has started: every protected step now has `seconds` left."""
        self._deadline = trio.current_time() + self.seconds
        for scope in self._scopes:
            scope.deadline = self._deadline
