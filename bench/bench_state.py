"""What durable state costs on the message path, measured side by side; prints a table.

    .venv/bin/python bench/bench_state.py [--messages 50] [--burst 200] [--compare REV]

The real manager (in this process) against the test suite's fake Bot API over
real HTTP on 127.0.0.1, and a proxy reduced to the wire protocol that answers
every task at once — so the figures are the manager's own: polling, handling,
the state writes, dispatch, delivery. No codex, no model.

Rows:
* message → answer, p50/p90: one message at a time (each to its own chat, so
  Telegram's per-chat limit of ~1 message/s does not pace them); with the
  state on disk, and with it in memory (`state_dir: ":memory:"`): the
  difference is what durability adds;
* `--burst` messages at once (one per chat): message → task frame at the proxy,
  p50/p99 — bounded by how fast updates are handled and journalled;
* one conversation write with 10 and with 10 000 known chats.

`--compare REV` runs the same measurements on a checkout of REV (a git
worktree under .tools/, removed afterwards) and prints both columns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if "CODEXNET_BENCH_ROOT" in os.environ:  # measuring another checkout (--compare)
    ROOT = Path(os.environ["CODEXNET_BENCH_ROOT"])
sys.path.insert(0, str(ROOT))

import attrs  # noqa: E402
import trio  # noqa: E402

from codexnet import protocol  # noqa: E402
from codexnet.config import ManagerConfig, ProxyEntry  # noqa: E402
from codexnet.manager.service import run_manager  # noqa: E402
from codexnet.wsclient import connect_websocket  # noqa: E402
from tests.fakes.telegram_api import FakeTelegram  # noqa: E402

BOT_TOKEN = "123456789:BENCH-bot-token-abcdefghijklmnopqrstuvwxyz"
PROXY_TOKEN = "bench-proxy-token-0123456789abcdef"
FIRST_CHAT = 10_000


def config(base_url: str, state_dir: str, chats: int) -> ManagerConfig:
    values: dict[str, Any] = {
        "source": "bench",
        "telegram_bot_token": BOT_TOKEN,
        "telegram_api_base": base_url,
        "telegram_allowed_user_ids": frozenset(range(FIRST_CHAT, FIRST_CHAT + chats)),
        "manager_ws_listen": ("127.0.0.1", 0),
        "default_proxy": "bench",
        "proxies": {"bench": ProxyEntry(PROXY_TOKEN)},
        "state_dir": Path(state_dir),
        "task_timeout_s": 120.0,
        "telegram_poll_timeout_s": 10,
        "proxy_wait_s": 20.0,
        "live_interval_private_s": 1.0,
        "live_interval_group_s": 3.0,
        "use_drafts": True,
        "approval_timeout_s": 600.0,
    }
    names = {f.name for f in attrs.fields(ManagerConfig)}
    return ManagerConfig(**{k: v for k, v in values.items() if k in names})


async def instant_proxy(port: int, arrived: dict[str, float], *, task_status: Any) -> None:
    """A proxy that answers every task at once; records when each task frame arrived.

    Reading and answering are separate tasks, so the proxy never holds up the
    manager's sends: what is measured is the manager.
    """
    async with connect_websocket(f"ws://127.0.0.1:{port}") as ws, trio.open_nursery() as nursery:
        hello = protocol.Hello(
            proxy_id="bench", token=PROXY_TOKEN, protocol=protocol.PROTOCOL_VERSION, capacity=999
        )
        await ws.send_message(protocol.encode(hello))
        await ws.get_message()  # welcome
        send, receive = trio.open_memory_channel[str](math.inf)

        async def answer() -> None:
            async for raw in receive:
                await ws.send_message(raw)

        nursery.start_soon(answer)
        task_status.started()
        while True:
            frame = protocol.decode_manager_frame(await ws.get_message())
            if isinstance(frame, protocol.Task):
                arrived.setdefault(frame.prompt, trio.current_time())
                send.send_nowait(protocol.encode(protocol.TaskAck(frame.task_id)))
                result = protocol.TaskResult(
                    frame.task_id, "completed", text=f"Echo: {frame.prompt}", thread_id="t"
                )
                send.send_nowait(protocol.encode(result))


def answered(fake: FakeTelegram, chat: int, text: str) -> bool:
    return any((m.text or "") == text for m in fake.messages(chat))


async def measure(state_dir: str, messages: int, burst: int) -> dict[str, list[float]]:
    fake = FakeTelegram(BOT_TOKEN)
    chats = max(messages, burst) * 2
    for chat in range(FIRST_CHAT, FIRST_CHAT + chats):
        fake.add_chat(chat)
    arrived: dict[str, float] = {}
    out: dict[str, list[float]] = {"answer": [], "burst": []}
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        running = await nursery.start(run_manager, config(fake.base_url, state_dir, chats))
        port = running.port if hasattr(running, "port") else running.hub.port
        await nursery.start(instant_proxy, port, arrived)
        for i in range(messages):
            chat = FIRST_CHAT + i
            start = trio.current_time()
            fake.push_message(chat, f"one {i}")
            with trio.fail_after(30):
                await fake.wait_until(lambda c=chat, i=i: answered(fake, c, f"Echo: one {i}"))
            out["answer"].append(trio.current_time() - start)
        base = FIRST_CHAT + messages
        start = trio.current_time()
        for i in range(burst):
            fake.push_message(base + i, f"burst {i}")
        with trio.fail_after(120):
            await fake.wait_until(lambda: all(f"burst {i}" in arrived for i in range(burst)))
        out["burst"] = [arrived[f"burst {i}"] - start for i in range(burst)]
        nursery.cancel_scope.cancel()
    return out


def conversation_write_ms(state_dir: Path, known: int) -> float:
    """Median time of one conversation write (a /use) with `known` chats stored."""

    async def run() -> float:
        try:
            from codexnet.manager.service import open_store
        except ImportError:  # a checkout from before the SQLite store
            return old_sessions_write_ms(state_dir, known)
        async with open_store(state_dir) as store:
            for chat in range(known):
                store.conversation((chat, 0)).proxy = "p"
            await store.save_conversation((0, 0))  # one write of all: the set-up
            for chat in range(known):
                store.conversation((chat, 0)).threads["p"] = f"thread-{chat}"
            times = []
            for i in range(20):
                store.conversation((i, 0)).proxy = "q"
                t0 = time.perf_counter()
                await store.save_conversation((i, 0))
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1000

    return trio.run(run)


def old_sessions_write_ms(state_dir: Path, known: int) -> float:
    from codexnet.manager.state import StateStore  # type: ignore[import-not-found]

    store = StateStore(state_dir)
    store.load()
    for chat in range(known):
        store.chat(chat).proxy = "p"
        store.chat(chat).threads["p"] = f"thread-{chat}"

    async def run() -> float:
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            await store.save_sessions()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

    return trio.run(run)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_all(messages: int, burst: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=ROOT / ".tools") as tmp:
        disk = trio.run(measure, str(Path(tmp) / "state"), messages, burst)
        figures["answer p50 disk"] = statistics.median(disk["answer"]) * 1000
        figures["answer p90 disk"] = pct(disk["answer"], 0.9) * 1000
        figures["burst p50"] = statistics.median(disk["burst"]) * 1000
        figures["burst p99"] = pct(disk["burst"], 0.99) * 1000
        try:
            memory = trio.run(measure, ":memory:", messages, 0)
        except Exception:  # a checkout whose state cannot live in memory
            memory = None
        if memory is not None:
            figures["answer p50 memory"] = statistics.median(memory["answer"]) * 1000
            figures["answer p90 memory"] = pct(memory["answer"], 0.9) * 1000
        for known in (10, 10_000):
            figures[f"write at {known}"] = conversation_write_ms(Path(tmp) / f"c{known}", known)
    return figures


ROWS = [
    ("message → answer p50, state on disk", "answer p50 disk", "ms"),
    ("message → answer p90, state on disk", "answer p90 disk", "ms"),
    ("message → answer p50, state in memory", "answer p50 memory", "ms"),
    ("message → answer p90, state in memory", "answer p90 memory", "ms"),
    ("durable state adds (p50 disk − p50 memory)", "added", "ms"),
    ("{burst} messages at once → task at the proxy, p50", "burst p50", "ms"),
    ("{burst} messages at once → task at the proxy, p99", "burst p99", "ms"),
    ("one conversation write, 10 chats known", "write at 10", "ms"),
    ("one conversation write, 10 000 chats known", "write at 10000", "ms"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--compare", metavar="REV", help="also measure this git revision")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    figures = run_all(args.messages, args.burst)
    if "answer p50 memory" in figures:
        figures["added"] = figures["answer p50 disk"] - figures["answer p50 memory"]
    if args.json:
        print(json.dumps(figures))
        return
    columns = [("this tree", figures)]
    if args.compare:
        columns.insert(0, (args.compare, measure_revision(args.compare, args)))
    label_width = max(len(label.format(burst=args.burst)) for label, _, _ in ROWS)
    head = "".join(f"  {name:>14}" for name, _ in columns)
    print(f"{'measure':<{label_width}}{head}")
    print("-" * label_width + "".join("  " + "-" * 14 for _ in columns))
    for label, key, unit in ROWS:
        cells = "".join(
            f"  {f'{col[key]:.2f} {unit}' if key in col else 'n/a':>14}" for _, col in columns
        )
        print(f"{label.format(burst=args.burst):<{label_width}}{cells}")
    print(
        "\nBounded by: the fake Bot API's long poll (answers within ~1 ms), one SQLite commit"
        " per batch of updates, and Telegram's global limit (~25 sends/s) for the burst's"
        " answers, not for its tasks."
    )


def measure_revision(rev: str, args: argparse.Namespace) -> dict[str, float]:
    """Run this script's measurements against a checkout of `rev`."""
    tree = Path(tempfile.mkdtemp(dir=ROOT / ".tools", prefix="bench-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True)
    try:
        env = {**os.environ, "CODEXNET_BENCH_ROOT": str(tree)}
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--json",
                "--messages",
                str(args.messages),
                "--burst",
                str(args.burst),
            ],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
