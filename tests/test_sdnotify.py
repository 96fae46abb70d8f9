"""The sd_notify protocol against a real Unix datagram socket, and both services' readiness."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from codexnet import sdnotify
from codexnet.config import ProxyEntry
from codexnet.manager.hub import Hub
from tests.fakes.stack import BOT_TOKEN, PROXY_TOKEN, USER
from tests.fakes.telegram_api import FakeTelegram
from tests.fakes.terminal import child_env, python_module

PATIENCE_S = 15.0  # for a datagram that should come at once
FAKE_APPSERVER = Path(__file__).parent / "fakes" / "fake_appserver.py"


class Listener:
    """What systemd's end of `$NOTIFY_SOCKET` receives."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # as it goes into $NOTIFY_SOCKET

    def pending(self) -> bytes | None:
        """A datagram already waiting, without waiting for one."""
        try:
            return self.sock.recv(4096)
        except BlockingIOError:
            return None

    async def next(self) -> list[str]:
        with trio.fail_after(PATIENCE_S):
            while (data := self.pending()) is None:
                await trio.lowlevel.wait_readable(self.sock)
        return data.decode().split("\n")

    async def until(self, field: str) -> list[list[str]]:
        """Every message up to and including the first that holds `field`."""
        seen: list[list[str]] = []
        with trio.fail_after(PATIENCE_S):
            while not seen or field not in seen[-1]:
                seen.append(await self.next())
        return seen


def datagram_socket() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    return sock


@pytest.fixture
def listener() -> Iterator[Listener]:
    # A short directory: a Unix socket path must fit in 108 bytes.
    folder = tempfile.mkdtemp(prefix="cn-notify-")
    path = os.path.join(folder, "notify")
    with datagram_socket() as sock:
        sock.bind(path)
        try:
            yield Listener(sock, path)
        finally:
            os.unlink(path)
            os.rmdir(folder)


async def test_a_message_is_one_datagram_of_lines(listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": listener.address}
    assert sdnotify.notify("READY=1", "STATUS=serving", environ=env)
    assert await listener.next() == ["READY=1", "STATUS=serving"]


async def test_the_abstract_namespace() -> None:
    name = f"codexnet-test-{uuid.uuid4().hex}"
    with datagram_socket() as sock:
        sock.bind("\0" + name)
        assert sdnotify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name})
        assert await Listener(sock, "@" + name).next() == ["STOPPING=1"]


def test_without_a_socket_nothing_is_sent_and_nothing_raises(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", environ={})
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert not sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1"})


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # our parent's
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert sdnotify.watchdog_interval(env) == interval


async def test_ready_only_once_started_then_the_watchdog(
    listener: Listener, nursery: trio.Nursery
) -> None:
    env = {"NOTIFY_SOCKET": listener.address, "WATCHDOG_USEC": "20000"}
    waiting, release = trio.Event(), trio.Event()

    async def service(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        waiting.set()
        await release.wait()
        task_status.started()
        await trio.sleep_forever()

    nursery.start_soon(partial(sdnotify.run_ready, service, status="up", environ=env))
    with trio.fail_after(5):
        await waiting.wait()
    await trio.testing.wait_all_tasks_blocked()
    assert listener.pending() is None  # still starting: not ready
    release.set()
    assert await listener.next() == ["READY=1", "STATUS=up"]
    assert await listener.next() == ["WATCHDOG=1"]
    assert await listener.next() == ["WATCHDOG=1"]
    nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ the real services
# Real processes that start and stop whole services (~2.5 s each, mostly their
# clean shutdown): in the full suite, not the fast one.


@asynccontextmanager
async def service(
    command: list[str], env: dict[str, str], log: Path
) -> AsyncIterator[trio.Process]:
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(command, env=env, stderr=out)
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5, shield=True):
                await process.wait()


async def stop(process: trio.Process) -> int:
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(15):
        return await process.wait()


@pytest.mark.e2e
async def test_the_manager_is_ready_after_telegram_start_up_and_says_stopping(
    tmp_path: Path, listener: Listener, nursery: trio.Nursery
) -> None:
    telegram = FakeTelegram(BOT_TOKEN)
    await nursery.start(telegram.serve)
    config = tmp_path / "codex_config.json"
    config.write_text(
        json.dumps(
            {
                "telegram_bot_token": BOT_TOKEN,
                "telegram_api_base": telegram.base_url,
                "telegram_allowed_user_ids": [USER],
                "manager_ws_listen": "127.0.0.1:0",
                "proxies": {"proxy1": {"token": PROXY_TOKEN}},
                "state_dir": str(tmp_path / "state"),
                "telegram_poll_timeout_s": 5,
            }
        )
    )
    env = child_env(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="200000")
    command = python_module("codexnet.manager", "--config", str(config))
    async with service(command, env, tmp_path / "manager.log") as process:
        ready = await listener.next()
        assert ready[0] == "READY=1"
        assert "serving Telegram and 1 proxies" in ready[1]
        assert {"deleteWebhook", "getMe", "setMyCommands"} <= {r.method for r in telegram.requests}
        assert await listener.next() == ["WATCHDOG=1"]
        assert await stop(process) == 0
        assert ["STOPPING=1", "STATUS=shutting down"] in await listener.until("STOPPING=1")


@pytest.mark.e2e
async def test_the_proxy_is_ready_once_connected_with_its_app_server_up(
    tmp_path: Path, listener: Listener, nursery: trio.Nursery
) -> None:
    hub = Hub({"proxy1": ProxyEntry(PROXY_TOKEN)})
    port = await nursery.start(partial(hub.serve, "127.0.0.1", 0))
    fake_codex = tmp_path / "fake-codex"
    fake_codex.write_text(f"#!/bin/sh\nexec {sys.executable} -u {FAKE_APPSERVER}\n")
    fake_codex.chmod(0o755)
    config = tmp_path / "proxy_config.json"
    config.write_text(
        json.dumps(
            {
                "manager_ws": f"ws://127.0.0.1:{port}",
                "proxy_id": "proxy1",
                "proxy_token": PROXY_TOKEN,
                "codex_cwd": str(tmp_path),
                "codex_bin": str(fake_codex),
                "state_dir": str(tmp_path / "proxy-state"),
            }
        )
    )
    command = python_module("codexnet.proxy", "--config", str(config))
    env = child_env(NOTIFY_SOCKET=listener.address)
    async with service(command, env, tmp_path / "proxy.log") as process:
        assert await listener.next() == [
            "READY=1",
            f"STATUS=proxy 'proxy1' connected to ws://127.0.0.1:{port}",
        ]
        assert "codex app-server ready" in (tmp_path / "proxy.log").read_text()
        with trio.fail_after(5):
            await hub.wait_online("proxy1")
        assert await stop(process) == 0
        assert ["STOPPING=1", "STATUS=shutting down"] in await listener.until("STOPPING=1")
