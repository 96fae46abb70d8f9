"""A chat's conversation with Codex: route, run, remember the thread, answer.

Prompts of one chat run one after another (a FIFO lock per chat): Codex would
otherwise steer the second prompt into the running turn. A few may wait; more
are refused with a clear message rather than queued without bound.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from codexnet.config import ManagerConfig
from codexnet.events import wait_first
from codexnet.manager.approvals import Approvals
from codexnet.manager.grace import ShutdownGrace
from codexnet.manager.hub import Hub, TaskFailed, TaskHandle
from codexnet.manager.liveview import LiveView
from codexnet.manager.replies import Replies
from codexnet.manager.routing import choose_proxy
from codexnet.manager.state import JournalEntry, StateStore
from codexnet.protocol import ApprovalRequest, TaskResult

log = logging.getLogger(__name__)

MAX_WAITING_PER_CHAT: Final = 5
TYPING_EVERY_S: Final = 4.0  # Telegram shows "typing" for ~5 s
FINISH_LINES: Final = {
    "completed": "✅ Done",
    "interrupted": "⏹ Cancelled",
    "timeout": "⏱ Timed out",
    "failed": "⚠️ Failed",
}


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
        self,
        config: ManagerConfig,
        hub: Hub,
        store: StateStore,
        replies: Replies,
        grace: ShutdownGrace,
    ) -> None:
        self._grace = grace
        self._config = config
        self._hub = hub
        self._store = store
        self._replies = replies
        self._locks: dict[int, trio.StrictFIFOLock] = {}
        self._waiting: dict[int, int] = {}
        self.running: dict[int, TaskHandle] = {}  # chat → its running task
        self._cancel_keys = (format(n, "x") for n in itertools.count(1))
        self._cancel_keys_live: dict[str, int] = {}  # Cancel button data → chat
        self._cancel_requested: set[int] = set()  # pressed before the task reached the proxy
        self._no_drafts: set[int] = set()  # chats where Telegram refused sendMessageDraft
        self._adopted: list[tuple[JournalEntry, TaskHandle]] = []  # from the journal
        self._approvals = Approvals(replies.tg, hub.decide, timeout_s=config.approval_timeout_s)
        self.nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ prompts

    def start_adopted(self) -> None:
        """Follow the tasks `adopt_journal` took back (once the nursery exists)."""
        assert self.nursery is not None
        for entry, handle in self._adopted:
            self.nursery.start_soon(self._resume, entry, handle)
        self._adopted.clear()

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
        task_id = uuid.uuid4().hex
        # Journalled before it is sent: a manager restart can still deliver the answer.
        await self._store.journal_add(JournalEntry(task_id, chat_id, proxy_id, time.time()))

        def start(view: LiveView) -> Awaitable[TaskResult]:
            return self._hub.run_task(
                proxy_id,
                text,
                task_id=task_id,
                chat_id=chat_id,
                thread_id=thread_id,
                timeout_s=self._config.task_timeout_s,
                on_update=lambda handle: view.update(handle.text, handle.step),
                on_approval=self._on_approval,
                on_handle=lambda handle: self._track(chat_id, handle),
            )

        await self._follow(chat_id, proxy_id, task_id, start)

    def adopt_journal(self) -> None:
        """Take back the tasks a previous run sent but never answered (before serving)."""
        for entry in self._store.journal:
            if entry.proxy_id not in self._hub.known():
                log.warning(
                    "journal: dropping task %s for unknown proxy %r", entry.task_id, entry.proxy_id
                )
                continue
            handle = self._hub.adopt(
                entry.task_id,
                entry.proxy_id,
                chat_id=entry.chat_id,
                timeout_s=self._config.task_timeout_s,
                on_approval=self._on_approval,
            )
            self._adopted.append((entry, handle))
        if self._adopted:
            log.info("journal: %d task(s) from before the restart", len(self._adopted))

    async def _resume(self, entry: JournalEntry, handle: TaskHandle) -> None:
        """Deliver the answer of a task adopted from the journal."""

        def start(view: LiveView) -> Awaitable[TaskResult]:
            handle.on_update = lambda h: view.update(h.text, h.step)
            self._track(entry.chat_id, handle)
            return self._hub.follow(handle)

        lock = self._locks.setdefault(entry.chat_id, trio.StrictFIFOLock())
        async with lock:
            await self._follow(entry.chat_id, entry.proxy_id, entry.task_id, start)

    async def _follow(
        self,
        chat_id: int,
        proxy_id: str,
        task_id: str,
        start: Callable[[LiveView], Awaitable[TaskResult]],
    ) -> None:
        """Show a task live while it runs, then its answer; forget it in the journal."""
        private = chat_id > 0
        cancel_key = f"c:{next(self._cancel_keys)}"
        self._cancel_keys_live[cancel_key] = chat_id
        view = LiveView(
            self._replies.tg,
            chat_id,
            proxy_id,
            interval=(
                self._config.live_interval_private_s
                if private
                else self._config.live_interval_group_s
            ),
            use_draft=private and self._config.use_drafts and chat_id not in self._no_drafts,
            cancel_data=cancel_key,
            on_draft_refused=lambda: self._no_drafts.add(chat_id),
        )
        outcome: TaskResult | TaskFailed
        async with trio.open_nursery() as nursery:
            nursery.start_soon(view.run)
            nursery.start_soon(self._keep_typing, chat_id)
            try:
                outcome = await start(view)
            except TaskFailed as exc:  # caught here: out of the nursery it would be a group
                outcome = exc
            finally:
                self.running.pop(chat_id, None)
                self._cancel_keys_live.pop(cancel_key, None)
                self._cancel_requested.discard(chat_id)
                nursery.cancel_scope.cancel()
        # Delivering the answer and forgetting the task go together: a shutdown in
        # between would make the next start report the answered task as lost.
        with self._grace.protect():
            await self._approvals.expire_task(task_id)  # open questions are moot now
            await self._deliver(chat_id, proxy_id, view, outcome)
            await self._store.journal_done(task_id)

    async def _deliver(
        self, chat_id: int, proxy_id: str, view: LiveView, outcome: TaskResult | TaskFailed
    ) -> None:
        if isinstance(outcome, TaskFailed):
            await view.finish("⚠️ Failed")
            await self._replies.send_text(chat_id, f"⚠️ {outcome}")
            return
        if outcome.thread_id:
            session = self._store.chat(chat_id)
            session.threads[proxy_id] = outcome.thread_id
            session.reset = False
            session.proxy = proxy_id  # sticky: the conversation lives on this machine now
            await self._store.save_sessions()
        await view.finish(FINISH_LINES.get(outcome.status, "⚠️ Failed"))
        await self._replies.send_answer(chat_id, describe_result(outcome))

    def _track(self, chat_id: int, handle: TaskHandle) -> None:
        self.running[chat_id] = handle
        if chat_id in self._cancel_requested:
            assert self.nursery is not None
            self.nursery.start_soon(self._cancel_when_acked, handle)

    async def _cancel_when_acked(self, handle: TaskHandle) -> None:
        # A cancel that overtakes the task itself would be ignored by the proxy.
        await wait_first(handle.acked, handle.done)
        if not handle.done.is_set():
            await self._hub.cancel(handle.task.task_id)

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
        assert self.nursery is not None
        self.nursery.start_soon(self._approvals.ask, handle.task.chat_id, request)

    # ------------------------------------------------------------------ buttons

    async def on_callback(self, query: dict[str, Any]) -> None:
        """A button press from an allowed user."""
        data = str(query.get("data") or "")
        kind, _, rest = data.partition(":")
        if kind == "a":
            key, _, choice = rest.partition(":")
            await self._approvals.on_press(query, key, choice)
            return
        if kind == "c":
            chat_id = self._cancel_keys_live.get(data)
            if chat_id is None:
                await self._replies.tg.toast(query, "That task has already finished.")
                return
            await self._replies.tg.toast(query, "Cancelling…")
            await self._request_cancel(chat_id)
            return
        if kind == "u":
            chat_id = (query.get("message") or {}).get("chat", {}).get("id")
            if isinstance(chat_id, int):
                await self._replies.tg.toast(query, f"Using {rest}")
                await self.use(chat_id, rest)
                return
        await self._replies.tg.toast(query, "This button is no longer valid.")

    # ------------------------------------------------------------------ commands

    async def use(self, chat_id: int, proxy_id: str) -> None:
        known = self._hub.known()
        if not proxy_id:
            online = sorted(self._hub.online)
            buttons = [
                [{"text": p, "callback_data": f"u:{p}"}]
                for p in online
                if len(f"u:{p}".encode()) <= 64  # Telegram's callback_data limit
            ]
            text = (
                "Pick the machine for this chat:"
                if buttons
                else f"No proxy is online. Known: {', '.join(known) or 'none'}."
            )
            await self._replies.send_text(
                chat_id, text, reply_markup={"inline_keyboard": buttons} if buttons else None
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
        if chat_id not in self._cancel_keys_live.values():
            await self._replies.send_text(chat_id, "Nothing is running in this chat.")
            return
        await self._request_cancel(chat_id)

    async def _request_cancel(self, chat_id: int) -> None:
        handle = self.running.get(chat_id)
        if handle is None or not handle.acked.is_set():
            self._cancel_requested.add(chat_id)  # acted on as soon as the proxy has the task
            if handle is not None:
                self._track(chat_id, handle)
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
