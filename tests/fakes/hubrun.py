"""The hub with the real dispatcher and an in-memory store, for tests without Telegram.

`HubRunner.run_task` journals a prompt, dispatches it to a proxy and waits for
its outcome, exactly as a conversation does (minus the chat): the delivery
rules under test are the dispatcher's own.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import trio

from codexnet.config import ProxyEntry
from codexnet.manager.dispatcher import Dispatcher, wait_task_change
from codexnet.manager.hub import Hub
from codexnet.manager.service import open_store
from codexnet.manager.store import ManagerStore, Outcome, TaskRecord


@attrs.define
class HubRunner:
    hub: Hub
    store: ManagerStore
    dispatcher: Dispatcher

    @property
    def port(self) -> int:
        return self.hub.port

    async def start_task(
        self,
        proxy_id: str,
        prompt: str,
        *,
        thread_id: str | None = None,
        timeout_s: float = 120,
        chat_id: int = 0,
    ) -> TaskRecord:
        task = self.store.new_task(
            chat_id, 0, prompt, task_id=uuid.uuid4().hex, timeout_s=timeout_s
        )
        await self.store.add_task(task)
        await self.dispatcher.dispatch(task, proxy_id, thread_id)
        return task

    async def wait(
        self, task: TaskRecord, on_update: Callable[[TaskRecord], Any] | None = None
    ) -> Outcome:
        while task.outcome is None:
            if on_update is not None:
                on_update(task)
            await wait_task_change(task, self.hub, trio.current_time() + 3600)
        return task.outcome

    async def run_task(
        self,
        proxy_id: str,
        prompt: str,
        *,
        thread_id: str | None = None,
        on_update: Callable[[TaskRecord], Any] | None = None,
        timeout_s: float = 120,
    ) -> Outcome:
        task = await self.start_task(proxy_id, prompt, thread_id=thread_id, timeout_s=timeout_s)
        return await self.wait(task, on_update)


@asynccontextmanager
async def open_hub(
    proxies: Mapping[str, ProxyEntry], **hub_options: Any
) -> AsyncIterator[HubRunner]:
    hub = Hub(proxies, **hub_options)
    async with open_store(":memory:") as store, trio.open_nursery() as nursery:
        dispatcher = Dispatcher(store, hub)
        dispatcher.nursery = nursery
        await nursery.start(partial(hub.serve, "127.0.0.1", 0))
        try:
            yield HubRunner(hub, store, dispatcher)
        finally:
            nursery.cancel_scope.cancel()


async def serve_hub(
    proxies: Mapping[str, ProxyEntry],
    *,
    task_status: trio.TaskStatus[HubRunner] = trio.TASK_STATUS_IGNORED,
    **hub_options: Any,
) -> None:
    """`open_hub` as a startable service: `runner = await nursery.start(serve_hub, proxies)`."""
    async with open_hub(proxies, **hub_options) as runner:
        task_status.started(runner)
        await trio.sleep_forever()
