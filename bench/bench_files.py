"""Measure a 20 MB file on its way in and out, and print a table.

    .venv/bin/python bench/bench_files.py [--rounds 3] [--mb 20]

The manager and the proxy run as their own processes (so each one's memory
can be read from /proc), against the test suite's fake Telegram Bot API and
fake model on 127.0.0.1, the proxy driving the real codex. Each round sends a
document of `--mb` MB of random bytes and times it from the moment Telegram
has it to the moment the whole file is in the working directory's
telegram-files/; then `/get` sends it back, timed to the document in the
chat. While each passes, both processes' RSS is sampled every 10 ms: the
growth is the peak minus the RSS just before.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PATH"] = f"{ROOT / '.tools/codex/node_modules/.bin'}{os.pathsep}{os.environ['PATH']}"

from tests.fakes.codex_env import write_codex_home  # noqa: E402
from tests.fakes.processes import (  # noqa: E402
    ManagerProcess,
    ProxyProcess,
    manager_config,
    proxy_config,
)
from tests.fakes.responses_api import FakeResponsesAPI  # noqa: E402
from tests.fakes.stack import BOT_TOKEN, USER  # noqa: E402
from tests.fakes.telegram_api import FakeTelegram  # noqa: E402

SAMPLE_S = 0.01


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Peak:
    """The highest RSS of some processes while a block runs, sampled every 10 ms."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.before = {name: rss_mb(pid) for name, pid in pids.items()}
        self.peak = dict(self.before)

    async def sample(self) -> None:
        while True:
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mb(pid))
            await trio.sleep(SAMPLE_S)

    def growth(self, name: str) -> float:
        return self.peak[name] - self.before[name]


async def until(predicate: object, seconds: float = 120) -> None:
    """Poll `predicate()` every 5 ms: the file is written by another process."""
    assert callable(predicate)
    with trio.fail_after(seconds):
        while not predicate():  # noqa: ASYNC110 - nothing to wait on but another process's file
            await trio.sleep(0.005)


async def file_in(
    telegram: FakeTelegram, work: Path, pids: dict[str, int], n: int, size: int
) -> tuple[float, float, float]:
    """Seconds from Telegram to the whole file on the machine; RSS growth of both."""
    content = os.urandom(size)
    target = work / "telegram-files" / f"payload-{n}.bin"
    peak = Peak(pids)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peak.sample)
        start = trio.current_time()
        telegram.push_document(USER, content, file_name=target.name, caption="[[reply:ok]]")
        await until(lambda: target.exists() and target.stat().st_size == size)
        took = trio.current_time() - start
        await until(
            lambda: any(
                m.text == f"📎 telegram-files/{target.name}\n\nok" for m in telegram.messages(USER)
            )
        )
        nursery.cancel_scope.cancel()
    assert target.read_bytes() == content
    return took, peak.growth("manager"), peak.growth("proxy")


async def file_out(
    telegram: FakeTelegram, pids: dict[str, int], n: int, size: int
) -> tuple[float, float, float]:
    """Seconds from /get to the document in the chat; RSS growth of both."""
    peak = Peak(pids)
    before = len(telegram.messages(USER))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peak.sample)
        start = trio.current_time()
        telegram.push_message(USER, f"/get telegram-files/payload-{n}.bin")
        await telegram.wait_until(
            lambda: any(m.document is not None for m in telegram.messages(USER)[before:])
        )
        took = trio.current_time() - start
        nursery.cancel_scope.cancel()
    [sent] = [m for m in telegram.messages(USER)[before:] if m.document is not None]
    assert sent.document is not None
    assert len(sent.document.content or b"") == size
    return took, peak.growth("manager"), peak.growth("proxy")


async def main(rounds: int, megabytes: int) -> None:
    size = megabytes * 1024 * 1024
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(dir=ROOT / ".tools") as tmp_name:
        tmp = Path(tmp_name)
        model = FakeResponsesAPI()
        telegram = FakeTelegram(BOT_TOKEN, rate_limits=False)
        telegram.add_chat(USER)
        async with trio.open_nursery() as nursery:
            await nursery.start(model.serve)
            await nursery.start(telegram.serve)
            codex_env = write_codex_home(tmp / "codex-home", model.base_url)
            config = manager_config(tmp / "state", telegram.base_url)
            async with ManagerProcess(config, tmp / "manager") as manager:
                port = await manager.hub_port()
                work = tmp / "work"
                async with ProxyProcess(
                    proxy_config(port, work, state_dir=str(tmp / "proxy-state")),
                    tmp / "proxy",
                    codex_env,
                ) as proxy:
                    await telegram.wait_until(lambda: telegram.polling)
                    pids = {"manager": manager.pid, "proxy": proxy.pid}
                    ins = [await file_in(telegram, work, pids, n, size) for n in range(rounds)]
                    outs = [await file_out(telegram, pids, n, size) for n in range(rounds)]
                    idle = {name: rss_mb(pid) for name, pid in pids.items()}
            nursery.cancel_scope.cancel()
    label = f"{megabytes} MB"
    for what, results in (
        (f"{label} in: Telegram → file on the machine", ins),
        (f"{label} out: /get → document in the chat", outs),
    ):
        took, manager_growth, proxy_growth = zip(*results, strict=True)
        rows += [
            (f"{what}, median", f"{statistics.median(took):.2f} s"),
            (f"{what}, max", f"{max(took):.2f} s"),
            (f"{what}: manager RSS growth, max", f"{max(manager_growth):.1f} MB"),
            (f"{what}: proxy RSS growth, max", f"{max(proxy_growth):.1f} MB"),
        ]
    rows += [
        ("manager RSS after the runs", f"{idle['manager']:.0f} MB"),
        ("proxy RSS after the runs", f"{idle['proxy']:.0f} MB"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    print(f"{'-' * width}  -----")
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mb", type=int, default=20)
    args = parser.parse_args()
    trio.run(main, args.rounds, args.mb)
