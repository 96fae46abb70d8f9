"""A controllable TCP relay for fault tests: put it between a proxy and the hub.

    relay = TcpRelay("127.0.0.1", hub_port)
    port = await nursery.start(relay.serve)        # the proxy connects to this port
    await relay.wait_for_frame("down", "welcome")  # the proxy is registered
    relay.cut()                                    # RST both ways, like a broken link
    relay.blackhole()                              # half-dead: bytes vanish, sockets stay open
    relay.restore()                                # RST the half-dead ones; new ones work
    trap = relay.cut_on("up", "task_result")       # the link dies while this frame is on the wire
    frame = await trap.wait()

Each accepted connection gets its own connection to the target and two pump
tasks (client → target is "up", target → client is "down"). When the target
is down the accepted connection is reset, so the client sees a failed connect
and retries. `serve(port=N)` keeps the relay's port fixed, so a test can keep
the same relay across restarts of the target (set `relay.target` if the
target's port changes).

WebSocket-aware (the default): after the HTTP upgrade, both directions are
split into RFC 6455 frames. Complete data messages (fragments are held back
until the final one) are logged in `relay.frames` with their JSON decoded,
and are the unit traps act on; control frames (ping, pong, close) are passed
on at once, unchanged, and logged in `relay.controls`. Anything the relay
cannot read faithfully (a negotiated extension such as permessage-deflate,
RSV bits, an unmasked client frame) raises `RelayError`, which ends `serve`
and so fails the test: a fault test whose traps silently never fire would
prove nothing. Traffic that does not start with an HTTP `GET` (TLS, for a
`wss://` hub) and plain HTTP without an upgrade pass through as opaque bytes:
cut/blackhole/restore work, frames and traps do not. `TcpRelay(...,
websocket=False)` relays everything as raw bytes.

Two details make the faults look like the real thing:

* A cut sets `SO_LINGER (1, 0)` before closing, so each peer gets an RST (a
  reader sees ECONNRESET) rather than an orderly FIN.
* A black-holed connection keeps reading and discarding (and logging, with
  fate "discarded"), so the peers' writes keep succeeding and nobody sees a
  FIN or an RST until `restore()`/`cut()`. Unlike a real dead link the relay's
  kernel still ACKs what it reads: only application-level liveness (pings,
  heartbeats) can notice, not TCP retransmission timeouts.
"""

from __future__ import annotations

import array
import fcntl
import itertools
import json
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, Final, Literal

import attrs
import trio

log = logging.getLogger(__name__)

Direction = Literal["up", "down"]
Fate = Literal["forwarded", "dropped", "discarded"]
# A message filter: a `type` value, or a predicate on the decoded message.
Match = str | Callable[[dict[str, Any]], bool] | None

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
ControlName = Literal["ping", "pong", "close"]
_CONTROL_NAMES: Final[dict[int, ControlName]] = {
    OP_CLOSE: "close",
    OP_PING: "ping",
    OP_PONG: "pong",
}

MAX_HEAD_BYTES: Final = 64 * 1024
RECEIVE_SIZE: Final = 65536
# How long mode="after" waits for the forwarded frame to leave the relay's send
# buffer before resetting: an RST discards whatever the kernel has not sent yet.
FLUSH_LIMIT_S: Final = 1.0
_SIOCOUTQNSD: Final = 0x894B  # Linux: bytes in the send queue not yet sent


class RelayError(Exception):
    """The relay cannot read the traffic faithfully (so its traps would lie)."""


# --------------------------------------------------------------------------- records


@attrs.frozen
class Frame:
    """One complete data message seen by the relay."""

    direction: Direction
    message: dict[str, Any]  # the decoded JSON object; {} for binary or non-object text
    time: float  # trio.current_time() when its last byte arrived
    connection: int  # the relay connection's number, from 1
    fate: Fate = "forwarded"
    text: str | None = None  # the raw text (None for binary messages)

    @property
    def type(self) -> str | None:
        kind = self.message.get("type")
        return kind if isinstance(kind, str) else None


@attrs.frozen
class ControlFrame:
    direction: Direction
    opcode: ControlName
    payload: bytes
    time: float
    connection: int
    fate: Fate = "forwarded"


def _matcher(match: Match) -> Callable[[dict[str, Any]], bool]:
    if match is None:
        return lambda message: True
    if isinstance(match, str):
        kind = match
        return lambda message: message.get("type") == kind
    return match


# --------------------------------------------------------------------------- framing (sans I/O)


@attrs.frozen
class Chunk:
    """A unit of one direction's byte stream: forwarded whole, or not at all."""

    kind: Literal["raw", "message", "control"]
    raw: bytes  # the bytes as they came (all frames of a fragmented message)
    opcode: int = 0
    payload: bytes = b""  # unmasked; a message's fragments joined


def encode_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = None
) -> bytes:
    """One RFC 6455 frame (for tests that speak raw WebSocket through the relay)."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask is not None else 0
    n = len(payload)
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += n.to_bytes(2, "big")
    else:
        head.append(bit | 127)
        head += n.to_bytes(8, "big")
    if mask is None:
        return bytes(head) + payload
    return bytes(head) + mask + _unmask(payload, mask)


def _unmask(data: bytes, key: bytes) -> bytes:
    n = len(data)
    if n == 0:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")).to_bytes(n, "little")


class FrameParser:
    """Split one direction of a WebSocket byte stream into `Chunk`s.

    Client frames must be masked and server frames must not (RFC 6455 §5.1).
    A fragmented message comes out as one "message" chunk once its final
    fragment is in; ping and pong frames in between come out at once (the RFC
    allows control frames between fragments), a close frame first releases
    the incomplete message's bytes as "raw" so nothing is reordered past it.
    """

    def __init__(self, *, masked: bool) -> None:
        self.masked = masked
        self._buffer = bytearray()
        self._held = bytearray()
        self._held_payload = bytearray()
        self._held_opcode: int | None = None

    def feed(self, data: bytes) -> list[Chunk]:
        self._buffer += data
        out: list[Chunk] = []
        while (frame := self._next_frame()) is not None:
            out.extend(self._assemble(*frame))
        return out

    def _assemble(self, fin: bool, opcode: int, payload: bytes, raw: bytes) -> list[Chunk]:
        if opcode in _CONTROL_NAMES:
            if not fin or len(payload) > 125:
                raise RelayError("fragmented or oversized control frame")
            out: list[Chunk] = []
            if opcode == OP_CLOSE and self._held_opcode is not None:
                out.append(Chunk("raw", bytes(self._held)))
                self._reset_held()
            out.append(Chunk("control", raw, opcode, payload))
            return out
        if opcode == OP_CONTINUATION:
            if self._held_opcode is None:
                raise RelayError("continuation frame outside a fragmented message")
            self._held += raw
            self._held_payload += payload
            if not fin:
                return []
            chunk = Chunk(
                "message", bytes(self._held), self._held_opcode, bytes(self._held_payload)
            )
            self._reset_held()
            return [chunk]
        if opcode in (OP_TEXT, OP_BINARY):
            if self._held_opcode is not None:
                raise RelayError("a new message started inside a fragmented one")
            if fin:
                return [Chunk("message", raw, opcode, payload)]
            self._held_opcode = opcode
            self._held += raw
            self._held_payload += payload
            return []
        raise RelayError(f"reserved opcode {opcode:#x}")

    def _reset_held(self) -> None:
        self._held = bytearray()
        self._held_payload = bytearray()
        self._held_opcode = None

    def _next_frame(self) -> tuple[bool, int, bytes, bytes] | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        if b0 & 0x70:
            raise RelayError("RSV bits set: an extension (compression?) is in use")
        masked = bool(b1 & 0x80)
        if masked != self.masked:
            side = "client" if self.masked else "server"
            raise RelayError(f"{side} frame with mask bit {int(masked)}")
        length = b1 & 0x7F
        pos = 2
        if length == 126:
            if len(buf) < 4:
                return None
            length = int.from_bytes(buf[2:4], "big")
            pos = 4
        elif length == 127:
            if len(buf) < 10:
                return None
            length = int.from_bytes(buf[2:10], "big")
            if length >> 63:
                raise RelayError("64-bit payload length with the top bit set")
            pos = 10
        key = b""
        if masked:
            if len(buf) < pos + 4:
                return None
            key = bytes(buf[pos : pos + 4])
            pos += 4
        end = pos + length
        if len(buf) < end:
            return None
        payload = bytes(buf[pos:end])
        if masked:
            payload = _unmask(payload, key)
        raw = bytes(buf[:end])
        del buf[:end]
        return bool(b0 & 0x80), b0 & 0x0F, payload, raw


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """An HTTP head → its first line and headers (names lower-cased, repeats joined)."""
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return lines[0], headers


def _is_upgrade_request(head: bytes) -> bool:
    _, headers = _parse_head(head)
    return headers.get("upgrade", "").lower() == "websocket"


def _is_upgrade_response(head: bytes) -> bool:
    """True for a 101 WebSocket upgrade; raise if it negotiated an extension."""
    status_line, headers = _parse_head(head)
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        return False
    if headers.get("sec-websocket-extensions"):
        # trio-websocket 0.12.2 offers none; if that changes, frames are compressed.
        raise RelayError(
            "the WebSocket handshake negotiated extensions "
            f"({headers['sec-websocket-extensions']}): the relay cannot read the frames"
        )
    return headers.get("upgrade", "").lower() == "websocket"


def _decode(chunk: Chunk) -> tuple[dict[str, Any], str | None]:
    if chunk.opcode != OP_TEXT:
        return {}, None
    text = chunk.payload.decode("utf-8", "replace")
    try:
        value = json.loads(text)
    except ValueError:
        return {}, text
    return (value if isinstance(value, dict) else {}), text


# --------------------------------------------------------------------------- traps


@attrs.define(eq=False)
class Trap:
    """A one-shot trigger armed by `cut_on`/`blackhole_on`; `await trap.wait()`."""

    direction: Direction
    match: Callable[[dict[str, Any]], bool]
    action: Literal["cut", "blackhole"]
    mode: Literal["drop", "after"]
    frame: Frame | None = None  # the message that fired it
    fired: trio.Event = attrs.Factory(trio.Event)
    _armed: list[Trap] | None = None

    async def wait(self) -> Frame:
        await self.fired.wait()
        assert self.frame is not None
        return self.frame

    def disarm(self) -> None:
        if self._armed is not None and self in self._armed:
            self._armed.remove(self)


# --------------------------------------------------------------------------- connections

ConnState = Literal["open", "doomed", "blackholed", "closed"]


def _set_rst_on_close(stream: trio.SocketStream) -> None:
    sock = stream.socket
    if sock.fileno() != -1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _close_now(stream: trio.SocketStream | None, *, rst: bool) -> None:
    """Close synchronously; trio wakes any task blocked on the socket."""
    if stream is None or stream.socket.fileno() == -1:
        return
    if rst:
        _set_rst_on_close(stream)
    stream.socket.close()


def _unsent_bytes(stream: trio.SocketStream) -> int:
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(stream.socket.fileno(), _SIOCOUTQNSD, buf)
    except OSError:
        return 0
    return buf[0]


@attrs.define(eq=False)
class RelayConnection:
    """One client connection and its connection to the target."""

    id: int
    client: trio.SocketStream
    target: trio.SocketStream | None = None
    # "doomed": a trap fired; nothing more is forwarded while its frame is flushed.
    state: ConnState = "open"
    released: trio.Event = attrs.Factory(trio.Event)  # reset or closed: the task may end
    ws_requested: bool = False
    websocket: bool = False
    request_seen: trio.Event = attrs.Factory(trio.Event)  # the up side classified the request
    handshake: trio.Event = attrs.Factory(trio.Event)  # the down side has seen the response

    @property
    def forwarding(self) -> bool:
        return self.state == "open"

    def reset(self) -> None:
        """RST both sides now (SO_LINGER 0), whatever state the connection is in."""
        if self.state == "closed":
            return
        self.state = "closed"
        _close_now(self.client, rst=True)
        _close_now(self.target, rst=True)
        self.released.set()

    def close(self) -> None:
        """Orderly close (FIN) of whatever is still open."""
        self.state = "closed"
        _close_now(self.client, rst=False)
        _close_now(self.target, rst=False)
        self.released.set()


# --------------------------------------------------------------------------- the relay


class TcpRelay:
    """See the module docstring. All methods are called from the trio thread."""

    def __init__(self, target_host: str, target_port: int, *, websocket: bool = True) -> None:
        self.target: tuple[str, int] = (target_host, target_port)
        self.websocket = websocket
        self.port: int | None = None
        self.frames: list[Frame] = []
        self.controls: list[ControlFrame] = []
        self.accepted = 0  # connections accepted so far
        self.refused = 0  # accepted connections reset because the target was down
        self.live: list[RelayConnection] = []
        self._traps: list[Trap] = []
        self._hang_new = False
        self._ids = itertools.count(1)
        self._changed = trio.Event()

    # ----------------------------------------------------------------- serving

    async def serve(
        self, *, port: int = 0, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on 127.0.0.1:`port` (0: any) until cancelled; `started(port)`."""
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")  # SO_REUSEADDR
        self.port = int(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    async def _handle(self, client: trio.SocketStream) -> None:
        conn = RelayConnection(next(self._ids), client)
        self.accepted += 1
        self.live.append(conn)
        self._notify()
        try:
            await self._run(conn)
        finally:
            conn.close()  # FIN, unless it was reset already
            self.live.remove(conn)
            self._notify()

    async def _run(self, conn: RelayConnection) -> None:
        if self._hang_new:
            # A half-dead link: the connect "succeeds", then nothing gets through.
            conn.state = "blackholed"
            await self._discard(conn.client)
            await conn.released.wait()
            return
        try:
            target = await trio.open_tcp_stream(*self.target)
        except OSError as exc:
            log.info("relay connection %d: target %s:%d down (%s)", conn.id, *self.target, exc)
            self.refused += 1
            conn.reset()
            return
        conn.target = target
        if conn.state == "closed":  # cut while connecting
            _close_now(target, rst=True)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, conn, "up", conn.client, target)
            nursery.start_soon(self._pump, conn, "down", target, conn.client)
        if conn.state == "blackholed":
            await conn.released.wait()  # even a FIN must not get through

    async def _discard(self, stream: trio.SocketStream) -> None:
        while True:
            try:
                if not await stream.receive_some(RECEIVE_SIZE):
                    return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    # ----------------------------------------------------------------- pumping

    async def _pump(
        self,
        conn: RelayConnection,
        direction: Direction,
        src: trio.SocketStream,
        dst: trio.SocketStream,
    ) -> None:
        try:
            await self._pump_bytes(conn, direction, src, dst)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            if conn.forwarding:  # a peer reset: pass the reset on, like a router would
                conn.reset()
        finally:  # never leave the other side waiting
            (conn.handshake if direction == "down" else conn.request_seen).set()

    async def _pump_bytes(
        self,
        conn: RelayConnection,
        direction: Direction,
        src: trio.SocketStream,
        dst: trio.SocketStream,
    ) -> None:
        head = bytearray()
        parser: FrameParser | None = None
        raw = not self.websocket
        while True:
            data = await src.receive_some(RECEIVE_SIZE)
            if not data:
                if conn.forwarding:
                    await dst.send_eof()
                return
            if raw:
                await self._forward(conn, dst, data)
                continue
            if parser is None:
                head += data
                if direction == "up":
                    rest = await self._request_head(conn, head, dst)
                else:
                    rest = await self._response_head(conn, head, dst)
                if rest is None:
                    continue  # the head is not complete yet
                if not conn.websocket:
                    raw = True
                    if rest:
                        await self._forward(conn, dst, rest)
                    continue
                parser = FrameParser(masked=direction == "up")
                data = rest
            for chunk in parser.feed(data):
                await self._on_chunk(conn, direction, chunk, dst)

    async def _request_head(
        self, conn: RelayConnection, head: bytearray, dst: trio.SocketStream
    ) -> bytes | None:
        """Forward the client's HTTP head once complete; what follows it, or None."""
        if len(head) < 4:
            return None
        if not head.startswith(b"GET "):
            # Not an HTTP upgrade (TLS for wss://, say): relay it as it is.
            conn.request_seen.set()
            return bytes(head)
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEAD_BYTES:
                raise RelayError(f"no end of the HTTP head in {len(head)} bytes")
            return None
        first = bytes(head[: end + 4])
        conn.ws_requested = _is_upgrade_request(first)
        conn.request_seen.set()
        await self._forward(conn, dst, first)
        if conn.ws_requested:
            await conn.handshake.wait()  # the response decides what follows
        return bytes(head[end + 4 :])

    async def _response_head(
        self, conn: RelayConnection, head: bytearray, dst: trio.SocketStream
    ) -> bytes | None:
        """Forward the server's HTTP head once complete; what follows it, or None."""
        await conn.request_seen.wait()
        if not conn.ws_requested:
            return bytes(head)
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEAD_BYTES:
                raise RelayError(f"no end of the HTTP head in {len(head)} bytes")
            return None
        first = bytes(head[: end + 4])
        conn.websocket = _is_upgrade_response(first)
        conn.handshake.set()  # before forwarding: the client's frames come after it
        await self._forward(conn, dst, first)
        return bytes(head[end + 4 :])

    async def _forward(self, conn: RelayConnection, dst: trio.SocketStream, data: bytes) -> None:
        if conn.forwarding:
            await dst.send_all(data)

    def _lost_fate(self, conn: RelayConnection) -> Fate:
        return "discarded" if conn.state == "blackholed" else "dropped"

    async def _on_chunk(
        self, conn: RelayConnection, direction: Direction, chunk: Chunk, dst: trio.SocketStream
    ) -> None:
        now = trio.current_time()
        if chunk.kind == "raw":
            await self._forward(conn, dst, chunk.raw)
        elif chunk.kind == "control":
            fate: Fate = "forwarded" if conn.forwarding else self._lost_fate(conn)
            await self._forward(conn, dst, chunk.raw)
            name = _CONTROL_NAMES[chunk.opcode]
            self.controls.append(ControlFrame(direction, name, chunk.payload, now, conn.id, fate))
            self._notify()
        else:
            await self._on_message(conn, direction, chunk, dst, now)

    async def _on_message(
        self,
        conn: RelayConnection,
        direction: Direction,
        chunk: Chunk,
        dst: trio.SocketStream,
        now: float,
    ) -> None:
        message, text = _decode(chunk)

        def record(fate: Fate) -> Frame:
            frame = Frame(direction, message, now, conn.id, fate, text)
            self.frames.append(frame)
            self._notify()
            return frame

        if not conn.forwarding:
            record(self._lost_fate(conn))
            return
        trap = self._take_trap(direction, message)
        if trap is None:
            await dst.send_all(chunk.raw)
            record("forwarded")
            return
        # Stop the other direction at once: with mode="after" its answer must be lost.
        conn.state = "doomed"
        if trap.mode == "after":
            await dst.send_all(chunk.raw)
            await self._flushed(dst)
        frame = record("forwarded" if trap.mode == "after" else "dropped")
        log.info(
            "relay connection %d: %s %r frame %s, then %s",
            conn.id,
            direction,
            frame.type,
            "forwarded" if trap.mode == "after" else "dropped",
            "cut" if trap.action == "cut" else "black-holed",
        )
        if trap.action == "cut":
            conn.reset()
        elif conn.state == "doomed":  # not cut meanwhile
            conn.state = "blackholed"
        trap.frame = frame
        trap.fired.set()
        self._notify()

    async def _flushed(self, dst: trio.SocketStream) -> None:
        """Wait (bounded) until the kernel has sent what we wrote: an RST drops the rest."""
        with trio.move_on_after(FLUSH_LIMIT_S):
            # A kernel counter: there is no event to wait on, so poll it briefly.
            while _unsent_bytes(dst):  # noqa: ASYNC110
                await trio.sleep(0.001)

    def _take_trap(self, direction: Direction, message: dict[str, Any]) -> Trap | None:
        for trap in self._traps:
            if trap.direction == direction and trap.match(message):
                self._traps.remove(trap)
                return trap
        return None

    # ----------------------------------------------------------------- faults

    def cut(self) -> None:
        """RST every current connection, both sides. New connections work."""
        log.info("relay: cutting %d connection(s)", len(self.live))
        for conn in list(self.live):
            conn.reset()
        self._notify()

    def blackhole(self, new_connections: Literal["hang", "work"] = "hang") -> None:
        """Half-dead link: current connections silently lose every byte, both ways.

        With "hang", new connections are accepted and then get nothing through
        either (the target is not even contacted); with "work" they work.
        """
        log.info(
            "relay: black-holing %d connection(s), new ones %s", len(self.live), new_connections
        )
        for conn in self.live:
            if conn.state == "open":
                conn.state = "blackholed"
        self._hang_new = new_connections == "hang"
        self._notify()

    def restore(self) -> None:
        """RST the black-holed connections (a NAT answering for a dead entry); new ones work."""
        self._hang_new = False
        for conn in list(self.live):
            if conn.state == "blackholed":
                conn.reset()
        self._notify()

    def cut_on(
        self, direction: Direction, match: Match, *, mode: Literal["drop", "after"] = "drop"
    ) -> Trap:
        """Arm a one-shot trap: the next message in `direction` matching `match`
        is not forwarded ("drop") or forwarded ("after"), and its connection is
        reset at that moment; nothing else goes through it in either direction."""
        return self._arm(direction, match, "cut", mode)

    def blackhole_on(
        self, direction: Direction, match: Match, *, mode: Literal["drop", "after"] = "drop"
    ) -> Trap:
        """Like `cut_on`, but that connection turns half-dead instead of being reset."""
        return self._arm(direction, match, "blackhole", mode)

    def _arm(
        self,
        direction: Direction,
        match: Match,
        action: Literal["cut", "blackhole"],
        mode: Literal["drop", "after"],
    ) -> Trap:
        if mode not in ("drop", "after"):
            raise ValueError(f"mode must be 'drop' or 'after', not {mode!r}")
        trap = Trap(direction, _matcher(match), action, mode, armed=self._traps)
        self._traps.append(trap)
        return trap

    # ----------------------------------------------------------------- waiting

    def _notify(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds; re-checked after every frame and fault."""
        while not predicate():
            await self._changed.wait()

    def messages(
        self, direction: Direction | None = None, match: Match = None, *, fate: Fate | None = None
    ) -> list[Frame]:
        """Logged messages in `direction` (None: both) matching, of `fate` (None: any)."""
        check = _matcher(match)
        return [
            f
            for f in self.frames
            if (direction is None or f.direction == direction)
            and (fate is None or f.fate == fate)
            and check(f.message)
        ]

    async def wait_for_frame(
        self,
        direction: Direction,
        match: Match = None,
        *,
        since: int = 0,
        fate: Fate | None = None,
    ) -> Frame:
        """The first message (index >= since in `frames`) in `direction` matching."""
        check = _matcher(match)
        found: list[Frame] = []

        def scan() -> bool:
            for frame in self.frames[since:]:
                if (
                    frame.direction == direction
                    and (fate is None or frame.fate == fate)
                    and check(frame.message)
                ):
                    found.append(frame)
                    return True
            return False

        await self.wait_until(scan)
        return found[0]
