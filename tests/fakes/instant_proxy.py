"""A proxy reduced to the wire protocol that answers every task at once, as a process.

For the bench and the shutdown tests: `await nursery.start(instant_proxy, port,
version, arrivals)` runs this file as its own process (its work must not slow
the process that measures) and records in `arrivals` when each task frame
reached it. As a script:

    python tests/fakes/instant_proxy.py PORT PROTOCOL_VERSION TOKEN [ANSWER_AFTER_S]

prints `ready` once registered, then `arrived <time.monotonic()> <prompt>` for
every task frame (CLOCK_MONOTONIC is the same clock in every process) and
`stored <task_id>` for every result_ack (the manager has the result in its store).
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from codexnet import protocol
from codexnet.wsclient import connect_websocket
from tests.fakes.stack import PROXY_TOKEN

main_scope = trio.CancelScope()


async def main(port: int, version: int, token: str, delay: float) -> None:
    main_scope.deadline = trio.current_time() + 30
    with main_scope:
        while True:  # the manager may still be opening its state
            try:
                await serve(port, version, token, delay)
                return
            except OSError:
                await trio.sleep(0.05)


async def serve(port: int, version: int, token: str, delay: float) -> None:
    async with connect_websocket(f"ws://127.0.0.1:{port}") as ws, trio.open_nursery() as nursery:
        hello = protocol.Hello(proxy_id="proxy1", token=token, protocol=version, capacity=999)
        await ws.send_message(protocol.encode(hello))
        await ws.get_message()  # welcome
        send, receive = trio.open_memory_channel[str](math.inf)

        async def answer() -> None:
            async for raw in receive:
                await ws.send_message(raw)

        async def answer_later(task: protocol.Task) -> None:
            await trio.sleep(delay)
            result = protocol.TaskResult(
                task.task_id, "completed", text=f"Echo: {task.prompt}", thread_id="t"
            )
            send.send_nowait(protocol.encode(result))

        nursery.start_soon(answer)
        print("ready", flush=True)
        main_scope.deadline = math.inf  # connected: no deadline any more
        while True:
            frame = protocol.decode_manager_frame(await ws.get_message())
            if isinstance(frame, protocol.Task):
                print(f"arrived {time.monotonic()} {frame.prompt}", flush=True)
                send.send_nowait(protocol.encode(protocol.TaskAck(frame.task_id)))
                nursery.start_soon(answer_later, frame)
            elif isinstance(frame, protocol.ResultAck):
                print(f"stored {frame.task_id}", flush=True)


class Arrivals:
    """When each task frame reached the proxy (time.monotonic(), by prompt), and which
    results the manager acknowledged (stored)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.stored: set[str] = set()
        self._changed = trio.Event()

    def add_stored(self, task_id: str) -> None:
        self.stored.add(task_id)
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_stored(self, count: int) -> None:
        while len(self.stored) < count:
            await self._changed.wait()

    def add(self, prompt: str, at: float) -> None:
        self.at.setdefault(prompt, at)
        self._notify()

    async def wait_for(self, prompts: list[str]) -> None:
        while not all(p in self.at for p in prompts):
            await self._changed.wait()


async def instant_proxy(
    port: int,
    version: int,
    arrived: Arrivals,
    *,
    answer_after: float = 0.0,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """tests/fakes/instant_proxy.py in its own process; `arrived.at[prompt]` = time.monotonic().

    `answer_after`: seconds from a task's arrival to its result (0: at once).
    """
    script = Path(__file__)
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(
                trio.run_process,
                [
                    sys.executable,
                    "-u",
                    str(script),
                    str(port),
                    str(version),
                    PROXY_TOKEN,
                    str(answer_after),
                ],
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        buffer = b""
        started = False
        async for chunk in process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                word, _, rest = line.decode().partition(" ")
                if word == "ready" and not started:
                    started = True
                    task_status.started()
                elif word == "arrived":
                    at, _, prompt = rest.partition(" ")
                    arrived.add(prompt, float(at))
                elif word == "stored":
                    arrived.add_stored(rest)


if __name__ == "__main__":
    try:
        delay = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
        trio.run(main, int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], delay)
    except BaseExceptionGroup as group:  # the manager went away: that is how it ends
        if group.subgroup(ConnectionClosed) is None:
            raise
