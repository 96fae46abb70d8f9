"""The hub's end of a proxy's WebSocket (RFC 6455, server side), read in the caller's task.

trio-websocket gives every connection a reader task, a message channel, its
handshake state kept for life, and answers pings in that task: ~9 KB and a
task switch per frame for each connection. At 5 000 proxies that was a third
of the hub's memory and most of its heartbeat CPU. The hub reads each
connection in one task anyway (hello, then frame after frame), so here the
bytes are read in the task that asks for a message: a ping met on the way is
answered there, a pong wakes whoever waits for it, and the socket is read only
when a message is wanted (TCP holds the rest: backpressure for free).

The handshake is h11's HTTP parsing plus the upgrade's checks; the frames are
parsed here, not by wsproto: the server side of the protocol is small
(masked frames in, unmasked out, no extensions), and an idle fleet's traffic
is pings, which are answered from the frame's bytes at once. A ping costs the
hub ~50 µs instead of ~110 µs through trio-websocket; 5 000 idle proxies ping
~370 times a second. On a plain TCP socket (not TLS) the bytes are read and
pongs written with `os.read`/`os.write` on its descriptor once trio says it is
ready, skipping the stream layer's failed first try and its extra scheduling
round; everything else is sent through the stream, under the send lock.

One task reads at a time (the connection's handler). `ping()` and `aclose()`
may be called from other tasks: they send, then wait for what the reader
sees; `aclose()` from the reader itself (or with no reader) reads on its own
until the peer's close comes. Errors are trio-websocket's `ConnectionClosed`
with a `CloseReason`, so callers and the proxy's side (which keeps
trio-websocket as a client) speak of closes the same way.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import os
import struct
from typing import Final

import h11
import trio
from trio_websocket import CloseReason, ConnectionClosed

RECEIVE_BYTES: Final = 16384
MAX_REQUEST_BYTES: Final = 16384  # the upgrade request's head
ACCEPT_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Opcodes (RFC 6455 5.2).
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES: Final = frozenset({CONTINUATION, TEXT, BINARY})
CONTROL_OPCODES: Final = frozenset({CLOSE, PING, PONG})

# Close codes.
NORMAL: Final = 1000
PROTOCOL_ERROR: Final = 1002
NO_STATUS: Final = 1005  # a close frame without a code
ABNORMAL: Final = 1006  # the link went without a close frame
INVALID_DATA: Final = 1007  # text that is not UTF-8
MESSAGE_TOO_BIG: Final = 1009


class HandshakeFailed(Exception):
    """The peer did not speak a WebSocket upgrade (it was answered 400 or 426)."""


class _ProtocolViolation(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# --------------------------------------------------------------------------- handshake


class Upgrade:
    """A received upgrade request, to be accepted or rejected."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        http: h11.Connection,
        request: h11.Request,
        key: bytes,
    ) -> None:
        self._stream = stream
        self._http = http
        self.request = request
        self._key = key

    def header(self, name: bytes) -> bytes | None:
        """A request header's value (`name` lower-case), else None."""
        return _header(self.request, name)

    async def reject(self, status: int, body: bytes) -> None:
        await _respond(self._stream, self._http, status, body)

    async def accept(self, *, max_message_size: int) -> ServerWebSocket:
        accept = base64.b64encode(hashlib.sha1(self._key + ACCEPT_GUID).digest())
        data = self._http.send(
            h11.InformationalResponse(
                status_code=101,
                headers=[
                    (b"upgrade", b"websocket"),
                    (b"connection", b"Upgrade"),
                    (b"sec-websocket-accept", accept),
                ],
            )
        )
        assert data is not None
        trailing, _ = self._http.trailing_data  # frames sent right after the request
        await self._stream.send_all(data)
        return ServerWebSocket(self._stream, max_message_size, bytes(trailing))


async def read_upgrade(stream: trio.abc.Stream) -> Upgrade:
    """Read the HTTP upgrade request; `HandshakeFailed` if it is not one (after a 400 or
    426), `ConnectionClosed` if the peer leaves first."""
    http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            await _respond(stream, http, exc.error_status_hint, b"bad HTTP request\n")
            raise HandshakeFailed(f"bad HTTP request: {exc}") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:  # gone before a request: no complaint, nothing to answer
                raise ConnectionClosed(CloseReason(ABNORMAL, "closed before the handshake"))
            http.receive_data(bytes(data))
            continue
        if not isinstance(event, h11.Request):  # the peer closed halfway
            raise ConnectionClosed(CloseReason(ABNORMAL, "closed during the handshake"))
        problem, status = _upgrade_problem(event)
        if problem:
            await _respond(stream, http, status, f"{problem}\n".encode())
            raise HandshakeFailed(problem)
        key = _header(event, b"sec-websocket-key")
        assert key is not None
        return Upgrade(stream, http, event, key)


def _upgrade_problem(request: h11.Request) -> tuple[str, int]:
    """What makes `request` not a WebSocket upgrade ("" if nothing), and the status for it."""
    if request.method != b"GET":
        return "Request method must be GET", 400
    connection = _header(request, b"connection") or b""
    if b"upgrade" not in {token.strip().lower() for token in connection.split(b",")}:
        return "Missing header, 'Connection: Upgrade'", 400
    if (_header(request, b"upgrade") or b"").lower() != b"websocket":
        return "Missing header, 'Upgrade: WebSocket'", 400
    if _header(request, b"sec-websocket-version") != b"13":
        return "Missing header, 'Sec-WebSocket-Version: 13'", 426
    key = _header(request, b"sec-websocket-key")
    try:
        valid = key is not None and len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid = False
    if not valid:
        return "Missing or bad header, 'Sec-WebSocket-Key'", 400
    return "", 0


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:  # h11 lower-cases the names
        if key == name:
            return bytes(value)
    return None


async def _respond(stream: trio.abc.Stream, http: h11.Connection, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
    if status == 426:
        headers.append((b"sec-websocket-version", b"13"))
    try:
        data = http.send(h11.Response(status_code=status, headers=headers)) or b""
        data += http.send(h11.Data(data=body)) or b""
        data += http.send(h11.EndOfMessage()) or b""
    except h11.LocalProtocolError:
        return  # h11 cannot answer in this state: the socket is simply closed
    await stream.send_all(data)


# --------------------------------------------------------------------------- frames


def _frame(opcode: int, payload: bytes) -> bytes:
    """A server frame (final, unmasked)."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


def _close_payload(code: int, reason: str | None) -> bytes:
    if code == NO_STATUS:
        return b""
    data = (reason or "").encode()[:123]  # a control frame carries at most 125 bytes
    return struct.pack("!H", code) + data.decode(errors="ignore").encode()


def _unmask(mask: bytes, payload: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def _valid_close_code(code: int) -> bool:
    # RFC 6455 7.4: 1004-1006 and 1015 are never sent; 1012-2999 are reserved.
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999


class ServerWebSocket:
    def __init__(self, stream: trio.abc.Stream, max_message_size: int, data: bytes = b""):
        self._stream = stream
        self._max_message_size = max_message_size
        self._buffer = bytearray(data)  # bytes received, not yet parsed into frames
        self._message: list[bytes] = []  # the data frames of the message so far
        self._message_opcode: int | None = None  # TEXT or BINARY while one is open
        self._size = 0
        self._reading = trio.Lock()  # held by the one task reading the socket
        self._send_lock = trio.StrictFIFOLock()
        self._pings: collections.OrderedDict[bytes, trio.Event] = collections.OrderedDict()
        self._close_sent = False
        self._close_seen = trio.Event()  # the peer's close frame (or the link's end)
        self.closed: CloseReason | None = None  # once closed, why
        self.heard_at = trio.current_time()  # the last bytes from the peer (trio time)
        # The descriptor, for the direct reads and pongs (None: through the stream).
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None

    # ------------------------------------------------------------------ reading

    async def get_message(self) -> str | bytes:
        """The next whole message; pings met on the way are answered."""
        async with self._reading:
            if self._close_seen.is_set():
                raise ConnectionClosed(self.closed)
            while True:
                message = await self._parse()
                if message is not None:
                    return message
                await self._receive()

    async def _receive(self) -> None:
        try:
            data = await self._read()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            self._gone()
            raise ConnectionClosed(self.closed)
        self.heard_at = trio.current_time()
        self._buffer += data

    async def _read(self) -> bytes | bytearray:
        if self._fd is None:
            return await self._stream.receive_some(RECEIVE_BYTES)
        while True:
            # The handler just drained the socket: wait first, then read once.
            # A close of the stream elsewhere wakes this with ClosedResourceError.
            await trio.lowlevel.wait_readable(self._fd)
            try:
                return os.read(self._fd, RECEIVE_BYTES)
            except BlockingIOError:
                continue  # woken for nothing

    async def _parse(self) -> str | bytes | None:
        """Handle the whole frames received so far; a message once one is complete."""
        try:
            while (frame := self._next_frame()) is not None:
                opcode, fin, payload = frame
                if opcode == PING:
                    await self._pong(payload)
                elif opcode == PONG:
                    self._ponged(payload)
                elif opcode == CLOSE:
                    await self._on_close(payload)
                else:
                    message = self._on_data(opcode, fin, payload)
                    if message is not None:
                        return message
        except _ProtocolViolation as exc:
            await self._fail(exc.code, exc.reason)
        return None

    def _next_frame(self) -> tuple[int, bool, bytes] | None:
        """(opcode, fin, unmasked payload) of the next whole frame, or None for more bytes."""
        buf = self._buffer
        if len(buf) < 2:
            return None
        b0, b1 = buf[0], buf[1]
        opcode, fin = b0 & 0x0F, bool(b0 & 0x80)
        if b0 & 0x70:
            raise _ProtocolViolation(PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
        if not b1 & 0x80:
            raise _ProtocolViolation(PROTOCOL_ERROR, "a client frame must be masked")
        if opcode not in DATA_OPCODES and opcode not in CONTROL_OPCODES:
            raise _ProtocolViolation(PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        n, at = b1 & 0x7F, 2
        if opcode in CONTROL_OPCODES and (n > 125 or not fin):
            raise _ProtocolViolation(PROTOCOL_ERROR, "a control frame must be short and whole")
        if n == 126:
            if len(buf) < 4:
                return None
            (n,), at = struct.unpack_from("!H", buf, 2), 4
        elif n == 127:
            if len(buf) < 10:
                return None
            (n,), at = struct.unpack_from("!Q", buf, 2), 10
        if opcode in DATA_OPCODES and self._size + n > self._max_message_size:
            # Refused before its bytes are held.
            raise _ProtocolViolation(MESSAGE_TOO_BIG, f"message over {self._max_message_size}")
        end = at + 4 + n
        if len(buf) < end:
            return None
        payload = _unmask(bytes(buf[at : at + 4]), bytes(buf[at + 4 : end]))
        del buf[:end]
        return opcode, fin, payload

    def _on_data(self, opcode: int, fin: bool, payload: bytes) -> str | bytes | None:
        if opcode == CONTINUATION:
            if self._message_opcode is None:
                raise _ProtocolViolation(PROTOCOL_ERROR, "a continuation without a message")
        elif self._message_opcode is not None:
            raise _ProtocolViolation(PROTOCOL_ERROR, "a new message inside a fragmented one")
        else:
            self._message_opcode = opcode
        if self._close_sent:
            return None  # closing: their messages no longer matter
        self._message.append(payload)
        self._size += len(payload)
        if not fin:
            return None
        parts, kind = self._message, self._message_opcode
        self._message, self._message_opcode, self._size = [], None, 0
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if kind == BINARY:
            return data
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise _ProtocolViolation(INVALID_DATA, "text that is not UTF-8") from None

    async def _on_close(self, payload: bytes) -> None:
        if not payload:
            code, reason = NO_STATUS, ""
        elif len(payload) == 1:
            raise _ProtocolViolation(PROTOCOL_ERROR, "a close frame of one byte")
        else:
            (code,) = struct.unpack_from("!H", payload)
            if not _valid_close_code(code):
                raise _ProtocolViolation(PROTOCOL_ERROR, f"invalid close code {code}")
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError:
                raise _ProtocolViolation(INVALID_DATA, "a close reason that is not UTF-8") from None
        if not self._close_sent:  # theirs: answered with their code, then done
            self.closed = CloseReason(code, reason)
            await self._send_close(code, None)
        elif self.closed is None:
            self.closed = CloseReason(code, reason)
        self._gone()
        raise ConnectionClosed(self.closed)

    async def _fail(self, code: int, reason: str) -> None:
        """Close with `code` on their fault (too big, bad UTF-8 …), without waiting."""
        self.closed = CloseReason(code, reason)
        if not self._close_sent:
            await self._send_close(code, reason)
        self._gone()
        raise ConnectionClosed(self.closed)

    def _gone(self) -> None:
        """No more frames: wake every waiter (unanswered pings raise)."""
        if self.closed is None:
            self.closed = CloseReason(ABNORMAL, "connection lost")
        self._close_seen.set()
        for waiter in self._pings.values():
            waiter.set()

    # ------------------------------------------------------------------ sending

    async def send_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            await self._send(_frame(TEXT, message.encode()))
        else:
            await self._send(_frame(BINARY, message))

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            if self._close_sent or self.closed is not None:
                raise ConnectionClosed(self.closed or CloseReason(ABNORMAL, None))
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._gone()
                raise ConnectionClosed(self.closed) from None

    async def _send_close(self, code: int, reason: str | None) -> None:
        """Our close frame (once), if it can still go (a peer that went needs none)."""
        self._close_sent = True
        async with self._send_lock:
            try:
                await self._stream.send_all(_frame(CLOSE, _close_payload(code, reason)))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _pong(self, payload: bytes) -> None:
        """Answer a ping: at once on the descriptor if no send is under way."""
        if self._close_sent:
            return  # closing: their close answers everything
        data = _frame(PONG, payload)
        if self._fd is None or self._send_lock.locked():
            await self._send(data)
            return
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._gone()
            raise ConnectionClosed(self.closed) from None
        if sent < len(data):  # the socket's buffer is full: the rest in turn
            await self._send(data[sent:])

    async def ping(self) -> None:
        """Ping and wait for its pong (or a later one); `ConnectionClosed` if it ends first.

        Someone must be reading (`get_message`) for the pong to be seen: the
        hub's handler always is.
        """
        payload = os.urandom(4)
        waiter = self._pings[payload] = trio.Event()
        try:
            await self._send(_frame(PING, payload))
            await waiter.wait()
        finally:
            unanswered = self._pings.pop(payload, None) is not None
        if unanswered:
            raise ConnectionClosed(self.closed)

    def _ponged(self, payload: bytes) -> None:
        """A pong answers its ping and every earlier one; one we did not send, none."""
        if payload not in self._pings:
            return
        while self._pings:
            key, waiter = self._pings.popitem(last=False)
            waiter.set()
            if key == payload:
                return

    # ------------------------------------------------------------------ closing

    async def aclose(self, code: int = NORMAL, reason: str | None = None) -> None:
        """Send a close frame and wait for the peer's (callers bound the wait), then
        close the socket."""
        try:
            if not self._close_sent and self.closed is None:
                self.closed = CloseReason(code, reason)
                await self._send_close(code, reason)
                if self._reading.locked():
                    await self._close_seen.wait()  # the reader sees their close
                else:
                    await self._drain()
        finally:
            self._gone()
            self._fd = None  # its number may belong to another socket once closed
            await trio.aclose_forcefully(self._stream)

    async def _drain(self) -> None:
        """Read (discarding messages) until the peer's close frame or the link's end."""
        async with self._reading:
            try:
                while True:
                    await self._parse()
                    await self._receive()
            except ConnectionClosed:
                return  # their close, or the link's end
