"""Logging set-up shared by the manager and the proxy.

The Telegram bot token sits in every Bot API request URL, and httpx logs request
URLs at INFO. Two defences, both always on:

1. the `httpx` and `httpcore` loggers are raised to WARNING;
2. a filter on every root handler formats each record and replaces any secret it
   knows about (registered with `register_secret`) and anything shaped like a bot
   token with `<redacted>`, so even a stray `log.info("%s", url)` cannot leak one.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Final

REDACTED: Final = "<redacted>"
# `bot<digits>:<secret>` as it appears in Bot API URLs, and bare `<digits>:<secret>` tokens.
_BOT_TOKEN_RE: Final = re.compile(r"\b(bot)?\d{3,}:[A-Za-z0-9_-]{20,}")

_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(secret: str | None) -> None:
    """Make `secret` unloggable from now on (short strings are ignored: too many false hits)."""
    if secret and len(secret) >= 6:
        with _secrets_lock:
            _secrets.add(secret)


def redact(text: str) -> str:
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return _BOT_TOKEN_RE.sub(REDACTED, text)


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


def setup_logging(level: str | int = "INFO") -> None:
    """Configure the root logger for a service process (idempotent)."""
    root = logging.getLogger()
    root.setLevel(level)
    if not any(getattr(h, "_codexnet", False) for h in root.handlers):
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._codexnet = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    for handler in root.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for noisy in ("httpx", "httpcore", "trio-websocket", "hpack"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
