"""Secrets out of log lines, at a cost that does not grow with the number of secrets.

A manager with 5 000 proxies knows 5 000 tokens, and every log line must be
checked for each of them. Looking for each one in turn cost 0.7–0.9 ms a line
at that size. Instead a line is cut into *token-shaped runs* — maximal runs
of `[A-Za-z0-9_-]`, the alphabet of `secrets.token_urlsafe` and so of every
token codexnet generates — with one compiled pattern, and each run is looked
up in a set:

* a run that *is* a secret is redacted: a secret of any length, standing
  between other characters (`token x`, `bot123:<token>`, `?token=<token>&`,
  `"<token>"`);
* a secret of `WINDOW` (16) characters or more is also found *inside* a
  longer run (`x<token>y`, `<token><token>`): every run longer than `WINDOW`
  is slid over, and its 16-character windows are looked up among the
  secrets' first 16 characters. The cost is one set lookup per character of
  such runs — in ordinary log text there are few — whatever the number of
  secrets. (Proxy tokens are at least 16 characters: `checks.py`.)

A secret with characters outside the alphabet (a hand-made `pass word!`, the
`<id>:<secret>` bot token) cannot be one run, so it is looked for as a plain
substring — one scan each, and there are few of them. Its token-shaped
parts of `WINDOW` characters or more are registered as well, so the bot
token's secret half is redacted even where the `:` is URL-encoded (`%3A`).
Anything shaped like a bot token is redacted whether registered or not.
"""

from __future__ import annotations

import re
import threading
from typing import Final

REDACTED: Final = "<redacted>"
WINDOW: Final = 16  # secrets this long are found inside longer runs too
_ALPHABET: Final = "A-Za-z0-9_-"
_TOKEN_SHAPED: Final = re.compile(f"[{_ALPHABET}]+")
_WHOLLY_TOKEN_SHAPED: Final = re.compile(f"[{_ALPHABET}]+\\Z")
# `bot<digits>:<secret>` as it appears in Bot API URLs, and bare `<digits>:<secret>` tokens.
# (A look-behind, not `\b`: the scan then fails at once inside a word, twice as fast.)
_BOT_TOKEN_RE: Final = re.compile(r"(?<![A-Za-z0-9_])(?:bot)?\d{3,}:[A-Za-z0-9_-]{20,}")


class SecretRedactor:
    """The registered secrets, and `redact(text)` (thread-safe; registering is rare)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: set[str] = set()  # token-shaped secrets
        # First WINDOW characters → the token-shaped secrets that start so, longest first.
        self._by_prefix: dict[str, tuple[str, ...]] = {}
        self._others: tuple[str, ...] = ()  # secrets that are not one token-shaped run
        # Runs shorter than every registered secret cannot be one: not even looked at.
        self._shortest = WINDOW
        self._pattern = self._pattern_for(WINDOW)

    def __len__(self) -> int:
        return len(self._runs) + len(self._others)

    def register(self, secret: str | None) -> None:
        """Make `secret` unloggable from now on (any length; empty is ignored)."""
        if not secret:
            return
        with self._lock:
            if _WHOLLY_TOKEN_SHAPED.match(secret):
                self._add_run(secret)
                return
            if secret not in self._others:
                # Longest first, so a secret inside another one leaves none of it behind.
                self._others = tuple(sorted((*self._others, secret), key=len, reverse=True))
            for part in _TOKEN_SHAPED.findall(secret):
                if len(part) >= WINDOW:
                    self._add_run(part)

    def _add_run(self, secret: str) -> None:
        self._runs.add(secret)
        if len(secret) >= WINDOW:
            prefix = secret[:WINDOW]
            same = {*self._by_prefix.get(prefix, ()), secret}
            self._by_prefix[prefix] = tuple(sorted(same, key=len, reverse=True))
        if len(secret) < self._shortest:
            self._shortest = len(secret)
            self._pattern = self._pattern_for(len(secret))

    @staticmethod
    def _pattern_for(shortest: int) -> re.Pattern[str]:
        # Runs of at least `shortest`, matched from their start only: inside a
        # run the look-behind fails at once, instead of a match tried and
        # abandoned at every position of it.
        return re.compile(f"(?<![{_ALPHABET}])[{_ALPHABET}]{{{shortest},}}")

    def redact(self, text: str) -> str:
        # Bot-token shapes first: `bot123:<secret>` goes as a whole, `bot` included.
        text = _BOT_TOKEN_RE.sub(REDACTED, text)
        for secret in self._others:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if not self._runs:
            return text
        return self._pattern.sub(self._redact_run, text)

    def _redact_run(self, match: re.Match[str]) -> str:
        run = match.group()
        if run in self._runs:
            return REDACTED
        if len(run) <= WINDOW:
            return run  # a longer secret cannot be inside it, a same-length one would be it
        by_prefix = self._by_prefix
        pieces: list[str] = []
        start = i = 0
        last = len(run) - WINDOW
        while i <= last:
            candidates = by_prefix.get(run[i : i + WINDOW])
            if candidates is not None:
                found = next((s for s in candidates if run.startswith(s, i)), None)
                if found is not None:
                    pieces += (run[start:i], REDACTED)
                    i = start = i + len(found)
                    continue
            i += 1
        if not pieces:
            return run
        pieces.append(run[start:])
        return "".join(pieces)


_default = SecretRedactor()


def register_secret(secret: str | None) -> None:
    """Make `secret` unloggable from now on, in every log line of this process."""
    _default.register(secret)


def redact(text: str) -> str:
    """`text` with every registered secret and anything shaped like a bot token redacted."""
    return _default.redact(text)
