"""A chat's conversation with Codex: route, run, remember the thread, answer.

Prompts of one chat run one after another (a FIFO lock per chat): Codex would
otherwise steer the second prompt into the running turn. A few may wait; more
are refused with a clear message rather than queued without bound.
"""

from __future__ import annotations

import logging
from typing import Any, Final

import trio

from codexnet.config import ManagerConfig
from codexnet.manager.hub import Hub, TaskFailed, TaskHandle
from codexnet.manager.replies import Replies
from codexnet.manager.routing import choose_proxy
from codexnet.manager.state import StateStore
from codexnet.protocol import ApprovalRequest, TaskResult

log = logging.getLogger(__name__)

MAX_WAITING_PER_CHAT: Final = 5
TYPING_EVERY_S: Final = 4.0  # Telegram shows "typing" for ~5 s


def describe_result(result: TaskResult) -> str:
    """The text the chat gets for a finished task."""
    text = result.text.strip()
    if result.status == "completed":
        return text or "(Codex finished without a text answer.)"
    if result.status == "interrupted":
        head = "⏹ Cancelled."
    elif result.status == "timeout":
        head = f"⏱ Timed out: {result.error}."
    else:
        head = f"⚠️ Codex failed: {result.error or 'unknown error'}"
    return f"{head}\n\n{text}" if text else head


class Conversations:
    def __init__(
        self, config: ManagerConfig, hub: Hub, store: StateStore, replies: Replies
    ) -> None:
        self._config = config
        self._hub = hub
        self._store = store
        self._replies = replies
        self._locks: dict[int, trio.StrictFIFOLock] = {}
        self._waiting: dict[int, int] = {}
        self.running: dict[int, TaskHandle] = {}  # chat → its running task
        self.nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ prompts

    def submit(self, chat_id: int, text: str) -> None:
        """Hand a prompt over; it runs in the background after earlier ones of this chat."""
        assert self.nursery is not None
        self.nursery.start_soon(self._queue, chat_id, text)

    async def _queue(self, chat_id: int, text: str) -> None:
        waiting = self._waiting.get(chat_id, 0)
        if waiting >= MAX_WAITING_PER_CHAT:
            await self._replies.send_text(
                chat_id, "Too many messages are waiting already; this one was not queued."
            )
            return
        lock = self._locks.setdefault(chat_id, trio.StrictFIFOLock())
        if lock.locked():
            await self._replies.send_text(
                chat_id, "Queued: I'll start on it when the current task finishes."
            )
        self._waiting[chat_id] = waiting + 1
        try:
            async with lock:
                self._waiting[chat_id] -= 1
                await self._run(chat_id, text)
        except Exception:
            log.exception("prompt for chat %s failed", chat_id)
            await self._replies.send_text(chat_id, "⚠️ Internal error; see the manager's log.")

    async def _route(self, chat_id: int) -> str | None:
        """The proxy for this chat's next prompt, waiting briefly for one to connect.

        Right after a manager restart the proxies need a second or two to come
        back; a message arriving then should wait for them, not be refused.
        """
        session = self._store.chat(chat_id)
        with trio.move_on_after(self._config.proxy_wait_s):
            while True:
                route = choose_proxy(
                    session.proxy,
                    self._config.default_proxy,
                    self._hub.online,
                    self._hub.known(),
                )
                if route.proxy_id is not None:
                    await self._hub.wait_online(route.proxy_id)
                    return route.proxy_id
                if self._hub.online:
                    break  # several online, none chosen: waiting will not help
                await self._hub.wait_online()
        route = choose_proxy(
            session.proxy, self._config.default_proxy, self._hub.online, self._hub.known()
        )
        if route.proxy_id is None:
            await self._replies.send_text(chat_id, route.why)
        return route.proxy_id

    async def _run(self, chat_id: int, text: str) -> None:
        session = self._store.chat(chat_id)
        proxy_id = await self._route(chat_id)
        if proxy_id is None:
            return
        thread_id = None if session.reset else session.threads.get(proxy_id)
        outcome: TaskResult | TaskFailed
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keep_typing, chat_id)
            try:
                outcome = await self._hub.run_task(
                    proxy_id,
                    text,
                    chat_id=chat_id,
                    thread_id=thread_id,
                    timeout_s=self._config.task_timeout_s,
                    on_approval=self._on_approval,
                    on_handle=lambda handle: self.running.__setitem__(chat_id, handle),
                )
            except TaskFailed as exc:  # caught here: out of the nursery it would be a group
                outcome = exc
            finally:
                self.running.pop(chat_id, None)
                nursery.cancel_scope.cancel()
        if isinstance(outcome, TaskFailed):
            await self._replies.send_text(chat_id, f"⚠️ {outcome}")
            return
        result = outcome
        if result.thread_id:
            session.threads[proxy_id] = result.thread_id
            session.reset = False
            session.proxy = proxy_id  # sticky: the conversation lives on this machine now
            await self._store.save_sessions()
        await self._replies.send_text(chat_id, describe_result(result))

    async def _keep_typing(self, chat_id: int) -> None:
        while True:
            try:
                await self._replies.tg.call(
                    "sendChatAction", {"chat_id": chat_id, "action": "typing"}, attempts=1
                )
            except Exception as exc:  # typing is cosmetic; never let it end the task
                log.debug("sendChatAction failed: %s", exc)
            await trio.sleep(TYPING_EVERY_S)

    def _on_approval(self, handle: TaskHandle, request: ApprovalRequest) -> None:
        # Until approvals have buttons, decline: running commands nobody approved is worse.
        assert self.nursery is not None
        self.nursery.start_soon(self._decline, handle, request)

    async def _decline(self, handle: TaskHandle, request: ApprovalRequest) -> None:
        await self._hub.decide(handle.task.task_id, request.approval_id, "decline")
        await self._replies.send_text(
            handle.task.chat_id, f"Codex asked to {request.summary}; declined."
        )

    async def on_callback(self, query: dict[str, Any]) -> None:
        await self._replies.tg.call("answerCallbackQuery", {"callback_query_id": query["id"]})

    # ------------------------------------------------------------------ commands

    async def use(self, chat_id: int, proxy_id: str) -> None:
        known = self._hub.known()
        if not proxy_id:
            online = sorted(self._hub.online)
            await self._replies.send_text(
                chat_id,
                f"Online: {', '.join(online) or 'none'}. Known: {', '.join(known)}.\n"
                "Pick one with /use <proxy>.",
            )
            return
        if proxy_id not in known:
            await self._replies.send_text(
                chat_id, f"Unknown proxy {proxy_id!r}. Known: {', '.join(known) or 'none'}."
            )
            return
        session = self._store.chat(chat_id)
        session.proxy = proxy_id
        await self._store.save_sessions()
        state = "online" if proxy_id in self._hub.online else "offline right now"
        await self._replies.send_text(chat_id, f"This chat now uses {proxy_id} ({state}).")

    async def reset(self, chat_id: int) -> None:
        session = self._store.chat(chat_id)
        session.reset = True
        session.threads.clear()
        await self._store.save_sessions()
        await self._replies.send_text(chat_id, "OK: your next message starts a new conversation.")

    async def cancel(self, chat_id: int) -> None:
        handle = self.running.get(chat_id)
        if handle is None:
            await self._replies.send_text(chat_id, "Nothing is running in this chat.")
            return
        if not await self._hub.cancel(handle.task.task_id):
            await self._replies.send_text(chat_id, "Could not reach the proxy to cancel.")

    async def status(self, chat_id: int) -> None:
        session = self._store.chat(chat_id)
        route = choose_proxy(
            session.proxy, self._config.default_proxy, self._hub.online, self._hub.known()
        )
        lines = []
        for proxy_id in self._hub.known():
            conn = self._hub.online.get(proxy_id)
            labels = ", ".join(self._hub.labels(proxy_id)) or "none"
            if conn is None:
                lines.append(f"⚪ {proxy_id}: offline (labels: {labels})")
            else:
                lines.append(
                    f"🟢 {proxy_id}: online, {conn.running}/{conn.capacity} running, "
                    f"labels: {labels}, {conn.version or 'version unknown'}"
                )
        if route.proxy_id is not None:
            lines.append(f"\nThis chat uses {route.proxy_id} ({route.why}).")
        else:
            lines.append(f"\n{route.why}")
        await self._replies.send_text(chat_id, "\n".join(lines) or "No proxies configured.")
