"""One process per state directory: a lock file held for the life of the service.

Two managers on one `state_dir` would both poll Telegram (409s forever) and
write one database from two processes; two proxies on one `state_dir` would
both claim the same tasks. `hold_state_lock` takes an exclusive `flock` on
`<state_dir>/<name>.lock` (released by the kernel however the process dies,
SIGKILL included) and writes our pid into it so the refusal can name the owner.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from codexnet.db import StateError


@contextmanager
def hold_state_lock(state_dir: Path, name: str) -> Iterator[Path]:
    """Hold the lock until the block ends; `StateError` if another process has it."""
    path = state_dir / f"{name}.lock"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StateError(f"{path}: cannot create the lock file: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise StateError(
                f"{state_dir}: another codexnet {name} (pid {owner}) already uses this "
                "state_dir; stop it first, or give this one its own state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock
