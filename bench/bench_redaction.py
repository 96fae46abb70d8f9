"""What redacting one log line costs, by the number of registered secrets; prints a table.

    .venv/bin/python bench/bench_redaction.py [--lines 2000]

Every log line of both services goes through `codexnet.redaction.redact`
(the logging filter). The table compares, side by side in the same run, the
loop it replaced (one substring search per secret, longest first) with the
one-pass version (token-shaped runs looked up in a set), at 10 … 5 000 proxy
tokens (`secrets.token_urlsafe(32)`, as `--add-proxy` makes them). The lines
are the kinds a manager writes: a short hub line, a Bot API URL, a line
holding a token, a 2 000-character exception text. Bounded by: the line's
length (one regex pass; a set lookup per character of runs longer than 16),
not by the number of secrets.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from codexnet.redaction import REDACTED, SecretRedactor  # noqa: E402

BOT_TOKEN = "123456789:AAH" + "x" * 32
_BOT_TOKEN_RE = re.compile(r"\b(bot)?\d{3,}:[A-Za-z0-9_-]{20,}")


class LoopRedactor:
    """The redaction this replaces (codexnet/logs.py before): every secret, every line."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def register(self, secret: str) -> None:
        if len(secret) >= 6:
            self._secrets.add(secret)

    def redact(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, REDACTED)
        return _BOT_TOKEN_RE.sub(REDACTED, text)


def lines(token: str) -> dict[str, str]:
    return {
        "hub line (60 chars)": "proxy 'proxy417' online (v0.3.1, 2 slots) from 10.0.0.7:51234",
        "Bot API URL": f"HTTP Request: POST https://api.telegram.org/bot{BOT_TOKEN}/sendMessage",
        "line with a token": f"hello from proxy417 rejected: token {token}x in frame",
        "exception (2 000 chars)": "Traceback: " + " ".join(["frame at 0x7f3a9c1d2e40"] * 80),
    }


def per_line_us(redact: Callable[[str], str], line: str, n: int) -> float:
    """The best of 3 runs of `n` lines (the machine is shared: the best is the cost)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            redact(line)
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2000, help="lines timed per cell")
    args = parser.parse_args()
    counts = (10, 100, 1000, 5000)
    tokens = [secrets.token_urlsafe(32) for _ in range(max(counts))]
    print("Redacting one log line: µs per line (old loop / one pass)\n")
    header = f"{'line':<26}" + "".join(f"{f'{c} secrets':>22}" for c in counts)
    print(header)
    print("-" * len(header))
    results: dict[str, list[str]] = {}
    for count in counts:
        old, new = LoopRedactor(), SecretRedactor()
        for t in [BOT_TOKEN, *tokens[:count]]:
            old.register(t)
            new.register(t)
        token = tokens[count // 2]
        for name, line in lines(token).items():
            out = new.redact(line)
            assert token not in out, name
            assert BOT_TOKEN not in out, name
            # The loop is slow at 5 000 secrets: time it on fewer lines.
            n_old = max(20, args.lines * 10 // count)
            cell = (
                f"{per_line_us(old.redact, line, n_old):9.1f} /"
                f"{per_line_us(new.redact, line, args.lines):6.1f}"
            )
            results.setdefault(name, []).append(cell)
    for name, cells in results.items():
        print(f"{name:<26}" + "".join(f"{c:>22}" for c in cells))
    print(
        "\nOld: one substring search per secret and a sort of them all, per line (grows "
        "with the secrets).\nOne pass: bounded by the line's length, whatever the number "
        "of secrets."
    )


if __name__ == "__main__":
    main()
