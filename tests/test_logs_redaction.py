"""No registered secret gets through a log line, whatever its length and however many there are."""

from __future__ import annotations

import logging
import random
import secrets
import string

import pytest

from codexnet.logs import RedactingFilter
from codexnet.redaction import REDACTED, WINDOW, SecretRedactor
from tests.fakes.stack import BOT_TOKEN

# How a token turns up in a log line: alone, quoted, after `bot<id>:`, in a URL
# query or path, in a repr, glued to other token characters (x<token>y).
SURROUNDINGS = [
    "{}",
    "token {} refused",
    "'{}'",
    '{{"token": "{}"}}',
    "proxy1:{}",
    "bot123:{}",  # (from 20 characters on, shaped like a bot token: redacted whole)
    "https://h/p?token={}&x=1",
    "https://h/{}/getMe",
    "Hello(token='{}', proxy_id='p')",
    "{}\nnext line",
]
GLUED = ["x{}y", "{}{}", "abc-{}_def", "{}0000000000000000000", "prefix{}"]


def token(length: int, rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits + "_-") for _ in range(length))


@pytest.fixture
def redactor() -> SecretRedactor:
    return SecretRedactor()


def leaks(redactor: SecretRedactor, secret: str, line: str) -> bool:
    return secret in redactor.redact(line)


@pytest.mark.parametrize("length", [1, 2, 5, 6, 15, 16, 17, 43, 200])
def test_a_secret_of_any_length_is_redacted_where_it_stands(
    redactor: SecretRedactor, length: int
) -> None:
    secret = "Q" * length if length < 3 else token(length, random.Random(length))
    redactor.register(secret)
    for shape in SURROUNDINGS:
        line = shape.format(secret, secret)
        out = redactor.redact(line)
        assert secret not in out, (shape, out)
        assert out in (shape.format(REDACTED, REDACTED), REDACTED)


@pytest.mark.parametrize("length", [WINDOW, 43, 100])
def test_a_long_secret_is_redacted_inside_a_longer_run(
    redactor: SecretRedactor, length: int
) -> None:
    secret = token(length, random.Random(length))
    redactor.register(secret)
    for shape in GLUED:
        out = redactor.redact(shape.format(secret, secret))
        assert secret not in out
        assert out == shape.format(REDACTED, REDACTED)


def test_nothing_else_is_touched(redactor: SecretRedactor) -> None:
    redactor.register(secrets.token_urlsafe(32))
    redactor.register("abcde")  # a short one, as a word of its own only
    line = "proxy 'proxy1' online (v0.3.1, 2 slots) from 10.0.0.7:51234; abcdef xabcde"
    assert redactor.redact(line) == line


def test_thousands_of_secrets_each_one_redacted(redactor: SecretRedactor) -> None:
    rng = random.Random(7)
    tokens = [secrets.token_urlsafe(32) for _ in range(5000)]
    tokens += [token(rng.randint(16, 64), rng) for _ in range(1000)]  # hand-made lengths
    for t in tokens:
        redactor.register(t)
    shapes = SURROUNDINGS + GLUED
    for n, secret in enumerate(tokens):
        line = shapes[n % len(shapes)].format(secret, secret)
        assert not leaks(redactor, secret, line), line
    # Several in one line, with another secret's prefix as a decoy.
    some = rng.sample(tokens, 20)
    line = " ".join(f"{a}{b[:WINDOW]}" for a, b in zip(some, reversed(some), strict=True))
    out = redactor.redact(line)
    assert not any(t in out for t in some)
    assert out.count(REDACTED) == 20


def test_a_secret_inside_another_leaves_nothing_of_either(redactor: SecretRedactor) -> None:
    long = "A" * 20 + "B" * 20
    redactor.register(long)
    redactor.register(long[: WINDOW + 4])  # the same first 16 characters, shorter
    redactor.register(long[4:30])
    for line in (long, f"x{long}y", long[: WINDOW + 4] + "zz", "zz" + long[4:30]):
        out = redactor.redact(line)
        assert not any(s in out for s in (long, long[: WINDOW + 4], long[4:30])), out


def test_secrets_with_other_characters_and_the_bot_token(redactor: SecretRedactor) -> None:
    hand_made = "pass word! 2024"
    redactor.register(hand_made)
    redactor.register(BOT_TOKEN)
    bot_id, _, bot_secret = BOT_TOKEN.partition(":")
    assert redactor.redact(f"token is {hand_made}.") == f"token is {REDACTED}."
    assert (
        redactor.redact(f"GET https://x/bot{BOT_TOKEN}/getMe") == f"GET https://x/{REDACTED}/getMe"
    )
    # URL-encoded, the `:` is gone, but the secret half is still known.
    assert bot_secret not in redactor.redact(f"GET https://x/?t={bot_id}%3A{bot_secret}")
    assert len(redactor) == 3  # the two, and the bot token's secret half


def test_a_token_shaped_like_a_bot_token_is_redacted_unregistered(
    redactor: SecretRedactor,
) -> None:
    other = "987654321:AAH" + "x" * 32
    assert redactor.redact(f"url /bot{other}/sendMessage") == f"url /{REDACTED}/sendMessage"


def test_random_text_around_random_secrets_never_leaks(redactor: SecretRedactor) -> None:
    rng = random.Random(11)
    tokens = [token(rng.choice([16, 20, 32, 43, 64]), rng) for _ in range(300)]
    for t in tokens:
        redactor.register(t)
    noise = string.ascii_letters + string.digits + "_-:/?&=. '\"\n"
    for _ in range(2000):
        chosen = rng.sample(tokens, rng.randint(1, 3))
        parts = ["".join(rng.choice(noise) for _ in range(rng.randint(0, 12))) for _ in range(4)]
        line = parts[0] + parts[1].join(chosen) + parts[2]
        out = redactor.redact(line)
        assert not any(t in out for t in chosen), (line, out)


def test_the_log_filter_redacts_the_rendered_line_and_the_traceback() -> None:
    from codexnet.logs import register_secret

    secret = secrets.token_urlsafe(32)
    register_secret(secret)
    record = logging.LogRecord(
        "t", logging.ERROR, __file__, 1, "hello(%r) x%sy", (secret, secret), None
    )
    try:
        raise RuntimeError(f"boom {secret}")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    RedactingFilter().filter(record)
    assert record.getMessage() == f"hello('{REDACTED}') x{REDACTED}y"
    assert record.exc_text is not None
    assert secret not in record.exc_text
