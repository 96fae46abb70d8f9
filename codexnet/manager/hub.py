"""The WebSocket hub: proxies connect here, register, and run the manager's tasks.

Each connection is handled behind its own error boundary: a misbehaving proxy
is logged and disconnected, never allowed to take the server down. A proxy
must say `hello` first with a known id and its own token (compared in
constant time); otherwise the socket is closed with a 44xx code and a reason
the proxy logs.

Tasks outlive connections. `run_task` registers a `TaskHandle` before the
task is sent; when a proxy drops mid-task the handle waits for it to come back
(the proxy replays the result from its outbox), and fails only if the proxy
returns without the task or does not return in time.
"""

from __future__ import annotations

import hmac
import logging
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Final

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from codexnet.config import ProxyEntry
from codexnet.protocol import (
    CLOSE_BAD_FRAME,
    CLOSE_HELLO_TIMEOUT,
    CLOSE_PROTOCOL_VERSION,
    CLOSE_REPLACED,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_PROXY,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    ApprovalDecision,
    ApprovalRequest,
    Hello,
    Load,
    ManagerFrame,
    ProtocolError,
    ResultAck,
    Task,
    TaskAck,
    TaskCancel,
    TaskEvent,
    TaskResult,
    Welcome,
    decode_proxy_frame,
    encode,
)

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S: Final = 10.0
RECONNECT_GRACE_S: Final = 120.0  # how long a task waits for its dropped proxy to return
RESULT_GRACE_S: Final = 60.0  # beyond the task's own timeout, which the proxy enforces


class TaskFailed(Exception):
    """The task could not run or its result was lost; the message is for the user."""


@attrs.define(eq=False)
class ProxyConn:
    proxy_id: str
    ws: WebSocketConnection
    capacity: int
    labels: tuple[str, ...]
    version: str
    running: int = 0
    connected_at: float = attrs.Factory(time.time)
    closed: trio.Event = attrs.Factory(trio.Event)
    _send_lock: trio.StrictFIFOLock = attrs.Factory(trio.StrictFIFOLock)

    async def send(self, frame: ManagerFrame) -> bool:
        try:
            async with self._send_lock:
                await self.ws.send_message(encode(frame))
        except ConnectionClosed:
            return False
        return True


@attrs.define(eq=False)
class TaskHandle:
    task: Task
    proxy_id: str
    on_update: Callable[[TaskHandle], None]
    on_approval: Callable[[TaskHandle, ApprovalRequest], None]
    text: str = ""
    step: str = ""
    last_seq: int = 0
    sent: bool = False
    acked: trio.Event = attrs.Factory(trio.Event)
    result: TaskResult | None = None
    failure: str | None = None
    done: trio.Event = attrs.Factory(trio.Event)
    started_at: float = attrs.Factory(trio.current_time)

    def fail(self, reason: str) -> None:
        if not self.done.is_set():
            self.failure = reason
            self.done.set()

    def apply(self, event: TaskEvent) -> bool:
        """Apply an event once; False for a duplicate or stale one."""
        if event.seq <= self.last_seq:
            return False
        self.last_seq = event.seq
        if event.kind == "delta":
            self.text += event.text
        elif event.kind == "snapshot":
            self.text = event.text
        elif event.kind == "progress":
            self.step = event.text
        return True


def _ignore_approval(handle: TaskHandle, request: ApprovalRequest) -> None:
    log.warning("task %s: no approval handler; the request will time out", handle.task.task_id)


class Hub:
    def __init__(self, proxies: Mapping[str, ProxyEntry]) -> None:
        self._proxies = proxies
        self.online: dict[str, ProxyConn] = {}
        self.tasks: dict[str, TaskHandle] = {}
        self._online_changed = trio.Event()
        self.port = 0  # the bound port, once serving

    def known(self) -> list[str]:
        return sorted(self._proxies)

    def labels(self, proxy_id: str) -> tuple[str, ...]:
        conn = self.online.get(proxy_id)
        if conn is not None and conn.labels:
            return conn.labels
        entry = self._proxies.get(proxy_id)
        return entry.labels if entry else ()

    async def wait_online(self, proxy_id: str | None = None) -> ProxyConn:
        """Wait until `proxy_id` (or, with None, any proxy) is online."""
        while True:
            if proxy_id is None and self.online:
                return next(iter(self.online.values()))
            if proxy_id is not None and proxy_id in self.online:
                return self.online[proxy_id]
            await self._online_changed.wait()

    def _notify_online_changed(self) -> None:
        self._online_changed.set()
        self._online_changed = trio.Event()

    # ------------------------------------------------------------------ server

    async def serve(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve proxies until cancelled (`wss://` with `ssl_context`); `started(port)`."""
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_websocket(
                    self._handle,
                    host,
                    port,
                    ssl_context,
                    max_message_size=MAX_FRAME_BYTES,
                    message_queue_size=8,
                    disconnect_timeout=5,
                    task_status=task_status,
                )
            )
            bound = server.port
            self.port = bound
            scheme = "wss" if ssl_context else "ws"
            log.info("waiting for proxies on %s://%s:%d", scheme, host, bound)
            task_status.started(bound)

    async def _handle(self, request: WebSocketRequest) -> None:
        """Error boundary: one proxy's failure ends its connection, not the server."""
        try:
            ws = await request.accept()
            await self._serve_connection(ws)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("proxy connection failed")

    async def _serve_connection(self, ws: WebSocketConnection) -> None:
        remote = ws.remote
        peer = f"{remote.address}:{remote.port}" if not isinstance(remote, str) else remote
        hello = await self._read_hello(ws, peer)
        if hello is None:
            return
        old = self.online.get(hello.proxy_id)
        if old is not None:
            log.warning("proxy %r connected again; closing its older connection", hello.proxy_id)
            await old.ws.aclose(CLOSE_REPLACED, "replaced by a newer connection")
        conn = ProxyConn(
            hello.proxy_id,
            ws,
            capacity=hello.capacity,
            labels=tuple(hello.labels) or self._proxies[hello.proxy_id].labels,
            version=hello.version,
            running=len(hello.running),
        )
        if not await conn.send(Welcome()):
            return
        self.online[hello.proxy_id] = conn
        self._notify_online_changed()
        log.info(
            "proxy %r online from %s (%s, capacity %d)",
            hello.proxy_id,
            peer,
            hello.version or "unknown version",
            hello.capacity,
        )
        try:
            await self._reconcile(conn, hello)
            await self._read_frames(conn)
        finally:
            conn.closed.set()
            if self.online.get(hello.proxy_id) is conn:
                del self.online[hello.proxy_id]
                self._notify_online_changed()
                log.warning("proxy %r went offline", hello.proxy_id)

    async def _read_hello(self, ws: WebSocketConnection, peer: str) -> Hello | None:
        with trio.move_on_after(HELLO_TIMEOUT_S):
            raw = await ws.get_message()
            break_reason = None
            try:
                frame = decode_proxy_frame(raw)
            except ProtocolError as exc:
                frame, break_reason = None, str(exc)
            if not isinstance(frame, Hello):
                reason = break_reason or f"expected hello, got {frame.type if frame else '?'}"
                log.warning("refusing connection from %s: %s", peer, reason)
                await ws.aclose(CLOSE_BAD_FRAME, reason[:120])
                return None
            if frame.protocol != PROTOCOL_VERSION:
                log.warning(
                    "refusing proxy %r: protocol %d, we speak %d",
                    frame.proxy_id,
                    frame.protocol,
                    PROTOCOL_VERSION,
                )
                await ws.aclose(CLOSE_PROTOCOL_VERSION, f"protocol {PROTOCOL_VERSION} required")
                return None
            entry = self._proxies.get(frame.proxy_id)
            if entry is None:
                log.warning("refusing unknown proxy %r from %s", frame.proxy_id, peer)
                await ws.aclose(CLOSE_UNKNOWN_PROXY, "unknown proxy id")
                return None
            if not hmac.compare_digest(frame.token.encode(), entry.token.encode()):
                log.warning("refusing proxy %r from %s: wrong token", frame.proxy_id, peer)
                await ws.aclose(CLOSE_UNAUTHORIZED, "wrong token")
                return None
            return frame
        log.warning("refusing connection from %s: no hello within %.0f s", peer, HELLO_TIMEOUT_S)
        await ws.aclose(CLOSE_HELLO_TIMEOUT, "no hello")
        return None

    async def _reconcile(self, conn: ProxyConn, hello: Hello) -> None:
        """Match our open tasks for this proxy against what it says it still holds."""
        held = set(hello.running) | set(hello.finished)
        for handle in list(self.tasks.values()):
            if handle.proxy_id != conn.proxy_id or handle.done.is_set():
                continue
            if handle.task.task_id in held:
                continue  # still running, or its result is on the way from the outbox
            if handle.sent:
                handle.fail(
                    f"proxy {conn.proxy_id} no longer has this task (it or the manager "
                    "restarted); please send it again"
                )
            else:
                handle.sent = await conn.send(handle.task)

    async def _read_frames(self, conn: ProxyConn) -> None:
        while True:
            raw = await conn.ws.get_message()
            try:
                frame = decode_proxy_frame(raw)
                if isinstance(frame, Hello):
                    raise ProtocolError("hello sent twice")
            except ProtocolError as exc:
                log.warning("proxy %r sent a bad frame, disconnecting: %s", conn.proxy_id, exc)
                await conn.ws.aclose(CLOSE_BAD_FRAME, str(exc)[:120])
                return
            handle = self.tasks.get(getattr(frame, "task_id", ""))
            if isinstance(frame, TaskResult):
                # Ack even unknown results: the proxy may drop them from its outbox.
                await conn.send(ResultAck(frame.task_id))
                if handle is not None and not handle.done.is_set():
                    handle.result = frame
                    handle.done.set()
            elif isinstance(frame, Load):
                conn.running = frame.running
            elif handle is None:
                log.debug("frame for unknown task from %r: %s", conn.proxy_id, frame.type)
            elif isinstance(frame, TaskAck):
                handle.acked.set()
            elif isinstance(frame, TaskEvent):
                if handle.apply(frame):
                    handle.on_update(handle)
            elif isinstance(frame, ApprovalRequest):
                handle.on_approval(handle, frame)

    # ------------------------------------------------------------------ tasks

    async def run_task(
        self,
        proxy_id: str,
        prompt: str,
        *,
        task_id: str | None = None,
        chat_id: int = 0,
        thread_id: str | None = None,
        timeout_s: float = 1800.0,
        on_update: Callable[[TaskHandle], None] = lambda handle: None,
        on_approval: Callable[[TaskHandle, ApprovalRequest], None] = _ignore_approval,
        on_handle: Callable[[TaskHandle], None] = lambda handle: None,
    ) -> TaskResult:
        """Run one prompt on `proxy_id` and return its result; raises `TaskFailed`."""
        conn = self.online.get(proxy_id)
        if conn is None:
            raise TaskFailed(f"proxy {proxy_id} is offline")
        task = Task(task_id or uuid.uuid4().hex, chat_id, prompt, thread_id, timeout_s)
        handle = TaskHandle(task, proxy_id, on_update, on_approval)
        self.tasks[task.task_id] = handle
        on_handle(handle)
        handle.sent = await conn.send(task)
        return await self.follow(handle)

    def adopt(
        self,
        task_id: str,
        proxy_id: str,
        *,
        chat_id: int,
        timeout_s: float,
        on_update: Callable[[TaskHandle], None] = lambda handle: None,
        on_approval: Callable[[TaskHandle, ApprovalRequest], None] = _ignore_approval,
    ) -> TaskHandle:
        """Take back a task sent before a manager restart (from the journal).

        Call before `serve`: the proxy's `hello` then finds the handle and either
        keeps it (the task still runs or its result waits in the outbox) or fails
        it (the proxy no longer knows it). Then `follow` it.
        """
        task = Task(task_id, chat_id, "", None, timeout_s)
        handle = TaskHandle(task, proxy_id, on_update, on_approval, sent=True)
        self.tasks[task_id] = handle
        return handle

    async def follow(self, handle: TaskHandle) -> TaskResult:
        """Wait for `handle`'s result, within its timeout; raises `TaskFailed`."""
        task = handle.task
        try:
            with trio.move_on_after(task.timeout_s + RESULT_GRACE_S):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch_proxy, handle)
                    await handle.done.wait()
                    nursery.cancel_scope.cancel()
            if not handle.done.is_set():
                await self.cancel(task.task_id)
                raise TaskFailed(
                    f"no result from proxy {handle.proxy_id} within {task.timeout_s:.0f} s"
                )
            if handle.result is None:
                raise TaskFailed(handle.failure or "the task failed")
            return handle.result
        finally:
            del self.tasks[task.task_id]

    async def _watch_proxy(self, handle: TaskHandle) -> None:
        """Fail the task if its proxy goes away and does not come back in time."""
        while True:
            conn = self.online.get(handle.proxy_id)
            if conn is not None:
                await conn.closed.wait()
                continue
            with trio.move_on_after(RECONNECT_GRACE_S):
                await self.wait_online(handle.proxy_id)
                continue
            handle.fail(f"proxy {handle.proxy_id} went offline during the task")
            return

    async def cancel(self, task_id: str) -> bool:
        handle = self.tasks.get(task_id)
        conn = self.online.get(handle.proxy_id) if handle else None
        return conn is not None and await conn.send(TaskCancel(task_id))

    async def decide(self, task_id: str, approval_id: str, decision: str) -> bool:
        handle = self.tasks.get(task_id)
        conn = self.online.get(handle.proxy_id) if handle else None
        if conn is None:
            return False
        return await conn.send(
            ApprovalDecision(task_id, approval_id, decision)  # type: ignore[arg-type]
        )
