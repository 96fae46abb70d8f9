"""Running out of file descriptors: survived, said once a minute, nothing stored lost.

The descriptors really run out (tests/fakes/fdlimit.py lowers this process's
limit and fills it), so the errors come from the kernel through the real
SQLite, httpx, trio and subprocess code, not from a mock of them.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from codexnet.db import Database, StateError, Write
from codexnet.manager.outbox import Outbox, Priority
from codexnet.manager.telegram import TelegramClient, TelegramUnavailable
from codexnet.proxy.appserver import AppServer, AppServerUnavailable
from codexnet.proxy.service import ProxyService
from tests.fakes.fdlimit import exhausted_fds
from tests.fakes.loglines import LogLines
from tests.fakes.rawmanager import FakeManager
from tests.fakes.stack import BOT_TOKEN, USER
from tests.fakes.telegram_api import MOCK_BASE_URL, FakeTelegram
from tests.test_appserver import fake_codex, proxy_config
from tests.test_appserver import run as run_turn
from tests.test_proxy_delivery import Proxy
from tests.test_proxy_delivery import run as run_proxy

MIGRATIONS = ("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT NOT NULL)",)


def put(key: str, value: str = "x") -> Write:
    def fn(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (k, v) VALUES (?, ?)", (key, value))

    return fn


def big_sort(conn: sqlite3.Connection) -> None:
    """A write whose sort spills to a temporary file: SQLite must open one."""
    conn.execute("CREATE TABLE IF NOT EXISTS sorted AS SELECT v FROM t ORDER BY v")


def stored(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[0] for row in conn.execute("SELECT k FROM t ORDER BY k")]


async def test_state_writes_with_no_descriptor_left_are_committed_and_made_power_safe(
    tmp_path: Path,
) -> None:
    db = Database(tmp_path / "state.db", MIGRATIONS)
    db.open()
    try:
        async with db.serving():
            with exhausted_fds():  # from the very first write on
                await db.write(put("a"), durable=True)
                await db.write(put("b"))
                await db.sync()
                assert db.syncs >= 1  # a real fsync, not skipped for want of a descriptor
    finally:
        db.close()
    assert stored(tmp_path / "state.db") == ["a", "b"]


async def test_a_write_that_needs_a_new_file_fails_alone_and_is_said_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    db = Database(tmp_path / "state.db", MIGRATIONS, inline=True)
    db.open()
    filler = os.urandom(150).hex()
    db.write_now(
        lambda conn: conn.executemany(
            "INSERT INTO t (k, v) VALUES (?, ?)",
            ((f"row{i:05}", filler + str(i)) for i in range(20_000)),
        )
    )
    try:
        async with db.serving():
            with exhausted_fds() as fds:
                with pytest.raises(StateError, match="too many open files"):
                    await db.write(big_sort)
                for i in range(20):  # non-essential writes that fail, 20 in a few seconds
                    fds.fill()  # whatever an earlier test's leftovers closed meanwhile
                    db.write_soon(big_sort)
                    await db.write(put(f"kept{i}"))  # every other write still commits
                    await trio.sleep(1)
            await db.write(big_sort)  # descriptors back: the same write works
    finally:
        db.close()
    keys = stored(tmp_path / "state.db")
    assert sorted(k for k in keys if k.startswith("kept")) == sorted(f"kept{i}" for i in range(20))
    dropped = [r for r in caplog.records if "non-essential write was dropped" in r.getMessage()]
    assert len(dropped) == 1  # 20 failures in 20 s: one line
    assert "this process has too many open files (EMFILE" in dropped[0].getMessage()
    assert not any(r.exc_info for r in caplog.records)


# --------------------------------------------------------------------------- Telegram


async def test_a_bot_api_request_with_no_descriptor_left_says_so_and_works_once_they_are_back(
    nursery: trio.Nursery,
) -> None:
    fake = FakeTelegram(BOT_TOKEN)
    await nursery.start(fake.serve)
    async with httpx.AsyncClient() as http:  # the real transport, over real sockets
        tg = TelegramClient(http, fake.base_url, BOT_TOKEN)
        with exhausted_fds():
            with pytest.raises(TelegramUnavailable) as info:
                await tg.request("getMe")
        assert info.value.fate == "not_sent"  # no socket, so nothing reached Telegram
        assert info.value.resource
        assert "too many open files (EMFILE" in info.value.description
        assert (await tg.request("getMe"))["is_bot"]


class OutOfFilesUntil(httpx.AsyncBaseTransport):
    """The Bot API transport while the process has no descriptor left: every new
    connection fails as httpcore reports it (a ConnectError caused by EMFILE)."""

    def __init__(self, inner: httpx.AsyncBaseTransport, until: float) -> None:
        self.inner = inner
        self.until = until
        self.refused = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if trio.current_time() < self.until:
            self.refused += 1
            try:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            except OSError as exc:
                raise httpx.ConnectError("all attempts to connect failed") from exc
        return await self.inner.handle_async_request(request)


async def test_answers_wait_out_minutes_without_descriptors_said_once_a_minute(
    fake: FakeTelegram,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.testing.MockClock,
) -> None:
    for chat in range(1, 51):
        fake.add_chat(chat)
    transport = OutOfFilesUntil(fake.transport(), trio.current_time() + 300)
    async with httpx.AsyncClient(transport=transport) as http:
        outbox = Outbox(TelegramClient(http, MOCK_BASE_URL, BOT_TOKEN))
        await nursery.start(outbox.run)
        async with trio.open_nursery() as sends:
            for chat in [USER, *range(1, 51)]:  # 51 answers waiting for five minutes
                sends.start_soon(
                    partial(
                        outbox.send, priority=Priority.ANSWER, until=3600 + trio.current_time()
                    ),
                    "sendMessage",
                    {"chat_id": chat, "text": "the answer"},
                )
    assert transport.refused > 300  # each answer retried many times
    assert all(fake.count_messages(chat, "the answer") == 1 for chat in [USER, *range(1, 51)])
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(lines) <= 6  # five minutes: one line a minute, not one per retry
    assert all("this process has too many open files (EMFILE" in line for line in lines)
    assert "more like this" in lines[-1]
    assert not any(r.exc_info for r in caplog.records)


# --------------------------------------------------------------------------- proxy


async def test_an_app_server_that_cannot_start_for_want_of_descriptors_starts_once_they_are_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logged: LogLines
) -> None:
    monkeypatch.setattr("codexnet.proxy.appserver.READY_WAIT_S", 0.5)
    server = AppServer(proxy_config(tmp_path, fake_codex(tmp_path)))
    async with trio.open_nursery() as nursery:
        with exhausted_fds():
            await nursery.start(server.serve)
            with pytest.raises(AppServerUnavailable) as info:
                await run_turn(server, "hello")  # what the task's result says
        assert "this process has too many open files (EMFILE" in str(info.value)
        monkeypatch.setattr("codexnet.proxy.appserver.READY_WAIT_S", 20.0)
        outcome = await run_turn(server, "hello")  # the supervisor's next start works
        assert outcome.text == "Echo: hello"  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()
    assert len(logged.lines("cannot start")) == 1
    assert logged.lines("restarting codex app-server") == []  # said once, with "retrying"
    assert not any(r.exc_info for r in logged.records)


async def test_a_proxy_with_no_descriptor_left_says_so_and_reconnects_once_they_are_back(
    tmp_path: Path, nursery: trio.Nursery, logged: LogLines
) -> None:
    manager = FakeManager()
    await nursery.start(manager.serve)
    proxy = Proxy(tmp_path, manager)
    app = AppServer(proxy.config, env=proxy.env)
    await run_proxy(ProxyService(proxy.config, app), nursery)
    link = await manager.accept()
    with trio.fail_after(20):
        await app.wait_ready()  # its pipes are set up: nothing of the proxy's closes now
    with exhausted_fds() as fds:
        # The proxy's socket, closed with the link, is free again: take it before
        # the proxy reconnects (this side's socket is closed first, by the cut).
        logged.hooks.append(("connection to the manager closed", fds.fill))
        await link.cut()  # the proxy reconnects, and cannot make a socket
        await logged.wait_for("cannot reach the manager")
    link = await manager.accept()
    assert link.hello.proxy_id == proxy.config.proxy_id
    [line] = logged.lines("cannot reach the manager")
    assert "this process has too many open files (EMFILE" in line
    assert not any(r.exc_info for r in logged.records)
