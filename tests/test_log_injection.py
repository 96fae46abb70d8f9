"""Peer-supplied strings cannot forge log lines: log arguments are escaped centrally.

The real filter (`codexnet.logs.RedactingFilter`, as `setup_logging` installs
it) on a real handler; the hostile string arrives through the hub's real
WebSocket in a hello.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from codexnet.config import ProxyEntry
from codexnet.logs import RedactingFilter
from tests.fakes.hubrun import open_hub
from tests.fakes.rawproxy import raw_proxy

TOKEN = "token-of-p1-0123456789"


@pytest.fixture
def output(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """What the service's own stderr handler would print."""
    caplog.set_level(logging.INFO)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


async def test_a_newline_in_a_hellos_version_cannot_forge_a_log_line(output: io.StringIO) -> None:
    async with (
        open_hub({"p1": ProxyEntry(TOKEN)}) as hub,
        raw_proxy(hub.port, "p1", TOKEN, version="1.0\nFAKE: proxy x online"),
    ):
        pass
    lines = output.getvalue().splitlines()
    online = [line for line in lines if "online from" in line]
    assert len(online) == 1
    assert online[0].startswith("INFO codexnet.manager.hub: proxy 'p1' online from 127.0.0.1:")
    assert online[0].endswith("(1.0\\nFAKE: proxy x online, capacity 2)")
    assert not [line for line in lines if line.startswith("FAKE")]


def test_every_control_character_in_an_argument_is_escaped(output: io.StringIO) -> None:
    log = logging.getLogger("codexnet.test")
    hostile = "a\nb\rc\td\x00e\x1b[2Jf\x7fg\x85h\u2028i\u2029j"
    log.warning("got %s (%r), %d of %.1f, %-4s|", hostile, "x\ny", 3, 2.5, "ab")
    log.warning("named: %(who)s", {"who": "x\ny"})
    log.warning("an object: %s", ValueError("bad\nvalue"))
    assert output.getvalue().splitlines() == [
        "WARNING codexnet.test: got a\\nb\\rc\\td\\x00e\\x1b[2Jf\\x7fg\\x85h\\u2028i\\u2029j"
        " ('x\\ny'), 3 of 2.5, ab  |",
        "WARNING codexnet.test: named: x\\ny",
        "WARNING codexnet.test: an object: bad\\nvalue",
    ]


def test_format_strings_and_tracebacks_are_left_alone(output: io.StringIO) -> None:
    log = logging.getLogger("codexnet.test")
    log.warning("two\nlines of our own")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed: %s", "x\ny")
    lines = output.getvalue().splitlines()
    assert lines[:3] == [
        "WARNING codexnet.test: two",
        "lines of our own",
        "ERROR codexnet.test: failed: x\\ny",
    ]
    assert lines[3] == "Traceback (most recent call last):"
    assert lines[-1] == "RuntimeError: boom"
