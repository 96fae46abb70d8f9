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
from typing import Final, Protocol

import trio

from codexnet.config import ManagerConfig
from codexnet.db import StateError
from codexnet.manager.admission import Admission
from codexnet.manager.delivery import Delivery, wall_to_trio
from codexnet.manager.dispatcher import Dispatcher
from codexnet.manager.files import FileProblem, Files
from codexnet.manager.grace import ShutdownGrace
from codexnet.manager.hub import Hub
from codexnet.manager.liveview import SHOW_AFTER_S, LiveView
from codexnet.manager.outbox import Outbox
from codexnet.manager.replies import Replies
from codexnet.manager.scheduler import Decision
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


class ViewSink(Protocol):
    """What `_watch` tells: a task's live view, or its line in an /all run's view."""

    def update(self, text: str, step: str) -> None: ...


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
        self._active_runs: set[str] = set()
        self._run_lines: dict[str, _BoardLine] = {}  # an /all task → its line in the run's view
        self.admission = Admission(config, store, hub)
        dispatcher.on_finished = lambda task: self.admission.pump()
        self.nursery: trio.Nursery | None = None

    def start(self, nursery: trio.Nursery) -> None:
        """Give every conversation (and /all run) with open tasks from before a
        restart its lane."""
        self.nursery = nursery
        self._started = trio.current_time()
        nursery.start_soon(self.admission.watch)
        keys = {task.conversation for task in self._store.open_tasks() if task.run_id is None}
        runs = self._store.runs()
        if keys or runs:
            log.info(
                "journal: %d open task(s) in %d conversation(s) and %d /all run(s) from "
                "before the restart",
                len(self._store.tasks),
                len(keys),
                len(runs),
            )
        for key in keys:
            self._wake(key)
        for run_id in runs:
            self._wake_run(run_id)

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
        """The machine a just-arrived prompt goes to at once, if it has a free slot."""
        decision = self.admission.decide_now(task)
        if decision.action != "run" or decision.moved_from is not None:
            return None  # it waits, is refused, or moves (with its notice): the lane's part
        assert decision.proxy_id is not None
        self.admission.granted(task, decision.proxy_id)
        return decision.proxy_id

    def _thread_for(self, task: TaskRecord, proxy_id: str) -> str | None:
        if task.run_id is not None:
            return None  # an /all task: a fresh thread, the conversation untouched
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
        decision = await self._admit(task)
        if task.cancel:
            await self._dispatcher.finish(
                task, Outcome("interrupted", line="⏹ Cancelled before it started.")
            )
            return
        if decision.action != "run" or decision.proxy_id is None:
            await self._dispatcher.finish(task, Outcome("failed", line=decision.why))
            return
        proxy_id = decision.proxy_id
        thread_id = self._thread_for(task, proxy_id)
        if decision.moved_from is not None:
            thread_id = None  # its thread lives on the machine that is gone
            task.notice = (
                f"{decision.moved_from} is offline; continuing on {proxy_id} in a new conversation"
            )
            log.info("task %s: %s", task.task_id, task.notice)
        view = self._views.get(task.task_id)
        if view is not None:
            view.proxy_id = proxy_id
        await self._dispatcher.dispatch(task, proxy_id, thread_id)

    async def _admit(self, task: TaskRecord) -> Decision:
        """The scheduler's answer for this task, waiting in the manager's queue.

        Right after a manager restart the proxies need a second or two to come
        back; a message arriving then (or journalled before) waits up to
        `proxy_wait_s` for its machine. A wait for a free slot has no deadline;
        while it lasts the live view says the task's place ("queued: 2nd for
        proxy1").
        """
        deadline = max(self._started, wall_to_trio(task.created)) + self._config.proxy_wait_s
        async with trio.open_nursery() as nursery:
            view: LiveView | None = None

            def on_wait(step: str) -> None:
                nonlocal view
                if not step.startswith("queued:") and view is None:
                    return  # a short wait for a machine to connect shows nothing
                if view is None and task.run_id is None:
                    view = self._view(task)
                    view.proxy_id = step.rpartition(" for ")[2]
                    nursery.start_soon(view.run)
                if view is not None:
                    view.update(task.text, step)
                self._on_queued(task, step)

            decision = await self.admission.admit(task, deadline=deadline, on_wait=on_wait)
            nursery.cancel_scope.cancel()
        return decision

    def _on_queued(self, task: TaskRecord, step: str) -> None:
        """An /all task's place in its machine's queue, for the run's view."""
        line = self._run_lines.get(task.task_id)
        if line is not None:
            line.update(task.text, step)

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

    async def _watch(self, task: TaskRecord, view: ViewSink, *, until: float) -> None:
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

    def _make_view(self, task: TaskRecord, *, shared: list[TaskRecord] | None = None) -> LiveView:
        """`shared`: the tasks of an /all run, which share one view (each row keeps it,
        so the view is found after a restart whichever of them is still open)."""
        if task.view_key is None:
            task.view_key = secrets.token_urlsafe(9)  # unguessable: it cancels a task
        private = task.chat_id > 0
        started = wall_to_trio(task.dispatched or task.created)

        def on_message(message_id: int | None) -> None:
            for each in shared or [task]:
                each.view_message_id = message_id
                self._store.save_view(each)

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

    def cancellable(self, key: ConversationKey) -> list[TaskRecord]:
        """What /cancel stops here: the conversation's current task and every
        task of its /all runs that has not finished."""
        found = [t for t in [self.current(key)] if t is not None]
        for run_id in self._store.runs(key):
            found += [
                t for t in self._store.run_tasks(run_id) if t.state in ("queued", "sent", "acked")
            ]
        return found

    def tasks_for_cancel_key(self, key: str) -> list[TaskRecord]:
        """Every unfinished task a Cancel button stops (one, or all of an /all run)."""
        return [
            t
            for t in self._store.open_tasks()
            if t.view_key == key and t.state in ("queued", "sent", "acked")
        ]

    def task_for_cancel_key(self, key: str) -> TaskRecord | None:
        for task in self._store.open_tasks():
            if task.view_key == key and task.state in ("queued", "sent", "acked"):
                return task
        return None

    async def cancel(self, task: TaskRecord) -> None:
        await self._dispatcher.request_cancel(task)

    # ------------------------------------------------------------------ /all

    async def submit_all(
        self, chat_id: int, topic: int, prompt: str, proxies: list[str], *, update_id: int | None
    ) -> str:
        """Journal one task per machine of an /all run (durably), and start the run."""
        run_id = self._task_id(update_id)
        view_key = secrets.token_urlsafe(9)  # one Cancel button for the whole run
        tasks: list[TaskRecord] = []
        for proxy_id in proxies:
            task = self._store.new_task(
                chat_id,
                topic,
                prompt,
                task_id=f"{run_id}.{proxy_id}",
                timeout_s=self._config.task_timeout_s,
                update_id=update_id if not tasks else None,
                run_id=run_id,
                target=proxy_id,
                notice=f"🖥 {proxy_id}",
            )
            task.view_key = view_key
            tasks.append(task)
        failed: list[StateError] = []

        async def add(task: TaskRecord) -> None:
            try:
                await self._store.add_task(task)
            except StateError as exc:  # raised plain below: the bot retries the update
                failed.append(exc)

        async with trio.open_nursery() as nursery:  # together: one group commit, not N
            for task in tasks:
                nursery.start_soon(add, task)
        if failed:
            raise failed[0]
        for task in tasks:
            self._store.save_view(task)  # the shared Cancel key
        self._wake_run(run_id)
        return run_id

    def _wake_run(self, run_id: str) -> None:
        if run_id in self._active_runs:
            return
        assert self.nursery is not None
        self._active_runs.add(run_id)
        self.nursery.start_soon(self._run_lane, run_id)

    async def _run_lane(self, run_id: str) -> None:
        """Every machine of an /all run at once, one view for all, each answer on its own."""
        try:
            tasks = self._store.run_tasks(run_id)
            if not tasks:
                return
            board = RunBoard(tasks)
            first = next((t for t in tasks if t.view_message_id is not None), tasks[0])
            view = self._make_view(first, shared=tasks)
            view.proxy_id = "/all"
            async with trio.open_nursery() as members:
                for task in tasks:
                    members.start_soon(self._run_member, task, board, view)
                # The view closes once every machine has finished, while the
                # answers are still being delivered: should the manager stop
                # before it is closed, the run's tasks are still open and the
                # next start closes it.
                async with trio.open_nursery() as showing:
                    showing.start_soon(view.run)
                    while not board.all_finished():
                        await board.changed.wait()
                    showing.cancel_scope.cancel()
                until = trio.current_time() + self._config.delivery_give_up_s
                with self._grace.protect() as step:
                    await view.finish(board.final_line(), until=until)
                if not step.cancelled_caught:
                    board.view_closed.set()
        finally:
            self._active_runs.discard(run_id)

    async def _run_member(self, task: TaskRecord, board: RunBoard, view: LiveView) -> None:
        line = board.line(task, view)
        self._run_lines[task.task_id] = line
        try:
            await self._run_member_steps(task, line)
        finally:
            del self._run_lines[task.task_id]

    async def _run_member_steps(self, task: TaskRecord, line: _BoardLine) -> None:
        while task.state != "done":
            await trio.lowlevel.checkpoint()
            try:
                if task.state == "queued":
                    await self._start(task)
                elif task.state in ("sent", "acked"):
                    await self._watch(task, line, until=math.inf)
                elif task.state == "finished":
                    line.update(task.text, "")
                    if line.board.all_finished():
                        # The last to finish keeps its task open until the run's
                        # view is closed: a restart in between would find no open
                        # task of the run and leave its view at "⏳".
                        await line.board.view_closed.wait()
                    await self._delivery.deliver(task, None)
            except StateError as exc:
                log.error("%s; task %s waits and tries again", exc, task.task_id)
                await trio.sleep(STATE_RETRY_S)
            except Exception:  # error boundary: one machine's bug never stops the run
                log.exception("task %s failed in the manager", task.task_id)
                await self._give_up(task)
            line.update(task.text, "")


class RunBoard:
    """An /all run's live view: one line per machine."""

    def __init__(self, tasks: list[TaskRecord]) -> None:
        self.tasks = tasks
        self.changed = trio.Event()  # replaced on every update of a line
        self.view_closed = trio.Event()  # its final line is in the chat

    def all_finished(self) -> bool:
        return all(t.state in ("finished", "done") for t in self.tasks)

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def line(self, task: TaskRecord, view: LiveView) -> _BoardLine:
        return _BoardLine(self, task, view)

    def render(self) -> str:
        return "\n".join(f"{t.target}: {self._state(t)}" for t in self.tasks)

    @staticmethod
    def _state(task: TaskRecord) -> str:
        if task.state in ("finished", "done") and task.outcome is not None:
            return FINISHED_WORDS.get(task.outcome.status, "failed")
        if task.state == "queued":
            return task.step if task.step.startswith("queued:") else "waiting"
        return task.step or "running"

    def final_line(self) -> str:
        statuses = [t.outcome.status if t.outcome else "failed" for t in self.tasks]
        done = statuses.count("completed")
        if done == len(statuses):
            mark = "✅ Done"
        elif "interrupted" in statuses:
            mark = "⏹ Cancelled"
        else:
            mark = "⚠️ Failed"
        return f"{mark} · {done}/{len(statuses)} machines answered"


FINISHED_WORDS: Final = {
    "completed": "✅ done",
    "interrupted": "⏹ cancelled",
    "timeout": "⏱ timed out",
    "failed": "⚠️ failed",
}


class _BoardLine:
    def __init__(self, board: RunBoard, task: TaskRecord, view: LiveView) -> None:
        self._board, self._task, self._view = board, task, view

    @property
    def board(self) -> RunBoard:
        return self._board

    def update(self, text: str, step: str) -> None:
        if step:
            self._task.step = step
        finished = sum(1 for t in self._board.tasks if t.state in ("finished", "done"))
        self._view.update(self._board.render(), f"{finished}/{len(self._board.tasks)} finished")
        self._board.poke()
