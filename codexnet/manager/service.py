"""Wire the manager together: state, WebSocket hub, Telegram bot.

run_manager
├── Hub.serve        proxies connect here (one error-bounded task per connection)
└── Bot.run          getUpdates long-poll; conversations run in its nursery
"""

from __future__ import annotations

import logging
import ssl
from functools import partial

import httpx
import trio

from codexnet.config import ManagerConfig
from codexnet.manager.bot import Bot
from codexnet.manager.hub import Hub, TaskFailed
from codexnet.manager.state import StateStore
from codexnet.manager.telegram import TelegramClient
from codexnet.protocol import TaskResult

log = logging.getLogger(__name__)


async def run_manager(
    config: ManagerConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    task_status: trio.TaskStatus[Hub] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the hub and the bot until cancelled; `started(hub)` once both are up.

    `transport` replaces the network for the Bot API (tests run it in memory).
    """
    store = StateStore(config.state_dir)
    store.load()
    hub = Hub(config.proxies)
    host, port = config.manager_ws_listen
    assert config.telegram_bot_token is not None
    async with httpx.AsyncClient(transport=transport) as http, trio.open_nursery() as nursery:
        tg = TelegramClient(http, config.telegram_api_base, config.telegram_bot_token)
        bot = Bot(config, tg, hub, store)
        bot.conversations.adopt_journal()  # before serving: proxies' hellos must find them
        await nursery.start(partial(hub.serve, host, port, ssl_context=config.ssl_context()))
        await nursery.start(bot.run)
        task_status.started(hub)


async def run_once(
    hub: Hub,
    host: str,
    port: int,
    proxy_id: str,
    prompt: str,
    *,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> TaskResult:
    """The one-shot CLI: serve proxies, wait for `proxy_id`, run one prompt.

    Raises `TaskFailed` (outside the nursery, so callers see it unwrapped).
    """
    outcome: TaskResult | TaskFailed = TaskFailed("not run")
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(hub.serve, host, port, ssl_context=ssl_context))
        try:
            with trio.fail_after(timeout_s):
                await hub.wait_online(proxy_id)
                outcome = await hub.run_task(proxy_id, prompt, timeout_s=timeout_s)
        except trio.TooSlowError:
            outcome = TaskFailed(f"no answer from proxy {proxy_id} within {timeout_s:.0f} s")
        except TaskFailed as exc:
            outcome = exc
        finally:
            nursery.cancel_scope.cancel()
    if isinstance(outcome, TaskFailed):
        raise outcome
    return outcome
