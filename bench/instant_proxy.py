"""A proxy reduced to the wire protocol that answers every task at once (for bench/).

    python bench/instant_proxy.py PORT PROTOCOL_VERSION TOKEN

Run as its own process so its work does not slow the process that measures.
Prints `ready` once registered, then `arrived <time.monotonic()> <prompt>` for
every task frame (CLOCK_MONOTONIC is the same clock in every process).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codexnet import protocol
from codexnet.wsclient import connect_websocket

main_scope = trio.CancelScope()


async def main(port: int, version: int, token: str) -> None:
    main_scope.deadline = trio.current_time() + 30
    with main_scope:
        while True:  # the manager may still be opening its state
            try:
                await serve(port, version, token)
                return
            except OSError:
                await trio.sleep(0.05)


async def serve(port: int, version: int, token: str) -> None:
    async with connect_websocket(f"ws://127.0.0.1:{port}") as ws, trio.open_nursery() as nursery:
        hello = protocol.Hello(proxy_id="proxy1", token=token, protocol=version, capacity=999)
        await ws.send_message(protocol.encode(hello))
        await ws.get_message()  # welcome
        send, receive = trio.open_memory_channel[str](math.inf)

        async def answer() -> None:
            async for raw in receive:
                await ws.send_message(raw)

        nursery.start_soon(answer)
        print("ready", flush=True)
        main_scope.deadline = math.inf  # connected: no deadline any more
        while True:
            frame = protocol.decode_manager_frame(await ws.get_message())
            if isinstance(frame, protocol.Task):
                print(f"arrived {time.monotonic()} {frame.prompt}", flush=True)
                send.send_nowait(protocol.encode(protocol.TaskAck(frame.task_id)))
                result = protocol.TaskResult(
                    frame.task_id, "completed", text=f"Echo: {frame.prompt}", thread_id="t"
                )
                send.send_nowait(protocol.encode(result))


if __name__ == "__main__":
    trio.run(main, int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
