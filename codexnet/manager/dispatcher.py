"""The task journal in motion: what goes to which proxy, and what comes back.

The dispatcher is the hub's listener. It owns the delivery rules between the
manager and its proxies (docs/ARCHITECTURE.md, "Delivery"):

* a task is journalled (with its prompt) before it is sent, and sent again on
  every reconnect of its proxy until the proxy acknowledges it (`task_ack`);
  the proxy drops repeats, so sending again is always safe;
* a task the proxy acknowledged is never sent again; it ends with the proxy's
  result, or when the proxy positively says it no longer has it (its `hello`
  lists neither the task nor its result);
* a result is stored durably before `result_ack`; a repeated or late result
  is acknowledged and dropped;
* `task_cancel` and `approval_decision` are kept until `cancel_ack` /
  `decision_ack` and re-sent on every reconnect;
* every frame naming a task is checked against the task's owner: a proxy
  can only speak for its own tasks;
* at most `max_open_approvals` questions of one task wait in its chat: a
  further new request is declined at once (one WARNING per task), so a
  runaway or hostile proxy cannot flood the chat with buttons.

Conversations (`conversation.py`) decide when a task is dispatched and what
the chat sees; the dispatcher only moves state and frames.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from codexnet.db import StateError
from codexnet.manager.hub import Hub, ProxyConn
from codexnet.manager.store import ApprovalRecord, ManagerStore, Outcome, TaskRecord
from codexnet.protocol import (
    CLOSE_FOREIGN,
    MAX_FILE_NAME_CHARS,
    ApprovalDecision,
    ApprovalRequest,
    CancelAck,
    DecisionAck,
    FileFetch,
    FilePart,
    FileRef,
    Hello,
    ProxyFrame,
    QueryResult,
    ReadResult,
    ResultAck,
    Task,
    TaskAck,
    TaskCancel,
    TaskEvent,
    TaskResult,
)

log = logging.getLogger(__name__)

FOREIGN_LOG_EVERY_S: Final = 60.0
FOREIGN_CLOSE_AFTER: Final = 5  # frames for other proxies' tasks before the link is closed

ApprovalHandler = Callable[[TaskRecord, ApprovalRequest], Awaitable[None]]
FileFetchHandler = Callable[[ProxyConn, TaskRecord, FileFetch], Awaitable[None]]
ReplyHandler = Callable[[ProxyConn, QueryResult | ReadResult], None]


async def _no_approvals(task: TaskRecord, request: ApprovalRequest) -> None:
    log.warning("task %s: no approval handler; the request will time out", task.task_id)


class Dispatcher:
    def __init__(self, store: ManagerStore, hub: Hub, *, max_open_approvals: int = 3) -> None:
        self._store = store
        self._hub = hub
        # The approval handler stores each question it asks (state "open")
        # before it returns: that is what the cap counts.
        self.on_approval: ApprovalHandler = _no_approvals
        self.max_open_approvals = max_open_approvals
        # The workspace (machine_requests.py): a task's files, and answers to questions.
        self.on_file_fetch: FileFetchHandler | None = None
        self.on_reply: ReplyHandler | None = None
        self.on_online: Callable[[str], None] = lambda proxy_id: None
        # A task ended: its slot on its machine is free (the capacity queue moves).
        self.on_finished: Callable[[TaskRecord], None] = lambda task: None
        self.workdirs: dict[str, str] = {}  # proxy → its codex_cwd (from its hello)
        self.nursery: trio.Nursery | None = None  # for work that must not hold up a link
        self._foreign_logged: dict[str, float] = {}
        self._flood_logged: set[str] = set()  # tasks whose surplus approvals were logged
        self._storing: dict[str, trio.Event] = {}  # tasks whose end is being committed
        hub.listener = self

    # ------------------------------------------------------------------ outgoing

    async def dispatch(self, task: TaskRecord, proxy_id: str, thread_id: str | None) -> None:
        """Hand `task` to `proxy_id` (journalled first; sent now if it is online)."""
        await self._store.mark_dispatched(task, proxy_id, thread_id)
        task.poke()
        await self.send_task(task)

    async def send_task(self, task: TaskRecord) -> None:
        """Send a journalled, dispatched task now, if its proxy is online."""
        assert task.proxy_id is not None
        await self._hub.send(task.proxy_id, self._task_frame(task))

    async def finish(self, task: TaskRecord, outcome: Outcome) -> None:
        """End `task` here (a manager-side failure, or the proxy's result); raises
        `StateError` if it cannot be stored, and then the task is as it was."""
        await self._stored(task)
        if task.state in ("finished", "done"):
            return
        # Until committed, anything else that would end the task, or acknowledge
        # its result, waits (`_stored`): the commit may yet fail and undo this.
        self._storing[task.task_id] = storing = trio.Event()
        try:
            await self._store.mark_finished(task, outcome)
        finally:
            del self._storing[task.task_id]
            storing.set()
        self._flood_logged.discard(task.task_id)
        task.poke()
        self.on_finished(task)

    async def request_cancel(self, task: TaskRecord) -> None:
        """The person asked to stop `task`; a queued one is ended by its conversation."""
        if task.cancel or task.state in ("finished", "done"):
            return
        await self._store.set_cancel(task, "requested")
        task.poke()
        if task.state in ("sent", "acked") and task.proxy_id:
            await self._hub.send(task.proxy_id, TaskCancel(task.task_id))

    async def send_decision(self, approval: ApprovalRecord) -> None:
        task = self._store.tasks.get(approval.task_id)
        if task is None or task.proxy_id is None or approval.decision is None:
            return
        await self._hub.send(task.proxy_id, self._decision_frame(approval))

    def _task_frame(self, task: TaskRecord) -> Task:
        files = [
            FileRef(
                a.index,
                a.name[:MAX_FILE_NAME_CHARS],  # the proxy shortens it further
                a.size,
                a.sha256 or "",
                "photo" if a.kind == "photo" else "document",
            )
            for a in task.files
        ]
        return Task(
            task.task_id,
            task.chat_id,
            task.prompt,
            task.thread_id,
            task.timeout_s,
            model=task.model,
            effort=task.effort,
            cwd=task.cwd,
            files=files,
        )

    @staticmethod
    def _decision_frame(approval: ApprovalRecord) -> ApprovalDecision:
        return ApprovalDecision(
            approval.task_id,
            approval.approval_id,
            approval.decision,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ hub events

    async def proxy_online(self, conn: ProxyConn, hello: Hello) -> None:
        """Reconcile with what the proxy says it holds; send what it has not acknowledged."""
        self.workdirs[conn.proxy_id] = hello.workdir
        held = set(hello.running) | set(hello.finished)
        mine = [t for t in self._store.open_tasks() if t.proxy_id == conn.proxy_id]
        for task in mine:
            if task.state == "sent":
                await conn.send(self._task_frame(task))
            elif task.state == "acked" and task.task_id not in held and conn.took_over:
                # The connection this one replaced stopped answering but may
                # still be a live proxy holding the task (one config started
                # twice): not failed on this hello's word; its deadline ends it.
                log.info(
                    "task %s: not listed by proxy %r's new connection; it replaced one "
                    "that may still hold it",
                    task.task_id,
                    conn.proxy_id,
                )
            elif task.state == "acked" and task.task_id not in held:
                log.warning(
                    "task %s: proxy %r no longer has it (its state was reset?)",
                    task.task_id,
                    conn.proxy_id,
                )
                await self.finish(
                    task,
                    Outcome(
                        "failed",
                        line=(
                            f"⚠️ proxy {conn.proxy_id} no longer has this task (its state was "
                            "lost or reset); please send it again"
                        ),
                    ),
                )
        for task in mine:  # cancels after the tasks they refer to
            # Also for a task already ended here (withdrawn while its proxy was
            # away): if it reached the proxy after all, it must not run on.
            if task.cancel == "requested":
                await conn.send(TaskCancel(task.task_id))
        for approval in list(self._store.approvals.values()):
            owner_task = self._store.tasks.get(approval.task_id)
            owner = owner_task.proxy_id if owner_task else None
            if owner == conn.proxy_id and approval.decision and not approval.decision_acked:
                await conn.send(self._decision_frame(approval))
        for task in mine:
            task.poke()  # live views: the machine is back
        self.on_online(conn.proxy_id)  # questions asked while it was away go again

    def proxy_offline(self, conn: ProxyConn) -> None:
        for task in self._store.open_tasks():
            if task.proxy_id == conn.proxy_id:
                task.poke()

    async def on_frame(self, conn: ProxyConn, frame: ProxyFrame) -> None:
        if isinstance(frame, QueryResult | ReadResult):
            if self.on_reply is not None:
                self.on_reply(conn, frame)
            return
        task_id = getattr(frame, "task_id", None)
        if task_id is None:
            return
        task = self._store.tasks.get(task_id)
        if task is None:
            if isinstance(frame, FileFetch):
                # Ended here meanwhile (withdrawn, say): its files are gone for good.
                error = "the manager no longer has this task"
                await conn.send(FilePart(task_id, frame.index, frame.offset, error=error))
                return
            if isinstance(frame, TaskResult):
                # Finished long ago (a late duplicate) or never ours: the proxy may let it go.
                log.debug("result for a task not open here: %s", task_id)
                await conn.send(ResultAck(task_id))
            else:
                log.debug("%s for a task not open here: %s", frame.type, task_id)
            return
        if task.proxy_id != conn.proxy_id:
            await self._foreign(conn, task, frame)
            return
        if isinstance(frame, TaskAck):
            if task.state == "sent":
                self._store.mark_acked(task)
                task.poke()
        elif isinstance(frame, TaskEvent):
            if self._apply(task, frame):
                task.poke()
        elif isinstance(frame, ApprovalRequest):
            if task.state in ("sent", "acked"):
                await self._approval_request(conn, task, frame)
        elif isinstance(frame, FileFetch):
            if self.on_file_fetch is not None:
                await self.on_file_fetch(conn, task, frame)
        elif isinstance(frame, TaskResult):
            # In its own task: the reader goes on while the result is committed,
            # so results arriving together share one commit instead of queueing
            # behind each other's fsync (and behind them, the link's other frames).
            assert self.nursery is not None, "Dispatcher.nursery is set when serving"
            self.nursery.start_soon(self._store_result, conn, task, frame)
        elif isinstance(frame, CancelAck):
            if task.cancel == "requested":
                self._store.cancel_acked(task)
                task.poke()
        elif isinstance(frame, DecisionAck):
            approval = self._store.approval(task_id, frame.approval_id)
            if approval is not None and not approval.decision_acked:
                approval.decision_acked = True
                await self._store.save_approval(approval, wait=False)
                task.poke()

    async def _approval_request(
        self, conn: ProxyConn, task: TaskRecord, request: ApprovalRequest
    ) -> None:
        """Ask (once per approval id), unless the task has its fill of open questions."""
        if self._store.approval(task.task_id, request.approval_id) is None:
            waiting = [a for a in self._store.approvals_of(task.task_id) if a.state == "open"]
            if len(waiting) >= self.max_open_approvals:
                # Not stored: should the decline be lost, the proxy asks again
                # after its reconnect and is answered the same way (or asked,
                # if a question was answered meanwhile).
                if task.task_id not in self._flood_logged:
                    self._flood_logged.add(task.task_id)
                    log.warning(
                        "task %s: proxy %r asks for more than %d approvals at once "
                        "(max_open_approvals_per_task); declining the extra ones",
                        task.task_id,
                        conn.proxy_id,
                        self.max_open_approvals,
                    )
                await conn.send(ApprovalDecision(task.task_id, request.approval_id, "decline"))
                return
        await self.on_approval(task, request)

    async def _store_result(self, conn: ProxyConn, task: TaskRecord, frame: TaskResult) -> None:
        # While an end of the task is being committed (a copy of this result, the
        # manager's timeout) this waits: it must not be acknowledged before that
        # commit, and if the commit failed (the task is then as it was) this
        # result is the one stored.
        await self._stored(task)
        if task.state in ("sent", "acked"):
            try:
                await self.finish(
                    task,
                    Outcome(
                        frame.status,
                        text=frame.text,
                        error=frame.error,
                        thread_id=frame.thread_id,
                        usage=dict(frame.usage),
                        diff_bytes=frame.diff_bytes,
                    ),
                )
            except StateError as exc:
                # Not stored, so not acknowledged: drop the link so the proxy sends it again.
                log.error("%s; dropping proxy %r so it sends the result again", exc, conn.proxy_id)
                conn.scope.cancel()
                return
        # Committed, and the answer is on its way to the chat; once it would also
        # survive a power cut, and only then, the proxy may forget it.
        try:
            await self._store.db.sync()
        except StateError as exc:
            log.error("%s; the result of task %s is not acknowledged yet", exc, task.task_id)
            return
        await conn.send(ResultAck(task.task_id))

    async def _stored(self, task: TaskRecord) -> None:
        """Wait while an end of `task` is being committed (`finish`)."""
        while (storing := self._storing.get(task.task_id)) is not None:
            await storing.wait()

    @staticmethod
    def _apply(task: TaskRecord, event: TaskEvent) -> bool:
        """Apply a live event once; False for a duplicate or stale one."""
        if event.seq <= task.last_seq:
            return False
        task.last_seq = event.seq
        if event.kind == "delta":
            task.text += event.text
        elif event.kind == "snapshot":
            task.text = event.text
        elif event.kind == "progress":
            task.step = event.text
        return True

    async def _foreign(self, conn: ProxyConn, task: TaskRecord, frame: ProxyFrame) -> None:
        """A proxy spoke for a task it does not own: drop it, say so (rate-limited);
        after FOREIGN_CLOSE_AFTER such frames the connection is closed."""
        conn.foreign_frames += 1
        if conn.foreign_frames >= FOREIGN_CLOSE_AFTER:
            log.warning(
                "proxy %r sent %d frames for other proxies' tasks: disconnecting it",
                conn.proxy_id,
                conn.foreign_frames,
            )
            await conn.refuse(CLOSE_FOREIGN, "frames for tasks of another proxy")
            return
        now = time.monotonic()
        if now - self._foreign_logged.get(conn.proxy_id, -FOREIGN_LOG_EVERY_S) >= (
            FOREIGN_LOG_EVERY_S
        ):
            self._foreign_logged[conn.proxy_id] = now
            log.warning(
                "proxy %r sent %s for task %s, which belongs to %r: dropped",
                conn.proxy_id,
                frame.type,
                task.task_id,
                task.proxy_id,
            )


async def wait_task_change(task: TaskRecord, hub: Hub, deadline: float) -> None:
    """Sleep until `task` changes, a proxy goes on/offline, or the trio `deadline`."""
    changed = task.changed
    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:

            async def on(event: Callable[[], Awaitable[None]]) -> None:
                await event()
                nursery.cancel_scope.cancel()

            nursery.start_soon(on, changed.wait)
            nursery.start_soon(on, hub.wait_change)
