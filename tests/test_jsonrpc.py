"""The JSON-RPC peer, in memory against a scripted app-server (virtual time)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from codexnet.proxy.jsonrpc import JsonRpcPeer, PeerClosed, RpcError, ServerRequest


class ScriptedServer:
    """The far end of the pipes: reads our lines, writes whatever the test says."""

    def __init__(self) -> None:
        # client → server and server → client, each a one-way in-memory pipe
        self.to_server_send, self.to_server_recv = trio.testing.memory_stream_one_way_pair()
        self.to_client_send, self.to_client_recv = trio.testing.memory_stream_one_way_pair()
        self.buffer = b""

    async def read(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            self.buffer += await self.to_server_recv.receive_some(65536)
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)  # type: ignore[no-any-return]

    async def write(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        await self.to_client_send.send_all(data)


@pytest.fixture
def server() -> ScriptedServer:
    return ScriptedServer()


def make_peer(server: ScriptedServer) -> tuple[JsonRpcPeer, list[Any], list[ServerRequest]]:
    notes: list[Any] = []
    requests: list[ServerRequest] = []
    peer = JsonRpcPeer(
        server.to_server_send,
        server.to_client_recv,
        on_notification=lambda m, p: notes.append((m, p)),
        on_request=requests.append,
    )
    return peer, notes, requests


async def test_requests_match_responses_and_server_ids_do_not_collide(
    server: ScriptedServer, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    peer, notes, requests = make_peer(server)
    nursery.start_soon(peer.run)
    results: dict[str, Any] = {}
    answered = trio.Event()

    async def call(name: str) -> None:
        results[name] = await peer.request(name, {"x": name})
        answered.set()

    nursery.start_soon(call, "initialize")
    first = await server.read()
    assert first == {"id": 0, "method": "initialize", "params": {"x": "initialize"}}
    assert "jsonrpc" not in first  # codex's dialect omits it
    # The server's own request uses id 0 too: it must not resolve our request.
    await server.write(
        {"id": 0, "method": "item/commandExecution/requestApproval", "params": {"threadId": "t"}}
    )
    await server.write({"method": "turn/started", "params": {"threadId": "t"}})
    await server.write(b"this is not json\n")
    await server.write({"id": 0, "result": {"userAgent": "x/1"}})
    with trio.fail_after(5):
        await answered.wait()
    assert results["initialize"] == {"userAgent": "x/1"}
    assert requests == [
        ServerRequest(0, "item/commandExecution/requestApproval", {"threadId": "t"})
    ]
    assert notes == [("turn/started", {"threadId": "t"})]

    await peer.respond(0, {"decision": "accept"})
    assert await server.read() == {"id": 0, "result": {"decision": "accept"}}


async def test_error_response_raises_rpc_error(
    server: ScriptedServer, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    peer, _, _ = make_peer(server)
    nursery.start_soon(peer.run)

    async def answer() -> None:
        request = await server.read()
        await server.write(
            {"id": request["id"], "error": {"code": -32600, "message": "thread not found: x"}}
        )

    nursery.start_soon(answer)
    with pytest.raises(RpcError, match="thread/resume: thread not found: x") as info:
        await peer.request("thread/resume", {"threadId": "x"})
    assert info.value.code == -32600


async def test_pending_requests_fail_when_the_child_goes_away(
    server: ScriptedServer, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    peer, _, _ = make_peer(server)
    nursery.start_soon(peer.run)

    async def close_after_request() -> None:
        await server.read()
        await server.to_client_send.aclose()  # EOF on the child's stdout

    nursery.start_soon(close_after_request)
    with trio.fail_after(5), pytest.raises(PeerClosed, match="closed its output"):
        await peer.request("turn/start", {})
    # And new requests are refused at once instead of hanging.
    with pytest.raises(PeerClosed):
        await peer.request("thread/start", {})


async def test_a_line_split_across_reads_is_reassembled(
    server: ScriptedServer, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    got = trio.Event()
    notes: list[Any] = []

    def on_notification(method: str, params: dict[str, Any]) -> None:
        notes.append((method, params))
        got.set()

    peer = JsonRpcPeer(
        server.to_server_send,
        server.to_client_recv,
        on_notification=on_notification,
        on_request=lambda r: None,
    )
    nursery.start_soon(peer.run)
    line = (
        json.dumps({"method": "item/agentMessage/delta", "params": {"delta": "héllo 😀"}}).encode()
        + b"\n"
    )
    for i in range(len(line)):
        await server.write(line[i : i + 1])
    with trio.fail_after(5):
        await got.wait()
    assert notes == [("item/agentMessage/delta", {"delta": "héllo 😀"})]


async def test_a_request_with_no_answer_is_bounded_by_the_caller(
    server: ScriptedServer, nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    # codex does not answer malformed lines at all: callers must own a deadline.
    peer, _, _ = make_peer(server)
    nursery.start_soon(peer.run)
    with pytest.raises(trio.TooSlowError), trio.fail_after(30):
        await peer.request("thread/start", {})
    assert not peer._pending  # the slot was cleaned up
