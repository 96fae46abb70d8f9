"""What durable state costs on the message path, measured side by side; prints a table.

    .venv/bin/python bench/bench_state.py [--messages 50] [--burst 200] [--compare REV]

The real manager runs as its own process, as in production, against the test
suite's fake Bot API over real HTTP on 127.0.0.1 (in this process), and a proxy
reduced to the wire protocol (tests/fakes/instant_proxy.py, a third process) that
answers every task at once — so the figures are the manager's own: polling,
handling, the state writes, dispatch, delivery. No codex, no model.

Rows:
* message → answer, p50/p90: one message at a time, 0.2 s apart and each to
  its own chat, so neither Telegram's global limit (the outbox keeps to 25
  sends/s) nor its per-chat one (~1/s) paces them; one manager with its
  state on disk and one with it in memory (`state_dir: ":memory:"`), side by
  side, their messages interleaved: the difference is what durability adds;
* `--burst` messages at once (one per chat): message → task frame at the proxy,
  p50/p99 — how fast updates are handled, journalled and dispatched (the proxy
  answers each 2 s after it arrived, as a model takes a moment, so the
  answers' delivery does not race the intake being measured);
* one conversation write with 10 and with 10 000 known chats (in this process).

`--compare REV` also runs the manager of a checkout of REV (a git worktree
under .tools/, removed afterwards) and prints both columns.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.instant_proxy import Arrivals, instant_proxy  # noqa: E402
from tests.fakes.processes import ManagerProcess, manager_config  # noqa: E402
from tests.fakes.stack import BOT_TOKEN, free_port  # noqa: E402
from tests.fakes.telegram_api import FakeTelegram  # noqa: E402

FIRST_CHAT = 10_000


def answered(fake: FakeTelegram, chat: int, text: str) -> bool:
    return any((m.text or "") == text for m in fake.messages(chat))


def protocol_version(tree: Path) -> int:
    found = re.search(
        r"PROTOCOL_VERSION: Final = (\d+)", (tree / "codexnet/protocol.py").read_text()
    )
    assert found is not None
    return int(found.group(1))


@attrs.define
class Rig:
    """One manager process (of `tree`, its state in `state_dir`), its fake Bot API and proxy."""

    tree: Path
    state_dir: str
    work: Path
    chats: int
    answer_after: float = 0.0
    fake: FakeTelegram = attrs.field(init=False)
    arrived: Arrivals = attrs.Factory(Arrivals)
    sent: int = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.fake = FakeTelegram(BOT_TOKEN)
        users = list(range(FIRST_CHAT, FIRST_CHAT + self.chats))
        for chat in users:
            self.fake.add_chat(chat)
        port = free_port()
        async with trio.open_nursery() as nursery:
            await nursery.start(self.fake.serve)
            config = manager_config(
                Path(self.state_dir),
                self.fake.base_url,
                port,
                telegram_allowed_user_ids=users,
                default_proxy="proxy1",
            )
            env = {**os.environ, "PYTHONPATH": str(self.tree)}
            async with (
                ManagerProcess(config, self.work, env, log_level="WARNING") as manager,
                trio.open_nursery() as proxies,
            ):
                await proxies.start(
                    partial(instant_proxy, answer_after=self.answer_after),
                    port,
                    protocol_version(self.tree),
                    self.arrived,
                )
                try:
                    task_status.started()
                    await trio.sleep_forever()
                finally:
                    proxies.cancel_scope.cancel()
                    manager.kill()

    async def one(self) -> float:
        """Seconds from one message to its answer in the chat (each to its own chat)."""
        i = self.sent
        self.sent += 1
        chat = FIRST_CHAT + i
        start = time.monotonic()
        self.fake.push_message(chat, f"one {i}")
        with trio.fail_after(30):
            await self.fake.wait_until(lambda: answered(self.fake, chat, f"Echo: one {i}"))
        return time.monotonic() - start

    async def burst(self, n: int) -> list[float]:
        """`n` messages at once, one per chat: seconds to each one's task frame at the proxy."""
        base = FIRST_CHAT + self.sent
        self.sent += n
        prompts = [f"burst {i}" for i in range(n)]
        start = time.monotonic()
        for i, prompt in enumerate(prompts):
            self.fake.push_message(base + i, prompt)
        with trio.fail_after(120):
            await self.arrived.wait_for(prompts)
        return [self.arrived.at[p] - start for p in prompts]


async def measure_answers(rigs: list[Rig], messages: int) -> list[list[float]]:
    """Message → answer on every rig, interleaved, so any noise hits them all alike."""
    out: list[list[float]] = [[] for _ in rigs]
    async with trio.open_nursery() as nursery:
        for rig in rigs:
            await nursery.start(rig.run)
        for _ in range(messages):
            for rig, times in zip(rigs, out, strict=True):
                await trio.sleep(0.2)  # the global send budget (25/s) refills: latency, not rate
                times.append(await rig.one())
        nursery.cancel_scope.cancel()
    return out


async def measure_burst(rig: Rig, n: int) -> list[float]:
    async with trio.open_nursery() as nursery:
        await nursery.start(rig.run)
        await trio.sleep(0.5)
        times = await rig.burst(n)
        nursery.cancel_scope.cancel()
    return times


def conversation_write_ms(tree: Path, state_dir: Path, known: int) -> float:
    """Median time of one conversation write (a /use) with `known` chats stored."""
    script = f"""
import statistics, sys, time, trio
sys.path.insert(0, {str(tree)!r})
state = {str(state_dir)!r}
known = {known}
try:
    from codexnet.manager.service import open_store
except ImportError:
    open_store = None

async def new() -> float:
    async with open_store(state) as store:
        async with trio.open_nursery() as nursery:  # the known chats, group-committed
            for chat in range(known):
                store.conversation((chat, 0)).threads["p"] = f"thread-{{chat}}"
                nursery.start_soon(store.save_conversation, (chat, 0))
        times = []
        for i in range(20):
            store.conversation((i, 0)).proxy = "q"
            t0 = time.perf_counter()
            await store.save_conversation((i, 0))
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1000

async def old() -> float:
    from codexnet.manager.state import StateStore
    store = StateStore(__import__("pathlib").Path(state))
    store.load()
    for chat in range(known):
        store.chat(chat).proxy = "p"
        store.chat(chat).threads["p"] = f"thread-{{chat}}"
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        await store.save_sessions()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000

print(trio.run(new if open_store else old))
"""
    out = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True
    ).stdout
    return float(out.strip().splitlines()[-1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_all(tree: Path, messages: int, burst: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=ROOT / ".tools") as tmp:
        work = Path(tmp)
        chats = messages + 1
        rigs = [Rig(tree, str(work / "state"), work / "m1", chats)]
        if (tree / "codexnet/db.py").exists():  # state in memory exists since the SQLite store
            rigs.append(Rig(tree, ":memory:", work / "m2", chats))
        answers = trio.run(measure_answers, rigs, messages)
        figures["answer p50 disk"] = statistics.median(answers[0]) * 1000
        figures["answer p90 disk"] = pct(answers[0], 0.9) * 1000
        if len(answers) > 1:
            figures["answer p50 memory"] = statistics.median(answers[1]) * 1000
            figures["answer p90 memory"] = pct(answers[1], 0.9) * 1000
            figures["added"] = figures["answer p50 disk"] - figures["answer p50 memory"]
        # The burst's answers come 2 s after their tasks, as a model takes a moment:
        # what is measured is intake and dispatch, not their delivery racing it.
        rig = Rig(tree, str(work / "state-b"), work / "m3", burst, answer_after=2.0)
        times = trio.run(measure_burst, rig, burst)
        figures["burst p50"] = statistics.median(times) * 1000
        figures["burst p99"] = pct(times, 0.99) * 1000
        for known in (10, 10_000):
            figures[f"write at {known}"] = conversation_write_ms(tree, work / f"c{known}", known)
    return figures


ROWS = [
    ("message → answer p50, state on disk", "answer p50 disk"),
    ("message → answer p90, state on disk", "answer p90 disk"),
    ("message → answer p50, state in memory", "answer p50 memory"),
    ("message → answer p90, state in memory", "answer p90 memory"),
    ("durable state adds (p50 disk − p50 memory)", "added"),
    ("{burst} messages at once → task at the proxy, p50", "burst p50"),
    ("{burst} messages at once → task at the proxy, p99", "burst p99"),
    ("one conversation write, 10 chats known", "write at 10"),
    ("one conversation write, 10 000 chats known", "write at 10000"),
]


def checkout(rev: str) -> Path:
    tree = Path(tempfile.mkdtemp(dir=ROOT / ".tools", prefix="bench-"))
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--compare", metavar="REV", help="also measure this git revision")
    args = parser.parse_args()
    columns = []
    if args.compare:
        tree = checkout(args.compare)
        try:
            columns.append((args.compare, run_all(tree, args.messages, args.burst)))
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True
            )
    columns.append(("this tree", run_all(ROOT, args.messages, args.burst)))
    label_width = max(len(label.format(burst=args.burst)) for label, _ in ROWS)
    print(f"{'measure':<{label_width}}" + "".join(f"  {name:>14}" for name, _ in columns))
    print("-" * label_width + "".join("  " + "-" * 14 for _ in columns))
    for label, key in ROWS:
        cells = "".join(
            f"  {f'{col[key]:.2f} ms' if key in col else 'n/a':>14}" for _, col in columns
        )
        print(f"{label.format(burst=args.burst):<{label_width}}{cells}")
    print(
        "\nThe manager, the proxy and Telegram (the fake) each run in their own process."
        "\nBounded by: the long poll handing over updates (~1 ms), one SQLite commit per batch"
        " of updates, and for the burst, 100 updates per getUpdates."
    )


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"(took {time.perf_counter() - start:.0f} s)")
