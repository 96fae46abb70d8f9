"""A program under a real pseudo-terminal, driven like a person at a keyboard.

The child gets the pty's slave end as stdin/stdout/stderr *and as its
controlling terminal* (a new session, then TIOCSCTTY), so `getpass` opens
`/dev/tty` and turns echo off as it would for a person, and a typed Ctrl-C
(`\\x03`) reaches it as SIGINT from the line discipline.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import trio

# How long expect() and wait() give the program: generous, they return as soon as it is done.
PATIENCE_S = 15.0

# Run as `python -c LAUNCHER argv…`: become a session leader, take the pty as
# the controlling terminal, then exec the real program in this same process.
_LAUNCHER = (
    "import fcntl, os, sys, termios\n"
    "os.setsid()\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


class Terminal:
    def __init__(self, process: trio.Process, master: trio.lowlevel.FdStream) -> None:
        self.process = process
        self._master = master
        self._raw = ""
        self._seen = 0  # where the next expect() starts looking
        self._eof = False

    @property
    def output(self) -> str:
        """Everything the program wrote, with the terminal's CR LF turned into LF."""
        return self._raw.replace("\r\n", "\n")

    async def _read_more(self) -> None:
        try:
            chunk = await self._master.receive_some(65536)
        except trio.BrokenResourceError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            self._eof = True
            return
        self._raw += chunk.decode(errors="replace")

    async def expect(self, pattern: str) -> re.Match[str]:
        """Wait until `pattern` appears in new output; fail with the screen if it does not."""
        regex = re.compile(pattern)
        with trio.move_on_after(PATIENCE_S):
            while True:
                match = regex.search(self.output, self._seen)
                if match is not None:
                    self._seen = match.end()
                    return match
                if self._eof:
                    break
                await self._read_more()
        raise AssertionError(f"{pattern!r} did not appear; the terminal shows:\n{self.output}")

    async def send(self, text: str) -> None:
        await self._master.send_all(text.encode())

    async def wait(self) -> int:
        """The exit code, reading the rest of the output meanwhile."""
        with trio.fail_after(PATIENCE_S):
            while not self._eof:
                await self._read_more()
            return await self.process.wait()


@asynccontextmanager
async def spawn(
    argv: Sequence[str], *, env: Mapping[str, str], cwd: Path
) -> AsyncIterator[Terminal]:
    master, slave = os.openpty()
    try:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-c", _LAUNCHER, *argv],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=dict(env),
            cwd=cwd,
        )
    finally:
        os.close(slave)  # the child has its copy; ours would keep EOF from ever coming
    terminal = Terminal(process, trio.lowlevel.FdStream(master))
    try:
        yield terminal
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5, shield=True):
                await process.wait()
        await terminal._master.aclose()


def child_env(**extra: str) -> dict[str, str]:
    """Our environment without anything that points a child at a real service."""
    skip = ("TELEGRAM_", "CODEXNET_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env.update(extra)
    return env


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
