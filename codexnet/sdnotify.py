"""sd_notify(3) without libsystemd: readiness, watchdog and stopping for systemd.

With `Type=notify`, systemd passes a Unix datagram socket in `$NOTIFY_SOCKET`:
a filesystem path, or `@name` for the abstract namespace. A message is one
datagram of newline-separated `KEY=VALUE` lines (`READY=1`, `WATCHDOG=1`,
`STOPPING=1`, `STATUS=…`). Without `$NOTIFY_SOCKET` (not under systemd) every
call is a no-op, so the services call these unconditionally.

Sending never blocks and never raises: a notification that cannot go out is
dropped with a DEBUG line. systemd then notices on its own (a start timeout,
a missed watchdog), which is the right outcome for a service that cannot talk
to it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import NoReturn

import trio

log = logging.getLogger(__name__)


def _address(environ: Mapping[str, str]) -> str | None:
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        return "\0" + address[1:]  # abstract namespace: a leading NUL byte, no file
    if address.startswith("/"):
        return address
    return None  # unset, or a kind we do not speak (e.g. vsock:…)


def notify(*fields: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `fields` as one datagram to `$NOTIFY_SOCKET`; True if it went out."""
    address = _address(os.environ if environ is None else environ)
    if address is None or not fields:
        return False
    message = "\n".join(fields).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a full queue drops the message instead of stalling us
            sock.sendto(message, address)
    except OSError as exc:
        log.debug("sd_notify %s not sent: %s", fields[0], exc)
        return False
    return True


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of `WatchdogSec`), or None when it is off."""
    environ = os.environ if environ is None else environ
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # the variables were meant for our parent, not for us
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


async def serve_watchdog(interval: float, environ: Mapping[str, str] | None = None) -> NoReturn:
    """Ping the watchdog forever.

    The ping comes from a task of the service's own event loop, so it stops
    when the loop is stuck (a blocking call, a busy loop): systemd then kills
    and restarts the service, which is what the watchdog is for.
    """
    while True:
        notify("WATCHDOG=1", environ=environ)
        await trio.sleep(interval)


async def run_ready(
    start: Callable[..., Awaitable[object]],
    *,
    status: str,
    environ: Mapping[str, str] | None = None,
) -> None:
    """Run the startable `start` until cancelled; READY=1 once it has started.

    `start` takes `task_status` and calls `task_status.started()` once it
    serves. After that, and while `WatchdogSec` is set, the watchdog is pinged.
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(start)
        notify("READY=1", f"STATUS={status}", environ=environ)
        interval = watchdog_interval(environ)
        if interval is not None:
            nursery.start_soon(serve_watchdog, interval, environ)
