"""A thousand strangers at the hub's door, and the manager limited to 1 024 file descriptors.

The manager runs as its own process under `prlimit --nofile=1024:1024` (the
limit that made ~1 000 hostile connections lock every proxy out). While
`tests/fakes/flood.py` keeps 1 000 connections from 100 addresses at the door
(idle sockets, unfinished handshakes, handshakes without a hello, each coming
straight back when dropped), a real proxy registers and a prompt is answered,
and the manager's log stays readable: no traceback, a few lines a minute.
"""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio

from codexnet.proxy.appserver import AppServer
from codexnet.proxy.service import ProxyService
from tests.fakes.flood import Flood
from tests.fakes.processes import ManagerProcess, manager_config
from tests.fakes.stack import BOT_TOKEN, PROXY_TOKEN, USER, free_port
from tests.fakes.telegram_api import FakeTelegram
from tests.test_appserver import fake_codex, proxy_config

pytestmark = pytest.mark.e2e  # a manager process and a thousand sockets: ~10 s


async def test_a_proxy_registers_and_answers_through_a_flood_at_1024_fds(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    telegram = FakeTelegram(BOT_TOKEN)
    await nursery.start(telegram.serve)
    port = free_port()
    config = manager_config(tmp_path / "state", telegram.base_url, port, default_proxy="proxy1")
    limit = ["prlimit", "--nofile=1024:1024", "--"]
    async with ManagerProcess(config, tmp_path / "manager", prefix=limit) as manager:
        await manager.wait_for_log(r"waiting for proxies")
        flood = Flood(port)
        async with trio.open_nursery() as strangers:
            with trio.fail_after(30):
                await strangers.start(flood.run, 1000)
                await flood.wait_connects(3000)  # the door in its steady state: full, churning
            proxy = ProxyService(
                attrs.evolve(
                    proxy_config(tmp_path, fake_codex(tmp_path)),
                    manager_ws=f"ws://127.0.0.1:{port}",
                    proxy_id="proxy1",
                    proxy_token=PROXY_TOKEN,
                    state_dir=tmp_path / "proxy-state",
                ),
                AppServer(proxy_config(tmp_path, fake_codex(tmp_path))),
            )
            strangers.start_soon(proxy.run)
            await manager.wait_for_log(r"proxy 'proxy1' online", timeout=60)
            telegram.push_message(USER, "through the flood")
            with trio.fail_after(60):
                await telegram.wait_until(lambda: "Echo: through the flood" in telegram.texts(USER))
            assert flood.dropped > 2000  # the hub kept dropping strangers all along
            strangers.cancel_scope.cancel()
    output = "\n".join(manager.lines)
    assert "Traceback" not in output
    assert "Too many open files" not in output
    hub_lines = [line for line in manager.lines if "WARNING codexnet.manager.hub:" in line]
    assert 1 <= len(hub_lines) <= 8, "\n".join(hub_lines)
    print(f"{flood.connects} stranger connections; the manager logged:", *hub_lines, sep="\n")
