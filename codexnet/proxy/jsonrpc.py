"""A JSON-RPC peer over a pair of byte streams, as `codex app-server` speaks it.

Newline-delimited JSON, without the `"jsonrpc": "2.0"` member. Three kinds of
incoming message, told apart by shape and *not* by id — the server numbers its
own requests from 0, so its ids collide with ours:

* has `method` and `id`  → a server request (approvals); answer with `respond`;
* has `method`, no `id`  → a notification;
* has `id`, no `method`  → the response to one of our requests.

The reader never blocks on a consumer: responses resolve a pending slot,
notifications and server requests go to synchronous callbacks that must only
record or hand off. When the stream ends every pending request fails with
`PeerClosed`, so no caller waits forever for a dead child.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, Final

import attrs
import trio

log = logging.getLogger(__name__)

MAX_LINE_BYTES: Final = 64 * 1024 * 1024


class RpcError(Exception):
    """The peer answered a request with a JSON-RPC error."""

    def __init__(self, method: str, code: int, message: str) -> None:
        super().__init__(f"{method}: {message} (code {code})")
        self.method = method
        self.code = code
        self.message = message


class PeerClosed(Exception):
    """The peer's stream ended (or broke) before it answered."""


@attrs.frozen
class ServerRequest:
    id: int | str
    method: str
    params: dict[str, Any]


@attrs.define(eq=False)
class _Pending:
    method: str
    done: trio.Event = attrs.Factory(trio.Event)
    result: Any = None
    error: BaseException | None = None


NotificationHandler = Callable[[str, dict[str, Any]], None]
RequestHandler = Callable[[ServerRequest], None]


class JsonRpcPeer:
    def __init__(
        self,
        send_stream: trio.abc.SendStream,
        receive_stream: trio.abc.ReceiveStream,
        *,
        on_notification: NotificationHandler,
        on_request: RequestHandler,
    ) -> None:
        self._send_stream = send_stream
        self._receive_stream = receive_stream
        self._on_notification = on_notification
        self._on_request = on_request
        self._send_lock = trio.StrictFIFOLock()
        self._next_id = 0
        self._pending: dict[int, _Pending] = {}
        self._closed: str | None = None

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def run(self) -> None:
        """Read until the stream ends; then fail every pending request."""
        reason = "app-server closed its output"
        try:
            buffer = bytearray()
            while True:
                chunk = await self._receive_stream.receive_some(65536)
                if not chunk:
                    break
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line = bytes(buffer[:end])
                    del buffer[: end + 1]
                    if line.strip():
                        self._dispatch(line)
                if len(buffer) > MAX_LINE_BYTES:
                    reason = f"app-server sent a line over {MAX_LINE_BYTES} bytes"
                    log.error("%s; giving up on this process", reason)
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = "app-server output broke"
        finally:
            self._close(reason)

    def _close(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        for pending in self._pending.values():
            if not pending.done.is_set():
                pending.error = PeerClosed(reason)
                pending.done.set()

    def _dispatch(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.warning("app-server sent a line that is not JSON: %.200r", line)
            return
        if not isinstance(message, dict):
            log.warning("app-server sent a non-object message: %.200r", line)
            return
        method = message.get("method")
        if isinstance(method, str):
            params = message.get("params")
            params = params if isinstance(params, dict) else {}
            if "id" in message:
                self._on_request(ServerRequest(message["id"], method, params))
            else:
                self._on_notification(method, params)
            return
        pending = self._pending.get(message.get("id"))  # type: ignore[arg-type]
        if pending is None:
            log.warning("app-server answered an unknown request id %r", message.get("id"))
            return
        error = message.get("error")
        if error is not None:
            code = error.get("code", 0) if isinstance(error, dict) else 0
            text = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            pending.error = RpcError(pending.method, code, text)
        else:
            pending.result = message.get("result")
        pending.done.set()

    async def _write(self, message: dict[str, Any]) -> None:
        if self._closed is not None:
            raise PeerClosed(self._closed)
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        try:
            async with self._send_lock:
                await self._send_stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._close("app-server input closed")
            raise PeerClosed("app-server input closed") from exc

    async def request(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Send a request and wait for its result. Callers own the timeout."""
        request_id = self._next_id
        self._next_id += 1
        pending = _Pending(method)
        self._pending[request_id] = pending
        try:
            message: dict[str, Any] = {"id": request_id, "method": method}
            if params is not None:
                message["params"] = params
            await self._write(message)
            await pending.done.wait()
        finally:
            del self._pending[request_id]
        if pending.error is not None:
            raise pending.error
        return pending.result

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"method": method}
        if params is not None:
            message["params"] = params
        await self._write(message)

    async def respond(self, request_id: int | str, result: dict[str, Any]) -> None:
        await self._write({"id": request_id, "result": result})

    async def respond_error(self, request_id: int | str, code: int, message: str) -> None:
        await self._write({"id": request_id, "error": {"code": code, "message": message}})
