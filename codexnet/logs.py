"""Logging set-up shared by the manager and the proxy.

The Telegram bot token sits in every Bot API request URL, and httpx logs request
URLs at INFO. Two defences, both always on:

1. the `httpx` and `httpcore` loggers are raised to WARNING;
2. a filter on every root handler formats each record and replaces any secret it
   knows about (registered with `register_secret`) and anything shaped like a bot
   token with `<redacted>`, so even a stray `log.info("%s", url)` cannot leak one
   (`codexnet/redaction.py`: one pass per line, whatever the number of secrets).

Peers supply much of what is logged (a hello's `version`, ids, labels,
Telegram names and text), and a newline in any of it would forge a log line.
The same filter first escapes control characters (C0, DEL, C1, U+2028/2029)
in the record's *arguments* — not in its format string, not in a traceback —
so every call site is covered: `\n` is logged as the two characters `\\n`.

Under systemd, stderr is a journald stream (`$JOURNAL_STREAM` names it): then
lines carry no timestamp of our own (journald adds one) and start with a
syslog priority `<N>`, so `journalctl -p warning` filters them. Every line of a
multi-line record (a traceback) gets the prefix: journald reads each line as a
message of its own.
"""

from __future__ import annotations

import logging
import numbers
import os
import re
import sys
from collections.abc import Mapping
from typing import Final

# Re-exported: the rest of codexnet registers and redacts through this module.
from codexnet.redaction import REDACTED as REDACTED
from codexnet.redaction import redact as redact
from codexnet.redaction import register_secret as register_secret

# C0 controls, DEL, C1 controls, the Unicode line and paragraph separators.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT_ESCAPES: Final = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """`text` with each control character as a visible escape (`\\n`, `\\x1b`, `\\u2028`)."""
    if _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(_escape_one, text)


def _escape_one(match: re.Match[str]) -> str:
    char = match[0]
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


class _Escaped:
    """A log argument that renders (`%s`, `%r`, `%-10s`) with its control characters escaped."""

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __str__(self) -> str:
        return escape_controls(str(self._value))

    def __repr__(self) -> str:
        return escape_controls(repr(self._value))


def _escaped(value: object) -> object:
    # Numbers stay numbers (`%d`, `%.1f` need them) and cannot hold a newline.
    if value is None or isinstance(value, numbers.Number):
        return value
    return _Escaped(value)


def escape_arguments(record: logging.LogRecord) -> None:
    """Make every argument of `record` render without control characters."""
    args = record.args
    if not args:
        return
    if isinstance(args, Mapping):
        record.args = {key: _escaped(value) for key, value in args.items()}
    else:
        record.args = tuple(_escaped(value) for value in args)


class RedactingFilter(logging.Filter):
    """Render the record's message once (arguments escaped), redact it, and freeze the result."""

    def filter(self, record: logging.LogRecord) -> bool:
        escape_arguments(record)
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
