"""Logging set-up shared by the manager and the proxy.

The Telegram bot token sits in every Bot API request URL, and httpx logs request
URLs at INFO. Two defences, both always on:

1. the `httpx` and `httpcore` loggers are raised to WARNING;
2. a filter on every root handler formats each record and replaces any secret it
   knows about (registered with `register_secret`) and anything shaped like a bot
   token with `<redacted>`, so even a stray `log.info("%s", url)` cannot leak one
   (`codexnet/redaction.py`: one pass per line, whatever the number of secrets).

Under systemd, stderr is a journald stream (`$JOURNAL_STREAM` names it): then
lines carry no timestamp of our own (journald adds one) and start with a
syslog priority `<N>`, so `journalctl -p warning` filters them. Every line of a
multi-line record (a traceback) gets the prefix: journald reads each line as a
message of its own.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Final

# Re-exported: the rest of codexnet registers and redacts through this module.
from codexnet.redaction import REDACTED as REDACTED
from codexnet.redaction import redact as redact
from codexnet.redaction import register_secret as register_secret


class RedactingFilter(logging.Filter):
    """Render the record's message once, redact it, and freeze the result."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg = redact(message)
        record.args = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


# syslog(3) priorities, as journald reads them from a `<N>` line prefix.
_PRIORITIES: Final = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY: Final = 7


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return _DEBUG_PRIORITY


class JournalFormatter(logging.Formatter):
    """`<N>name: message` on every line; journald supplies the time."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """True when stderr is the journald stream systemd connected (`$JOURNAL_STREAM`).

    The variable is inherited by children whose stderr is something else (a
    pipe, a file), so it counts only when its `device:inode` is our stderr.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):
        return False


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger for a service process (idempotent)."""
    root = logging.getLogger()
    root.setLevel(level)
    if not any(getattr(h, "_codexnet", False) for h in root.handlers):
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        if stderr_is_journal():
            handler.setFormatter(JournalFormatter())
        else:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
        handler._codexnet = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for noisy in ("httpx", "httpcore", "trio-websocket", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
