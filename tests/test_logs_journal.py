"""Log lines under journald: a `<N>` priority per line, no timestamp, still redacted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.fakes.stack import BOT_TOKEN, PROXY_TOKEN
from tests.fakes.terminal import child_env

# A service process's logging as the entry points set it up, with one record of each kind.
PROGRAM = f"""
import logging
from codexnet.logs import register_secret, setup_logging
setup_logging("DEBUG")
register_secret({PROXY_TOKEN!r})
log = logging.getLogger("codexnet.test")
log.debug("debug line")
log.info("GET https://api.telegram.org/bot{BOT_TOKEN}/getMe")
log.warning("proxy token %s", {PROXY_TOKEN!r})
try:
    raise RuntimeError("boom {BOT_TOKEN}")
except RuntimeError:
    log.exception("it failed")
log.critical("the end")
"""
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def run(tmp_path: Path, journal: bool) -> list[str]:
    err = tmp_path / "stderr"
    err.touch()
    st = os.stat(err)
    # What systemd sets when stderr is its journal stream: that file's device:inode.
    stream = f"{st.st_dev}:{st.st_ino}" if journal else f"{st.st_dev}:{st.st_ino + 1}"
    with err.open("wb") as out:
        subprocess.run(
            [sys.executable, "-c", PROGRAM],
            env=child_env(JOURNAL_STREAM=stream),
            stderr=out,
            check=True,
            timeout=30,
        )
    return err.read_text().splitlines()


def test_under_journald_every_line_has_a_priority_and_no_timestamp(tmp_path: Path) -> None:
    lines = run(tmp_path, journal=True)
    assert lines[0] == "<7>codexnet.test: debug line"
    assert lines[1] == "<6>codexnet.test: GET https://api.telegram.org/<redacted>/getMe"
    assert lines[2] == "<4>codexnet.test: proxy token <redacted>"
    assert lines[3] == "<3>codexnet.test: it failed"
    assert lines[4] == "<3>Traceback (most recent call last):"  # the traceback, line by line
    assert lines[-2] == "<3>RuntimeError: boom <redacted>"
    assert lines[-1] == "<2>codexnet.test: the end"
    assert all(re.match(r"<[2-7]>", line) for line in lines)
    assert not any(TIMESTAMP.search(line) for line in lines)
    assert BOT_TOKEN not in "\n".join(lines)
    assert PROXY_TOKEN not in "\n".join(lines)


def test_an_inherited_journal_stream_that_is_not_our_stderr_is_ignored(tmp_path: Path) -> None:
    lines = run(tmp_path, journal=False)
    assert TIMESTAMP.match(lines[0])
    assert lines[0].endswith("DEBUG codexnet.test: debug line")
    assert not any(line.startswith("<") for line in lines)
    assert BOT_TOKEN not in "\n".join(lines)
