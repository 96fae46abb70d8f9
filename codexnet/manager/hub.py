"""The WebSocket hub: proxies connect here, register, and exchange frames.

The hub is transport only: it authenticates a proxy's `hello`, keeps the
registry of who is online, watches each link's liveness, and hands every
decoded frame to its `HubListener` (the dispatcher), which owns what the
frames mean and what must be sent again.

Each connection is handled behind its own error boundary: a misbehaving proxy
is logged and disconnected, never allowed to take the server down. A proxy
must say `hello` first with a known id and its own token (compared in
constant time); otherwise the socket is closed with a 44xx code and a reason
the proxy logs.

Liveness: the hub pings every proxy every third of `heartbeat_timeout_s`
(jittered). A link from which nothing (no frame, no pong) arrived for
`heartbeat_timeout_s` is half-dead — a sleeping laptop, an expired NAT entry:
the proxy is marked offline at once and the connection dropped, without
waiting for a close handshake that cannot come.
"""

from __future__ import annotations

import hmac
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Mapping
from typing import Final, Protocol

import attrs
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
)

from codexnet.config import ProxyEntry
from codexnet.db import StateError
from codexnet.protocol import (
    CLOSE_BAD_FRAME,
    CLOSE_HELLO_TIMEOUT,
    CLOSE_PROTOCOL_VERSION,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNKNOWN_PROXY,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Hello,
    Load,
    ManagerFrame,
    ProtocolError,
    ProxyFrame,
    Welcome,
    decode_proxy_frame,
    encode,
)

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 2.0  # a close handshake on a dead link never ends: bound it
CLOSE_STATE_ERROR: Final = 4500


class HubListener(Protocol):
    """What the hub tells the dispatcher."""

    async def proxy_online(self, conn: ProxyConn, hello: Hello) -> None: ...

    async def on_frame(self, conn: ProxyConn, frame: ProxyFrame) -> None: ...

    def proxy_offline(self, conn: ProxyConn) -> None: ...


@attrs.define(eq=False)
class ProxyConn:
    proxy_id: str
    ws: WebSocketConnection
    capacity: int
    labels: tuple[str, ...]
    version: str
    running: int = 0
    connected_at: float = attrs.Factory(time.time)
    last_heard: float = attrs.Factory(trio.current_time)  # trio time
    rtt: float | None = None  # seconds, of the last heartbeat
    closed: trio.Event = attrs.Factory(trio.Event)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _send_lock: trio.StrictFIFOLock = attrs.Factory(trio.StrictFIFOLock)

    async def send(self, frame: ManagerFrame) -> bool:
        """Write `frame`; False if the link is closed. Written is not delivered:
        whatever must arrive is re-sent after the next `hello` until acknowledged."""
        try:
            async with self._send_lock:
                await self.ws.send_message(encode(frame))
        except ConnectionClosed:
            return False
        return True


class _NoListener:
    async def proxy_online(self, conn: ProxyConn, hello: Hello) -> None:
        pass

    async def on_frame(self, conn: ProxyConn, frame: ProxyFrame) -> None:
        pass

    def proxy_offline(self, conn: ProxyConn) -> None:
        pass


class Hub:
    def __init__(
        self, proxies: Mapping[str, ProxyEntry], *, heartbeat_timeout_s: float = 30.0
    ) -> None:
        self._proxies = proxies
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.listener: HubListener = _NoListener()
        self.online: dict[str, ProxyConn] = {}
        self.offline_since: dict[str, float] = {}  # wall clock; from our start if never seen
        self._online_changed = trio.Event()
        self.port = 0  # the bound port, once serving
        started = time.time()
        for proxy_id in proxies:
            self.offline_since[proxy_id] = started

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

    async def wait_change(self) -> None:
        """Return at the next proxy going online or offline."""
        await self._online_changed.wait()

    def _notify_online_changed(self) -> None:
        self._online_changed.set()
        self._online_changed = trio.Event()

    async def send(self, proxy_id: str, frame: ManagerFrame) -> bool:
        """Send to `proxy_id` if it is online (see `ProxyConn.send`)."""
        conn = self.online.get(proxy_id)
        return conn is not None and await conn.send(frame)

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
                    disconnect_timeout=CLOSE_TIMEOUT_S,
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
        except* ConnectionClosed:
            pass  # the normal end of a connection
        except* Exception:
            log.exception("proxy connection failed")

    async def _serve_connection(self, ws: WebSocketConnection) -> None:
        remote = ws.remote
        peer = f"{remote.address}:{remote.port}" if not isinstance(remote, str) else remote
        hello = await self._read_hello(ws, peer)
        if hello is None:
            return
        old = self.online.get(hello.proxy_id)
        if old is not None:
            log.warning("proxy %r connected again; dropping its older connection", hello.proxy_id)
            # Not awaited: an old link that went silent would hold the new one up
            # for the whole close timeout. Its own handler closes it, bounded.
            old.scope.cancel()
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
        self.offline_since.pop(hello.proxy_id, None)
        self._notify_online_changed()
        log.info(
            "proxy %r online from %s (%s, capacity %d)",
            hello.proxy_id,
            peer,
            hello.version or "unknown version",
            hello.capacity,
        )
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._heartbeat, conn, nursery.cancel_scope)
                    if await self._tell(conn, self.listener.proxy_online(conn, hello)):
                        await self._read_frames(conn)
                    nursery.cancel_scope.cancel()
        finally:
            conn.closed.set()
            if self.online.get(hello.proxy_id) is conn:
                del self.online[hello.proxy_id]
                self.offline_since[hello.proxy_id] = time.time()
                self._notify_online_changed()
                log.warning("proxy %r went offline", hello.proxy_id)
            self.listener.proxy_offline(conn)

    async def _heartbeat(self, conn: ProxyConn, session: trio.CancelScope) -> None:
        timeout = self.heartbeat_timeout_s
        while True:
            await trio.sleep(timeout / 3 * random.uniform(0.8, 1.2))
            sent = trio.current_time()
            with trio.move_on_at(conn.last_heard + timeout):
                await conn.ws.ping()
                conn.last_heard = trio.current_time()
                conn.rtt = conn.last_heard - sent
                continue
            log.warning(
                "proxy %r silent for %.0f s (half-dead link?); marking it offline",
                conn.proxy_id,
                trio.current_time() - conn.last_heard,
            )
            # Offline now, not after a close handshake that a dead link never completes.
            if self.online.get(conn.proxy_id) is conn:
                del self.online[conn.proxy_id]
                self.offline_since[conn.proxy_id] = time.time()
                self._notify_online_changed()
            session.cancel()
            return

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

    async def _read_frames(self, conn: ProxyConn) -> None:
        while True:
            raw = await conn.ws.get_message()
            conn.last_heard = trio.current_time()
            try:
                frame = decode_proxy_frame(raw)
                if isinstance(frame, Hello):
                    raise ProtocolError("hello sent twice")
            except ProtocolError as exc:
                log.warning("proxy %r sent a bad frame, disconnecting: %s", conn.proxy_id, exc)
                await conn.ws.aclose(CLOSE_BAD_FRAME, str(exc)[:120])
                return
            if isinstance(frame, Load):
                conn.running = frame.running
                continue
            if not await self._tell(conn, self.listener.on_frame(conn, frame)):
                return

    async def _tell(self, conn: ProxyConn, call: Awaitable[None]) -> bool:
        """Run a listener call; False (and the link closed) if the state cannot be stored.

        Closing makes the proxy reconnect and send its unacknowledged frames
        again, so nothing is lost while the disk is full or read-only.
        """
        try:
            await call
        except StateError as exc:
            log.error("%s; dropping proxy %r so its frames are sent again", exc, conn.proxy_id)
            with trio.move_on_after(CLOSE_TIMEOUT_S):
                await conn.ws.aclose(CLOSE_STATE_ERROR, "the manager cannot store its state")
            return False
        return True
