"""Idle Codex threads are unloaded from the app-server and resumed on their next message.

The scripted app-server (tests/fakes/fake_appserver.py) runs as a real
process on the real clock and writes every thread method it gets to a file:
that file is what the app-server was asked, in order.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import attrs
import trio

from codexnet.proxy.appserver import AppServer, TurnOutcome
from tests.fakes.loglines import LogLines
from tests.test_appserver import fake_codex, proxy_config
from tests.test_appserver import run as run_turn


def calls(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def serve(tmp_path: Path, idle_s: float, nursery: trio.Nursery) -> tuple[AppServer, Path]:
    log = tmp_path / "calls.log"
    config = attrs.evolve(proxy_config(tmp_path, fake_codex(tmp_path)), thread_idle_unload_s=idle_s)
    server = AppServer(config, env={**os.environ, "FAKE_APPSERVER_CALLS": str(log)})
    await nursery.start(server.serve)
    return server, log


async def test_an_idle_thread_is_unloaded_and_its_next_message_resumes_it(
    tmp_path: Path, nursery: trio.Nursery, logged: LogLines
) -> None:
    server, log = await serve(tmp_path, 0.5, nursery)
    first = await run_turn(server, "hello")
    assert isinstance(first, TurnOutcome)
    thread = first.thread_id
    await logged.wait_for(f"thread {thread} idle for")
    second = await run_turn(server, "again", thread)
    assert isinstance(second, TurnOutcome)
    assert (second.thread_id, second.text, second.notice) == (thread, "Echo: again", None)
    assert calls(log) == [
        "thread/start ",
        f"started {thread}",
        f"turn/start {thread}",
        f"thread/unsubscribe {thread}",
        f"thread/resume {thread}",
        f"turn/start {thread}",
    ]
    [line] = logged.lines(f"thread {thread} idle for")
    assert re.fullmatch(
        rf"thread {thread} idle for \d s: unloaded \(its next message resumes it\)", line
    )
    # Once resumed, it is idle again, and unloaded again.
    await logged.wait_for(f"thread {thread} idle for", count=2)
    assert calls(log)[-1] == f"thread/unsubscribe {thread}"


async def test_a_thread_in_use_or_used_again_soon_stays_loaded(
    tmp_path: Path, nursery: trio.Nursery, logged: LogLines
) -> None:
    server, log = await serve(tmp_path, 1.0, nursery)
    # A turn longer than the idle time, then the next one straight away.
    first = await run_turn(server, "slow")
    assert isinstance(first, TurnOutcome)
    thread = first.thread_id
    second = await run_turn(server, "again", thread)
    assert isinstance(second, TurnOutcome)
    assert second.text == "Echo: again"
    assert calls(log) == [
        "thread/start ",
        f"started {thread}",
        f"turn/start {thread}",
        f"turn/start {thread}",  # no unsubscribe, no resume in between
    ]
    assert logged.lines("idle for") == []
