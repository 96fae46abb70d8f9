"""Scheduling across machines, measured; prints a table.

    .venv/bin/python bench/bench_scheduler.py [--proxies 1000] [--decisions 2000] [--all 50]

Rows:
* one scheduling decision with `--proxies` machines online (in this process):
  the fleet's state built from the hub's registry and the task journal, then
  `scheduler.decide` — for a pinned chat, a label pool (a tenth of the
  machines), and auto (all of them); p50 and p99;
* the whole queue decided again (`Admission.pump`) with 100 prompts waiting;
* `/all` over `--all` simulated proxies (the wire protocol only; each answers
  its task at once) against the fake Bot API over real HTTP, the real manager
  in this process: time until every answer is in the chat, Bot API requests,
  and 429s (the outbox must keep to Telegram's limits by itself).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from codexnet import protocol  # noqa: E402
from codexnet.config import ProxyEntry  # noqa: E402
from codexnet.manager.admission import Admission  # noqa: E402
from codexnet.manager.hub import Hub, ProxyConn  # noqa: E402
from codexnet.manager.service import open_store, run_manager  # noqa: E402
from codexnet.wsclient import connect_websocket  # noqa: E402
from tests.fakes.stack import USER, manager_config  # noqa: E402
from tests.fakes.telegram_api import FakeTelegram  # noqa: E402

LABELS = ("linux", "windows", "gpu", "cpu", "arm", "x86", "big", "small", "eu", "us")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def decisions(n_proxies: int, n_decisions: int) -> list[tuple[str, str, str]]:
    rng = random.Random(9)
    proxies = {
        f"m{i:04}": ProxyEntry(f"token-{i:04}-0123456789abcdef", (rng.choice(LABELS),))
        for i in range(n_proxies)
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = attrs.evolve(manager_config("http://x", Path(tmp)), proxies=proxies)
        async with open_store(":memory:", inline_writes=True) as store:
            hub = Hub(proxies, heartbeat_timeout_s=30.0)
            for proxy_id, entry in proxies.items():
                conn = ProxyConn(proxy_id, None, rng.randint(1, 4), entry.labels, "bench")  # type: ignore[arg-type]
                hub.online[proxy_id] = conn
                hub.offline_since.pop(proxy_id, None)
            admission = Admission(config, store, hub)
            # Some load: 1 000 tasks running across the fleet.
            for n in range(1000):
                task = store.new_task(n + 1, 0, "x", task_id=f"r{n}", timeout_s=60)
                await store.add_task(task)
                await store.mark_dispatched(task, rng.choice(list(proxies)), None)
            for mode, label in (
                ("proxy:m0007", "pinned"),
                ("label:gpu", "pool (label:gpu)"),
                ("auto", "auto"),
            ):
                task = store.new_task(-1, 0, "x", task_id=f"q-{label}", timeout_s=60)
                store.conversation(task.conversation).mode = mode
                took = []
                for _ in range(n_decisions):
                    start = time.perf_counter()
                    admission.decide_now(task)
                    took.append((time.perf_counter() - start) * 1000)
                rows.append(
                    (
                        f"decision, {n_proxies} online, {label}",
                        f"p50 {statistics.median(took):.3f} ms",
                        f"p99 {percentile(took, 0.99):.3f} ms",
                    )
                )
            # The worst case: no machine is idle, so every one is looked at.
            for n, proxy_id in enumerate(proxies):
                task = store.new_task(5, 0, "x", task_id=f"busy{n}", timeout_s=60)
                await store.add_task(task)
                await store.mark_dispatched(task, proxy_id, None)
            task = store.new_task(-2, 0, "x", task_id="q-worst", timeout_s=60)
            store.conversation(task.conversation).mode = "auto"
            took = []
            for _ in range(n_decisions):
                start = time.perf_counter()
                admission.decide_now(task)
                took.append((time.perf_counter() - start) * 1000)
            rows.append(
                (
                    f"decision, {n_proxies} online, auto, none idle (a full scan)",
                    f"p50 {statistics.median(took):.3f} ms",
                    f"p99 {percentile(took, 0.99):.3f} ms",
                )
            )
            took = []
            for _ in range(50):
                start = time.perf_counter()
                admission.machines(fresh=True)
                took.append((time.perf_counter() - start) * 1000)
            rows.append(
                (
                    f"the fleet's state rebuilt, {n_proxies} machines (each second, off the path)",
                    f"p50 {statistics.median(took):.1f} ms",
                    f"max {max(took):.1f} ms",
                )
            )
            # A queue of 100 waiting prompts decided again, as on every capacity change.
            waiting = []
            for n in range(100):
                task = store.new_task(-100 - n, 0, "x", task_id=f"w{n}", timeout_s=60)
                store.conversation(task.conversation).mode = "label:gpu"
                waiting.append(task)
            # Every machine of the pool full, so they all wait.
            for proxy_id, conn in hub.online.items():
                if "gpu" not in conn.labels:
                    continue
                for k in range(conn.capacity):
                    task = store.new_task(7, 0, "x", task_id=f"f{proxy_id}.{k}", timeout_s=60)
                    await store.add_task(task)
                    await store.mark_dispatched(task, proxy_id, None)
            async with trio.open_nursery() as nursery:
                for task in waiting:
                    nursery.start_soon(
                        lambda t: admission.admit(t, deadline=trio.current_time() + 3600), task
                    )
                await trio.sleep(0.5)
                assert admission.waiting_total() == len(waiting)
                took = []
                for _ in range(20):
                    start = time.perf_counter()
                    admission.pump()
                    took.append((time.perf_counter() - start) * 1000)
                nursery.cancel_scope.cancel()
            rows.append(
                (
                    f"the queue decided again, {len(waiting)} waiting for label:gpu",
                    f"p50 {statistics.median(took):.1f} ms",
                    f"max {max(took):.1f} ms",
                )
            )
    return rows


async def simulated_proxy(port: int, proxy_id: str, token: str) -> None:
    """The wire protocol only: every task is answered at once."""
    async with connect_websocket(f"ws://127.0.0.1:{port}") as ws:
        hello = protocol.Hello(proxy_id, token, protocol.PROTOCOL_VERSION, capacity=2)
        await ws.send_message(protocol.encode(hello))
        await ws.get_message()  # welcome
        while True:
            frame = protocol.decode_manager_frame(await ws.get_message())
            if isinstance(frame, protocol.Task):
                await ws.send_message(protocol.encode(protocol.TaskAck(frame.task_id)))
                result = protocol.TaskResult(
                    frame.task_id, "completed", text=f"answer from {proxy_id}", thread_id="t"
                )
                await ws.send_message(protocol.encode(result))


async def all_over(n: int) -> tuple[str, str, str]:
    tokens = {f"sim{i:02}": f"sim-token-{i:02}-0123456789abcdef" for i in range(n)}
    proxies = {p: ProxyEntry(t, ("sim",)) for p, t in tokens.items()}
    fake = FakeTelegram("123456789:TEST-bot-token-abcdefghijklmnopqrstuvwxyz")
    with tempfile.TemporaryDirectory() as tmp:
        async with trio.open_nursery() as nursery:
            await nursery.start(fake.serve)
            config = manager_config(fake.base_url, Path(tmp) / "state", proxies=proxies)
            manager: Any = await nursery.start(run_manager, config)
            for proxy_id, token in tokens.items():
                nursery.start_soon(simulated_proxy, manager.port, proxy_id, token)
            with trio.fail_after(60):
                while len(manager.hub.online) < n:
                    await manager.hub.wait_change()
            requests_before = sum(fake.stats.by_status.values())
            start = time.perf_counter()
            fake.push_message(USER, "/all hello")

            def done() -> bool:
                found = {m.text for m in fake.messages(USER) if (m.text or "").startswith("🖥")}
                return len(found) == n

            with trio.fail_after(600):
                await fake.wait_until(done)
            took = time.perf_counter() - start
            requests = sum(fake.stats.by_status.values()) - requests_before
            too_many = fake.stats.too_many_requests
            nursery.cancel_scope.cancel()
    shown = f", {requests} Bot API requests"
    return (
        f"/all over {n} simulated proxies: every answer in the chat",
        f"{took:.1f} s{shown}",
        f"{too_many} × 429",
    )


async def main(args: argparse.Namespace) -> None:
    rows = await decisions(args.proxies, args.decisions)
    rows.append(await all_over(args.all))
    width = max(len(r[0]) for r in rows)
    print(f"{'bench_scheduler'.ljust(width)} | figure")
    print(f"{'-' * width}-|-------------------------")
    for name, a, b in rows:
        print(f"{name.ljust(width)} | {a}, {b}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)  # the simulated proxies' goodbyes are not news
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--proxies", type=int, default=1000)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--all", type=int, default=50)
    trio.run(main, parser.parse_args())
