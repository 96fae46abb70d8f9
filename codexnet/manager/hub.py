"""The WebSocket hub: proxies connect here, register, and exchange frames.

The hub is transport only: it authenticates a proxy's `hello`, keeps the
registry of who is online, watches each link's liveness, and hands every
decoded frame to its `HubListener` (the dispatcher), which owns what the
frames mean and what must be sent again.

Anyone on the network can connect, so every step before an authenticated
`hello` is bounded (`frontdoor.py`): connections without a hello are capped
in all and per address (the oldest is dropped), the WebSocket handshake must
finish within HANDSHAKE_TIMEOUT_S and the hello within HELLO_TIMEOUT_S, every
close is bounded, failed authentications back off per address, a browser
(an `Origin` header) is refused, and an unknown id gets the same close code
and reason as a wrong token. Strangers are logged once per kind per minute.

A proxy id has one connection. A second hello with the id of a connection
that still answers heartbeats is refused (CLOSE_DUPLICATE: the same config
started twice), so the two never flap; a connection that stopped answering
is replaced at once.

Each connection is handled behind its own error boundary: a misbehaving proxy
is logged and disconnected, never allowed to take the server down.

Liveness: any bytes from a proxy count as hearing from it (its frames, and the
ping it sends about every half of `heartbeat_timeout_s`), noted as they are
read (`hubsocket.ServerWebSocket.heard_at`). One sweep for the whole hub
(`_liveness`) checks every connection each second: a link silent for 70 % of
the timeout gets a ping of ours (it missed its own), one silent for the whole
timeout is half-dead — a sleeping laptop, an expired NAT entry: the proxy is
marked offline at once and the connection dropped, without waiting for a
close handshake that cannot come. Besides that the hub pings each proxy only
every `RTT_EVERY_S`, for the round trip `/status` shows: at 5 000 proxies a
ping each way every 10 s and a sleeping task per connection cost 40 % of a
core.

Each connection is one task: trio-websocket's reader task, message channel
and kept handshake per connection were a third of the hub's memory at 5 000
proxies (`hubsocket.py` reads in the handler's own task).
"""

from __future__ import annotations

import errno
import hmac
import logging
import os
import random
import resource
import secrets
import ssl
import time
from collections import defaultdict
from collections.abc import Awaitable, Mapping
from typing import Final, Protocol

import attrs
import trio
from trio_websocket import ConnectionClosed

from codexnet.config import ManagerConfig, ProxyEntry
from codexnet.db import StateError
from codexnet.manager.frontdoor import FrontDoor, Notices, Pending
from codexnet.manager.hubsocket import HandshakeFailed, ServerWebSocket, read_upgrade
from codexnet.protocol import (
    CLOSE_BAD_FRAME,
    CLOSE_DUPLICATE,
    CLOSE_HELLO_TIMEOUT,
    CLOSE_PROTOCOL_VERSION,
    CLOSE_TRY_LATER,
    CLOSE_UNAUTHORIZED,
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

HANDSHAKE_TIMEOUT_S: Final = 5.0  # accepted → WebSocket (and TLS) handshake done
HELLO_TIMEOUT_S: Final = 5.0  # handshake done → the hello (a real proxy sends it at once)
CLOSE_TIMEOUT_S: Final = 2.0  # a close handshake on a dead link never ends: bound it
DUPLICATE_PROBE_S: Final = 2.0  # how long an online connection has to answer a ping
RTT_EVERY_S: Final = 600.0  # our own pings, for /status's round trip (the proxy pings us)
LIVENESS_SWEEP_MAX_S: Final = 1.0  # how often the sweep looks (at most; a tenth of the timeout)
ACCEPT_RETRY_S: Final = 0.1
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
DEFAULT_MAX_PENDING_PER_ADDRESS: Final = 32
CLOSE_STATE_ERROR: Final = 4500
# The proxy pings every half of heartbeat_timeout_s at most (PROXY_PING_FRACTION);
# a link silent for HUB_PING_FRACTION of it has missed that ping and gets one of
# ours; one silent for HEARTBEAT_LATE_FRACTION has missed both, and its proxy is
# not chosen for new conversations.
HUB_PING_FRACTION: Final = 0.7
HEARTBEAT_LATE_FRACTION: Final = 0.8


class HubListener(Protocol):
    """What the hub tells the dispatcher."""

    async def proxy_online(self, conn: ProxyConn, hello: Hello) -> None: ...

    async def on_frame(self, conn: ProxyConn, frame: ProxyFrame) -> None: ...

    def proxy_offline(self, conn: ProxyConn) -> None: ...


@attrs.define(eq=False)
class ProxyConn:
    proxy_id: str
    ws: ServerWebSocket
    capacity: int
    labels: tuple[str, ...]
    version: str
    running: int = 0
    connected_at: float = attrs.Factory(time.time)
    last_heard: float = attrs.Factory(trio.current_time)  # trio time
    rtt: float | None = None  # seconds, of the last heartbeat
    health: str = "ok"  # its app-server (protocol.Health), from hello and load frames
    health_detail: str = ""
    next_rtt_ping: float = 0.0  # trio time
    pinging: bool = False
    late: bool = False  # its heartbeats are late (the sweep notes the change)
    peer: str = "?"  # address:port, for the logs
    # It replaced a connection of the same id that had stopped answering: that
    # one may still hold tasks this hello does not list (see the dispatcher).
    took_over: bool = False
    foreign_frames: int = 0  # frames it sent for other proxies' tasks
    closed: trio.Event = attrs.Factory(trio.Event)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)

    async def send(self, frame: ManagerFrame) -> bool:
        """Write `frame`; False if the link is closed. Written is not delivered:
        whatever must arrive is re-sent after the next `hello` until acknowledged."""
        try:
            await self.ws.send_message(encode(frame))  # frames in order: its send lock
        except ConnectionClosed:
            return False
        return True

    def silent_for(self, now: float) -> float:
        """Seconds since anything came from the proxy (frames, pings, pongs)."""
        ws = self.ws  # None in tests that register a connection by hand
        if ws is not None and ws.heard_at > self.last_heard:
            self.last_heard = ws.heard_at
        return now - self.last_heard

    async def ping(self, within: float) -> None:
        """Ping; on the pong the round trip is known and the link heard (bounded by
        `within`: the sweep drops a link silent for the heartbeat timeout anyway)."""
        self.pinging = True
        sent = trio.current_time()
        try:
            with trio.move_on_after(within) as waited:
                await self.ws.ping()
        except ConnectionClosed:
            return
        finally:
            self.pinging = False
        if waited.cancelled_caught:
            return
        self.last_heard = trio.current_time()
        self.rtt = self.last_heard - sent

    async def refuse(self, code: int, reason: str) -> None:
        """Close this connection with `code` (bounded); its reader then ends."""
        await _close(self.ws, code, reason)
        self.scope.cancel()


ONLINE_LINES_PER_MINUTE: Final = 20


class LineBudget:
    """At most `per_minute` lines of a kind a minute; `renew` says how many were not
    written in the minute gone by. A fleet of 5 000 coming back after a restart is one
    line a minute after the first 20, not 5 000 lines (a tenth of the hub's CPU)."""

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._written = 0
        self._unwritten = 0
        self._since = 0.0

    def take(self) -> bool:
        if self._written < self._per_minute:
            self._written += 1
            return True
        self._unwritten += 1
        return False

    def renew(self, now: float) -> int:
        """At each minute's end, a fresh budget and the count of lines not written."""
        if now - self._since < 60.0:
            return 0
        unwritten = self._unwritten
        self._since, self._written, self._unwritten = now, 0, 0
        return unwritten


class _NoListener:
    async def proxy_online(self, conn: ProxyConn, hello: Hello) -> None:
        pass

    async def on_frame(self, conn: ProxyConn, frame: ProxyFrame) -> None:
        pass

    def proxy_offline(self, conn: ProxyConn) -> None:
        pass


class Hub:
    def __init__(
        self,
        proxies: Mapping[str, ProxyEntry],
        *,
        heartbeat_timeout_s: float = 30.0,
        max_pending: int | None = None,
        max_pending_per_address: int = DEFAULT_MAX_PENDING_PER_ADDRESS,
    ) -> None:
        self._proxies = proxies
        if max_pending is None:
            max_pending = default_max_pending()
        max_pending_per_address = min(max_pending_per_address, max_pending)
        self._door = FrontDoor(max_pending, max_pending_per_address)
        self.notices = Notices()
        self._registering: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.listener: HubListener = _NoListener()
        self.online: dict[str, ProxyConn] = {}
        self._seen: dict[str, ProxyConn] = {}  # the last connection of each proxy (labels)
        self._known: tuple[str, ...] = tuple(sorted(proxies))
        # The proxies that changed in a way the scheduler cares about, for its
        # snapshot to rebuild only them (`take_changed`): rebuilding all 5 000
        # machines on each of 5 000 registrations cost 50 s of CPU.
        self._changed_ids: set[str] = set()
        self.offline_since: dict[str, float] = {}  # wall clock; from our start if never seen
        self._online_changed = trio.Event()
        self.port = 0  # the bound port, once serving
        self._pings: trio.Nursery | None = None  # our pings run here, while serving
        self._online_lines = LineBudget(ONLINE_LINES_PER_MINUTE)
        started = time.time()
        for proxy_id in proxies:
            self.offline_since[proxy_id] = started

    @classmethod
    def for_config(cls, config: ManagerConfig) -> Hub:
        return cls(
            config.proxies,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            max_pending=config.hub_max_pending,
            max_pending_per_address=config.hub_max_pending_per_address,
        )

    def known(self) -> tuple[str, ...]:
        """Every configured proxy id, sorted (asked on every decision: kept sorted once)."""
        if len(self._known) != len(self._proxies):
            self._known = tuple(sorted(self._proxies))
        return self._known

    def labels(self, proxy_id: str) -> tuple[str, ...]:
        """The manager's `proxies.<id>.labels` and the proxy's own (from its last hello)."""
        conn = self.online.get(proxy_id) or self._seen.get(proxy_id)
        if conn is not None:
            return conn.labels
        entry = self._proxies.get(proxy_id)
        return tuple(sorted(entry.labels)) if entry else ()

    def last_seen(self, proxy_id: str) -> ProxyConn | None:
        """Its connection now, or the last one it had (for capacity, labels while offline)."""
        return self.online.get(proxy_id) or self._seen.get(proxy_id)

    def heartbeat_late(self, conn: ProxyConn) -> str | None:
        """Why `conn`'s heartbeats count as late (nothing heard for a while), else None."""
        silent = conn.silent_for(trio.current_time())
        if silent > self.heartbeat_timeout_s * HEARTBEAT_LATE_FRACTION:
            return f"heartbeats late (silent for {silent:.0f} s)"
        return None

    def unhealthy(self, proxy_id: str) -> str | None:
        """Why an online proxy is not chosen for new conversations, else None."""
        conn = self.online.get(proxy_id)
        if conn is None:
            return None
        if conn.health != "ok":
            detail = f": {conn.health_detail}" if conn.health_detail else ""
            return f"app-server {conn.health}{detail}"
        return self.heartbeat_late(conn)

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

    def take_changed(self) -> set[str]:
        """The proxies that changed since the last call (one reader: the admission)."""
        changed, self._changed_ids = self._changed_ids, set()
        return changed

    def _notify_online_changed(self, proxy_id: str) -> None:
        self._changed_ids.add(proxy_id)
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
        listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]
        if ssl_context is not None:
            listeners = await trio.open_ssl_over_tcp_listeners(port, ssl_context, host=host)
        else:
            listeners = await trio.open_tcp_listeners(port, host=host)
        try:
            first = listeners[0]
            raw = first.transport_listener if isinstance(first, trio.SSLListener) else first
            assert isinstance(raw, trio.SocketListener)
            bound = raw.socket.getsockname()[1]
            self.port = bound
            async with trio.open_nursery() as nursery:
                self._pings = nursery
                nursery.start_soon(self.notices.run)
                nursery.start_soon(self._liveness)
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                scheme = "wss" if ssl_context else "ws"
                log.info("waiting for proxies on %s://%s:%d", scheme, host, bound)
                task_status.started(bound)
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                # Out of file descriptors (or memory): free one by dropping the
                # oldest stranger, and try again shortly; trio's own accept loop
                # would log a traceback ten times a second.
                self.notices.note(
                    "accepts failed for lack of resources",
                    "cannot accept a connection: %s; dropping the oldest connection "
                    "without a hello and retrying",
                    os.strerror(exc.errno or 0),
                )
                self._door.evict_oldest()
                await trio.sleep(ACCEPT_RETRY_S)
                continue
            nursery.start_soon(self._on_stream, stream)

    async def _on_stream(self, stream: trio.abc.Stream) -> None:
        """Error boundary: one connection's failure ends it, not the server."""
        address, peer = _peer(stream)
        entry, *evicted = self._door.enter(address)
        for dropped in evicted:
            self.notices.note(
                "connections without a hello dropped over the caps",
                "%d connections have not said hello yet (caps: %d in all, %d per "
                "address); dropping the oldest, from %s",
                self._door.pending + 1,
                self._door.max_pending,
                self._door.max_pending_per_address,
                dropped.address,
            )
        try:
            with entry.scope:
                await self._serve_stream(stream, entry, peer)
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the peer went away: the normal end of a connection
        except* HandshakeFailed as group:
            self.notices.note(
                "connections that did not speak WebSocket",
                "dropping a connection from %s: %s",
                peer,
                group.exceptions[0],
            )
        except* Exception:
            log.exception("proxy connection failed")
        finally:
            self._door.leave(entry)
            await trio.aclose_forcefully(stream)

    async def _serve_stream(self, stream: trio.abc.Stream, entry: Pending, peer: str) -> None:
        ws = await self._handshake(stream, peer)
        if ws is None:
            return
        try:
            await self._serve_connection(ws, entry, peer)
        except* ConnectionClosed:
            pass  # the normal end
        finally:
            await _close(ws)

    async def _handshake(self, stream: trio.abc.Stream, peer: str) -> ServerWebSocket | None:
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
            upgrade = await read_upgrade(stream)
            if upgrade.header(b"origin") is not None:
                # Proxies never send Origin; browsers always do: a web page must
                # not be able to probe the hub from the user's own machine.
                self.notices.note(
                    "browser connections refused",
                    "refusing a connection from %s: it sent an Origin header (a web page?)",
                    peer,
                )
                await upgrade.reject(403, b"codexnet hub: no browsers\n")
                return None
            return await upgrade.accept(max_message_size=MAX_FRAME_BYTES)
        self.notices.note(
            "connections without a handshake in time",
            "dropping a connection from %s: no WebSocket handshake within %g s",
            peer,
            HANDSHAKE_TIMEOUT_S,
        )
        return None

    async def _serve_connection(self, ws: ServerWebSocket, entry: Pending, peer: str) -> None:
        hello = await self._read_hello(ws, entry.address, peer)
        if hello is None:
            return
        self._door.leave(entry)  # through the door: no longer a stranger
        proxy_id = hello.proxy_id
        async with self._registering[proxy_id]:  # one hello of an id at a time
            old = self.online.get(proxy_id)
            if old is not None:
                if await self._still_answers(old):
                    self.notices.note(
                        f"second connections of proxy {proxy_id!r} refused",
                        "refusing a second connection of proxy %r from %s: it is connected "
                        "from %s and answers heartbeats (two proxies started with one config?)",
                        proxy_id,
                        peer,
                        old.peer,
                    )
                    await _close(
                        ws,
                        CLOSE_DUPLICATE,
                        f"proxy {proxy_id} is already connected from {old.peer}",
                    )
                    return
                log.warning(
                    "proxy %r connected again from %s; its connection from %s stopped "
                    "answering: replaced",
                    proxy_id,
                    peer,
                    old.peer,
                )
                # Not awaited: its own handler closes it, bounded.
                old.scope.cancel()
            conn = ProxyConn(
                proxy_id,
                ws,
                capacity=hello.capacity,
                labels=_union(self._proxies[proxy_id].labels, hello.labels),
                version=hello.version,
                health=hello.health,
                health_detail=hello.health_detail,
                running=len(hello.running),
                peer=peer,
                took_over=old is not None,
                # The first of our pings soon, so /status knows the round trip.
                next_rtt_ping=trio.current_time()
                + min(RTT_EVERY_S, self.heartbeat_timeout_s / 3) * random.uniform(0.3, 0.6),
            )
            if not await conn.send(Welcome()):
                return
            self.online[proxy_id] = conn
            self._seen[proxy_id] = conn
            self.offline_since.pop(proxy_id, None)
            self._notify_online_changed(proxy_id)
        if self._online_lines.take():
            log.info(
                "proxy %r online from %s (%s, capacity %d)",
                proxy_id,
                peer,
                hello.version or "unknown version",
                hello.capacity,
            )
        try:
            with conn.scope:
                if await self._tell(conn, self.listener.proxy_online(conn, hello)):
                    await self._read_frames(conn)
        finally:
            conn.closed.set()
            if self.online.get(proxy_id) is conn:
                del self.online[proxy_id]
                self.offline_since[proxy_id] = time.time()
                self._notify_online_changed(proxy_id)
                log.warning("proxy %r went offline", proxy_id)
            self.listener.proxy_offline(conn)

    async def _still_answers(self, conn: ProxyConn) -> bool:
        """Whether an online connection is alive (a second hello of its id is then refused)."""
        if conn.silent_for(trio.current_time()) > self.heartbeat_timeout_s / 2:
            return False  # a heartbeat is overdue already: it stopped answering
        with trio.move_on_after(DUPLICATE_PROBE_S):
            try:
                await conn.ws.ping()
            except ConnectionClosed:
                return False
            conn.last_heard = trio.current_time()
            return True
        return False

    async def _liveness(self) -> None:
        """Every connection's heartbeat, in one task: ping the quiet, drop the silent."""
        while True:
            timeout = self.heartbeat_timeout_s
            await trio.sleep(min(LIVENESS_SWEEP_MAX_S, timeout / 10))
            now = trio.current_time()
            if unlogged := self._online_lines.renew(now):
                log.info(
                    "%d more proxies came online in the last minute, not logged one by one "
                    "(%d online now)",
                    unlogged,
                    len(self.online),
                )
            for conn in list(self.online.values()):
                silent = conn.silent_for(now)
                late = silent > timeout * HEARTBEAT_LATE_FRACTION
                if late != conn.late:
                    conn.late = late
                    self._notify_online_changed(conn.proxy_id)  # the scheduler's choice may change
                if silent > timeout:
                    self._half_dead(conn, silent)
                elif self._pings is not None and not conn.pinging:
                    if silent > timeout * HUB_PING_FRACTION or now >= conn.next_rtt_ping:
                        conn.next_rtt_ping = now + RTT_EVERY_S * random.uniform(0.8, 1.2)
                        self._pings.start_soon(conn.ping, timeout)

    def _half_dead(self, conn: ProxyConn, silent: float) -> None:
        log.warning(
            "proxy %r silent for %.0f s (half-dead link?); marking it offline",
            conn.proxy_id,
            silent,
        )
        # Offline now, not after a close handshake that a dead link never completes.
        if self.online.get(conn.proxy_id) is conn:
            del self.online[conn.proxy_id]
            self.offline_since[conn.proxy_id] = time.time()
            self._notify_online_changed(conn.proxy_id)
        conn.scope.cancel()

    async def _read_hello(self, ws: ServerWebSocket, address: str, peer: str) -> Hello | None:
        raw: str | bytes | None = None
        with trio.move_on_after(HELLO_TIMEOUT_S):
            raw = await ws.get_message()
        if raw is None:
            self.notices.note(
                "connections without a hello in time",
                "dropping a connection from %s: no hello within %g s",
                peer,
                HELLO_TIMEOUT_S,
            )
            await _close(ws, CLOSE_HELLO_TIMEOUT, "no hello")
            return None
        try:
            frame = decode_proxy_frame(raw)
            if not isinstance(frame, Hello):
                raise ProtocolError(f"expected hello, got {frame.type}")
        except ProtocolError as exc:
            self.notices.note(
                "connections refused for a bad first frame",
                "refusing a connection from %s: %s",
                peer,
                exc,
            )
            await _close(ws, CLOSE_BAD_FRAME, str(exc)[:120])
            return None
        if frame.protocol != PROTOCOL_VERSION:
            self.notices.note(
                "proxies refused for their protocol version",
                "refusing proxy %r from %s: protocol %d, we speak %d (upgrade it)",
                frame.proxy_id,
                peer,
                frame.protocol,
                PROTOCOL_VERSION,
            )
            await _close(ws, CLOSE_PROTOCOL_VERSION, f"protocol {PROTOCOL_VERSION} required")
            return None
        turn = self._door.auth_turn(address)
        if turn is None:
            self.notices.note(
                "hellos refused after repeated failed authentications",
                "refusing a hello from %s for now: too many failed authentications",
                peer,
            )
            await _close(ws, CLOSE_TRY_LATER, "too many failed authentications; retry later")
            return None
        await trio.sleep_until(turn)  # failures from this address back off
        entry = self._proxies.get(frame.proxy_id)
        # Compared in constant time, against a dummy for an unknown id, so
        # neither the close code nor the timing tells which ids exist.
        expected = entry.token if entry is not None else _DUMMY_TOKEN
        if not hmac.compare_digest(frame.token.encode(), expected.encode()) or entry is None:
            self._door.auth_failed(address)
            self.notices.note(
                "failed authentications",
                "refusing a proxy from %s: %s",
                peer,
                f"unknown proxy id {frame.proxy_id!r}"
                if entry is None
                else f"wrong token for proxy {frame.proxy_id!r}",
            )
            await _close(ws, CLOSE_UNAUTHORIZED, "unknown proxy id or wrong token")
            return None
        self._door.auth_succeeded(address)
        return frame

    async def _read_frames(self, conn: ProxyConn) -> None:
        while True:
            raw = await conn.ws.get_message()  # its bytes were noted by conn.stream
            try:
                frame = decode_proxy_frame(raw)
                if isinstance(frame, Hello):
                    raise ProtocolError("hello sent twice")
            except ProtocolError as exc:
                log.warning("proxy %r sent a bad frame, disconnecting: %s", conn.proxy_id, exc)
                await _close(conn.ws, CLOSE_BAD_FRAME, str(exc)[:120])  # bounded
                return
            if isinstance(frame, Load):
                changed = (frame.health, frame.health_detail) != (conn.health, conn.health_detail)
                conn.running = frame.running
                conn.health, conn.health_detail = frame.health, frame.health_detail
                if changed:
                    log.info(
                        "proxy %r: app-server %s%s",
                        conn.proxy_id,
                        frame.health,
                        f" ({frame.health_detail})" if frame.health_detail else "",
                    )
                    self._notify_online_changed(conn.proxy_id)
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


def _union(*groups: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return tuple(sorted({label for group in groups for label in group}))


def default_max_pending() -> int:
    """A quarter of the open-file limit, 64 … 4 096: room for a fleet reconnecting at
    once, while strangers can never take more than a quarter of the descriptors."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(64, min(4096, soft // 4))


_DUMMY_TOKEN: Final = secrets.token_urlsafe(32)


def _peer(stream: trio.abc.Stream) -> tuple[str, str]:
    """(address, "address:port") of the remote end, for the caps and the logs."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(inner, trio.SocketStream):
        return "?", "?"
    try:
        name = inner.socket.getpeername()
    except OSError:
        return "?", "?"
    host, port = str(name[0]), int(name[1])
    return host, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


async def _close(ws: ServerWebSocket, code: int = 1000, reason: str | None = None) -> None:
    """Close with `code`, bounded: a peer that never answers the close frame is dropped."""
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        await ws.aclose(code, reason)
