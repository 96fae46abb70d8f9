"""Wire the manager together: state, WebSocket hub, Telegram bot.

run_manager
├── Database.run          the state writer (outlives everything below)
├── Outbox.run            the Telegram send scheduler
├── Hub.serve             proxies connect here (one error-bounded task per connection)
├── Bot.poll              getUpdates long-poll
└── background work       one lane per conversation with open tasks; approvals;
                          replies sent in the background; workspace commands
                          (they wait for a machine, never the update handler)
"""

from __future__ import annotations

import logging
import ssl
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from functools import partial
from typing import Final

import attrs
import httpx
import trio

from codexnet.config import ManagerConfig
from codexnet.manager.approvals import Approvals
from codexnet.manager.bot import Bot
from codexnet.manager.commands import ChatCommands
from codexnet.manager.conversation import Conversations
from codexnet.manager.delivery import Delivery, describe_outcome
from codexnet.manager.dispatcher import Dispatcher, wait_task_change
from codexnet.manager.files import Files
from codexnet.manager.grace import ShutdownGrace
from codexnet.manager.hub import Hub
from codexnet.manager.machine_requests import MachineRequests
from codexnet.manager.outbox import Outbox
from codexnet.manager.replies import Replies
from codexnet.manager.store import ManagerStore, Outcome
from codexnet.manager.telegram import TelegramClient
from codexnet.manager.workspace_commands import WorkspaceCommands
from codexnet.statelock import hold_state_lock

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S: Final = 10.0  # how long shutdown waits for an answer part in flight


@attrs.define(eq=False)
class Manager:
    """The running parts, for tests and tools that need to look inside."""

    config: ManagerConfig
    store: ManagerStore
    hub: Hub
    dispatcher: Dispatcher
    outbox: Outbox
    conversations: Conversations
    bot: Bot

    @property
    def port(self) -> int:
        return self.hub.port


@asynccontextmanager
async def open_store(
    state_dir: object, *, inline_writes: bool = False
) -> AsyncIterator[ManagerStore]:
    """Hold `state_dir`'s lock, open the database, run its writer; raises `StateError`.

    `inline_writes` commits on the event loop (tests on trio's virtual clock).
    """
    store = ManagerStore(str(state_dir), inline_writes=inline_writes)
    memory = str(state_dir) == ":memory:"
    with nullcontext() if memory else hold_state_lock(store.state_dir, "manager"):
        store.open()
        try:
            async with store.db.serving():
                yield store
        finally:
            store.db.close()


# Connections to the Bot API kept open between bursts: httpx keeps 20 by
# default, so every burst past that paid new TCP+TLS handshakes to Telegram.
HTTP_LIMITS: Final = httpx.Limits(max_connections=100, max_keepalive_connections=100)


async def run_manager(
    config: ManagerConfig,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    task_status: trio.TaskStatus[Manager] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the hub and the bot until cancelled; `started(manager)` once both are up.

    `transport` replaces the network for the Bot API (tests run it in memory).
    Raises `StateError` before anything starts when the state cannot be used.
    """
    assert config.telegram_bot_token is not None
    host, port = config.manager_ws_listen
    async with (
        open_store(config.state_dir) as store,
        httpx.AsyncClient(transport=transport, limits=HTTP_LIMITS) as http,
        trio.open_nursery() as nursery,
    ):
        hub = Hub.for_config(config)
        dispatcher = Dispatcher(store, hub, max_open_approvals=config.max_open_approvals_per_task)
        dispatcher.nursery = nursery
        tg = TelegramClient(http, config.telegram_api_base, config.telegram_bot_token)
        outbox = Outbox(tg)
        replies = Replies(outbox)
        replies.nursery = nursery
        grace = ShutdownGrace(SHUTDOWN_GRACE_S)
        approvals = Approvals(
            replies,
            store,
            dispatcher.send_decision,
            timeout_s=config.approval_timeout_s,
            is_online=lambda proxy_id: proxy_id in hub.online,
            grace=grace,
        )
        approvals.nursery = nursery
        dispatcher.on_approval = approvals.on_request
        delivery = Delivery(store, replies, approvals, grace, give_up_s=config.delivery_give_up_s)
        files = Files(tg, http, store.state_dir)
        await files.prune({task.task_id for task in store.open_tasks() if task.files})
        machines = MachineRequests(hub, files)
        machines.nursery = nursery
        dispatcher.on_file_fetch = machines.on_file_fetch
        dispatcher.on_reply = machines.on_reply
        dispatcher.on_online = machines.on_online
        conversations = Conversations(
            config, store, hub, dispatcher, outbox, replies, delivery, grace, files
        )
        workspace = WorkspaceCommands(config, store, hub, dispatcher, machines, replies)
        workspace.nursery = nursery
        commands = ChatCommands(config, store, hub, conversations, approvals, replies, workspace)
        bot = Bot(config, tg, outbox, store, replies, conversations, commands)

        await nursery.start(outbox.run)
        nursery.start_soon(_begin_grace_on_shutdown, grace, outbox)
        await nursery.start(partial(hub.serve, host, port, ssl_context=config.ssl_context()))
        approvals.resume()
        conversations.start(nursery)
        await bot.start_up()
        task_status.started(Manager(config, store, hub, dispatcher, outbox, conversations, bot))
        await bot.poll()


async def _begin_grace_on_shutdown(grace: ShutdownGrace, outbox: Outbox) -> None:
    """On shutdown, give protected steps (an answer part in flight) a bounded time.

    Answer parts still waiting for their turn in the outbox are abandoned at
    once: they stay in the journal and go out after the next start.
    """
    try:
        await trio.sleep_forever()
    finally:
        outbox.stop()
        grace.begin()


class TaskFailed(Exception):
    """The one-shot task could not run; the message is for the person."""


async def run_once(
    hub: Hub,
    host: str,
    port: int,
    proxy_id: str,
    prompt: str,
    *,
    timeout_s: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Outcome:
    """The one-shot CLI: serve proxies, wait for `proxy_id`, run one prompt.

    State lives in memory only. Raises `TaskFailed` (outside the nursery, so
    callers see it unwrapped).
    """
    failure: TaskFailed | None = None
    outcome: Outcome | None = None
    async with open_store(":memory:") as store, trio.open_nursery() as nursery:
        dispatcher = Dispatcher(store, hub)
        dispatcher.nursery = nursery
        await nursery.start(partial(hub.serve, host, port, ssl_context=ssl_context))
        try:
            with trio.fail_after(timeout_s):
                await hub.wait_online(proxy_id)
                task = store.new_task(0, 0, prompt, task_id=uuid.uuid4().hex, timeout_s=timeout_s)
                await store.add_task(task)
                await dispatcher.dispatch(task, proxy_id, None)
                while task.outcome is None:
                    await wait_task_change(task, hub, trio.current_time() + timeout_s)
                outcome = task.outcome
        except trio.TooSlowError:
            failure = TaskFailed(f"no answer from proxy {proxy_id} within {timeout_s:.0f} s")
        finally:
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    assert outcome is not None
    if outcome.line:
        raise TaskFailed(describe_outcome(outcome))
    return outcome
