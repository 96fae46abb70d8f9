"""Conversations: each chat's prompts, one after another, from arrival to answer.

A conversation (a chat, or a forum topic in one) has one *lane*: a task that
walks its journalled prompts in order, each through the same states —

    queued   → route it (waiting up to `proxy_wait_s` for a proxy), dispatch
    sent     → the proxy has not acknowledged it yet; re-sent on reconnect
    acked    → the proxy runs it: live view, typing, deadlines
    finished → the outcome is stored: deliver the answer from the store
    done

— and only then takes the next (Codex would steer a second turn into a running
one). Everything a lane needs is in the store, so after a restart each
conversation with open tasks gets its lane back and carries on where it was:
a queued prompt is routed, a running task is followed (its live view resumed),
a finished one is delivered.

Deadlines, so nothing waits forever without saying so: a task whose proxy is
offline before acknowledging it is withdrawn after `RECONNECT_GRACE_S`; a task
without a result `RESULT_GRACE_S` after its own timeout is cancelled and
reported. While its proxy is offline the live view says so.

A prompt with files (a document, a photo, an album) is fetched from Telegram
to the manager's disk while it is queued — an album's photos join the task
until none has come for `ALBUM_WAIT_S` — and only then routed; a file that
cannot be fetched ends the task with one line, and nothing runs. Its files
are deleted from the manager's disk once the task has ended.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import uuid
from typing import Final

import trio

from codexnet.config import ManagerConfig
from codexnet.db import StateError
from codexnet.manager.delivery import Delivery, wall_to_trio
from codexnet.manager.dispatcher import Dispatcher, wait_task_change
from codexnet.manager.files import FileProblem, Files
from codexnet.manager.grace import ShutdownGrace
from codexnet.manager.hub import Hub
from codexnet.manager.liveview import SHOW_AFTER_S, LiveView
from codexnet.manager.outbox import Outbox
from codexnet.manager.replies import Replies
from codexnet.manager.routing import choose_proxy
from codexnet.manager.store import (
    Attachment,
    ConversationKey,
    ManagerStore,
    Outcome,
    TaskRecord,
)

log = logging.getLogger(__name__)

MAX_WAITING_PER_CHAT: Final = 5
TYPING_EVERY_S: Final = 4.0  # Telegram shows "typing" for ~5 s
RECONNECT_GRACE_S: Final = 120.0  # an unacknowledged task waits this long for its proxy
RESULT_GRACE_S: Final = 60.0  # beyond the task's own timeout, which the proxy enforces
STATE_RETRY_S: Final = 5.0
ALBUM_WAIT_S: Final = 1.5  # Telegram sends an album's photos one message each, together
MAX_ALBUM_FILES: Final = 10  # Telegram's album size; more with one id start another prompt


class Conversations:
    def __init__(
        self,
        config: ManagerConfig,
        store: ManagerStore,
        hub: Hub,
        dispatcher: Dispatcher,
        outbox: Outbox,
        replies: Replies,
        delivery: Delivery,
        grace: ShutdownGrace,
        files: Files | None = None,
    ) -> None:
        self._config = config
        self._files = files
        self._store = store
        self._hub = hub
        self._dispatcher = dispatcher
        self._outbox = outbox
        self._replies = replies
        self._delivery = delivery
        self._grace = grace
        self._started = trio.current_time()  # proxies need a moment to come back after a restart
        self._active: set[ConversationKey] = set()
        self._views: dict[str, LiveView] = {}
        self._no_drafts: set[int] = set()  # chats where Telegram refused sendMessageDraft
        self.nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Give every conversation with open tasks (from before a restart) its lane."""
        self.nursery = nursery
        self._started = trio.current_time()
        keys = {task.conversation for task in self._store.open_tasks()}
        if keys:
            log.info(
                "journal: %d open task(s) in %d conversation(s) from before the restart",
                len(self._store.tasks),
                len(keys),
            )
        for key in keys:
            self._wake(key)

    # ------------------------------------------------------------------ prompts

    async def submit(
        self,
        chat_id: int,
        topic: int,
        text: str,
        *,
        update_id: int | None = None,
        message_id: int | None = None,
        attachment: Attachment | None = None,
        media_group: str | None = None,
    ) -> TaskRecord | None:
        """Journal a prompt (durably) and wake its conversation; None if refused.

        `attachment`: a file sent with it (its caption is `text`); a photo of an
        album (`media_group`) joins the task already collecting that album.
        """
        key = (chat_id, topic)
        waiting = self._store.open_tasks(key)
        if attachment is not None:
            attachment.update_id = update_id
            album = self._album(key, media_group) if media_group else None
            if album is not None:
                await self._store.add_attachment(album, attachment, text)
                album.album_until = trio.current_time() + ALBUM_WAIT_S
                album.poke()
                return album
        if len(waiting) > MAX_WAITING_PER_CHAT:
            self._replies.post(
                chat_id,
                "Too many messages are waiting already; this one was not queued.",
                topic=topic,
            )
            return None
        task = self._store.new_task(
            chat_id,
            topic,
            text,
            task_id=self._task_id(update_id),
            timeout_s=self._config.task_timeout_s,
            update_id=update_id,
            message_id=message_id,
            files=[attachment] if attachment is not None else None,
            media_group=media_group,
        )
        if media_group:
            task.album_until = trio.current_time() + ALBUM_WAIT_S
        # The common case — nothing else open here, its machine online — is
        # journalled as dispatched in the same commit: one commit, not two,
        # before the task is on its way. (Files are fetched first.)
        proxy_id = self._route_now(task) if not waiting and not task.files else None
        if proxy_id is not None:
            self._store.assign(task, proxy_id, self._thread_for(task, proxy_id))
        await self._store.add_task(task)
        if proxy_id is not None:
            # Sent in the background: the update handler (and with it the next
            # getUpdates) must not wait for the proxy's socket.
            assert self.nursery is not None
            self.nursery.start_soon(self._dispatcher.send_task, task)
        if any(t.state in ("queued", "sent", "acked") for t in waiting):
            self._replies.post(
                chat_id, "Queued: I'll start on it when the current task finishes.", topic=topic
            )
        self._wake(key)
        return task

    def _album(self, key: ConversationKey, media_group: str) -> TaskRecord | None:
        """The queued task collecting this album, if one is (and has room)."""
        for task in self._store.open_tasks(key):
            if (
                task.media_group == media_group
                and task.state == "queued"
                and len(task.files) < MAX_ALBUM_FILES
            ):
                return task
        return None

    def _task_id(self, update_id: int | None) -> str:
        """The task id of a prompt: derived from its Telegram update when it has one.

        Should Telegram deliver the update again — after a crash, or a power cut
        that took the journal's newest rows — the prompt gets the same id, and
        a proxy that already took it does not run it twice.
        """
        if update_id is None:
            return uuid.uuid4().hex
        bot = (self._config.telegram_bot_token or "").partition(":")[0] or "bot"
        return f"t{bot}u{update_id}"

    def _route_now(self, task: TaskRecord) -> str | None:
        conv = self._store.conversation(task.conversation)
        route = choose_proxy(
            conv.proxy, self._config.default_proxy, self._hub.online, self._hub.known()
        )
        return route.proxy_id if route.proxy_id in self._hub.online else None

    def _thread_for(self, task: TaskRecord, proxy_id: str) -> str | None:
        conv = self._store.conversation(task.conversation)
        return None if conv.reset else conv.threads.get(proxy_id)

    def _wake(self, key: ConversationKey) -> None:
        if key in self._active:
            return
        assert self.nursery is not None
        self._active.add(key)
        self.nursery.start_soon(self._lane, key)

    async def _lane(self, key: ConversationKey) -> None:
        try:
            while True:
                # A step cut short by shutdown returns early; make sure the
                # shutdown's cancellation lands here instead of looping.
                await trio.lowlevel.checkpoint()
                tasks = self._store.open_tasks(key)
                if not tasks:
                    return  # no await between this check and leaving `_active`
                task = tasks[0]
                try:
                    await self._advance(task)
                except StateError as exc:
                    log.error("%s; task %s waits and tries again", exc, task.task_id)
                    await trio.sleep(STATE_RETRY_S)
                except Exception:  # error boundary: one task's bug never stops the chat
                    log.exception("task %s failed in the manager", task.task_id)
                    await self._give_up(task)
        finally:
            self._active.discard(key)

    async def _give_up(self, task: TaskRecord) -> None:
        if task.state == "finished":
            await self._store.mark_done(task)
        elif task.state != "done":
            line = "⚠️ Internal error; see the manager's log."
            await self._dispatcher.finish(task, Outcome("failed", line=line))

    async def _advance(self, task: TaskRecord) -> None:
        """Move the conversation's oldest task on by one state."""
        if task.state == "queued":
            await self._start(task)
        elif task.state in ("sent", "acked"):
            await self._follow(task)
        elif task.state == "finished":
            if task.files and self._files is not None:
                await self._files.discard(task.task_id)  # the proxy has no more use for them
            view = self._views.pop(task.task_id, None) or self._restored_view(task)
            await self._delivery.deliver(task, view)

    async def _start(self, task: TaskRecord) -> None:
        await task.persisted.wait()
        if task.files:
            problem = await self._fetch_files(task)
            if problem is not None:
                await self._dispatcher.finish(task, Outcome("failed", line=problem))
                return
        proxy_id, why = await self._route(task)
        if task.cancel:
            await self._dispatcher.finish(
                task, Outcome("interrupted", line="⏹ Cancelled before it started.")
            )
            return
        if proxy_id is None:
            await self._dispatcher.finish(task, Outcome("failed", line=why))
            return
        await self._dispatcher.dispatch(task, proxy_id, self._thread_for(task, proxy_id))

    async def _fetch_files(self, task: TaskRecord) -> str | None:
        """Wait for the rest of an album, then fetch what is not on our disk yet.

        None when all files are here; else the line that ends the task.
        """
        while trio.current_time() < task.album_until and not task.cancel:
            with trio.move_on_at(task.album_until):
                await task.changed.wait()
        assert self._files is not None, "Conversations without Files cannot take files"
        for attachment in list(task.files):
            if attachment.sha256 is not None or task.cancel:
                continue
            try:
                size, sha256 = await self._files.download(attachment)
            except FileProblem as exc:
                await self._files.discard(task.task_id)
                return str(exc)
            await self._store.attachment_stored(attachment, size, sha256)
        return None

    async def _route(self, task: TaskRecord) -> tuple[str | None, str]:
        """The proxy for this task, waiting briefly for one to connect; else why not.

        Right after a manager restart the proxies need a second or two to come
        back; a message arriving then (or journalled before) waits for them.
        """
        deadline = max(self._started, wall_to_trio(task.created)) + self._config.proxy_wait_s
        conv = self._store.conversation(task.conversation)
        while True:
            route = choose_proxy(
                conv.proxy, self._config.default_proxy, self._hub.online, self._hub.known()
            )
            if route.proxy_id is not None and route.proxy_id in self._hub.online:
                return route.proxy_id, route.why
            if route.proxy_id is None and self._hub.online:
                return None, route.why  # several online, none chosen: waiting will not help
            if task.cancel or trio.current_time() >= deadline:
                break
            await wait_task_change(task, self._hub, deadline)
        if route.proxy_id is not None:
            return None, f"⚠️ proxy {route.proxy_id} is offline"
        return None, route.why

    async def _follow(self, task: TaskRecord) -> None:
        """Show the task live until its outcome is in; enforce its deadlines.

        A quick answer needs no live view and no typing: for its first
        `SHOW_AFTER_S` the task is watched on its own, and only a task still
        running then gets its view (and the tasks that keep it fresh).
        """
        view = self._view(task)
        if task.view_message_id is None:  # (after a restart the view is up already)
            await self._watch(task, view, until=view.started + SHOW_AFTER_S)
            if task.state not in ("sent", "acked"):
                return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(view.run)
            nursery.start_soon(self._keep_typing, task.chat_id, task.topic)
            await self._watch(task, view, until=math.inf)
            nursery.cancel_scope.cancel()

    async def _watch(self, task: TaskRecord, view: LiveView, *, until: float) -> None:
        """Until the task is no longer running (or `until`): deadlines, and what the view shows."""
        proxy_id = task.proxy_id
        assert proxy_id is not None
        while task.state in ("sent", "acked"):
            now = trio.current_time()
            if now >= until:
                return
            since = task.acked or task.dispatched or task.created
            hard = wall_to_trio(since) + task.timeout_s + RESULT_GRACE_S
            offline_at = self._hub.offline_since.get(proxy_id)
            if proxy_id in self._hub.online:
                offline_at = None
            if now >= hard:
                await self._dispatcher.request_cancel(task)
                await self._dispatcher.finish(
                    task,
                    Outcome(
                        "timeout",
                        line=f"⏱ No answer from proxy {proxy_id} within {task.timeout_s:.0f} s.",
                    ),
                )
                return
            next_check = min(hard, until)
            step = task.step
            if offline_at is not None:
                offline_for = time.time() - offline_at
                if task.state == "sent" and offline_for >= RECONNECT_GRACE_S:
                    await self._dispatcher.request_cancel(task)  # in case it got there
                    await self._dispatcher.finish(
                        task,
                        Outcome(
                            "failed",
                            line=f"⚠️ proxy {proxy_id} went offline before it took the "
                            "task; please send it again",
                        ),
                    )
                    return
                if task.state == "sent":
                    next_check = min(next_check, now + RECONNECT_GRACE_S - offline_for)
                clock = time.strftime("%H:%M", time.localtime(offline_at))
                step = f"⚠️ {proxy_id} is offline since {clock}; waiting for it"
            view.update(task.text, step)
            # The dispatcher pokes the task on its events and when its proxy
            # goes on or offline: one event to wait on, no helper tasks.
            changed = task.changed
            with trio.move_on_at(next_check):
                await changed.wait()

    def _view(self, task: TaskRecord) -> LiveView:
        view = self._views.get(task.task_id)
        if view is None:
            view = self._make_view(task)
            self._views[task.task_id] = view
        return view

    def _restored_view(self, task: TaskRecord) -> LiveView | None:
        """The status message of a task from before a restart, to close it."""
        return self._make_view(task) if task.view_message_id is not None else None

    def _make_view(self, task: TaskRecord) -> LiveView:
        if task.view_key is None:
            task.view_key = secrets.token_urlsafe(9)  # unguessable: it cancels a task
        private = task.chat_id > 0
        started = wall_to_trio(task.dispatched or task.created)

        def on_message(message_id: int | None) -> None:
            task.view_message_id = message_id
            self._store.save_view(task)

        return LiveView(
            self._outbox,
            task.chat_id,
            task.proxy_id or "?",
            interval=(
                self._config.live_interval_private_s
                if private
                else self._config.live_interval_group_s
            ),
            use_draft=private and self._config.use_drafts and task.chat_id not in self._no_drafts,
            cancel_data=f"c:{task.view_key}",
            started=started,
            message_id=task.view_message_id,
            on_message=on_message,
            on_draft_refused=lambda: self._no_drafts.add(task.chat_id),
            grace=self._grace,
            topic=task.topic,
        )

    async def _keep_typing(self, chat_id: int, topic: int) -> None:
        # Started with the live view, once the task has taken a moment: a quick
        # answer costs no chat action, and a burst of prompts is dispatched
        # before a burst of "typing" requests competes with it.
        while True:
            await self._outbox.chat_action(chat_id, topic=topic)
            await trio.sleep(TYPING_EVERY_S)

    # ------------------------------------------------------------------ cancel

    def current(self, key: ConversationKey) -> TaskRecord | None:
        """The conversation's task that is not yet finished (the one /cancel stops)."""
        for task in self._store.open_tasks(key):
            if task.state in ("queued", "sent", "acked"):
                return task
        return None

    def task_for_cancel_key(self, key: str) -> TaskRecord | None:
        for task in self._store.open_tasks():
            if task.view_key == key and task.state in ("queued", "sent", "acked"):
                return task
        return None

    async def cancel(self, task: TaskRecord) -> None:
        await self._dispatcher.request_cancel(task)
