"""Keep one `codex app-server --listen stdio://` child alive and run turns on it.

`AppServer.serve` supervises the child: spawn (own process group), drain
stderr into the log, `initialize`, then wait; when the child dies every turn in
flight fails with a clear reason and a new child is started with backoff. On
shutdown it closes stdin (Codex exits in ~30 ms and marks running turns
interrupted), then SIGTERMs and SIGKILLs the whole group, each step bounded.

`AppServer.run_turn` runs one prompt on a thread: `thread/start` for a new
thread, `thread/resume` for a known one this child has not loaded (yet, or
any more), then `turn/start`, and waits for `turn/completed`. Turns on one
thread are serialised: `turn/start` on a busy thread would silently steer the
running turn. Each turn names its working directory, and its model and
reasoning effort when the conversation chose them (`TurnSettings`):
`turn/start` overrides stick to the thread, so they are sent with every turn,
not once.

`AppServer.call` is one request for the workspace's queries (`model/list`,
`thread/list`, `thread/read`).

Idle threads are unloaded: every loaded thread costs the child about a
megabyte, and a proxy that serves many chats would otherwise keep every
conversation it ever had in memory. A thread unused for
`thread_idle_unload_s` gets `thread/unsubscribe`; codex 0.169.0 then closes a
thread nobody is subscribed to once it has been idle for about a minute
(`thread/closed`) and frees it. The next prompt on it resumes it from disk,
history and all, exactly like a thread a new child has not loaded.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final

import attrs
import trio

import codexnet
from codexnet.backoff import backoff
from codexnet.cli import first_leaf
from codexnet.config import ProxyConfig
from codexnet.protocol import Health
from codexnet.proxy import server_requests
from codexnet.proxy.jsonrpc import JsonRpcPeer, PeerClosed, RpcError, ServerRequest
from codexnet.proxy.progress import describe_item
from codexnet.proxy.server_requests import Approval
from codexnet.ratelog import Throttle
from codexnet.resource_errors import resource_problem

log = logging.getLogger(__name__)
_throttled = Throttle()

INITIALIZE_TIMEOUT_S: Final = 60.0
STOP_GRACE_S: Final = 3.0
KILL_GRACE_S: Final = 3.0
RESTART_BACKOFF_S: Final = (1.0, 2.0, 5.0, 10.0, 30.0)
READY_WAIT_S: Final = 30.0
INTERRUPT_WAIT_S: Final = 10.0
CALL_TIMEOUT_S: Final = 20.0


class AppServerUnavailable(Exception):
    """No healthy app-server child to run the turn on."""


# The runner's answer to an approval: "accept", "acceptForSession", "decline" or "cancel".
ApprovalHandler = Callable[[Approval], Awaitable[str]]


@attrs.define(eq=False)
class Turn:
    """What one running turn has produced so far; updated by the reader task."""

    thread_id: str
    on_change: Callable[[], None]
    on_approval: ApprovalHandler
    turn_id: str | None = None
    messages: dict[str, str] = attrs.Factory(dict)  # agentMessage item id → text
    step: str = "starting"
    status: str | None = None  # turn/completed status
    error: str | None = None
    usage: dict[str, int] = attrs.Factory(dict)
    finished: trio.Event = attrs.Factory(trio.Event)
    # Set by turn/started, which follows the turn/start response: an interrupt
    # sent before it is answered "no active turn to interrupt" and lost.
    started: trio.Event = attrs.Factory(trio.Event)
    diff: str = ""  # the turn's whole diff so far (turn/diff/updated)
    # trio time: `turn/start` sent, and the turn's end seen (what codex itself took)
    sent_at: float | None = None
    ended_at: float | None = None

    @property
    def text(self) -> str:
        return "\n\n".join(t for t in self.messages.values() if t.strip())

    @property
    def seconds(self) -> float | None:
        """`turn/start` sent → the turn's end: what codex itself took (None: not run)."""
        if self.sent_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.sent_at

    def finish(self, status: str, error: str | None = None) -> None:
        if not self.finished.is_set():
            self.status = status
            self.error = self.error or error
            self.ended_at = trio.current_time()
            self.finished.set()
            self.on_change()


@attrs.frozen
class TurnOutcome:
    status: str  # completed | failed | interrupted | timeout
    text: str
    thread_id: str
    error: str | None
    usage: dict[str, int]
    notice: str | None = None  # e.g. the old thread was gone and a new one was started
    diff: str = ""  # what the turn changed, as a unified diff ("" if nothing)


@attrs.frozen
class TurnSettings:
    """Where and with what a turn runs (None: what the thread or codex already uses)."""

    cwd: str  # absolute, already checked against allowed_roots
    model: str | None = None
    effort: str | None = None
    images: tuple[str, ...] = ()  # absolute paths given to the model as image inputs


@attrs.define(eq=False)
class _Child:
    """One app-server process and what it has loaded."""

    process: trio.Process
    peer: JsonRpcPeer
    loaded_threads: set[str] = attrs.Factory(set)
    # The directory codex runs each loaded thread's turns in: what its load
    # (thread/start, thread/resume) or its last turn/start said. Codex keeps a
    # turn's `cwd` for the turns after it, so a turn names it only when it
    # changes: an override costs codex ~3 ms per turn even when it is the same.
    thread_cwd: dict[str, str] = attrs.Factory(dict)
    turns: dict[str, Turn] = attrs.Factory(dict)  # thread id → running turn
    # Loaded threads not in use, and since when (trio time): candidates to unload.
    idle_since: dict[str, float] = attrs.Factory(dict)
    idle_changed: trio.Event = attrs.Factory(trio.Event)

    def set_idle(self, thread_id: str) -> None:
        if thread_id in self.loaded_threads:
            self.idle_since[thread_id] = trio.current_time()
            self.idle_changed.set()

    def forget_thread(self, thread_id: str) -> None:
        self.loaded_threads.discard(thread_id)
        self.thread_cwd.pop(thread_id, None)
        self.idle_since.pop(thread_id, None)


async def _terminate_group(process: trio.Process) -> None:
    """`deliver_cancel` for run_process: TERM, then KILL, the child's whole group.

    Codex runs commands in grandchildren (sandbox helpers, shells); signalling
    only the direct child would orphan them.
    """
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        if grace is not None:
            await trio.sleep(grace)


class AppServer:
    def __init__(self, config: ProxyConfig, env: dict[str, str] | None = None) -> None:
        self._config = config
        self._env = config.child_env(os.environ if env is None else env)
        self._child: _Child | None = None
        self._ready = trio.Event()
        self._last_error = "app-server has not started yet"
        self._thread_locks: dict[str, trio.Lock] = {}
        self.restarts = 0
        self.version = ""
        # What the manager is told (hello, load): it chooses only `ok` machines
        # for new conversations. `health_changed` is replaced on every change.
        self.health: Health = "starting"
        self.health_detail = ""
        self.health_changed = trio.Event()
        # The last start failed for want of descriptors or memory: it is said
        # once a minute, not at every restart.
        self._starved = False

    @property
    def command(self) -> list[str]:
        return [self._config.codex_bin, "app-server", "--listen", "stdio://"]

    # ------------------------------------------------------------------ supervision

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the child forever, restarting it with backoff when it dies."""
        task_status.started()
        failures = 0
        while True:
            ran_ok = await self._run_child_once()
            failures = 0 if ran_ok else failures + 1
            self._set_health("restarting" if ran_ok else "failed", self._last_error)
            delay = backoff(RESTART_BACKOFF_S, failures)
            if not self._starved:
                log.warning("restarting codex app-server in %.0f s", delay)
            await trio.sleep(delay)
            self.restarts += 1

    def _set_health(self, health: Health, detail: str = "") -> None:
        if (health, detail) == (self.health, self.health_detail):
            return
        self.health, self.health_detail = health, detail
        self.health_changed.set()
        self.health_changed = trio.Event()

    async def _run_child_once(self) -> bool:
        """Start one child, serve it until it exits; True if it got past initialize."""
        initialized = False
        self._starved = False
        try:
            async with trio.open_nursery() as nursery:
                process: trio.Process = await nursery.start(
                    partial(
                        trio.run_process,
                        self.command,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        check=False,
                        start_new_session=True,
                        deliver_cancel=_terminate_group,
                        env=self._env,
                        cwd=str(self._config.codex_cwd),
                    )
                )
                assert process.stdin is not None
                assert process.stdout is not None
                assert process.stderr is not None
                child = _Child(process, peer=None)  # type: ignore[arg-type]
                child.peer = JsonRpcPeer(
                    process.stdin,
                    process.stdout,
                    on_notification=partial(self._on_notification, child),
                    on_request=partial(self._on_server_request, child, nursery),
                )
                # Readers first: writing before anyone reads stdout can deadlock.
                nursery.start_soon(self._drain_stderr, process.stderr)
                nursery.start_soon(child.peer.run)
                try:
                    with trio.fail_after(INITIALIZE_TIMEOUT_S):
                        info = await child.peer.request(
                            "initialize",
                            {
                                "clientInfo": {
                                    "name": "codexnet",
                                    "title": "codexnet proxy",
                                    "version": codexnet.__version__,
                                }
                            },
                        )
                        await child.peer.notify("initialized")
                    self.version = _version_from_user_agent(info)
                    initialized = True
                    self._child = child
                    self._ready.set()
                    self._set_health("ok")
                    log.info(
                        "codex app-server ready (pid %d, %s)", process.pid, self.version or "?"
                    )
                    nursery.start_soon(self._unload_idle_threads, child)
                    await process.wait()
                except trio.TooSlowError:
                    self._last_error = "app-server did not answer initialize"
                    log.error("%s within %.0f s", self._last_error, INITIALIZE_TIMEOUT_S)
                except (PeerClosed, RpcError) as exc:
                    self._last_error = f"app-server failed to initialize: {exc}"
                    log.error("%s", self._last_error)
                finally:
                    self._forget_child(child)
                    with trio.CancelScope(shield=True):
                        await self._stop_gracefully(process)
                    nursery.cancel_scope.cancel()
            code = process.returncode
            if initialized:
                self._last_error = f"app-server exited with code {code}"
            else:  # keep why initialize failed; that is what a task will report
                self._last_error = f"{self._last_error} (exit code {code})"
            log.error("%s", self._last_error)
        except* OSError as group:
            error = first_leaf(group)
            problem = resource_problem(error, probe=False)
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            self._last_error = f"cannot start {self._config.codex_bin!r}: {problem or reason}"
            if problem is not None:  # it will pass; say so once a minute meanwhile
                self._starved = True
                _throttled.log(log, logging.ERROR, "spawn", "%s; retrying", self._last_error)
            else:
                log.error("%s", self._last_error)
        return initialized

    def _forget_child(self, child: _Child) -> None:
        if self._child is child:
            self._child = None
            self._ready = trio.Event()
        for turn in list(child.turns.values()):
            turn.finish("failed", "the Codex app-server crashed")
        child.turns.clear()

    @staticmethod
    async def _stop_gracefully(process: trio.Process) -> None:
        """Close stdin and give Codex a moment to exit on its own (it does in ~30 ms)."""
        if process.returncode is not None:
            return
        assert process.stdin is not None
        with trio.move_on_after(STOP_GRACE_S):
            try:
                await process.stdin.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            await process.wait()

    @staticmethod
    async def _drain_stderr(stream: trio.abc.ReceiveStream) -> None:
        """Codex logs to stderr; an unread pipe would eventually block it."""
        buffer = b""
        try:
            async for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        log.debug("codex: %s", line.decode(errors="replace")[:2000])
                buffer = buffer[-65536:]
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # ------------------------------------------------------------------ incoming

    def _on_notification(self, child: _Child, method: str, params: dict[str, Any]) -> None:
        thread_id = params.get("threadId")
        if method == "thread/closed" and isinstance(thread_id, str):
            # The child unloaded it (after our unsubscribe): a next turn resumes it.
            log.debug("codex closed thread %s", thread_id)
            child.forget_thread(thread_id)
            return
        turn = child.turns.get(thread_id) if isinstance(thread_id, str) else None
        if turn is None:
            return
        if method == "item/agentMessage/delta":
            item_id = str(params.get("itemId", ""))
            turn.messages[item_id] = turn.messages.get(item_id, "") + str(params.get("delta", ""))
            turn.step = "writing the answer"
        elif method in ("item/started", "item/completed"):
            item = params.get("item")
            if isinstance(item, dict):
                if item.get("type") == "agentMessage" and method == "item/completed":
                    # The completed item's text is authoritative; deltas are a preview.
                    turn.messages[str(item.get("id", ""))] = str(item.get("text") or "")
                step = describe_item(item) if method == "item/started" else "thinking"
                if step:
                    turn.step = step
        elif method == "turn/started":
            turn.step = "thinking"
            turn.started.set()
        elif method == "error":
            error = params.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            if params.get("willRetry"):
                turn.step = f"model error, retrying: {message}"
            elif message:
                turn.error = str(message)
        elif method == "turn/diff/updated":
            if turn.turn_id is None or params.get("turnId") in (None, turn.turn_id):
                turn.diff = str(params.get("diff") or "")
            return
        elif method == "thread/tokenUsage/updated":
            usage = params.get("tokenUsage", {}).get("last", {})
            turn.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
        elif method == "turn/completed":
            info = params.get("turn") if isinstance(params.get("turn"), dict) else {}
            assert isinstance(info, dict)
            if turn.turn_id is not None and info.get("id") not in (None, turn.turn_id):
                return
            error = info.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            turn.finish(str(info.get("status", "completed")), message)
            return
        else:
            return
        turn.on_change()

    def _on_server_request(
        self, child: _Child, nursery: trio.Nursery, request: ServerRequest
    ) -> None:
        nursery.start_soon(self._answer_server_request, child, request)

    async def _answer_server_request(self, child: _Child, request: ServerRequest) -> None:
        approval = server_requests.describe(request.method, request.params)
        thread_id = request.params.get("threadId") or request.params.get("conversationId")
        turn = child.turns.get(thread_id) if isinstance(thread_id, str) else None
        try:
            if approval is None or turn is None:
                log.warning("declining unsupported app-server request %s", request.method)
                await child.peer.respond_error(
                    request.id, -32601, f"codexnet does not support {request.method}"
                )
                return
            decision = await turn.on_approval(approval)
            await child.peer.respond(
                request.id, server_requests.respond(request.method, decision, request.params)
            )
        except PeerClosed:
            pass  # the child died; its turns fail through _forget_child

    async def wait_ready(self) -> None:
        """Return once a child has answered `initialize` (sd_notify READY waits for it)."""
        await self._ready.wait()

    # ------------------------------------------------------------------ turns

    async def _ready_child(self) -> _Child:
        with trio.move_on_after(READY_WAIT_S):
            await self._ready.wait()
        if self._child is None:
            raise AppServerUnavailable(self._last_error)
        return self._child

    async def call(self, method: str, params: dict[str, Any]) -> Any:
        """One request to the app-server (raises `AppServerUnavailable`, `RpcError`)."""
        child = await self._ready_child()
        try:
            with trio.fail_after(CALL_TIMEOUT_S):
                return await child.peer.request(method, params)
        except PeerClosed:
            raise AppServerUnavailable("the Codex app-server crashed") from None
        except trio.TooSlowError:
            raise AppServerUnavailable(f"the Codex app-server did not answer {method}") from None

    async def run_turn(
        self,
        thread_id: str | None,
        prompt: str,
        *,
        on_change: Callable[[], None],
        on_approval: ApprovalHandler,
        on_turn: Callable[[Turn], None],
        cancel: trio.Event,
        settings: TurnSettings | None = None,
    ) -> TurnOutcome:
        """Run `prompt` as one turn; the caller owns the timeout (cancel → interrupt).

        `on_turn` receives the live `Turn` as soon as it exists; `on_change` is
        called after each update. Setting `cancel` interrupts the turn.
        """
        if settings is None:
            settings = TurnSettings(cwd=str(self._config.codex_cwd))
        child = await self._ready_child()
        if thread_id is None:
            thread_id = await self._load_thread(child, None, settings)
        # Loading happens under the thread's lock, so it cannot interleave with
        # an unload of the same thread (or a second load).
        lock = self._thread_locks.setdefault(thread_id, trio.Lock())
        async with lock:
            notice = None
            if thread_id not in child.loaded_threads:
                wanted = thread_id
                thread_id = await self._load_thread(child, thread_id, settings)
                if thread_id != wanted:
                    notice = (
                        "The previous Codex conversation could not be resumed; started a new one."
                    )
            child.idle_since.pop(thread_id, None)  # in use: not to be unloaded
            try:
                return await self._turn(
                    child,
                    thread_id,
                    prompt,
                    settings,
                    notice,
                    on_change,
                    on_approval,
                    on_turn,
                    cancel,
                )
            finally:
                child.set_idle(thread_id)

    async def _load_thread(
        self, child: _Child, thread_id: str | None, settings: TurnSettings
    ) -> str:
        """Start a new thread (None) or resume `thread_id`; the id of the loaded one.

        A thread that cannot be resumed is replaced by a new one (the caller
        tells the person).
        """
        try:
            if thread_id is None:
                return await self._start_thread(child, settings)
            try:
                await self._resume_thread(child, thread_id, settings)
                return thread_id
            except RpcError as exc:
                log.warning("cannot resume thread %s (%s); starting a new one", thread_id, exc)
                return await self._start_thread(child, settings)
        except PeerClosed:
            raise AppServerUnavailable("the Codex app-server crashed") from None
        except RpcError as exc:
            raise AppServerUnavailable(f"the Codex app-server refused the thread: {exc}") from None

    async def _turn(
        self,
        child: _Child,
        thread_id: str,
        prompt: str,
        settings: TurnSettings,
        notice: str | None,
        on_change: Callable[[], None],
        on_approval: ApprovalHandler,
        on_turn: Callable[[Turn], None],
        cancel: trio.Event,
    ) -> TurnOutcome:
        """One turn on a loaded thread, its lock held."""
        turn = Turn(thread_id, on_change=on_change, on_approval=on_approval)
        child.turns[thread_id] = turn
        on_turn(turn)
        if cancel.is_set():  # cancelled while waiting for the app-server or the thread
            del child.turns[thread_id]
            return TurnOutcome("interrupted", "", thread_id, None, {}, notice)
        try:
            params = self._turn_params(thread_id, prompt, settings)
            if child.thread_cwd.get(thread_id) == settings.cwd:
                del params["cwd"]  # codex still has it from the thread's load or last turn
            # Unknown from here until codex has answered: should turn/start fail,
            # the next turn names its directory again.
            child.thread_cwd.pop(thread_id, None)
            turn.sent_at = trio.current_time()
            result = await child.peer.request("turn/start", params)
            child.thread_cwd[thread_id] = settings.cwd
            turn.turn_id = (result or {}).get("turn", {}).get("id")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._interrupt_on, cancel, child, turn)
                await turn.finished.wait()
                nursery.cancel_scope.cancel()
        except PeerClosed:
            turn.finish("failed", "the Codex app-server crashed")
        finally:
            if child.turns.get(thread_id) is turn:
                del child.turns[thread_id]
            if not turn.finished.is_set():
                # We are being cancelled (timeout/shutdown): stop the turn, bounded.
                with trio.CancelScope(shield=True), trio.move_on_after(INTERRUPT_WAIT_S):
                    await self._interrupt(child, turn)
        return TurnOutcome(
            status=turn.status or "failed",
            text=turn.text,
            thread_id=thread_id,
            error=turn.error,
            usage=turn.usage,
            notice=notice,
            diff=turn.diff,
        )

    @staticmethod
    def _turn_params(thread_id: str, prompt: str, settings: TurnSettings) -> dict[str, Any]:
        items: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
        items += [{"type": "localImage", "path": path} for path in settings.images]
        params: dict[str, Any] = {"threadId": thread_id, "input": items, "cwd": settings.cwd}
        if settings.model:
            params["model"] = settings.model
        if settings.effort:
            params["effort"] = settings.effort
        return params

    async def _interrupt_on(self, cancel: trio.Event, child: _Child, turn: Turn) -> None:
        await cancel.wait()
        with trio.move_on_after(INTERRUPT_WAIT_S):
            await turn.started.wait()
        await self._interrupt(child, turn)

    async def _interrupt(self, child: _Child, turn: Turn) -> None:
        if turn.turn_id is None or child.peer.closed:
            return
        try:
            await child.peer.request(
                "turn/interrupt", {"threadId": turn.thread_id, "turnId": turn.turn_id}
            )
        except RpcError as exc:
            log.info("interrupt of turn %s: %s", turn.turn_id, exc)  # already finished
        except PeerClosed:
            pass

    def _thread_params(self, settings: TurnSettings) -> dict[str, Any]:
        params: dict[str, Any] = {
            "cwd": settings.cwd,
            "approvalPolicy": self._config.approval_policy,
            "sandbox": self._config.sandbox,
        }
        if settings.model:
            params["model"] = settings.model
        return params

    async def _start_thread(self, child: _Child, settings: TurnSettings) -> str:
        result = await child.peer.request("thread/start", self._thread_params(settings))
        thread_id = str(result["thread"]["id"])
        child.loaded_threads.add(thread_id)
        child.thread_cwd[thread_id] = settings.cwd
        return thread_id

    async def _resume_thread(self, child: _Child, thread_id: str, settings: TurnSettings) -> None:
        await child.peer.request(
            "thread/resume",
            {"threadId": thread_id, "excludeTurns": True, **self._thread_params(settings)},
        )
        child.loaded_threads.add(thread_id)
        child.thread_cwd[thread_id] = settings.cwd

    # ------------------------------------------------------------------ idle threads

    async def _unload_idle_threads(self, child: _Child) -> None:
        """Unload each of `child`'s threads once it has been idle `thread_idle_unload_s`."""
        idle_s = self._config.thread_idle_unload_s
        if idle_s <= 0:
            return
        while True:
            now = trio.current_time()
            for thread_id, since in list(child.idle_since.items()):
                if since + idle_s <= now:
                    await self._unload(child, thread_id, now - since)
            next_at = min((since + idle_s for since in child.idle_since.values()), default=math.inf)
            child.idle_changed = trio.Event()
            with trio.move_on_at(next_at):
                await child.idle_changed.wait()

    async def _unload(self, child: _Child, thread_id: str, idle: float) -> None:
        lock = self._thread_locks.setdefault(thread_id, trio.Lock())
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            return  # a turn is about to use it; it is idle again afterwards
        try:
            if thread_id in child.turns or thread_id not in child.idle_since:
                return
            # Forgotten first: from now on a prompt for it resumes it (after this
            # unsubscribe, which holds its lock).
            child.forget_thread(thread_id)
            try:
                await child.peer.request("thread/unsubscribe", {"threadId": thread_id})
            except RpcError as exc:
                log.info("unloading thread %s: %s", thread_id, exc)
                return
            except PeerClosed:
                return
            log.info(
                "thread %s idle for %.0f s: unloaded (its next message resumes it)",
                thread_id,
                idle,
            )
        finally:
            lock.release()
            if not lock.locked() and self._thread_locks.get(thread_id) is lock:
                del self._thread_locks[thread_id]  # nobody waits for it: no lock kept per thread


def _version_from_user_agent(info: Any) -> str:
    # userAgent looks like "codexnet/0.169.0 (Debian …) …": the codex version follows the slash.
    agent = info.get("userAgent", "") if isinstance(info, dict) else ""
    head = agent.split(" ", 1)[0]
    return head.split("/", 1)[1] if "/" in head else ""
