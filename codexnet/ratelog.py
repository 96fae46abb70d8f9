"""A recurring problem logged once a minute, with how often it recurred.

When the process runs out of file descriptors, every connection, every
retry and every write can fail the same way many times a second; a log
line (let alone a traceback) for each would bury the one line that says
what is wrong. `Throttle.log` writes the first occurrence of a kind of
problem at once, counts the repeats, and writes the next one no sooner
than `every_s` later, with the count: "… (37 more like this in the last
60 s)".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Final

import attrs
import trio

EVERY_S: Final = 60.0


@attrs.define
class _Seen:
    at: float
    repeats: int = 0


class Throttle:
    def __init__(
        self, every_s: float = EVERY_S, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self._every_s = every_s
        self._clock = clock
        self._seen: dict[Hashable, _Seen] = {}

    def log(
        self, logger: logging.Logger, level: int, key: Hashable, msg: str, *args: object
    ) -> bool:
        """Log `msg % args` to `logger` unless a problem of kind `key` was logged
        in the last `every_s`; True if this one was logged."""
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.at < self._every_s:
            seen.repeats += 1
            return False
        if seen is not None and seen.repeats:
            msg += " (%d more like this in the last %.0f s)"
            args = (*args, seen.repeats, now - seen.at)
        self._seen[key] = _Seen(now)
        logger.log(level, msg, *args)
        return True
