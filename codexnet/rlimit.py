"""Raise this process's soft limit on open files to its hard limit, at start.

Every proxy connection is a socket in the manager, and systemd (like most
shells) starts services with a soft `RLIMIT_NOFILE` of 1024 under a much
higher hard limit (524288): the manager would run out of file descriptors at
about a thousand proxies although it may use far more. The soft limit is
kept low by default only for programs that still use select(2); the services
use epoll (trio) and SQLite, so they take what the hard limit allows. The
limit is inherited by the codex child, which is fine (Rust, epoll).
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

NR_OPEN: Final = Path("/proc/sys/fs/nr_open")  # Linux: the most a soft limit can be


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force.

    Says what it did at DEBUG; a limit that cannot be raised is kept (and
    said so at DEBUG too): it is never worth failing the start for.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if target == resource.RLIM_INFINITY:
        # An unlimited hard limit cannot be a soft one: Linux caps it at nr_open.
        try:
            target = int(NR_OPEN.read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft >= target:
        log.debug("open files limit: %d (already the hard limit)", soft)
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.debug("open files limit: %d; cannot raise it to %d: %s", soft, target, exc)
        return soft
    log.debug("open files limit raised from %d to %d (the hard limit)", soft, target)
    return target
