"""The hub's front door: how many strangers it holds, and how fast an address may guess.

A connection is *pending* from the moment it is accepted until its `hello`
is authenticated (or it is closed). Pending connections cost a file
descriptor each and prove nothing, so they are capped: in all
(`hub_max_pending`) and per remote address (`hub_max_pending_per_address`).
When a cap is reached the *oldest* pending connection is dropped, not the
newest: a real proxy says `hello` within milliseconds of connecting, so it
is through the door long before a thousand idle sockets could push it out,
while an attacker who holds sockets open only ever evicts its own.

Failed authentications back off per address: after a failure, the next
`hello` from that address is checked only after a delay that doubles with
each failure (0.25 s … 30 s) and is forgotten after ten quiet minutes. A
guesser gets a handful of tries a minute instead of hundreds a second; a
proxy behind the same address as a guesser is delayed, never refused.

Nothing here logs per connection: `Notices` logs the first event of each kind
per minute and a one-line summary of the rest.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Final

import attrs
import trio

log = logging.getLogger("codexnet.manager.hub")

AUTH_BACKOFF_FIRST_S: Final = 0.25
AUTH_BACKOFF_MAX_S: Final = 30.0
AUTH_FORGET_S: Final = 600.0  # an address quiet this long starts afresh
MAX_TRACKED_ADDRESSES: Final = 10_000  # bounded memory under a spray of addresses
NOTICE_EVERY_S: Final = 60.0


@attrs.define(eq=False)
class Pending:
    """One connection at the door; its scope is cancelled when it is evicted."""

    address: str
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    evicted: bool = False


@attrs.define
class _Failures:
    count: int
    next_check: float  # trio time before which no hello of this address is checked
    last: float


class FrontDoor:
    def __init__(
        self,
        max_pending: int,
        max_pending_per_address: int,
        *,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        self._clock = clock
        self._pending: OrderedDict[Pending, None] = OrderedDict()  # oldest first
        self._by_address: dict[str, OrderedDict[Pending, None]] = {}
        self._failures: OrderedDict[str, _Failures] = OrderedDict()
        self._changed = trio.Event()

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def wait_pending(self, count: int) -> None:
        """Until exactly `count` connections are pending (for tests and benches)."""
        while len(self._pending) != count:
            await self._changed.wait()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def enter(self, address: str) -> list[Pending]:
        """Admit a connection from `address`; returns it first, then those evicted for it."""
        mine = self._by_address.setdefault(address, OrderedDict())
        evicted: list[Pending] = []
        if len(mine) >= self.max_pending_per_address:
            evicted.append(self._evict(next(iter(mine))))
        if len(self._pending) >= self.max_pending:
            evicted.append(self._evict(next(iter(self._pending))))
        entry = Pending(address)
        self._pending[entry] = None
        self._by_address.setdefault(address, OrderedDict())[entry] = None
        self._touch()
        return [entry, *evicted]

    def leave(self, entry: Pending) -> None:
        """`entry` is authenticated or closed: it no longer counts."""
        if self._pending.pop(entry, 0) is None:
            self._touch()
        mine = self._by_address.get(entry.address)
        if mine is not None:
            mine.pop(entry, None)
            if not mine:
                del self._by_address[entry.address]

    def evict_oldest(self) -> Pending | None:
        """Drop the oldest pending connection (to free a file descriptor)."""
        return self._evict(next(iter(self._pending))) if self._pending else None

    def _evict(self, entry: Pending) -> Pending:
        self.leave(entry)
        entry.evicted = True
        entry.scope.cancel()
        return entry

    # ------------------------------------------------------------------ auth

    def auth_turn(self, address: str) -> float | None:
        """The trio time at which a hello from `address` may be checked (now, if clean);
        None if that is more than AUTH_BACKOFF_MAX_S away (the caller says "try later").

        Each hello waiting behind failures takes its own turn, one delay apart,
        so parallel connections do not multiply the guessing rate.
        """
        now = self._clock()
        failures = self._failures.get(address)
        if failures is None:
            return now
        if now - failures.last > AUTH_FORGET_S:
            del self._failures[address]
            return now
        turn = max(now, failures.next_check)
        if turn - now > AUTH_BACKOFF_MAX_S:
            return None
        failures.next_check = turn + _delay(failures.count)
        return turn

    def auth_failed(self, address: str) -> None:
        now = self._clock()
        failures = self._failures.pop(address, None)
        if failures is None or now - failures.last > AUTH_FORGET_S:
            failures = _Failures(0, now, now)
        failures.count += 1
        failures.last = now
        failures.next_check = max(failures.next_check, now + _delay(failures.count))
        self._failures[address] = failures  # most recent last: the oldest is forgotten first
        while len(self._failures) > MAX_TRACKED_ADDRESSES:
            self._failures.popitem(last=False)

    def auth_succeeded(self, address: str) -> None:
        self._failures.pop(address, None)


def _delay(failures: int) -> float:
    if failures <= 0:
        return 0.0
    return min(AUTH_BACKOFF_FIRST_S * 2.0 ** (failures - 1), AUTH_BACKOFF_MAX_S)


class Notices:
    """Warnings about strangers, at most one per kind per minute plus a summary line.

    `note(kind, message, *args)` logs the first event of a kind in a minute
    at WARNING and counts the rest; `run()` logs, once a minute, how many of
    each kind were not logged.
    """

    def __init__(self) -> None:
        self._logged_at: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()
        self.total: Counter[str] = Counter()  # every event since start, for /status and tests

    def note(self, kind: str, message: str, *args: object) -> None:
        self.total[kind] += 1
        now = trio.current_time()
        if now - self._logged_at.get(kind, -NOTICE_EVERY_S) >= NOTICE_EVERY_S:
            self._logged_at[kind] = now
            log.warning(message, *args)
        else:
            self._unlogged[kind] += 1

    def summary(self) -> str | None:
        if not self._unlogged:
            return None
        parts = ", ".join(f"{count} {kind}" for kind, count in sorted(self._unlogged.items()))
        self._unlogged.clear()
        return f"strangers at the hub in the last minute, not logged one by one: {parts}"

    async def run(self) -> None:
        while True:
            await trio.sleep(NOTICE_EVERY_S)
            line = self.summary()
            if line:
                log.warning("%s", line)
