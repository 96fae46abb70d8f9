"""A tiny HTTP/1.1 server on trio + h11 for the test fakes.

The fakes (Telegram Bot API, OpenAI Responses API) must be reached over real
HTTP on 127.0.0.1: the manager's httpx client and the real `codex` binary talk
to them exactly as they would to the real services. h11 is already installed
as a dependency of httpx, so no web framework is needed.

A handler gets a `Request` and returns a `Response` whose body is either bytes
or an async iterator of byte chunks (sent chunked, for server-sent events).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs
import h11
import trio

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024


@attrs.frozen
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query))

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.frozen
class Response:
    status: int
    body: bytes | AsyncIterator[bytes] = b""
    headers: dict[str, str] = attrs.field(factory=dict)

    @classmethod
    def json(cls, status: int, payload: Any) -> Response:
        return cls(
            status,
            json.dumps(payload).encode(),
            {"content-type": "application/json"},
        )


Handler = Callable[[Request], Awaitable[Response]]


async def serve_http(
    handler: Handler,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` until cancelled; `task_status.started(port)` once listening."""
    await HttpServer(handler, host=host, port=port).serve(task_status=task_status)


class HttpServer:
    """`serve_http` with an off switch, for fakes that must become unreachable.

    `await go_down()` closes the listening socket (new connections are refused)
    and every open connection, idle keep-alive ones and requests in flight
    alike (their handlers are cancelled; the client sees the connection
    closed without an answer). `await come_up()` listens again on the same
    port (SO_REUSEADDR, which trio sets), so the base URL does not change.
    """

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.is_up = False
        self._scope: trio.CancelScope | None = None
        self._want_up = trio.Event()
        self._changed = trio.Event()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; `task_status.started(port)` once first listening."""
        listeners = await self._listen()
        while True:
            with trio.CancelScope() as scope:
                self._scope = scope
                async with trio.open_nursery() as nursery:
                    # The connection handlers run in serve_listeners' own nursery,
                    # so cancelling this scope closes them along with the listener.
                    await nursery.start(
                        trio.serve_listeners, _connection_handler(self.handler), listeners
                    )
                    self._set_up(True)
                    task_status.started(self.port)
                    task_status = trio.TASK_STATUS_IGNORED  # started() only once
            self._scope = None
            self._set_up(False)
            await self._want_up.wait()
            self._want_up = trio.Event()
            listeners = await self._listen()

    async def _listen(self) -> list[trio.SocketListener]:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = int(listeners[0].socket.getsockname()[1])
        return listeners

    def _set_up(self, up: bool) -> None:
        self.is_up = up
        event, self._changed = self._changed, trio.Event()
        event.set()

    async def _wait_up(self, up: bool) -> None:
        while self.is_up != up:
            await self._changed.wait()

    async def go_down(self) -> None:
        """Stop listening and close every connection; return once all are closed."""
        if self._scope is not None:
            self._scope.cancel()
        await self._wait_up(False)

    async def come_up(self) -> None:
        """Listen on the same port again; return once accepting."""
        self._want_up.set()
        await self._wait_up(True)


def _connection_handler(handler: Handler) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _serve_connection(stream, handler)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass  # the client went away; that is its business
        finally:
            with trio.move_on_after(1, shield=True):
                await stream.aclose()

    return handle


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
    while True:
        request = await _read_request(stream, conn)
        if request is None:
            return
        response = await handler(request)
        headers = [(k.encode(), v.encode()) for k, v in response.headers.items()]
        if isinstance(response.body, bytes):
            headers.append((b"content-length", str(len(response.body)).encode()))
            await stream.send_all(
                conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
            )
            await stream.send_all(conn.send(h11.Data(data=response.body)) or b"")
        else:
            # A streamed body is chunked, unless the handler knows its length
            # (a file download: a body cut short then shows as one).
            if "content-length" not in response.headers:
                headers.append((b"transfer-encoding", b"chunked"))
            await stream.send_all(
                conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
            )
            body = response.body
            try:
                async for chunk in body:
                    await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
            finally:
                # Close an abandoned generator now (client gone, cancelled), not at GC time.
                aclose = getattr(body, "aclose", None)
                if aclose is not None:
                    with trio.move_on_after(5, shield=True):
                        await aclose()
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


async def _read_request(stream: trio.SocketStream, conn: h11.Connection) -> Request | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)  # b"" marks EOF
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return Request(
                method=head.method.decode(),
                target=head.target.decode(),
                headers={k.decode().lower(): v.decode() for k, v in head.headers},
                body=bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
