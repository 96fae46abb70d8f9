"""The whole system on one machine for end-to-end tests.

A fake Telegram Bot API and a fake model (Responses API), both over real HTTP
on 127.0.0.1; the real manager; a real proxy driving the real `codex` binary.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from codexnet.config import ManagerConfig, ProxyConfig, ProxyEntry
from codexnet.manager.service import Manager, run_manager
from codexnet.proxy.appserver import AppServer
from codexnet.proxy.service import ProxyService
from tests.fakes.codex_env import require_codex, write_codex_home
from tests.fakes.responses_api import FakeResponsesAPI
from tests.fakes.telegram_api import FakeTelegram

BOT_TOKEN = "123456789:TEST-bot-token-abcdefghijklmnopqrstuvwxyz"
PROXY_TOKEN = "proxy1-secret-token-0123456789"
USER = 1001
STRANGER = 2002


def free_port() -> int:
    """A port free on 127.0.0.1 now (for a manager that must keep it across restarts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def manager_config(base_url: str, state_dir: Path, **changes: Any) -> ManagerConfig:
    config = ManagerConfig(
        source="test",
        telegram_bot_token=BOT_TOKEN,
        telegram_api_base=base_url,
        telegram_allowed_user_ids=frozenset({USER}),
        manager_ws_listen=("127.0.0.1", 0),
        default_proxy=None,
        proxies={
            "proxy1": ProxyEntry(PROXY_TOKEN, ("linux",)),
            "proxy2": ProxyEntry("proxy2-secret-token-9876543210"),
        },
        state_dir=state_dir,
        task_timeout_s=120.0,
        telegram_poll_timeout_s=10,
        proxy_wait_s=20.0,
        live_interval_private_s=1.0,
        live_interval_group_s=3.0,
        use_drafts=True,
        approval_timeout_s=600.0,
    )
    return attrs.evolve(config, **changes)


def proxy_config(hub_port: int, workdir: Path, **changes: Any) -> ProxyConfig:
    config = ProxyConfig(
        source="test",
        manager_ws=f"ws://127.0.0.1:{hub_port}",
        proxy_id="proxy1",
        proxy_token=PROXY_TOKEN,
        codex_cwd=workdir,
        codex_bin=require_codex(),
        approval_policy="never",
        sandbox="read-only",
        capacity=2,
        labels=("linux",),
        http_proxy=None,
        https_proxy=None,
        no_proxy=None,
        state_dir=workdir.parent / "proxy-state",
    )
    config = attrs.evolve(config, **changes)
    if "state_dir" not in changes and config.proxy_id != "proxy1":
        config = attrs.evolve(config, state_dir=workdir.parent / f"proxy-state-{config.proxy_id}")
    return config


@attrs.define
class Stack:
    tmp: Path
    model: FakeResponsesAPI
    telegram: FakeTelegram
    nursery: trio.Nursery
    codex_env: dict[str, str] = attrs.Factory(dict)

    @property
    def state_dir(self) -> Path:
        return self.tmp / "state"

    @asynccontextmanager
    async def manager(self, **changes: Any) -> AsyncIterator[Manager]:
        """Run the manager until the block ends (a restart is two blocks)."""
        config = manager_config(self.telegram.base_url, self.state_dir, **changes)
        async with trio.open_nursery() as nursery:
            manager: Manager = await nursery.start(run_manager, config)
            try:
                yield manager
            finally:
                nursery.cancel_scope.cancel()

    @asynccontextmanager
    async def proxy(
        self,
        manager: Manager | None = None,
        *,
        port: int = 0,
        machine: bool = False,
        **changes: Any,
    ) -> AsyncIterator[ProxyService]:
        """Run a proxy for `manager` (waiting until it is online), or for whatever
        manager listens on `port` (it keeps reconnecting, across manager restarts).

        `machine`: like a machine of its own — its own working directory
        (`work-<id>`, which the fake model sees as the cwd) and CODEX_HOME."""
        proxy_id = str(changes.get("proxy_id", "proxy1"))
        workdir = self.tmp / (f"work-{proxy_id}" if machine else "work")
        workdir.mkdir(exist_ok=True)
        env = self.codex_env
        if machine:
            env = write_codex_home(self.tmp / f"codex-home-{proxy_id}", self.model.base_url)
        config = proxy_config(manager.port if manager else port, workdir, **changes)
        service = ProxyService(config, AppServer(config, env=env))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run)
            if manager is not None:
                with trio.fail_after(60):
                    await manager.hub.wait_online(config.proxy_id)
            try:
                yield service
            finally:
                nursery.cancel_scope.cancel()


@asynccontextmanager
async def open_stack(tmp: Path) -> AsyncIterator[Stack]:
    require_codex()
    model = FakeResponsesAPI()
    telegram = FakeTelegram(BOT_TOKEN)
    async with trio.open_nursery() as nursery:
        await nursery.start(model.serve)
        await nursery.start(telegram.serve)
        stack = Stack(tmp, model, telegram, nursery)
        stack.codex_env = write_codex_home(tmp / "codex-home", model.base_url)
        try:
            yield stack
        finally:
            nursery.cancel_scope.cancel()
