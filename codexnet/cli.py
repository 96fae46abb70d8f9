"""Pieces shared by the two command-line entry points."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Final, NoReturn

import trio

import codexnet
from codexnet import sdnotify

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2  # the config cannot work: restarting cannot help (RestartPreventExitStatus)
EXIT_REFUSED = 3  # the other side refused our credentials: restarting cannot help either
EXIT_STATE = 4  # the state database or its directory cannot be used

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")
# errno values of a listening socket that cannot bind: one clear line, no traceback.
BIND_ERRNOS: Final = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL})


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: {message} (see --help)\n")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--log-level (case-insensitive, choices listed in --help) and --version."""
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="log level, any case (default: INFO)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {codexnet.__version__}")


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first real exception inside (possibly nested) exception groups."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def find_leaf(
    exc: BaseException, predicate: Callable[[BaseException], bool]
) -> BaseException | None:
    """The first exception in `exc` (a group or not) for which `predicate` holds."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_leaf(inner, predicate)
            if found is not None:
                return found
        return None
    return exc if predicate(exc) else None


def bind_error(exc: BaseException) -> OSError | None:
    """The "address already in use"-style failure inside `exc`, if that is what it is."""
    found = find_leaf(exc, lambda e: isinstance(e, OSError) and e.errno in BIND_ERRNOS)
    return found if isinstance(found, OSError) else None


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
                    # systemd shows "deactivating" from here on, not a crash.
                    sdnotify.notify("STOPPING=1", "STATUS=shutting down")
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(watch_signals)
        await main()
        nursery.cancel_scope.cancel()
