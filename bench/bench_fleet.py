"""What codexnet costs at fleet scale, each row measured side by side in one run; one table.

    .venv/bin/python bench/bench_fleet.py [--rounds 30] [--fleet 10,100,1000,5000]
                                          [--heartbeat-window 30] [--threads 100] [--quick]

Everything runs on this machine, on 127.0.0.1: the fake Bot API and the fake
model (tests/fakes) in this process, the real manager and proxy as their own
processes (as in production: INFO logging, the manager started with a soft
open-files limit of 1024 as systemd does, which it raises itself), the real
codex. The fake model answers at once, so the figures are codexnet's and
codex's own, not a model's thinking time.

Rows (each says what it measures and what bounds it):

1. relay overhead: a message through the fake Bot API, the manager, the
   proxy and codex, to the answer at the fake Bot API — vs `turn/start` →
   `turn/completed` on a warm app-server driven directly, the same codex and
   model, rounds interleaved; and the relay's own time, each message less
   its own turn at the proxy's codex (from the proxy's log line); beside it
   a minimal one-process bot (getUpdates → a turn on the direct app-server →
   sendMessage, no store), whose own time is the floor the Bot API's two HTTP
   exchanges set for any bot;
2. a warm app-server turn vs `codex exec --json` per message (a new process
   each time, what exec-based bots do), interleaved with row 1;
3. the hub at 10 / 100 / 1 000 / 5 000 simulated proxies speaking the real
   protocol (tests/fakes/fleet.py, its own process): registration time, the
   manager's RSS and CPU, the heartbeats' CPU at the largest fleet, and
   dispatch (message → task frame at its proxy) with 200 tasks in flight;
4. Telegram throughput against the fake Bot API's flood limits: 50 chats
   streaming at once, and 200 answers queued at once, vs the floor the limits set;
5. the outbox: wake-ups and CPU for 200 and 2 000 waiting sends (virtual time,
   in this process);
6. codex RSS with one thread, with 100 threads used once, and after the
   proxy unloaded the idle ones (thread_idle_unload_s).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
import trio.testing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PATH"] = f"{ROOT / '.tools/codex/node_modules/.bin'}{os.pathsep}{os.environ['PATH']}"

from codexnet.manager.hub import RTT_EVERY_S  # noqa: E402
from codexnet.manager.outbox import Outbox, Priority  # noqa: E402
from codexnet.manager.service import open_store  # noqa: E402
from codexnet.manager.telegram import TelegramClient  # noqa: E402
from codexnet.protocol import PROXY_PING_FRACTION  # noqa: E402
from codexnet.proxy.appserver import AppServer  # noqa: E402
from codexnet.proxy.jsonrpc import JsonRpcPeer  # noqa: E402
from tests.fakes.codex_env import find_codex, write_codex_home  # noqa: E402
from tests.fakes.fleet import fleet_proxies  # noqa: E402
from tests.fakes.loglines import LogLines  # noqa: E402
from tests.fakes.processes import (  # noqa: E402
    ManagerProcess,
    ProxyProcess,
    manager_config,
    proxy_config,
)
from tests.fakes.responses_api import FakeResponsesAPI  # noqa: E402
from tests.fakes.stack import BOT_TOKEN  # noqa: E402
from tests.fakes.stack import proxy_config as stack_proxy_config  # noqa: E402
from tests.fakes.telegram_api import LIMITED_METHODS, MOCK_BASE_URL, FakeTelegram  # noqa: E402

FIRST_CHAT = 10_000
HARD_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
# Started as systemd starts a service (LimitNOFILE's default, 1024:524288); prlimit execs it.
SYSTEMD_NOFILE = ["prlimit", f"--nofile={min(1024, HARD_NOFILE)}:{HARD_NOFILE}", "--"]
TELEGRAM_RATE = 30.0  # messages per second Telegram allows a bot
PARTS = ("relay", "hub", "telegram", "unload", "outbox")
OUR_RATE = 25.0  # what the outbox keeps to (codexnet/manager/outbox.py)


@attrs.define
class Row:
    measure: str
    figure: str
    bound: str


# --------------------------------------------------------------------------- helpers


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` so far."""
    return sum(cpu_split(pid))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# --------------------------------------------------------------------------- codex (rows 1, 2, 6)


class DirectAppServer:
    """`codex app-server` driven directly over stdio: what the relay is compared with."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.peer: JsonRpcPeer | None = None
        self.process: trio.Process | None = None
        self._done: dict[str, trio.Event] = {}
        self.texts: dict[str, str] = {}  # thread → its last turn's answer

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        codex = find_codex()
        assert codex is not None, "codex not found: run scripts/install.sh"
        async with trio.open_nursery() as nursery:
            self.process = await nursery.start(
                partial(
                    trio.run_process,
                    [codex, "app-server", "--listen", "stdio://"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    env=self.env,
                    cwd=str(self.cwd),
                    check=False,
                )
            )
            assert self.process.stdin is not None
            assert self.process.stdout is not None
            self.peer = JsonRpcPeer(
                self.process.stdin,
                self.process.stdout,
                on_notification=self._on_notification,
                on_request=lambda request: None,
            )
            nursery.start_soon(self.peer.run)
            await self.peer.request(
                "initialize", {"clientInfo": {"name": "bench", "title": "bench", "version": "1"}}
            )
            await self.peer.notify("initialized")
            task_status.started()
            await trio.sleep_forever()

    def _on_notification(self, method: str, params: dict[str, Any]) -> None:
        if method == "item/completed":
            item = params.get("item") or {}
            if item.get("type") == "agentMessage":
                self.texts[str(params.get("threadId"))] = str(item.get("text", ""))
        elif method == "turn/completed":
            event = self._done.get(str(params.get("threadId")))
            if event is not None:
                event.set()

    async def new_thread(self) -> str:
        assert self.peer is not None
        result = await self.peer.request(
            "thread/start",
            {"cwd": str(self.cwd), "approvalPolicy": "never", "sandbox": "read-only"},
        )
        return str(result["thread"]["id"])

    async def turn(self, thread_id: str, prompt: str) -> float:
        """Seconds from `turn/start` to `turn/completed`."""
        assert self.peer is not None
        done = self._done[thread_id] = trio.Event()
        start = time.perf_counter()
        await self.peer.request(
            "turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": prompt}]}
        )
        with trio.fail_after(60):
            await done.wait()
        return time.perf_counter() - start


class MinimalBot:
    """The floor for any Telegram bot on a warm app-server: one process, the
    `getUpdates` long poll, `turn/start` on the bench's direct app-server,
    `sendMessage` with the answer. No store, no second process, no limiter —
    what codexnet's relay is, less the guarantees. Its own Bot API (a second
    fake, so two pollers never compete for one bot's updates)."""

    def __init__(self, fake: FakeTelegram, app: DirectAppServer) -> None:
        self.fake = fake
        self.app = app
        self.threads: dict[int, str] = {}  # chat → its thread on the app-server
        self.turns: dict[int, float] = {}  # chat → its last turn's seconds

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        base = f"{self.fake.base_url}/bot{BOT_TOKEN}"
        async with httpx.AsyncClient(timeout=60) as http, trio.open_nursery() as nursery:
            task_status.started()
            offset = 0
            while True:
                got = await http.post(f"{base}/getUpdates", json={"offset": offset, "timeout": 30})
                for update in got.json()["result"]:
                    offset = update["update_id"] + 1
                    chat, text = update["message"]["chat"]["id"], update["message"]["text"]
                    nursery.start_soon(self._answer, http, base, chat, text)

    async def _answer(self, http: httpx.AsyncClient, base: str, chat: int, text: str) -> None:
        thread = self.threads[chat]
        self.turns[chat] = await self.app.turn(thread, text)
        answer = {"chat_id": chat, "text": self.app.texts[thread]}
        (await http.post(f"{base}/sendMessage", json=answer)).raise_for_status()


async def codex_exec(env: dict[str, str], cwd: Path, prompt: str) -> float:
    """Seconds for one `codex exec --json` (a new codex process, a new session)."""
    codex = find_codex()
    assert codex is not None
    start = time.perf_counter()
    done = await trio.run_process(
        [codex, "exec", "--json", "--skip-git-repo-check", "-s", "read-only", prompt],
        env=env,
        cwd=str(cwd),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-2000:]
    assert b"Echo: " in done.stdout, done.stdout[-2000:]
    return elapsed


def answer_time(fake: FakeTelegram, chat: int, prefix: str) -> float | None:
    """When the fake Bot API got the answer starting with `prefix` in `chat` (trio time)."""
    for request in fake.requests:
        if (
            request.method == "sendMessage"
            and request.params.get("chat_id") == chat
            and str(request.params.get("text", "")).startswith(prefix)
        ):
            return request.time
    return None


async def relay_and_exec(work: Path, rounds: int, profile: Path | None = None) -> list[Row]:
    """Rows 1 and 2: the relay, a direct warm app-server, and codex exec, interleaved."""
    chats = [FIRST_CHAT + i for i in range(4)]  # rotated: each chat's 1 msg/s never paces
    model = FakeResponsesAPI()
    fake = FakeTelegram(BOT_TOKEN)
    bare = FakeTelegram(BOT_TOKEN)  # the minimal bot's own Bot API
    for chat in chats:
        fake.add_chat(chat)
        bare.add_chat(chat)
    relay_t: list[float] = []
    bare_t: list[float] = []  # the minimal one-process bot
    bare_own: list[float] = []  # each of its messages less its own turn
    own_t: list[float] = []  # each relayed message less its own turn at the proxy's codex
    direct_t: list[float] = []
    exec_t: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(model.serve)
        await nursery.start(fake.serve)
        await nursery.start(bare.serve)
        relay_env = write_codex_home(work / "codex-relay", model.base_url)
        direct_env = write_codex_home(work / "codex-direct", model.base_url)
        exec_env = write_codex_home(work / "codex-exec", model.base_url)
        cwd = work / "project"
        cwd.mkdir()
        config = manager_config(
            work / "relay-state",
            fake.base_url,
            0,
            telegram_allowed_user_ids=chats,
            default_proxy="proxy1",
        )
        async with (
            ManagerProcess(config, work / "relay-m", prefix=SYSTEMD_NOFILE) as manager,
        ):
            port = await manager.hub_port()
            pconfig = proxy_config(port, cwd, capacity=4)
            async with ProxyProcess(pconfig, work / "relay-p", relay_env) as proxy:
                await manager.wait_for_log(r"proxy 'proxy1' online")
                await proxy.wait_for_log(r"codex app-server ready")
                direct = DirectAppServer(direct_env, cwd)
                await nursery.start(direct.serve)
                threads = [await direct.new_thread() for _ in chats]
                bot = MinimalBot(bare, direct)  # on the same codex as `direct`: no noise between
                bot.threads = {chat: await direct.new_thread() for chat in chats}
                await nursery.start(bot.serve)
                # Warm-up: every chat and thread has its first (costlier) turn behind it.
                for i, (chat, thread) in enumerate(zip(chats, threads, strict=True)):
                    await relay_once(fake, chat, f"warm {i}")
                    await direct.turn(thread, f"warm {i}")
                    await relay_once(bare, chat, f"warm {i}")
                await trio.sleep(1.5)
                async with (
                    # Sampled often: each message costs them only a few ms of CPU.
                    profiled(manager.pid, profile and profile / "relay-manager.txt", rate=1000),
                    profiled(proxy.pid, profile and profile / "relay-proxy.txt", rate=1000),
                ):
                    for n in range(rounds):
                        k = n % len(chats)
                        since = len(proxy.lines)
                        relay_t.append(await relay_once(fake, chats[k], f"relay {n}"))
                        turn = await proxy.wait_for_log(TURN_LINE, since=since)
                        own_t.append(relay_t[-1] - turn_seconds(turn))
                        await trio.sleep(0.2)
                        direct_t.append(await direct.turn(threads[k], f"direct {n}"))
                        await trio.sleep(0.2)
                        bare_t.append(await relay_once(bare, chats[k], f"bare {n}"))
                        bare_own.append(bare_t[-1] - bot.turns[chats[k]])
                        await trio.sleep(0.2)
                        if n % 3 == 0:
                            exec_t.append(await codex_exec(exec_env, cwd, f"exec {n}"))
                            await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    r50, r90 = statistics.median(relay_t), pct(relay_t, 0.9)
    d50, d90 = statistics.median(direct_t), pct(direct_t, 0.9)
    o50, o90 = statistics.median(own_t), pct(own_t, 0.9)
    b50, b90 = statistics.median(bare_t), pct(bare_t, 0.9)
    bo50, bo90 = statistics.median(bare_own), pct(bare_own, 0.9)
    e50 = statistics.median(exec_t)
    return [
        Row(
            f"relay: message → answer at the Bot API, p50 / p90 ({rounds} rounds)",
            f"{ms(r50)} / {ms(r90)}",
            "fake Bot API long poll + manager + proxy + codex",
        ),
        Row(
            "direct: turn/start → turn/completed on a warm app-server, p50 / p90",
            f"{ms(d50)} / {ms(d90)}",
            "codex itself (same binary, same fake model)",
        ),
        Row(
            "relay overhead at p50: ratio / added",
            f"{r50 / d50:.2f}× / +{ms(r50 - d50)}",
            "target ≤ 1.05× or ≤ 3 ms added",
        ),
        Row(
            "relay overhead at p90: ratio / added",
            f"{r90 / d90:.2f}× / +{ms(r90 - d90)}",
            "",
        ),
        Row(
            "the relay's own time per message (less its turn at codex), p50 / p90",
            f"{ms(o50)} / {ms(o90)}",
            "the rows above less codex's noise (two codex processes' turns differ by ±5 ms)",
        ),
        Row(
            "a minimal one-process bot: message → answer at the Bot API, p50 / p90",
            f"{ms(b50)} / {ms(b90)}",
            "getUpdates → turn on the direct app-server → sendMessage; no store, no proxy",
        ),
        Row(
            "the minimal bot's own time per message (less its turn), p50 / p90",
            f"{ms(bo50)} / {ms(bo90)}",
            "the Bot API's two HTTP exchanges: the floor for any bot",
        ),
        Row(
            "the relay's own time above the minimal bot's, p50 / p90",
            f"+{ms(o50 - bo50)} / +{ms(o90 - bo90)}",
            "codexnet's split and guarantees: 2 WebSocket hops, 4 commits",
        ),
        Row(
            f"codex exec --json per message, p50 ({len(exec_t)} runs)",
            f"{ms(e50)} ({e50 / d50:.1f}× a warm app-server turn)",
            "a new codex process and session per message",
        ),
    ]


# The proxy's line for a finished task (codexnet/proxy/service.py): the turn alone,
# in ms (under 1 s) or s.
TURN_LINE = re.compile(r"task \S+: completed \(codex's turn: ([\d.]+) (ms|s)\)")


def turn_seconds(line: re.Match[str]) -> float:
    return float(line[1]) / (1000 if line[2] == "ms" else 1)


async def relay_once(fake: FakeTelegram, chat: int, prompt: str) -> float:
    start = trio.current_time()
    fake.push_message(chat, prompt)
    expect = f"Echo: {prompt} "
    with trio.fail_after(60):
        await fake.wait_until(lambda: answer_time(fake, chat, expect) is not None)
    at = answer_time(fake, chat, expect)
    assert at is not None
    return at - start


async def unload_rss(work: Path, threads: int) -> list[Row]:
    """Row 6: codex RSS with 1 and `threads` threads used once, then after the unload."""
    model = FakeResponsesAPI()
    closed = LogLines()
    appserver_log = logging.getLogger("codexnet.proxy.appserver")
    appserver_log.addHandler(closed)
    appserver_log.setLevel(logging.DEBUG)
    async with trio.open_nursery() as nursery:
        await nursery.start(model.serve)
        env = write_codex_home(work / "codex-unload", model.base_url)
        cwd = work / "unload-project"
        cwd.mkdir()
        codex = find_codex()
        assert codex is not None
        config = attrs.evolve(stack_proxy_config(1, cwd, codex_bin=codex), thread_idle_unload_s=2.0)
        app = AppServer(config, env=env)
        await nursery.start(app.serve)
        await app.wait_ready()

        async def decline(approval: object) -> str:
            return "decline"

        async def one(prompt: str) -> None:
            await app.run_turn(
                None,
                prompt,
                on_change=lambda: None,
                on_approval=decline,
                on_turn=lambda turn: None,
                cancel=trio.Event(),
            )

        child = app._child
        assert child is not None
        pid = child.process.pid
        await one("first")
        await trio.sleep(1.0)
        one_thread = rss_mb(pid)
        for i in range(threads - 1):
            await one(f"thread {i}")
        loaded = rss_mb(pid)
        # codex frees a thread ~60 s after the proxy's unsubscribe ("thread/closed").
        await closed.wait_for("codex closed thread", count=threads, seconds=200)
        await trio.sleep(2.0)
        after = rss_mb(pid)
        nursery.cancel_scope.cancel()
    return [
        Row("codex RSS, one thread used once", f"{one_thread:.0f} MB", ""),
        Row(
            f"codex RSS, {threads} threads used once, all loaded",
            f"{loaded:.0f} MB",
            f"~{(loaded - one_thread) / (threads - 1):.1f} MB per loaded thread",
        ),
        Row(
            f"codex RSS, {threads} threads, after the idle unload",
            f"{after:.0f} MB",
            "thread/unsubscribe after thread_idle_unload_s; codex frees ~60 s later",
        ),
    ]


# --------------------------------------------------------------------------- fleet (rows 3, 4)


@attrs.define
class FleetProcess:
    """tests/fakes/fleet.py as its own process; when it was ready and tasks arrived."""

    port: int
    count: int
    heartbeat_s: float = 30.0
    # Room for all 200 tasks of the dispatch row at once on any fleet: the row
    # measures dispatch, not the manager's queue in front of a full machine.
    capacity: int = 200
    connecting: float = 0.0
    ready: trio.Event = attrs.Factory(trio.Event)
    ready_at: float = 0.0
    arrived: dict[str, float] = attrs.Factory(dict)  # prompt → time.monotonic()
    _changed: trio.Event = attrs.Factory(trio.Event)
    pid: int = 0

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        script = ROOT / "tests/fakes/fleet.py"
        command = [sys.executable, str(script), str(self.port), str(self.count)]
        command += ["--heartbeat", str(self.heartbeat_s), "--capacity", str(self.capacity)]
        async with trio.open_nursery() as nursery:
            self.connecting = time.monotonic()
            process = await nursery.start(
                partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
            )
            self.pid = process.pid
            task_status.started()
            buffer = b""
            async for chunk in process.stdout:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    word, _, rest = line.decode().partition(" ")
                    if word == "ready":
                        self.ready_at = float(rest.split()[1])
                        self.ready.set()
                    elif word == "arrived":
                        at, _, rest = rest.partition(" ")
                        _, _, prompt = rest.partition(" ")
                        self.arrived.setdefault(prompt, float(at))
                        self._changed.set()
                        self._changed = trio.Event()

    async def wait_arrived(self, prompts: list[str]) -> None:
        while not all(p in self.arrived for p in prompts):
            await self._changed.wait()


async def pin_chats(state_dir: Path, pins: dict[int, str]) -> None:
    """Store each chat's machine, as `/use` would have (without 200 replies to send)."""
    async with open_store(state_dir) as store:
        async with trio.open_nursery() as nursery:
            for chat, proxy_id in pins.items():
                store.conversation((chat, 0)).proxy = proxy_id
                nursery.start_soon(store.save_conversation, (chat, 0))


@attrs.define
class Hub:
    """One manager process with a fleet of `n` proxies registered, and its fake Bot API."""

    manager: ManagerProcess
    fleet: FleetProcess
    fake: FakeTelegram
    registration_s: float
    registration_cpu_s: float
    fleet_cpu_s: float  # the simulated fleet's own CPU while registering


@asynccontextmanager
async def profiled(pid: int, out: Path | None, *, rate: int = 250) -> AsyncIterator[None]:
    """`py-spy record` of `pid` for the block, as collapsed stacks in `out` (None: not)."""
    if out is None:
        yield
        return
    command = [
        str(Path(sys.executable).with_name("py-spy")),
        "record",
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--rate",
        str(rate),
    ]
    command += ["--output", str(out), "--nonblocking"]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            partial(trio.run_process, command, check=False, stdout=subprocess.DEVNULL)
        )
        await trio.sleep(1.0)  # attached
        try:
            yield
        finally:
            process.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            with trio.move_on_after(20):
                await process.wait()


def top_frames(raw: Path, n: int = 15) -> str:
    """The functions most samples were in (inclusive) and on top of (self), from py-spy's
    collapsed stacks: "stack;of;frames count" lines, a frame being "func (path:line)"."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        total += samples
        names = []
        for frame in stack.split(";")[1:]:  # the first is the process
            found = re.match(r"(.*) \((?:.*/)?([^/]*?)(?::\d+)?\)$", frame)
            names.append(f"{found.group(1)} ({found.group(2)})" if found else frame)
        for name in set(names):
            inclusive[name] = inclusive.get(name, 0) + samples
        if names:
            own[names[-1]] = own.get(names[-1], 0) + samples
    # Frames in nearly every sample (the interpreter, trio's run loop) say nothing.
    telling = {k: v for k, v in inclusive.items() if v < 0.8 * total}
    ranked = sorted(telling.items(), key=lambda kv: -kv[1])[:n]
    lines = [f"  {'incl':>6} {'self':>6}  function ({total} samples)"]
    for name, count in ranked:
        lines.append(
            f"  {100 * count / total:5.1f}% {100 * own.get(name, 0) / total:5.1f}%  {name}"
        )
    return "\n".join(lines)


async def run_hub(
    work: Path,
    n: int,
    chats: dict[int, str],
    *,
    profile: Path | None = None,
    heartbeat_s: float = 30.0,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    fake = FakeTelegram(BOT_TOKEN)
    for chat in chats:
        fake.add_chat(chat)
    state = work / f"hub-{n}-{heartbeat_s:g}-state"
    await pin_chats(state, chats)
    async with trio.open_nursery() as nursery:
        await nursery.start(fake.serve)
        config = manager_config(
            state,
            fake.base_url,
            0,
            proxies=fleet_proxies(n),
            telegram_allowed_user_ids=sorted(chats),
            heartbeat_timeout_s=heartbeat_s,
        )
        home = work / f"hub-{n}-{heartbeat_s:g}"
        async with ManagerProcess(config, home, prefix=SYSTEMD_NOFILE) as manager:
            port = await manager.hub_port()
            await manager.wait_for_log(r"Telegram bot @\w+ ready")
            await trio.sleep(0.5)  # the manager settles (first long poll out)
            fleet = FleetProcess(port, n, heartbeat_s)
            async with profiled(manager.pid, profile and profile / f"register-{n}.txt"):
                cpu0 = cpu_s(manager.pid)
                await nursery.start(fleet.run)
                with trio.fail_after(300):
                    await fleet.ready.wait()
                registration_cpu = cpu_s(manager.pid) - cpu0
                fleet_cpu = cpu_s(fleet.pid)
            wall = fleet.ready_at - fleet.connecting
            task_status.started(Hub(manager, fleet, fake, wall, registration_cpu, fleet_cpu))
            try:
                await trio.sleep_forever()
            finally:
                manager.kill()
                os.kill(fleet.pid, 9)


async def dispatch_burst(hub: Hub, chats: list[int], prompt: str) -> list[float]:
    """Push one message per chat at once: seconds to each task frame at its proxy."""
    prompts = [f"{prompt} {chat}" for chat in chats]
    start = time.monotonic()
    for chat, text in zip(chats, prompts, strict=True):
        hub.fake.push_message(chat, text)
    with trio.fail_after(120):
        await hub.fleet.wait_arrived(prompts)
    return [hub.fleet.arrived[p] - start for p in prompts]


async def hub_scale(
    work: Path, sizes: list[int], heartbeat_window: float, profile: Path | None
) -> list[Row]:
    """Row 3."""
    rows: list[Row] = []
    biggest = max(sizes)
    for n in sizes:
        chats = {FIRST_CHAT + i: f"p{i % n}" for i in range(200)}
        where = profile if n == biggest else None
        async with trio.open_nursery() as nursery:
            # Heartbeats all but off (an hour): these rows are registration and dispatch alone.
            hub: Hub = await nursery.start(
                partial(run_hub, work, n, chats, profile=where, heartbeat_s=3600)
            )
            pid = hub.manager.pid
            rss = rss_mb(pid)
            rows.append(
                Row(
                    f"{n} proxies register: wall / manager CPU / manager RSS",
                    f"{hub.registration_s:.2f} s / {hub.registration_cpu_s:.2f} s / {rss:.0f} MB",
                    (
                        "target at 5 000: ≤ 3 s CPU, ≤ 150 MB; wall bound by the fleet client "
                        f"(one process, {hub.fleet_cpu_s:.1f} s CPU)"
                    )
                    if n == biggest
                    else "",
                )
            )
            times = await dispatch_burst(hub, sorted(chats), "[[after:3]] dispatch")
            rows.append(
                Row(
                    f"{n} proxies: 200 messages at once → task at its proxy, p50 / p99",
                    f"{ms(statistics.median(times))} / {ms(pct(times, 0.99))}",
                    "getUpdates hands over 100 updates per call; one commit per batch"
                    + (
                        "; a full GC pass of the manager (~0.1 s at 5 000 connections, "
                        "measured apart) may fall into the burst"
                        if n == biggest and n >= 5000
                        else ""
                    ),
                )
            )
            nursery.cancel_scope.cancel()
    # The heartbeats alone: the biggest fleet again, now with the default heartbeat (30 s).
    async with trio.open_nursery() as nursery:
        chats = {FIRST_CHAT: "p0"}
        hub = await nursery.start(partial(run_hub, work, biggest, chats, heartbeat_s=30))
        pid = hub.manager.pid
        rows.append(
            Row(
                f"{biggest} proxies register, heartbeats on meanwhile: wall / manager CPU",
                f"{hub.registration_s:.2f} s / {hub.registration_cpu_s:.2f} s",
                "the registered proxies' heartbeats run during the rest's registration",
            )
        )
        await trio.sleep(12.0)  # every proxy's first ping and the hub's went by
        async with profiled(pid, profile and profile / f"heartbeats-{biggest}.txt"):
            (user0, sys0), t0 = cpu_split(pid), time.monotonic()
            await trio.sleep(heartbeat_window)
            user1, sys1 = cpu_split(pid)
            elapsed = time.monotonic() - t0
        share, user = (user1 + sys1 - user0 - sys0) / elapsed, (user1 - user0) / elapsed
        every = 30 * PROXY_PING_FRACTION * 0.925  # the mean of heartbeat_interval(30)
        pings = biggest / every + biggest / RTT_EVERY_S
        rows.append(
            Row(
                f"{biggest} proxies idle: heartbeats' CPU ({heartbeat_window:.0f} s window)",
                f"{share * 100:.1f} % of one core ({user * 100:.1f} % user)",
                f"~{pings:.0f} pings/s and as many pongs (a proxy pings every ~{every:.1f} s, "
                f"the hub each proxy every {RTT_EVERY_S / 60:.0f} min for the round trip); "
                "target ≤ 5 %",
            )
        )
        nursery.cancel_scope.cancel()
    return rows


async def telegram_throughput(work: Path) -> list[Row]:
    """Row 4: 50 chats streaming at once, then 200 answers at once, vs the limits' floor."""
    n = 50
    streaming = [FIRST_CHAT + i for i in range(50)]
    queued = [FIRST_CHAT + 1000 + i for i in range(200)]
    chats = {chat: f"p{i % n}" for i, chat in enumerate(streaming + queued)}
    rows: list[Row] = []
    async with trio.open_nursery() as nursery:
        hub: Hub = await nursery.start(run_hub, work, n, chats)
        fake = hub.fake

        async def burst(users: list[int], prompt: str) -> tuple[list[float], int, int, int]:
            before = len(fake.requests)
            too_many = fake.stats.too_many_requests
            start = trio.current_time()
            for chat in users:
                fake.push_message(chat, f"{prompt} {chat}")
            expect: Callable[[int], str] = lambda chat: f"Echo: {prompt} {chat}"  # noqa: E731
            with trio.fail_after(300):
                await fake.wait_until(
                    lambda: all(answer_time(fake, c, expect(c)) is not None for c in users)
                )
            done = [answer_time(fake, c, expect(c)) for c in users]
            await trio.sleep(3)  # the status lines that follow the answers
            requests = fake.requests[before:]
            times = sorted(r.time for r in requests if r.method in LIMITED_METHODS)
            peak = max(sum(1 for t in times if t0 <= t < t0 + 1) for t0 in times)
            return (
                [t - start for t in done if t is not None],
                len(requests),
                peak,
                fake.stats.too_many_requests - too_many,
            )

        answers, total, peak, too_many = await burst(streaming, "[[stream:6]] stream")
        floor = 3.0 + 25 / OUR_RATE
        rows.append(
            Row(
                "50 chats streaming 3 s at once: answer p50 / last; 429s",
                f"{statistics.median(answers):.2f} s / {max(answers):.2f} s; {too_many} × 429",
                f"floor p50 {floor:.1f} s (3 s stream, then 25 answers at {OUR_RATE:.0f}/s)",
            )
        )
        rows.append(
            Row(
                "50 chats streaming: Bot API requests / peak message requests in 1 s",
                f"{total} / {peak}",
                f"the outbox's {OUR_RATE:.0f}/s and its burst of 5"
                f" (Telegram allows ~{TELEGRAM_RATE:.0f}/s)",
            )
        )
        await trio.sleep(2)
        answers, total, peak, too_many = await burst(queued, "[[after:0.5]] queued")
        floor = 0.5 + 100 / OUR_RATE
        rows.append(
            Row(
                "200 answers at once: p50 / last; 429s",
                f"{statistics.median(answers):.2f} s / {max(answers):.2f} s; {too_many} × 429",
                f"floor p50 {floor:.1f} s / last {0.5 + 200 / OUR_RATE:.1f} s at {OUR_RATE:.0f}/s"
                f" ({0.5 + 100 / TELEGRAM_RATE:.1f} / {0.5 + 200 / TELEGRAM_RATE:.1f} s at "
                f"Telegram's {TELEGRAM_RATE:.0f}/s)",
            )
        )
        nursery.cancel_scope.cancel()
    return rows


# --------------------------------------------------------------------------- outbox (row 5)


async def _outbox_run(chats: int, per_chat: int, direct: bool) -> tuple[float, int, int, int]:
    fake = FakeTelegram(BOT_TOKEN, rate_limits=not direct)
    for chat in range(1, chats + 1):
        fake.add_chat(chat)
    async with httpx.AsyncClient(transport=fake.transport()) as http:
        tg = TelegramClient(http, MOCK_BASE_URL, BOT_TOKEN)
        outbox = Outbox(tg)
        async with trio.open_nursery() as nursery:
            await nursery.start(outbox.run)
            cpu0 = time.process_time()
            async with trio.open_nursery() as sends:
                for chat in range(1, chats + 1):
                    for i in range(per_chat):
                        params = {"chat_id": chat, "text": f"m{i}"}
                        if direct:  # the same requests without the outbox: the baseline
                            sends.start_soon(tg.request, "sendMessage", params)
                        else:
                            sends.start_soon(
                                partial(outbox.send, priority=Priority.ANSWER),
                                "sendMessage",
                                params,
                            )
            cpu = time.process_time() - cpu0
            nursery.cancel_scope.cancel()
    assert fake.stats.too_many_requests == 0
    stats = outbox.stats
    return cpu, stats.wakeups, stats.at_once, stats.scheduler_wakeups


def outbox_rows() -> list[Row]:
    rows = []
    for chats, per_chat in ((200, 1), (200, 10)):
        n = chats * per_chat
        clock = trio.testing.MockClock(autojump_threshold=0)
        # The least of three runs each: CPU time of a sub-second run is noisy on a shared machine.
        runs = [trio.run(_outbox_run, chats, per_chat, False, clock=clock) for _ in range(3)]
        cpu = min(run[0] for run in runs)
        _, woken, at_once, scheduler = runs[0]
        base = min(trio.run(_outbox_run, chats, per_chat, True)[0] for _ in range(3))
        rows.append(
            Row(
                f"outbox, {n} sends at once: sends woken (gone at once) / scheduler wake-ups",
                f"{woken} ({at_once}) / {scheduler}",
                f"each waiting send woken once, when it may go (target ≤ {n})",
            )
        )
        rows.append(
            Row(
                f"outbox, {n} waiting sends: CPU of the outbox (of all)",
                f"{ms(cpu - base)} ({ms(cpu)})",
                f"all: with the in-memory Bot API's {ms(base)}; target ≤ 1 s at 2 000",
            )
        )
    return rows


# --------------------------------------------------------------------------- main


async def async_main(args: argparse.Namespace, work: Path) -> list[Row]:
    rows: list[Row] = []
    if "relay" in args.only:
        rows += await relay_and_exec(work, args.rounds, args.profile)
    if "hub" in args.only:
        rows += await hub_scale(work, args.fleet, args.heartbeat_window, args.profile)
    if "telegram" in args.only:
        rows += await telegram_throughput(work)
    if "unload" in args.only and args.threads:
        rows += await unload_rss(work, args.threads)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fleet", default="10,100,1000,5000")
    parser.add_argument("--heartbeat-window", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=100, help="row 6; 0 skips it")
    parser.add_argument("--quick", action="store_true", help="small sizes, to try the bench")
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        help=f"comma-separated parts to run, of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy the manager at the largest fleet (registration, heartbeats) into DIR",
    )
    args = parser.parse_args()
    args.fleet = [int(n) for n in args.fleet.split(",")]
    args.only = set(args.only.split(","))
    if not args.only <= set(PARTS):
        parser.error(f"--only: expected some of {','.join(PARTS)}")
    if args.quick:
        args.rounds, args.fleet, args.heartbeat_window, args.threads = 6, [10, 100], 5.0, 0
    started = time.perf_counter()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".tools", prefix="bench-fleet-") as tmp:
        rows = trio.run(async_main, args, Path(tmp))
    if "outbox" in args.only:
        rows += outbox_rows()
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("measure", "figure")]
    print(f"{'measure':<{widths[0]}}  {'figure':<{widths[1]}}  what bounds it / target")
    print(f"{'-' * widths[0]}  {'-' * widths[1]}  {'-' * 24}")
    for row in rows:
        print(f"{row.measure:<{widths[0]}}  {row.figure:<{widths[1]}}  {row.bound}")
    print(f"(took {time.perf_counter() - started:.0f} s on {os.cpu_count()} cores)")
    if args.profile:
        for raw in sorted(args.profile.glob("*.txt")):
            print(f"\nprofile of {raw.stem} (share of samples in each function):")
            print(top_frames(raw))


if __name__ == "__main__":
    main()
