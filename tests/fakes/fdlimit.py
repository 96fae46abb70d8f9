"""Run out of file descriptors for real, in this process, for a while.

`with exhausted_fds() as fds:` lowers the soft RLIMIT_NOFILE to a little above
what is open now and fills the rest with /dev/null, so the next socket(),
pipe() or open() fails with a real EMFILE from the kernel, at the real
boundary (trio, httpx, subprocess, SQLite), not a mock of it. A descriptor
closed meanwhile (a socket) is free again until `fds.fill()`; `fds.release()`
gives them back early (the block's end always does), restoring the limit.
"""

from __future__ import annotations

import errno
import gc
import os
import resource
from collections.abc import Iterator
from contextlib import contextmanager

import attrs

HEADROOM = 64  # descriptors between what is open now and the lowered limit


@attrs.define
class Exhausted:
    fds: list[int] = attrs.Factory(list)
    limit: tuple[int, int] | None = None

    def fill(self) -> None:
        """Take every descriptor free under the limit (again: closing a socket frees one)."""
        while True:
            try:
                self.fds.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
                return

    def release(self) -> None:
        while self.fds:
            os.close(self.fds.pop())
        if self.limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, self.limit)
            self.limit = None


@contextmanager
def exhausted_fds() -> Iterator[Exhausted]:
    # A socket an earlier test left to the garbage collector would close in the
    # middle of the block and hand its descriptor to the code under test.
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    state = Exhausted(limit=limit)
    try:
        # A low soft limit, so filling it takes a few dozen descriptors, not 20 000.
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + HEADROOM, limit[1]))
        state.fill()
        yield state
    finally:
        state.release()
        if was_enabled:
            gc.enable()
