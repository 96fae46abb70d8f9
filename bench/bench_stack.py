"""Measure the whole path on this machine and print a table.

    .venv/bin/python bench/bench_stack.py [--rounds 10] [--chats 50]

Runs the real manager and a real proxy driving the real codex (from PATH or
.tools/codex) against the test suite's fake Telegram Bot API and fake model,
all on 127.0.0.1. The fake model answers at once, so the figures are
codexnet's and codex's own overhead, not a model's thinking time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PATH"] = f"{ROOT / '.tools/codex/node_modules/.bin'}{os.pathsep}{os.environ['PATH']}"

from codexnet.manager.render import render_markdown, split_chunk  # noqa: E402
from tests.fakes.responses_api import long_text  # noqa: E402
from tests.fakes.stack import USER, Stack, open_stack  # noqa: E402
from tests.fakes.telegram_api import LIMITED_METHODS  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_round(stack: Stack, n: int) -> tuple[float, float, int]:
    """Seconds to the first live update and to the answer; Bot API requests used."""
    telegram = stack.telegram
    before = len(telegram.requests)
    expect = f"Echo: round {n} "
    start = trio.current_time()
    telegram.push_message(USER, f"round {n}")
    with trio.fail_after(60):
        await telegram.wait_until(
            lambda: any(
                r.method in ("sendMessageDraft", "sendMessage") for r in telegram.requests[before:]
            )
        )
        first = trio.current_time() - start
        await telegram.wait_until(
            lambda: any((m.text or "").startswith(expect) for m in telegram.messages(USER))
        )
    done = trio.current_time() - start
    # Let the status edit that follows the answer land before counting, and the
    # chat's budget (~1 message/s) refill: this row is latency, not the rate limit.
    await trio.sleep(1.2)
    return first, done, len(telegram.requests) - before


async def fifty(stack: Stack, chats: int) -> tuple[float, int, float, int]:
    """Wall time for `chats` streaming answers at once; requests, peak req/s, 429s."""
    telegram = stack.telegram
    before = len(telegram.requests)
    users = [USER + i for i in range(chats)]
    start = trio.current_time()
    for user in users:
        telegram.push_message(user, "[[slow:6]]")
    with trio.fail_after(600):
        await telegram.wait_until(
            lambda: all(
                any(
                    "tick 6" in (m.text or "") and not (m.text or "").startswith("⏳")
                    for m in telegram.messages(u)
                )
                for u in users
            )
        )
    wall = trio.current_time() - start
    requests = telegram.requests[before:]
    # Telegram's ~30/s is about messages; polls and chat actions are not counted here.
    times = sorted(r.time for r in requests if r.method in LIMITED_METHODS)
    peak = max(sum(1 for t in times if t0 <= t < t0 + 1) for t0 in times)
    return wall, len(requests), peak, telegram.stats.too_many_requests


async def main(rounds: int, chats: int) -> None:
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(dir=ROOT / ".tools") as tmp:
        async with open_stack(Path(tmp)) as stack:
            users = frozenset(USER + i for i in range(max(chats, 1)))
            async with (
                stack.manager(telegram_allowed_user_ids=users) as manager,
                stack.proxy(manager, capacity=chats) as proxy,
            ):
                results = [await one_round(stack, n) for n in range(rounds)]
                firsts, dones, requests = zip(*results, strict=True)
                rows += [
                    (
                        "message → first reply (view or answer), median",
                        f"{statistics.median(firsts):.3f} s",
                    ),
                    ("message → answer in chat, median", f"{statistics.median(dones):.3f} s"),
                    ("message → answer in chat, max", f"{max(dones):.3f} s"),
                    ("Bot API requests per short answer", f"{statistics.median(requests):.0f}"),
                ]
                child = proxy._app._child
                codex_rss = rss_mb(child.process.pid) if child else float("nan")
                wall, total, peak, too_many = await fifty(stack, chats)
                rows += [
                    (f"{chats} chats streaming at once: all answered", f"{wall:.1f} s"),
                    (f"{chats} chats: Bot API requests", str(total)),
                    (f"{chats} chats: peak message requests in any 1 s", str(peak)),
                    (f"{chats} chats: 429 answers", str(too_many)),
                    ("codex app-server RSS after the runs", f"{codex_rss:.0f} MB"),
                    (
                        "codex app-server RSS after 50 threads",
                        f"{rss_mb(child.process.pid) if child else float('nan'):.0f} MB",
                    ),
                    (
                        "manager+proxy+fakes Python RSS (one process)",
                        f"{rss_mb(os.getpid()):.0f} MB",
                    ),
                ]
    text = long_text(100_000)
    t0 = time.perf_counter()
    parts = split_chunk(render_markdown(text))
    rows.append(
        (
            "render + split 100 000 characters",
            f"{(time.perf_counter() - t0) * 1000:.0f} ms ({len(parts)} parts)",
        )
    )
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  -----")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--chats", type=int, default=50)
    args = parser.parse_args()
    trio.run(main, args.rounds, args.chats)
