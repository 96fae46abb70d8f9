"""The proxy service: connect out to the manager and run its tasks on Codex.

Task tree (every task lives in a nursery and nothing outlives its parent):

    ProxyService.run
    ├── Database.run               the state writer (proxy.db)
    ├── AppServer.serve            the supervised codex child
    ├── _connect_loop              connect → hello → serve frames → reconnect with backoff
    │   └── per connection: _heartbeat (ping; a silent link is dropped) + the reader
    ├── _run_task (one per task)   lives across reconnects, so a dropped socket
    │   └── _forward               does not kill a running turn
    └── queries and reads          answered in the background (`queries.py`)

A task with files fetches them first (`incoming.py`: pulled chunk by chunk
into `state_dir/incoming/`, resumed after a reconnect or a restart), then
takes its slot, is marked started, and places them into its working directory
(`workspace.py`) before the turn starts.

Delivery (docs/ARCHITECTURE.md): a task is stored before its `task_ack`, and
marked started before its turn starts, so it never runs twice on the model,
not even across a crash. Results are stored (committed as they are sent) and
re-sent after every reconnect until the manager's `result_ack`. Cancels and
approval decisions are acknowledged (`cancel_ack`, `decision_ack`) and applied
once. The live text is re-sent as one `snapshot` event after a reconnect.
"""

from __future__ import annotations

import collections
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Final

import attrs
import trio
from trio_websocket import CloseReason, ConnectionClosed, HandshakeError, WebSocketConnection

import codexnet
from codexnet.backoff import backoff
from codexnet.cli import find_leaf, first_leaf
from codexnet.config import ProxyConfig
from codexnet.db import StateError
from codexnet.events import wait_first
from codexnet.protocol import (
    CLOSE_DUPLICATE,
    CLOSE_FOREIGN,
    CLOSE_PROTOCOL_VERSION,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_PROXY,
    ID_RE,
    MAX_VERSION_CHARS,
    PROTOCOL_VERSION,
    PROXY_PING_FRACTION,
    ApprovalDecision,
    ApprovalRequest,
    CancelAck,
    DecisionAck,
    FilePart,
    Hello,
    Load,
    ProtocolError,
    ProxyFrame,
    Query,
    ReadFile,
    ResultAck,
    Task,
    TaskAck,
    TaskCancel,
    TaskEvent,
    TaskResult,
    Welcome,
    check_frame,
    decode_manager_frame,
    encode,
    usable_usage,
)
from codexnet.proxy.appserver import AppServer, AppServerUnavailable, Turn, TurnSettings
from codexnet.proxy.incoming import FetchFailed, Incoming, files_notice, prompt_with_files
from codexnet.proxy.queries import answer_query, answer_read
from codexnet.proxy.server_requests import Approval
from codexnet.proxy.store import ProxyStore, StoredTask
from codexnet.proxy.workspace import Workspace, WorkspaceError, safe_file_name
from codexnet.ratelog import Throttle
from codexnet.resource_errors import resource_problem
from codexnet.statelock import hold_state_lock
from codexnet.wsclient import connect_websocket

log = logging.getLogger(__name__)
_throttled = Throttle()

HELLO_TIMEOUT_S: Final = 15.0
RECONNECT_BACKOFF_S: Final = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
# Refused because this id is connected already (the same config started twice)
# or for speaking for another proxy's tasks: coming back fast cannot help.
REFUSED_BACKOFF_S: Final = (60.0, 120.0, 300.0)
RECONNECT_AFTER_DROP_S: Final = 0.5
FORWARD_INTERVAL_S: Final = 0.3  # at most ~3 event batches per second per task
FATAL_CLOSE_CODES: Final = {CLOSE_UNAUTHORIZED, CLOSE_UNKNOWN_PROXY, CLOSE_PROTOCOL_VERSION}
HELD_OFF_CLOSE_CODES: Final = {CLOSE_DUPLICATE, CLOSE_FOREIGN}


class ProxyRefused(Exception):
    """The manager refused this proxy for good (wrong token, unknown id, version)."""


class LinkDead(Exception):
    """Nothing came from the manager for `heartbeat_timeout_s`: the link is half-dead."""


@attrs.define(eq=False)
class _Running:
    task: Task
    deadline: float  # trio time: the task's timeout counts from when it was accepted
    cancel: trio.Event = attrs.Factory(trio.Event)
    changed: trio.Event = attrs.Factory(trio.Event)
    slot: trio.Event = attrs.Factory(trio.Event)  # set when it may run (capacity)
    started_stored: bool = False  # the store says started (written at accept)
    turn: Turn | None = None
    seq: int = 0
    sent_text: str = ""
    sent_step: str = ""
    approvals: dict[str, tuple[ApprovalRequest, trio.Event, list[str]]] = attrs.Factory(dict)
    staged: list[Path] = attrs.Factory(list)  # its files, fetched (incoming/)
    # Its working directory, resolved while it was being stored (see _accept_task),
    # or why it could not be; None: resolved before the turn.
    cwd: Path | WorkspaceError | OSError | None = None

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def poke(self) -> None:
        self.changed.set()


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds until the next ping: about half the timeout (`PROXY_PING_FRACTION`),
    never more, jittered so a fleet spreads out."""
    return timeout_s * PROXY_PING_FRACTION * random.uniform(0.85, 1.0)


class ProxyService:
    def __init__(self, config: ProxyConfig, app: AppServer, *, store: ProxyStore | None = None):
        self._config = config
        self._app = app
        self._store = store if store is not None else ProxyStore(config.state_dir)
        self._workspace = Workspace(config.codex_cwd, config.roots, config.state_dir)
        self._incoming = Incoming(self._workspace, self._send)
        self._ws: WebSocketConnection | None = None
        self._send_lock = trio.StrictFIFOLock()
        self._running: dict[str, _Running] = {}
        self._outbox: dict[str, TaskResult] = {}
        # Tasks waiting for one of `capacity` slots, in the order they were
        # accepted (a semaphore would let whichever runner runs first win).
        self._waiting: collections.deque[_Running] = collections.deque()
        self._busy = 0
        self._ssl_context = config.ssl_context()
        self._last_heard = 0.0  # trio time of the last frame or pong from the manager
        self.rtt: float | None = None  # the last heartbeat's round trip, seconds
        self.connected = trio.Event()  # set while a session with the manager is up
        # Set at the first welcome and never cleared (`connected` is replaced on
        # every disconnect): sd_notify READY waits for it.
        self.welcomed = trio.Event()

    async def run(self) -> None:
        """Serve until cancelled; raises `ProxyRefused` when the manager refuses us.

        Raises `StateError` (before anything starts) when `proxy.db` is unusable.
        """
        with hold_state_lock(self._config.state_dir, "proxy"):
            recovered = self._store.open()
            try:
                async with self._store.db.serving(), trio.open_nursery() as nursery:
                    await nursery.start(self._app.serve)
                    self._recover(recovered, nursery)
                    await self._connect_loop(nursery)
            finally:
                self._store.db.close()

    def _recover(self, recovered: list[StoredTask], tasks: trio.Nursery) -> None:
        for stored in recovered:
            if stored.result is not None:
                self._outbox[stored.task.task_id] = stored.result
                self._workspace.discard_staging(stored.task.task_id)
            else:  # accepted, never started: the model has not seen it, run it now
                self._start_runner(stored.task, stored.accepted, tasks)
        # Diffs are kept as long as their task is remembered (the tombstones' days).
        self._workspace.prune_diffs(self._store.tombstones | set(self._outbox))
        if recovered:
            log.info(
                "state: %d task(s) to run, %d result(s) to send from before the restart",
                len(self._running),
                len(self._outbox),
            )

    # ------------------------------------------------------------------ connection

    async def _connect_loop(self, tasks: trio.Nursery) -> None:
        failures = 0
        held_off_times = 0
        while True:
            refused: str | None = None
            had_session = False
            held_off = False
            try:
                async with connect_websocket(
                    self._config.manager_ws, ssl_context=self._ssl_context
                ) as ws:
                    await self._session(ws, tasks)
            except* ConnectionClosed as group:
                refused = _refusal(group)
                held_off = _close_code(group) in HELD_OFF_CLOSE_CODES
                log.warning("connection to the manager closed: %s", _close_reason(group))
            except* (HandshakeError, OSError, trio.TooSlowError, trio.BrokenResourceError) as group:
                problem = resource_problem(group)
                if problem is not None:  # our fault, not the network's: once a minute
                    _throttled.log(
                        log,
                        logging.WARNING,
                        "connect",
                        "cannot reach the manager at %s: %s",
                        self._config.manager_ws,
                        problem,
                    )
                else:
                    log.warning(
                        "cannot reach the manager at %s: %s", self._config.manager_ws, _first(group)
                    )
            except* ProtocolError as group:
                log.error("manager sent a bad frame: %s", _first(group))
            except* LinkDead as group:
                log.warning("%s; dropping the link and reconnecting", _first(group))
            finally:
                had_session = self.connected.is_set()
                self._ws = None
                self.connected = trio.Event()
            if refused is not None:
                raise ProxyRefused(refused)
            if held_off:
                delay = backoff(REFUSED_BACKOFF_S, held_off_times)
                held_off_times += 1
                log.warning("retrying in %.0f s", delay)
                await trio.sleep(delay * random.uniform(0.9, 1.1))
                continue
            held_off_times = 0
            if had_session:
                # A link that worked just broke: come back at once (what it
                # carried is replayed), spread over a moment for a whole fleet.
                failures = 0
                await trio.sleep(random.uniform(0, RECONNECT_AFTER_DROP_S))
                continue
            delay = backoff(RECONNECT_BACKOFF_S, failures)
            failures += 1
            # Jitter spreads a fleet of proxies reconnecting after a manager restart.
            await trio.sleep(delay * random.uniform(0.7, 1.3))

    async def _session(self, ws: WebSocketConnection, tasks: trio.Nursery) -> None:
        hello = self._hello()
        await ws.send_message(encode(hello))
        with trio.fail_after(HELLO_TIMEOUT_S):
            first = decode_manager_frame(await ws.get_message())
        if not isinstance(first, Welcome):
            raise ProtocolError(f"expected welcome, got {first.type!r}")
        log.info(
            "connected to the manager at %s as %r", self._config.manager_ws, self._config.proxy_id
        )
        self._last_heard = trio.current_time()
        self._ws = ws
        self.connected.set()
        self.welcomed.set()
        async with trio.open_nursery() as session:
            session.start_soon(self._heartbeat, ws)
            session.start_soon(self._report_health, (hello.health, hello.health_detail))
            await self._replay()
            while True:
                raw = await ws.get_message()
                self._last_heard = trio.current_time()
                try:
                    frame = decode_manager_frame(raw)
                except ProtocolError as exc:
                    # Ignored, not a reconnect: whatever the manager must get
                    # across it sends again after every reconnect, so dropping
                    # the link would only bring the same frame back at once.
                    # Unanswered, it is kept (and retried) by the manager.
                    log.warning("ignoring a bad frame from the manager: %s", exc)
                    continue
                await self._on_frame(frame, tasks)

    async def _heartbeat(self, ws: WebSocketConnection) -> None:
        """Ping the manager; a link silent for `heartbeat_timeout_s` is dropped.

        A half-dead link (the laptop slept, a NAT entry expired) keeps its socket
        open while bytes vanish: only a missing pong shows it. `LinkDead` makes
        `_connect_loop` reconnect, and the outbox is replayed on the new link.
        """
        timeout = self._config.heartbeat_timeout_s
        while True:
            await trio.sleep(heartbeat_interval(timeout))
            sent = trio.current_time()
            with trio.move_on_at(self._last_heard + timeout):
                await ws.ping()
                self._last_heard = trio.current_time()
                self.rtt = self._last_heard - sent
                continue
            # Raised, not returned: the link is dropped without the close
            # handshake that a dead link can never complete.
            raise LinkDead(
                f"no answer from the manager for {trio.current_time() - self._last_heard:.0f} s"
            )

    async def _on_frame(self, frame: object, tasks: trio.Nursery) -> None:
        if isinstance(frame, Task):
            await self._accept_task(frame, tasks)
        elif isinstance(frame, TaskCancel):
            running = self._running.get(frame.task_id)
            if running is not None and not running.cancel.is_set():
                log.info("task %s: cancel requested", frame.task_id)
                running.cancel.set()
            # Acknowledged whatever we know: a finished or unknown task has
            # nothing left to cancel, and the manager must stop re-sending.
            await self._send(CancelAck(frame.task_id))
        elif isinstance(frame, ApprovalDecision):
            self._decide(frame)
            await self._send(DecisionAck(frame.task_id, frame.approval_id))
        elif isinstance(frame, ResultAck):
            if self._outbox.pop(frame.task_id, None) is not None:
                self._store.acked(frame.task_id)
            else:
                log.debug("result_ack for a result not held here: %s", frame.task_id)
        elif isinstance(frame, FilePart):
            await self._incoming.on_part(frame)
        elif isinstance(frame, Query):
            tasks.start_soon(self._answer, partial(answer_query, frame, self._app, self._workspace))
        elif isinstance(frame, ReadFile):
            tasks.start_soon(self._answer, partial(answer_read, frame, self._workspace))

    async def _answer(self, ask: Callable[[], Awaitable[ProxyFrame]]) -> None:
        """A query or read, answered in the background (the reader goes on meanwhile)."""
        try:
            answer = await ask()
        except Exception:  # error boundary: a bug here never ends the proxy
            log.exception("answering the manager failed")
            return
        await self._send(answer)

    def _hello(self) -> Hello:
        return Hello(
            proxy_id=self._config.proxy_id,
            token=self._config.proxy_token,
            protocol=PROTOCOL_VERSION,
            capacity=self._config.capacity,
            labels=list(self._config.labels),
            version=f"codexnet {codexnet.__version__}; codex {self._app.version or '?'}"[
                :MAX_VERSION_CHARS
            ],
            running=list(self._running),
            finished=list(self._outbox),
            workdir=str(self._config.codex_cwd),
            health=self._app.health,
            health_detail=self._app.health_detail[:200],
        )

    def _load(self) -> Load:
        return Load(
            len(self._running),
            self._config.capacity,
            health=self._app.health,
            health_detail=self._app.health_detail[:200],
        )

    async def _report_health(self, told: tuple[str, str]) -> None:
        """Tell the manager at once when the app-server stops or comes back
        (`told`: what the hello said; a change since then goes out first)."""
        while True:
            changed = self._app.health_changed
            now = (self._app.health, self._app.health_detail[:200])
            if now != told:
                told = now
                await self._send(self._load())
                continue
            await changed.wait()

    async def _replay(self) -> None:
        """After a (re)connect: resend unacknowledged results and the live state."""
        for result in list(self._outbox.values()):
            await self._send(result)
        self._incoming.resume()
        for running in list(self._running.values()):
            running.sent_text = ""
            running.sent_step = ""
            running.poke()
            for request, _, _ in list(running.approvals.values()):
                await self._send(request)

    async def _send(self, frame: ProxyFrame) -> bool:
        """Send if connected; False when the frame could not go out.

        Nothing is queued here: what must arrive is kept elsewhere (the outbox,
        the running tasks) and replayed after the next connect.
        """
        ws = self._ws
        if ws is None:
            return False
        try:
            check_frame(frame)
        except ProtocolError as exc:
            # The manager would close the link on it (and get it again after
            # the reconnect): a bug here, said loudly, and the link kept.
            log.error("not sending a frame the manager would refuse: %s", exc)
            return False
        try:
            async with self._send_lock:
                await ws.send_message(encode(frame))
        except ConnectionClosed:
            return False
        return True

    # ------------------------------------------------------------------ tasks

    async def _accept_task(self, task: Task, tasks: trio.Nursery) -> None:
        task_id = task.task_id
        if task_id in self._outbox:
            # The manager missed our result (it restarted); send it again.
            await self._ack(task_id)
            await self._send(self._outbox[task_id])
            return
        if task_id in self._running or task_id in self._store.tombstones:
            await self._ack(task_id)  # a repeat: never run twice
            return
        accepted = time.time()
        # A free slot is taken now, and the task stored as started along with
        # being accepted: one write, not two, before the turn starts.
        # (A task with files fetches them before it takes a slot.)
        start_now = self._busy < self._config.capacity and not self._waiting and not task.files
        if start_now:
            self._busy += 1
        # Committed before the turn starts, and power-safe before it is
        # acknowledged: once the manager hears task_ack it never sends the task
        # again, so nothing short of a power cut during that fsync can make
        # this proxy forget it (store.py says what such a cut costs).
        # Meanwhile a task that runs at once has its working directory resolved
        # (on a thread): the two waits overlap instead of adding up before the
        # turn starts.
        cwd: list[Path | WorkspaceError | OSError] = []
        failed: StateError | None = None
        async with trio.open_nursery() as nursery:
            if start_now:
                nursery.start_soon(self._resolve_cwd, task, cwd)
            try:
                await self._store.accept(task, accepted, started=start_now)
            except StateError as exc:
                failed = exc
        if failed is not None:
            if start_now:
                self._busy -= 1
                self._grant()
            log.error("%s; task %s not taken (the manager will send it again)", failed, task_id)
            return
        self._start_runner(
            task, accepted, tasks, holding_slot=start_now, cwd=cwd[0] if cwd else None
        )
        # The turn starts meanwhile: the fsync is not in front of the answer.
        if not await self._ack(task_id):
            return
        # The count of tasks held here changed (the runner does not wait for
        # this: its turn starts meanwhile).
        await self._send(self._load())
        log.info(
            "task %s: accepted (chat %s, thread %s)",
            task_id,
            task.chat_id,
            task.thread_id or "new",
        )

    async def _ack(self, task_id: str) -> bool:
        """`task_ack`, once the task's row would survive a power cut; False if it cannot.

        Not acknowledged, the task is sent again after the next reconnect, and
        acknowledged then as a repeat (it runs here meanwhile, once).
        """
        try:
            await self._store.sync()
        except StateError as exc:
            log.error("%s; task %s is not acknowledged yet", exc, task_id)
            return False
        await self._send(TaskAck(task_id))
        return True

    async def _resolve_cwd(self, task: Task, into: list[Path | WorkspaceError | OSError]) -> None:
        try:
            into.append(await trio.to_thread.run_sync(self._workspace.working_dir, task.cwd))
        except (WorkspaceError, OSError) as exc:
            into.append(exc)  # said by the runner, as when it resolves the directory itself

    def _start_runner(
        self,
        task: Task,
        accepted: float,
        tasks: trio.Nursery,
        *,
        holding_slot: bool = False,
        cwd: Path | WorkspaceError | OSError | None = None,
    ) -> None:
        elapsed = max(0.0, time.time() - accepted)
        running = _Running(task, deadline=trio.current_time() + task.timeout_s - elapsed, cwd=cwd)
        if holding_slot:  # the slot was taken, and the start stored, at accept
            running.slot.set()
            running.started_stored = True
        self._running[task.task_id] = running
        tasks.start_soon(self._run_task, running)

    async def _run_task(self, running: _Running) -> None:
        task = running.task
        result: TaskResult
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._forward, running)
            result = await self._run_within_capacity(running)
            nursery.cancel_scope.cancel()
        # No last live update: the result carries the whole text, and the
        # manager shows that instead (an event first would only delay it).
        # Committed while it is sent, and kept until result_ack, even across a
        # restart. Sending it first loses nothing: the manager stores a result
        # before result_ack and drops a repeat, so one that reaches it before
        # our commit is its answer; a crash before our commit is reported after
        # the restart as a cut-short task, as when the commit came first, and
        # if the manager had the result by then that report is a late repeat.
        stored = None
        try:
            stored = self._store.finish(result)
        except StateError as exc:
            log.error("%s; the result of task %s is kept in memory only", exc, task.task_id)
        if task.files:
            await trio.to_thread.run_sync(self._workspace.discard_staging, task.task_id)
        self._outbox[task.task_id] = result
        del self._running[task.task_id]
        await self._send(result)
        if stored is not None:
            try:
                await stored.committed()
            except StateError as exc:
                log.error("%s; the result of task %s is kept in memory only", exc, task.task_id)
        took = running.turn.seconds if running.turn is not None else None
        log.info(
            "task %s: %s%s%s",
            task.task_id,
            result.status,
            f" ({result.error})" if result.error else "",
            "" if took is None else f" (codex's turn: {_duration(took)})",
        )
        await self._send(self._load())

    async def _run_within_capacity(self, running: _Running) -> TaskResult:
        task = running.task
        with trio.move_on_at(running.deadline) as deadline:
            if task.files:
                failed = await self._fetch_files(running)
                if failed is not None:
                    return failed
            if not running.slot.is_set() and self._busy >= self._config.capacity:
                step = f"queued: all {self._config.capacity} slots of this machine are busy"
                await self._send(TaskEvent(task.task_id, running.next_seq(), "progress", step))
            if not await self._acquire_or_cancel(running):
                return TaskResult(task.task_id, "interrupted", thread_id=task.thread_id)
            try:
                # Marked before the turn starts: after a crash from here on, the
                # model may have seen the prompt, so it is never run again.
                try:
                    if not running.started_stored:
                        await self._store.started(task.task_id)
                except StateError as exc:
                    return TaskResult(
                        task.task_id,
                        "failed",
                        error=f"the proxy cannot record its state ({exc}); nothing was run",
                        thread_id=task.thread_id,
                    )
                return await self._execute(running)
            finally:
                self._busy -= 1
                self._grant()
        assert deadline.cancelled_caught
        turn = running.turn
        return TaskResult(
            task.task_id,
            "timeout",
            text=turn.text if turn else "",
            thread_id=turn.thread_id if turn else task.thread_id,
            error=f"no answer within {task.timeout_s:.0f} s",
        )

    async def _fetch_files(self, running: _Running) -> TaskResult | None:
        """Fetch the task's files from the manager; a result if that ends the task."""
        task = running.task
        total = sum(ref.size for ref in task.files)
        step = f"receiving {len(task.files)} file(s), {total / 1e6:.1f} MB"
        await self._send(TaskEvent(task.task_id, running.next_seq(), "progress", step))
        try:
            staged = await self._incoming.fetch(task, running.cancel)
        except FetchFailed as exc:
            return TaskResult(task.task_id, "failed", error=str(exc), thread_id=task.thread_id)
        if staged is None:
            return TaskResult(task.task_id, "interrupted", thread_id=task.thread_id)
        running.staged = staged
        return None

    def _grant(self) -> None:
        """Give free slots to the longest-waiting tasks."""
        while self._waiting and self._busy < self._config.capacity:
            running = self._waiting.popleft()
            self._busy += 1
            running.slot.set()

    async def _acquire_or_cancel(self, running: _Running) -> bool:
        """Take a capacity slot in turn; False if the task is cancelled while it waits."""
        if running.slot.is_set():  # taken at accept
            if running.cancel.is_set():
                self._leave(running)
                return False
            return True
        if running.cancel.is_set():
            return False
        self._waiting.append(running)
        self._grant()
        try:
            await wait_first(running.slot, running.cancel)
        except BaseException:  # timed out or shutting down while waiting
            self._leave(running)
            raise
        if running.cancel.is_set():
            self._leave(running)
            return False
        return True

    def _leave(self, running: _Running) -> None:
        """Give up the slot, or the place in the queue."""
        if running.slot.is_set():
            self._busy -= 1
            self._grant()
        else:
            self._waiting.remove(running)

    async def _prepare(self, running: _Running) -> tuple[str, TurnSettings, str | None]:
        """The turn's working directory, its files in place, and its prompt.

        Raises `WorkspaceError` (nothing is run): a directory no longer inside
        allowed_roots, a telegram-files/ leading out of them.
        """
        task = running.task
        early, running.cwd = running.cwd, None
        if early is None:
            cwd = await trio.to_thread.run_sync(self._workspace.working_dir, task.cwd)
        elif isinstance(early, Path):
            cwd = early
        else:
            raise early
        placed = []
        for ref, staged in zip(task.files, running.staged, strict=True):
            fallback = "photo.jpg" if ref.kind == "photo" else "file"
            safe = safe_file_name(ref.name, fallback)
            path = await trio.to_thread.run_sync(self._workspace.place, staged, cwd, safe.name)
            placed.append((ref, path, safe.changed))
        settings = TurnSettings(
            cwd=str(cwd),
            model=task.model or self._config.model,
            effort=task.effort or self._config.effort,
            images=tuple(str(path) for ref, path, _ in placed if ref.kind == "photo"),
        )
        if not placed:
            return task.prompt, settings, None
        return prompt_with_files(task.prompt, placed, cwd), settings, files_notice(placed, cwd)

    async def _execute(self, running: _Running) -> TaskResult:
        task = running.task

        def on_turn(turn: Turn) -> None:
            running.turn = turn

        try:
            prompt, settings, files_line = await self._prepare(running)
        except (WorkspaceError, OSError) as exc:
            error = str(exc) if isinstance(exc, WorkspaceError) else f"cannot place a file: {exc}"
            return TaskResult(
                task.task_id, "failed", error=f"{error}; nothing was run", thread_id=task.thread_id
            )
        try:
            outcome = await self._app.run_turn(
                task.thread_id,
                prompt,
                on_change=running.poke,
                on_approval=partial(self._ask_approval, running),
                on_turn=on_turn,
                cancel=running.cancel,
                settings=settings,
            )
        except AppServerUnavailable as exc:
            return TaskResult(task.task_id, "failed", error=str(exc), thread_id=task.thread_id)
        except Exception as exc:  # error boundary: one task's bug never ends the proxy
            log.exception("task %s failed inside the proxy", task.task_id)
            return TaskResult(
                task.task_id, "failed", error=f"proxy error: {exc}", thread_id=task.thread_id
            )
        status = outcome.status
        if status not in ("completed", "failed", "interrupted"):
            status = "failed"
        text = outcome.text
        for notice in (outcome.notice, files_line):
            if notice:
                text = f"{notice}\n\n{text}" if text else notice
        if ID_RE.fullmatch(outcome.thread_id) is None:
            # The manager refuses such a result, on every reconnect: fail it here instead.
            return TaskResult(
                task.task_id,
                "failed",
                text=text,
                error=f"codex named its thread {outcome.thread_id[:40]!r}, not a usable id",
                thread_id=task.thread_id,
            )
        diff_bytes = 0
        if outcome.diff.strip():
            try:
                diff_bytes = await trio.to_thread.run_sync(
                    self._workspace.save_diff, task.task_id, outcome.diff
                )
            except OSError as exc:
                log.warning("task %s: could not keep its diff: %s", task.task_id, exc)
        return TaskResult(
            task.task_id,
            status,  # type: ignore[arg-type]
            text=text,
            thread_id=outcome.thread_id,
            error=outcome.error,
            usage=usable_usage(outcome.usage),
            diff_bytes=diff_bytes,
        )

    async def _forward(self, running: _Running) -> None:
        """Send the turn's new text and step, coalesced to a few batches a second."""
        while True:
            await running.changed.wait()
            running.changed = trio.Event()
            await self._flush(running)
            await trio.sleep(FORWARD_INTERVAL_S)

    async def _flush(self, running: _Running) -> None:
        turn = running.turn
        if turn is None:
            return
        task_id = running.task.task_id
        text = turn.text
        if text != running.sent_text:
            if text.startswith(running.sent_text) and running.sent_text:
                delta = text[len(running.sent_text) :]
                event = TaskEvent(task_id, running.next_seq(), "delta", delta)
            else:
                event = TaskEvent(task_id, running.next_seq(), "snapshot", text)
            if await self._send(event):
                running.sent_text = text
        if turn.step != running.sent_step:
            step = turn.step
            if await self._send(TaskEvent(task_id, running.next_seq(), "progress", step)):
                running.sent_step = step

    async def _ask_approval(self, running: _Running, approval: Approval) -> str:
        """Forward an approval to the manager and wait for the person's decision."""
        # Unique across restarts: the manager keys questions by (task, approval id).
        approval_id = uuid.uuid4().hex[:12]
        request = ApprovalRequest(
            running.task.task_id, approval_id, approval.kind, approval.summary, approval.detail
        )
        decided = trio.Event()
        slot: list[str] = []
        running.approvals[approval_id] = (request, decided, slot)
        try:
            await self._flush(running)  # the text so far goes out before the question
            await self._send(request)
            await wait_first(decided, running.cancel)
        finally:
            del running.approvals[approval_id]
        return slot[0] if slot else "cancel"

    def _decide(self, frame: ApprovalDecision) -> None:
        running = self._running.get(frame.task_id)
        entry = running.approvals.get(frame.approval_id) if running else None
        if entry is None:
            log.debug("decision for an approval no longer open: %s", frame.approval_id)
            return
        _, decided, slot = entry
        if not slot:  # the first decision wins; a repeat is applied once
            slot.append(frame.decision)
        decided.set()


def _duration(seconds: float) -> str:
    """`56.3 ms`, `2.41 s`, `3 min 5 s`: as precise as is worth reading."""
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def _first(group: BaseExceptionGroup[BaseException]) -> str:
    exc = first_leaf(group)
    text = str(exc) or type(exc).__name__
    if exc.__cause__ is not None:  # e.g. BrokenResourceError caused by a TLS verify failure
        text = f"{text}: {exc.__cause__}"
    return text


def _closed_reason(group: BaseExceptionGroup[ConnectionClosed]) -> CloseReason | None:
    """The close frame's code and reason, from wherever in the group it sits."""
    found = find_leaf(
        group, lambda exc: isinstance(exc, ConnectionClosed) and exc.reason is not None
    )
    return found.reason if isinstance(found, ConnectionClosed) else None


def _refusal(group: BaseExceptionGroup[ConnectionClosed]) -> str | None:
    reason = _closed_reason(group)
    if reason is not None and reason.code in FATAL_CLOSE_CODES:
        return (
            f"the manager refused this proxy: {reason.reason or reason.name}"
            f" (close code {reason.code})"
        )
    return None


def _close_code(group: BaseExceptionGroup[ConnectionClosed]) -> int | None:
    reason = _closed_reason(group)
    return reason.code if reason is not None else None


def _close_reason(group: BaseExceptionGroup[ConnectionClosed]) -> str:
    reason = _closed_reason(group)
    if reason is not None:
        return f"{reason.code} {reason.reason or reason.name}"
    return str(first_leaf(group)) or "closed"
