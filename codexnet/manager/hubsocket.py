"""The hub's end of a proxy's WebSocket: wsproto on a trio stream, read in the caller's task.

trio-websocket gives every connection a reader task, a message channel, its
handshake state kept for life, and answers pings in that task: ~9 KB and a
task switch per frame for each connection. At 5 000 proxies that was a third
of the hub's memory and most of its heartbeat CPU. The hub reads each
connection in one task anyway (hello, then frame after frame), so here the
bytes are read in the task that asks for a message: a ping met on the way is
answered there, a pong wakes whoever waits for it, and the socket is read only
when a message is wanted (TCP holds the rest: backpressure for free).

On a plain TCP socket (not TLS) the bytes are read and pongs written with
`os.read`/`os.write` on its descriptor once trio says it is ready, skipping
the stream layer's failed first try and its extra scheduling round: a ping
costs the hub 68 µs instead of 107 µs (5 000 idle proxies ping ~370 times a
second). Everything else is sent through the stream, under the send lock.

One task reads at a time (the connection's handler). `ping()` and `aclose()`
may be called from other tasks: they send, then wait for what the reader
sees; `aclose()` from the reader itself (or with no reader) reads on its own
until the peer's close comes. Errors are trio-websocket's `ConnectionClosed`
with a `CloseReason`, so callers and the proxy's side (which keeps
trio-websocket as a client) speak of closes the same way.
"""

from __future__ import annotations

import collections
import os
from typing import Final

import trio
from trio_websocket import CloseReason, ConnectionClosed
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

RECEIVE_BYTES: Final = 16384
ABNORMAL: Final = 1006  # the link went without a close frame
MESSAGE_TOO_BIG: Final = 1009


class HandshakeFailed(Exception):
    """The peer did not speak a WebSocket upgrade (or left before finishing it)."""


class Upgrade:
    """A received upgrade request, to be accepted or rejected."""

    def __init__(self, stream: trio.abc.Stream, handshake: H11Handshake, request: Request) -> None:
        self._stream = stream
        self._handshake = handshake
        self.request = request

    def header(self, name: bytes) -> bytes | None:
        """A request header's value (`name` lower-case), else None."""
        for key, value in self.request.extra_headers:
            if key.lower() == name:
                return value
        return None

    async def reject(self, status: int, body: bytes) -> None:
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body))]
        data = self._handshake.send(
            RejectConnection(status_code=status, headers=headers, has_body=True)
        )
        data += self._handshake.send(RejectData(data=body, body_finished=True))
        await self._stream.send_all(data)

    async def accept(self, *, max_message_size: int) -> ServerWebSocket:
        data = self._handshake.send(AcceptConnection())
        connection = self._handshake.connection  # with any bytes that came after the request
        assert connection is not None
        await self._stream.send_all(data)
        return ServerWebSocket(self._stream, connection, max_message_size)


async def read_upgrade(stream: trio.abc.Stream) -> Upgrade:
    """Read the HTTP upgrade request; `HandshakeFailed` if it is not one (after a 400),
    `ConnectionClosed` if the peer leaves first."""
    handshake = H11Handshake(ConnectionType.SERVER)
    while True:
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:  # gone before a request: no complaint, nothing to answer
            raise ConnectionClosed(CloseReason(ABNORMAL, "closed before the handshake"))
        try:
            handshake.receive_data(bytes(data))
        except RemoteProtocolError as exc:
            if isinstance(exc.event_hint, RejectConnection):
                await stream.send_all(handshake.send(exc.event_hint))
            raise HandshakeFailed(str(exc)) from None
        for event in handshake.events():
            if isinstance(event, Request):
                return Upgrade(stream, handshake, event)


class ServerWebSocket:
    def __init__(self, stream: trio.abc.Stream, connection: Connection, max_message_size: int):
        self._stream = stream
        self._ws = connection
        self._max_message_size = max_message_size
        self._reading = trio.Lock()  # held by the one task reading the socket
        self._send_lock = trio.StrictFIFOLock()
        self._text: list[str] = []  # the message so far (one of the two)
        self._bytes: list[bytes] = []
        self._size = 0
        self._pings: collections.OrderedDict[bytes, trio.Event] = collections.OrderedDict()
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
                message = await self._next_message()
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
        self._ws.receive_data(bytes(data))

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

    async def _next_message(self) -> str | bytes | None:
        """Handle the events the bytes so far make; a message once one is whole."""
        for event in self._ws.events():
            if isinstance(event, TextMessage | BytesMessage):
                self._size += len(event.data)
                if self._size > self._max_message_size:
                    await self._fail(MESSAGE_TOO_BIG, f"message over {self._max_message_size}")
                if isinstance(event, TextMessage):
                    self._text.append(event.data)
                else:
                    self._bytes.append(bytes(event.data))
                if event.message_finished:
                    self._size = 0
                    if isinstance(event, TextMessage):
                        text, self._text = self._text, []
                        return text[0] if len(text) == 1 else "".join(text)
                    data, self._bytes = self._bytes, []
                    return b"".join(data)
            elif isinstance(event, Ping):
                await self._pong(event)
            elif isinstance(event, Pong):
                self._ponged(event.payload)
            elif isinstance(event, CloseConnection):
                await self._on_close(event)
        return None

    async def _on_close(self, event: CloseConnection) -> None:
        state = self._ws.state
        if state is ConnectionState.REMOTE_CLOSING:  # theirs: answered, then done
            self.closed = CloseReason(event.code, event.reason)
            await self._send_quietly(event.response())
        elif state is ConnectionState.OPEN:  # a protocol error wsproto found in their bytes
            await self._fail(event.code, event.reason or "")
        elif self.closed is None:  # the answer to ours, or the link's end
            self.closed = CloseReason(event.code, event.reason)
        self._gone()
        raise ConnectionClosed(self.closed)

    async def _fail(self, code: int, reason: str) -> None:
        """Close with `code` on their fault (too big, bad UTF-8 …), without waiting."""
        self.closed = CloseReason(code, reason)
        await self._send_quietly(CloseConnection(code=code, reason=reason))
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
            await self._send(TextMessage(data=message))
        else:
            await self._send(BytesMessage(data=message))

    async def _send(self, event: Event) -> None:
        async with self._send_lock:
            if self.closed is not None:
                raise ConnectionClosed(self.closed)
            try:
                data = self._ws.send(event)
            except LocalProtocolError:  # closing already
                raise ConnectionClosed(self.closed or CloseReason(ABNORMAL, None)) from None
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._gone()
                raise ConnectionClosed(self.closed) from None

    async def _pong(self, ping: Ping) -> None:
        """Answer a ping: at once on the descriptor if no send is under way."""
        if self.closed is not None:
            return  # closing: their close answers everything
        if self._fd is None or self._send_lock.locked():
            await self._send(ping.response())
            return
        data = self._ws.send(ping.response())
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._gone()
            raise ConnectionClosed(self.closed) from None
        if sent < len(data):  # the socket's buffer is full: the rest in turn
            async with self._send_lock:
                try:
                    await self._stream.send_all(data[sent:])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._gone()
                    raise ConnectionClosed(self.closed) from None

    async def _send_quietly(self, event: Event) -> None:
        """A close frame, if it can still go (a peer that went needs none)."""
        async with self._send_lock:
            try:
                data = self._ws.send(event)
                await self._stream.send_all(data)
            except (LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def ping(self) -> None:
        """Ping and wait for its pong (or a later one); `ConnectionClosed` if it ends first.

        Someone must be reading (`get_message`) for the pong to be seen: the
        hub's handler always is.
        """
        payload = os.urandom(4)
        waiter = self._pings[payload] = trio.Event()
        try:
            await self._send(Ping(payload=payload))
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

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Send a close frame and wait for the peer's (callers bound the wait), then
        close the socket."""
        try:
            if self.closed is None:
                self.closed = CloseReason(code, reason)
                await self._send_quietly(CloseConnection(code=code, reason=reason))
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
            while not self._close_seen.is_set():
                for event in self._ws.events():
                    if isinstance(event, CloseConnection):
                        self._close_seen.set()
                        return
                    if isinstance(event, Pong):
                        self._ponged(event.payload)
                try:
                    await self._receive()
                except ConnectionClosed:
                    return  # the link ended: nothing more to wait for
