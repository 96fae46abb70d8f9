"""Many proxies reduced to the wire protocol, in one process: a fleet for the bench.

    python tests/fakes/fleet.py PORT COUNT [--first 0] [--heartbeat 30] [--capacity 4]

Opens COUNT WebSocket connections to the hub, each saying `hello` as proxy
`p<i>` with token `fleet_token(i)`, and keeps them alive the way a real proxy
does (a ping about every half of the heartbeat timeout, jittered; pongs to the
hub's pings are trio-websocket's). Each proxy connects from its own loopback
address (127.0.x.y), as a fleet of machines would: the hub's front door caps
unregistered connections per address, and one address for thousands of
proxies would be a NAT, not a fleet. Every task is acknowledged and answered;
the prompt may say how:

    [[after:S]]     answer S seconds after the task arrived (default at once)
    [[stream:N]]    N live deltas ("tick i ") 0.5 s apart, then the answer
    [[parts:K]]     an answer of K Telegram messages (K × ~4 000 characters)

Prints `ready COUNT <time.monotonic()>` once every proxy got its welcome, and
`arrived <time.monotonic()> <proxy id> <prompt>` for every task frame
(CLOCK_MONOTONIC is the same clock in every process). A light client: the
point is what the manager spends on thousands of proxies, not this process.
"""

from __future__ import annotations

import argparse
import random
import re
import resource
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from codexnet import protocol
from codexnet.proxy.service import heartbeat_interval
from codexnet.wsclient import connect_websocket

CONNECT_AT_ONCE = 256  # connections being set up at the same time
TICK_S = 0.5


def fleet_token(i: int) -> str:
    return f"fleet-secret-token-{i:05d}-abcdefghij"


def fleet_proxies(count: int, first: int = 0) -> dict[str, dict[str, str]]:
    """The manager config's `proxies` for a fleet of `count`."""
    return {f"p{i}": {"token": fleet_token(i)} for i in range(first, first + count)}


def source_address(i: int) -> str:
    """Proxy `i`'s own address: all of 127.0.0.0/8 is this machine's."""
    return f"127.0.{1 + i // 250}.{1 + i % 250}"


def directive(prompt: str, name: str, default: float) -> float:
    found = re.search(rf"\[\[{name}:([\d.]+)\]\]", prompt)
    return float(found.group(1)) if found else default


def answer_text(prompt: str) -> str:
    parts = int(directive(prompt, "parts", 0))
    if parts <= 0:
        return f"Echo: {prompt}"
    paragraph = ("lorem ipsum dolor sit amet " * 20).strip()
    # ~4 000 characters per part, split on blank lines.
    per_part = "\n\n".join([paragraph] * 7)
    return "\n\n".join(f"part {k + 1}\n\n{per_part}" for k in range(parts))


class Fleet:
    def __init__(
        self, port: int, count: int, first: int, heartbeat_s: float, *, capacity: int = 4
    ) -> None:
        self.capacity = capacity
        self.port = port
        self.count = count
        self.first = first
        self.heartbeat_s = heartbeat_s
        self.welcomed = 0
        self.all_welcomed = trio.Event()
        self.slots = trio.Semaphore(CONNECT_AT_ONCE)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(self.first, self.first + self.count):
                nursery.start_soon(self.proxy, i)
            await self.all_welcomed.wait()
            print(f"ready {self.count} {time.monotonic()}", flush=True)

    async def proxy(self, i: int) -> None:
        async with AsyncExitStack() as stack:
            async with self.slots:  # only the set-up is limited
                ws = await stack.enter_async_context(
                    connect_websocket(
                        f"ws://127.0.0.1:{self.port}", local_address=source_address(i)
                    )
                )
                hello = protocol.Hello(
                    proxy_id=f"p{i}",
                    token=fleet_token(i),
                    protocol=protocol.PROTOCOL_VERSION,
                    capacity=self.capacity,
                    version="fleet",
                )
                await ws.send_message(protocol.encode(hello))
                welcome = protocol.decode_manager_frame(await ws.get_message())
                if not isinstance(welcome, protocol.Welcome):
                    raise RuntimeError(f"p{i}: expected welcome, got {welcome}")
            self.welcomed += 1
            if self.welcomed == self.count:
                self.all_welcomed.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.heartbeat, ws)
                while True:
                    frame = protocol.decode_manager_frame(await ws.get_message())
                    if isinstance(frame, protocol.Task):
                        print(f"arrived {time.monotonic()} p{i} {frame.prompt}", flush=True)
                        await ws.send_message(protocol.encode(protocol.TaskAck(frame.task_id)))
                        nursery.start_soon(self.answer, ws, frame)
                    elif isinstance(frame, protocol.TaskCancel):
                        await ws.send_message(protocol.encode(protocol.CancelAck(frame.task_id)))

    async def heartbeat(self, ws: WebSocketConnection) -> None:
        timeout = self.heartbeat_s
        await trio.sleep(random.uniform(0, timeout / 2))  # a fleet that started together spreads
        while True:
            with trio.move_on_after(timeout):
                await ws.ping()
            await trio.sleep(heartbeat_interval(timeout))

    async def answer(self, ws: WebSocketConnection, task: protocol.Task) -> None:
        prompt = task.prompt
        ticks = int(directive(prompt, "stream", 0))
        for seq in range(1, ticks + 1):
            await trio.sleep(TICK_S)
            event = protocol.TaskEvent(task.task_id, seq, "delta", f"tick {seq} ")
            await ws.send_message(protocol.encode(event))
        await trio.sleep(directive(prompt, "after", 0.0))
        result = protocol.TaskResult(
            task.task_id, "completed", text=answer_text(prompt), thread_id=f"t-{task.chat_id}"
        )
        try:
            await ws.send_message(protocol.encode(result))
        except ConnectionClosed:
            pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--heartbeat", type=float, default=30.0)
    parser.add_argument("--capacity", type=int, default=4)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # a socket per proxy
    fleet = Fleet(args.port, args.count, args.first, args.heartbeat, capacity=args.capacity)
    try:
        trio.run(fleet.run)
    except BaseExceptionGroup as group:  # the manager went away: that is how it ends
        if group.subgroup(ConnectionClosed) is None:
            raise
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
