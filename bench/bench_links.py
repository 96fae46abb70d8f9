"""How fast a broken link is noticed and recovered from; prints a table.

    .venv/bin/python bench/bench_links.py [--heartbeat 30] [--rounds 3]

The real manager and proxy (in this process; the proxy drives the scripted
app-server of the tests, so no codex is needed) with a TCP relay between them.
Each round starts a slow answer, then makes the link half-dead (sockets stay
open, bytes vanish: a sleeping laptop, an expired NAT entry) and measures:

* until the manager marks the proxy offline, and until the proxy reconnects —
  both bounded by `heartbeat_timeout_s` (a ping unanswered past it);
* from the link being back (a new connection works) to the answer in the chat.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import attrs
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from codexnet.manager.service import run_manager  # noqa: E402
from codexnet.proxy.appserver import AppServer  # noqa: E402
from codexnet.proxy.service import ProxyService  # noqa: E402
from tests.fakes.relay import TcpRelay  # noqa: E402
from tests.fakes.stack import BOT_TOKEN, PROXY_TOKEN, USER, manager_config  # noqa: E402
from tests.fakes.telegram_api import FakeTelegram  # noqa: E402
from tests.test_appserver import fake_codex, proxy_config  # noqa: E402


async def one_round(heartbeat: float, work: Path, n: int) -> tuple[float, float, float]:
    telegram = FakeTelegram(BOT_TOKEN)
    telegram.add_chat(USER)
    async with trio.open_nursery() as nursery:
        await nursery.start(telegram.serve)
        config = manager_config(
            telegram.base_url, work / f"state-{n}", heartbeat_timeout_s=heartbeat
        )
        manager = await nursery.start(run_manager, config)
        relay = TcpRelay("127.0.0.1", manager.port)
        port = await nursery.start(relay.serve)
        workdir = work / f"work-{n}"
        workdir.mkdir()
        proxy = attrs.evolve(
            proxy_config(workdir, fake_codex(workdir)),
            manager_ws=f"ws://127.0.0.1:{port}",
            proxy_id="proxy1",
            proxy_token=PROXY_TOKEN,
            heartbeat_timeout_s=heartbeat,
            state_dir=work / f"proxy-{n}",
        )
        nursery.start_soon(ProxyService(proxy, AppServer(proxy)).run)
        with trio.fail_after(30):
            old = await manager.hub.wait_online("proxy1")
        telegram.push_message(USER, "slow")  # the scripted app-server answers in ~1.5 s
        with trio.fail_after(30):
            await relay.wait_for_frame("up", "task_ack")
        dead = time.monotonic()
        relay.blackhole(new_connections="work")  # existing link half-dead, a new one works
        with trio.fail_after(heartbeat * 4):
            while manager.hub.online.get("proxy1") is old:
                await manager.hub.wait_change()
        manager_noticed = time.monotonic() - dead
        with trio.fail_after(heartbeat * 4):
            await relay.wait_until(lambda: relay.accepted >= 2)
        back = time.monotonic()
        proxy_noticed = back - dead
        with trio.fail_after(60):
            await telegram.wait_until(lambda: "Echo: slow" in telegram.texts(USER))
        delivered = time.monotonic() - back
        nursery.cancel_scope.cancel()
    return manager_noticed, proxy_noticed, delivered


async def main(heartbeat: float, rounds: int) -> None:
    results = []
    with tempfile.TemporaryDirectory(dir=ROOT / ".tools") as tmp:
        for n in range(rounds):
            results.append(await one_round(heartbeat, Path(tmp), n))
    manager_noticed, proxy_noticed, delivered = zip(*results, strict=True)
    rows = [
        ("half-dead link → manager marks the proxy offline", manager_noticed),
        ("half-dead link → proxy reconnected", proxy_noticed),
        ("link back → the answer in the chat", delivered),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"heartbeat_timeout_s = {heartbeat:g}; {rounds} rounds")
    print(f"{'measure':<{width}}  {'median':>8}  {'max':>8}")
    print("-" * width + "  " + "-" * 8 + "  " + "-" * 8)
    for label, values in rows:
        print(f"{label:<{width}}  {statistics.median(values):7.2f}s  {max(values):7.2f}s")
    print(
        "\nBounded by: heartbeat_timeout_s (a ping not answered by the time the link has been"
        " silent that long),\nthen a reconnect within 0.5 s (jittered) and the result sent"
        " again from the proxy's store."
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heartbeat", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trio.run(main, args.heartbeat, args.rounds)
