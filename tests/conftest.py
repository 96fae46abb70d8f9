"""Test-wide set-up: the codex installed by scripts/install-codex.sh, shared fixtures."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from codexnet.manager.outbox import Outbox
from codexnet.manager.replies import Replies
from codexnet.manager.service import Manager, run_manager
from codexnet.manager.telegram import TelegramClient
from codexnet.ratelog import Throttle
from tests.fakes.loglines import logged  # noqa: F401 (a fixture for every test)
from tests.fakes.rawproxy import RawProxy, raw_proxy
from tests.fakes.stack import BOT_TOKEN, PROXY_TOKEN, USER, manager_config
from tests.fakes.telegram_api import MOCK_BASE_URL, FakeTelegram

GROUP = -1000

_CODEX_BIN = Path(__file__).resolve().parent.parent / ".tools" / "codex" / "node_modules" / ".bin"

# The README's test command is plain `.venv/bin/python -m pytest`; the pinned
# codex lives in an ignored folder, so put it on PATH for the end-to-end tests.
if (_CODEX_BIN / "codex").exists():
    os.environ["PATH"] = f"{_CODEX_BIN}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """The fast run (`-m "not e2e"`) runs in parallel: most of its ~760 tests wait on
    a subprocess or a socket, so two workers per core (4 on this 2-core machine:
    35-46 s, 2 workers 56 s, serial ~100 s) keep it under a minute. The full run
    stays serial: the end-to-end tests start several processes each and some
    measure time. `-n N` or `-p no:xdist` on the command line wins."""
    option = config.option
    if (
        getattr(option, "markexpr", "") == "not e2e"
        and getattr(option, "numprocesses", 0) is None
        and config.pluginmanager.has_plugin("xdist")
        and not os.environ.get("PYTEST_XDIST_WORKER")
    ):
        option.numprocesses = min(8, 2 * (os.cpu_count() or 1))  # more only adds start-up


@pytest.fixture(autouse=True)
def fresh_log_throttles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test its own once-a-minute log throttles (`codexnet.ratelog`): they keep
    instants of one trio run's clock, meaningless in the next test's run, where a
    line logged by an earlier test could hide the one a test looks for. Every
    module-level one is replaced, so a module that adds one is covered too."""
    for name, module in list(sys.modules.items()):
        if name.startswith("codexnet."):
            for attr, value in list(vars(module).items()):
                if isinstance(value, Throttle):
                    monkeypatch.setattr(module, attr, Throttle())


# The real manager in this process against the fake Bot API over HTTP, and a
# proxy reduced to its wire protocol: the bot's tests at its real interfaces.


@pytest.fixture
async def telegram(nursery: trio.Nursery) -> FakeTelegram:
    fake = FakeTelegram(BOT_TOKEN)
    await nursery.start(fake.serve)
    fake.add_chat(USER)
    fake.add_chat(GROUP, chat_type="group", title="team")
    return fake


@pytest.fixture
async def manager(telegram: FakeTelegram, tmp_path: Path) -> AsyncIterator[Manager]:
    async with trio.open_nursery() as inner:
        manager: Manager = await inner.start(
            run_manager, manager_config(telegram.base_url, tmp_path / "state")
        )
        yield manager
        inner.cancel_scope.cancel()


@pytest.fixture
async def proxy(manager: Manager) -> AsyncIterator[RawProxy]:
    async with raw_proxy(manager.port, "proxy1", PROXY_TOKEN) as proxy:
        yield proxy


@pytest.fixture
def fake() -> FakeTelegram:
    """The fake Bot API, reached in memory (see `tg`): no sockets, so virtual time works."""
    fake = FakeTelegram(BOT_TOKEN)
    fake.add_chat(USER)
    fake.add_chat(GROUP, chat_type="group", title="team")
    return fake


@pytest.fixture
async def tg(fake: FakeTelegram) -> AsyncIterator[TelegramClient]:
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        yield TelegramClient(http, MOCK_BASE_URL, BOT_TOKEN)


@pytest.fixture
async def outbox(tg: TelegramClient, nursery: trio.Nursery) -> Outbox:
    """The real outbox over the in-memory fake, its scheduler running in the test's nursery."""
    box = Outbox(tg)
    await nursery.start(box.run)
    return box


@pytest.fixture
def replies(outbox: Outbox, nursery: trio.Nursery) -> Replies:
    replies = Replies(outbox)
    replies.nursery = nursery
    return replies
