"""Running out of an OS resource (file descriptors, memory): recognised and named.

Such a failure is not the network's or the disk's fault, and the first
error it surfaces as can mislead: with no descriptor left, a DNS lookup
cannot open /etc/hosts and says "Name or service not known", SQLite says
"unable to open database file". `resource_problem` finds the real cause —
an EMFILE/ENFILE/ENOMEM/ENOBUFS anywhere in the exception's chain, or, for
an error that hides it, a probe of whether a descriptor can be had now —
and says it in words an operator can act on. Callers survive the failure
(retry, or fail only that step) and log it through `codexnet.ratelog`.
"""

from __future__ import annotations

import errno
import os
from typing import Final

RESOURCE_ERRNOS: Final = {
    errno.EMFILE: "this process has too many open files (EMFILE; raise LimitNOFILE)",
    errno.ENFILE: "the system has too many open files (ENFILE)",
    errno.ENOMEM: "out of memory (ENOMEM)",
    errno.ENOBUFS: "out of network buffers (ENOBUFS)",
}
_MAX_DEPTH: Final = 8


def _find(exc: BaseException | None, depth: int = 0) -> OSError | None:
    if exc is None or depth > _MAX_DEPTH:
        return None
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRNOS:
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _find(inner, depth + 1)) is not None:
                return found
    return _find(exc.__cause__ or exc.__context__, depth + 1)


def out_of_descriptors() -> OSError | None:
    """The EMFILE/ENFILE that opening a file would fail with right now, if any."""
    try:
        fd = os.open(os.devnull, os.O_RDONLY)
    except OSError as exc:
        return exc if exc.errno in (errno.EMFILE, errno.ENFILE) else None
    os.close(fd)
    return None


def resource_problem(exc: BaseException | None, *, probe: bool = True) -> str | None:
    """What resource ran out, if that is why `exc` happened; None otherwise.

    `probe`: also count an error whose chain does not show it (a failed DNS
    lookup, SQLite's "unable to open") when no descriptor can be had now.
    """
    found = _find(exc)
    if found is None and probe:
        found = out_of_descriptors()
    if found is None:
        return None
    assert found.errno is not None
    return RESOURCE_ERRNOS[found.errno]
