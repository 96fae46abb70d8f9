"""Pieces shared by the two command-line entry points."""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_REFUSED = 3
EXIT_STATE = 4  # the state database or its directory cannot be used


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real exception inside (possibly nested) exception groups."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def run_service(
    main: Callable[[], Awaitable[object]],
    fatal: type[BaseException] | tuple[type[BaseException], ...],
) -> BaseException | None:
    """Run `main` until a signal; the `fatal` error it ended with, if any (unwrapped)."""
    caught: list[BaseException] = []
    try:
        trio.run(run_until_signal, main)
    except* fatal as group:
        caught.append(first_leaf(group))
    return caught[0] if caught else None


async def run_until_signal(main: Callable[[], Awaitable[object]]) -> None:
    """Run `main` until it returns or SIGTERM/SIGINT arrives, then cancel it.

    Cancellation is the shutdown path: every service cleans up in shielded,
    bounded `finally` blocks, so a signal ends the process within seconds.
    """
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("%s received, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch_signals)
        await main()
        nursery.cancel_scope.cancel()
