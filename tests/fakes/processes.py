"""The manager and the proxy as real subprocesses, so a test can SIGKILL them anywhere.

    config = manager_config(tmp_path / "state", telegram.base_url, port)
    async with ManagerProcess(config, tmp_path / "manager") as manager:
        await manager.wait_for_log(r"Telegram bot @\\w+ ready")
        proxy_cfg = proxy_config(port, workdir)
        async with ProxyProcess(proxy_cfg, tmp_path / "proxy", codex_env) as proxy:
            await manager.wait_for_log(r"proxy 'proxy1' online")
            [pid] = proxy.app_server_pids()
            os.kill(pid, signal.SIGKILL)   # just the app-server: the proxy restarts it
            proxy.kill()                   # a crash: the proxy and everything under it
        code = await manager.terminate()   # SIGTERM, as systemd stops it

Each process runs `python -u -m codexnet.manager|codexnet.proxy --config FILE`
with the config dict written as JSON (mode 0600, the dict is passed through
as it is, so keys added later just work), in its own session and process
group, with stdout and stderr read continuously into `lines` (and mirrored
to the `tests.processes.<name>` logger, which pytest shows for a failed test).
Leaving the `async with` always kills whatever is left of the process tree
and reaps the process: no zombies, no open pipes.

The proxy starts `codex app-server` with `start_new_session=True`, so codex
is NOT in the proxy's process group: `killpg` alone would leave it running.
`kill()` therefore freezes (SIGSTOP) and then SIGKILLs the leader's group
and every descendant found through /proc, which is what an OOM kill of the
service's cgroup or a power cut does. `kill_leader_only()` kills just the
Python process, as a crash of the proxy alone would; codex then sees EOF on
its stdin and should exit by itself (`survivors()` tells whether it did).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import attrs
import trio

from tests.fakes.codex_env import require_codex
from tests.fakes.stack import BOT_TOKEN, PROXY_TOKEN, USER

log = logging.getLogger(__name__)
# Mirror child output at INFO even when the root logger is at WARNING, so that
# pytest's "Captured log" section of a failed test shows what the child said.
logging.getLogger("tests.processes").setLevel(logging.INFO)

TAIL_LINES = 30
REAP_TIMEOUT_S = 5.0
OUTPUT_DRAIN_S = 2.0


# --------------------------------------------------------------------------- /proc


@attrs.frozen
class ProcInfo:
    """One line of /proc/PID/stat, the fields we need."""

    pid: int
    comm: str
    state: str  # R, S, D, Z (zombie), T (stopped), …
    ppid: int
    pgid: int
    sid: int
    start: int  # start time in clock ticks since boot: tells a reused pid apart

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def read_stat(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    # comm is in parentheses and may itself hold spaces or ")": split at the last ")".
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    return ProcInfo(
        pid=pid,
        comm=head.partition("(")[2],
        state=fields[0],
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        sid=int(fields[3]),
        start=int(fields[19]),
    )


def all_processes() -> list[ProcInfo]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := read_stat(int(entry))) is not None:
            out.append(info)
    return out


def descendants(*pids: int) -> list[ProcInfo]:
    """Every process below `pids` (children, grandchildren, …), by parent pid."""
    children: dict[int, list[ProcInfo]] = {}
    for info in all_processes():
        children.setdefault(info.ppid, []).append(info)
    out: list[ProcInfo] = []
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child.pid)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
    except OSError:
        return []


def still_running(procs: Iterable[ProcInfo]) -> list[ProcInfo]:
    """Those of `procs` that still exist (same pid and start time) and are not zombies."""
    out = []
    for proc in procs:
        now = read_stat(proc.pid)
        if now is not None and now.start == proc.start and now.alive:
            out.append(now)
    return out


def _signal(pid: int, signum: int, *, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


async def wait_gone(procs: Iterable[ProcInfo]) -> None:
    """Return once none of `procs` runs (zombies count as gone), without polling.

    A pidfd becomes readable when its process exits; it works for processes
    that are not our children, which trio's Process.wait does not cover.
    """
    for proc in procs:
        try:
            fd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            continue
        try:
            if still_running([proc]):  # checked after opening: the pid is not a new process
                await trio.lowlevel.wait_readable(fd)
        finally:
            os.close(fd)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


# --------------------------------------------------------------------------- config helpers


def write_config(path: Path, config: Mapping[str, Any]) -> None:
    """JSON, mode 0600 from the first byte (configs hold tokens)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, default=str)  # default=str: Path values
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def manager_config(
    state_dir: Path, telegram_base_url: str, ws_port: int = 0, **changes: Any
) -> dict[str, Any]:
    """A manager config dict for tests (the tokens and user of tests/fakes/stack.py)."""
    config: dict[str, Any] = {
        "telegram_bot_token": BOT_TOKEN,
        "telegram_api_base": telegram_base_url,
        "telegram_allowed_user_ids": [USER],
        "manager_ws_listen": f"127.0.0.1:{ws_port}",
        "proxies": {
            "proxy1": {"token": PROXY_TOKEN, "labels": ["linux"]},
            "proxy2": {"token": "proxy2-secret-token-9876543210"},
        },
        "state_dir": str(state_dir),
        "telegram_poll_timeout_s": 10,
    }
    config.update(changes)
    return config


def proxy_config(ws_port: int, workdir: Path, **changes: Any) -> dict[str, Any]:
    """A proxy config dict for `proxy1`, driving the real codex (skips without it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "manager_ws": f"ws://127.0.0.1:{ws_port}",
        "proxy_id": "proxy1",
        "proxy_token": PROXY_TOKEN,
        "codex_cwd": str(workdir),
        "codex_bin": require_codex(),
        "approval_policy": "never",
        "sandbox": "read-only",
        "capacity": 2,
        "labels": ["linux"],
    }
    config.update(changes)
    return config


# --------------------------------------------------------------------------- processes


class ProcessExited(AssertionError):
    """The process ended (its output closed) before the awaited line appeared."""


class ServiceProcess:
    """One codexnet service as a child process; use `async with`."""

    module: ClassVar[str]

    def __init__(
        self,
        config: Mapping[str, Any],
        directory: Path,
        env: Mapping[str, str] | None = None,
        *,
        name: str | None = None,
        args: Sequence[str] = (),
        log_level: str = "INFO",
        prefix: Sequence[str] = (),
    ) -> None:
        self.config = dict(config)
        self.directory = Path(directory)
        self.env = dict(os.environ if env is None else env)
        self.name = name or self.module.rpartition(".")[2]
        self.args = list(args)
        self.prefix = list(prefix)  # e.g. ["prlimit", "--nofile=1024:1024", "--"]; it execs
        self.log_level = log_level
        self.config_path = self.directory / "config.json"
        self.lines: list[str] = []
        self.process: trio.Process | None = None
        # Every process seen below the leader, so that none escapes the clean-up
        # even after the leader died and its children were re-parented to init.
        self._seen: dict[int, ProcInfo] = {}
        self._log = logging.getLogger(f"tests.processes.{self.name}")
        self._changed = trio.Event()
        self._output_done = trio.Event()
        self._stack: AsyncExitStack | None = None

    # ----------------------------------------------------------------- lifetime

    @property
    def command(self) -> list[str]:
        return [
            *self.prefix,
            sys.executable,
            "-u",
            "-m",
            self.module,
            "--config",
            str(self.config_path),
            "--log-level",
            self.log_level,
            *self.args,
        ]

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            raise RuntimeError(f"{self.name} was started already; make a new one to restart")
        self.directory.mkdir(parents=True, exist_ok=True)
        write_config(self.config_path, self.config)
        async with AsyncExitStack() as stack:
            nursery = await stack.enter_async_context(trio.open_nursery())
            self.process = await trio.lowlevel.open_process(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.directory,
                start_new_session=True,  # its own group: kill() can take the group down
            )
            stack.push_async_callback(self._reap, nursery)
            nursery.start_soon(self._read_output)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._stack is not None
        try:
            return await self._stack.__aexit__(exc_type, exc, tb)
        except BaseExceptionGroup as group:
            # The body runs inside our reader's nursery, which wraps its error in a
            # group; when that error is all there is, let it through unwrapped.
            if exc is not None and _leaves(group) == [exc]:
                return False
            raise

    async def _reap(self, nursery: trio.Nursery) -> None:
        """Kill whatever is left, wait for the exit status, close the pipe; bounded."""
        process = self.process
        assert process is not None
        with trio.CancelScope(shield=True):
            self.kill()
            with trio.move_on_after(REAP_TIMEOUT_S):
                await process.wait()
            with trio.move_on_after(OUTPUT_DRAIN_S):
                await self._output_done.wait()  # the last lines, for the test's log
            nursery.cancel_scope.cancel()
            if process.stdout is not None:
                await process.stdout.aclose()

    async def _read_output(self) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        buffer = b""
        try:
            async for chunk in self.process.stdout:
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                for raw in complete:
                    self._add_line(raw)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if buffer:
                self._add_line(buffer)
            self._output_done.set()
            self._notify()

    def _add_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.lines.append(line)
        self._log.info("%s", line)
        self._notify()

    def _notify(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    # ----------------------------------------------------------------- state

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        """None while running; -9 after a SIGKILL; the exit code otherwise."""
        return None if self.process is None else self.process.returncode

    def tail(self, n: int = TAIL_LINES) -> str:
        return "\n".join(f"  {line}" for line in self.lines[-n:])

    # ----------------------------------------------------------------- waiting

    async def wait_for_log(
        self,
        pattern: str | re.Pattern[str],
        *,
        timeout: float = 20.0,  # noqa: ASYNC109 - the failure message needs the log tail
        since: int = 0,
    ) -> re.Match[str]:
        """The first line (index >= since in `lines`) matching `pattern` (re.search).

        Fails at once with `ProcessExited` if the output ends first, and with an
        AssertionError showing the last lines if nothing matches within `timeout`.
        """
        regex = re.compile(pattern)
        with trio.move_on_after(timeout):
            while True:
                for line in self.lines[since:]:
                    if match := regex.search(line):
                        return match
                since = len(self.lines)
                if self._output_done.is_set():
                    raise ProcessExited(
                        f"{self.name} ended (code {self.returncode}) before logging "
                        f"{regex.pattern!r}; last lines:\n{self.tail()}"
                    )
                await self._changed.wait()
        raise AssertionError(
            f"{self.name}: no line matching {regex.pattern!r} within {timeout} s;"
            f" last lines:\n{self.tail()}"
        )

    async def wait(self, timeout: float = 20.0) -> int:  # noqa: ASYNC109 - see wait_for_log
        """Wait for the process to exit by itself; its return code."""
        assert self.process is not None, "not started"
        with trio.move_on_after(timeout):
            return await self.process.wait()
        raise AssertionError(
            f"{self.name} still running after {timeout} s; last lines:\n{self.tail()}"
        )

    # ----------------------------------------------------------------- signals

    def send_signal(self, signum: int) -> None:
        """Signal the leader only (as `systemctl kill -s SIG --kill-whom=main` would)."""
        if self.returncode is None:
            _signal(self.pid, signum)

    async def terminate(self, timeout: float = 20.0) -> int:  # noqa: ASYNC109 - see wait_for_log
        """SIGTERM the leader (the service's own shutdown path), wait; its return code.

        A process still running after `timeout` is killed and the test fails.
        """
        self.send_signal(signal.SIGTERM)
        assert self.process is not None
        with trio.move_on_after(timeout):
            return await self.process.wait()
        self.kill()
        with trio.move_on_after(REAP_TIMEOUT_S):
            await self.process.wait()
        raise AssertionError(
            f"{self.name} did not exit within {timeout} s of SIGTERM; last lines:\n{self.tail()}"
        )

    def _tree(self) -> list[ProcInfo]:
        """The live processes below the leader (while it runs) and any seen before."""
        roots = [self.pid] if self.returncode is None else []
        roots += [p.pid for p in still_running(self._seen.values())]
        for proc in descendants(*roots):
            known = self._seen.get(proc.pid)
            if proc.alive and (known is None or known.start != proc.start):
                self._seen[proc.pid] = proc
        return still_running(self._seen.values())

    def kill(self) -> None:
        """SIGKILL the whole tree: the leader's group and every descendant.

        Everything is frozen first (SIGSTOP; descendants rescanned until no new
        one appears), so nothing can fork a survivor between the scan and the
        kill. Safe to call when everything is dead already.
        """
        assert self.process is not None, "not started"
        # Until we reap it, the leader's pid (= its group id) cannot be reused.
        leader_running = self.process.returncode is None
        if leader_running:
            _signal(self.pid, signal.SIGSTOP, group=True)
        tree: list[ProcInfo] = []
        for _ in range(10):
            before = {p.pid for p in tree}
            tree = self._tree()
            for proc in tree:
                _signal(proc.pid, signal.SIGSTOP)
            if {p.pid for p in tree} == before:
                break
        if leader_running:
            _signal(self.pid, signal.SIGKILL, group=True)
        for proc in tree:
            if proc.pgid == proc.pid:  # a group of its own (codex): its members too
                _signal(proc.pid, signal.SIGKILL, group=True)
            _signal(proc.pid, signal.SIGKILL)
        if leader_running or tree:
            log.info("%s: SIGKILLed %d and %s", self.name, self.pid, [p.pid for p in tree])

    def kill_leader_only(self) -> None:
        """SIGKILL just the service's own process; its children are left to fend for
        themselves (see `survivors()`); the `async with` kills them at the end."""
        assert self.process is not None, "not started"
        if self.process.returncode is None:
            self._tree()  # remember the children: once orphaned, they are hard to find
            _signal(self.pid, signal.SIGKILL)

    def survivors(self) -> list[ProcInfo]:
        """Processes of this tree that still run; [] after the leader died means
        nothing was left behind (zombies do not count: they no longer run)."""
        return self._tree()

    async def wait_tree_gone(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until the leader has exited and nothing of its tree runs any more."""
        assert self.process is not None, "not started"
        with trio.move_on_after(timeout):
            await self.process.wait()
            await wait_gone(self.survivors())
            return
        raise AssertionError(
            f"{self.name}: still running after {timeout} s: "
            f"{[(p.pid, p.comm) for p in self.survivors()]}"
        )


class ManagerProcess(ServiceProcess):
    """`python -m codexnet.manager --config FILE`."""

    module = "codexnet.manager"

    async def hub_port(self, *, timeout: float = 20.0) -> int:  # noqa: ASYNC109
        """The hub's port, from its "waiting for proxies on ws://HOST:PORT" line."""
        match = await self.wait_for_log(
            r"waiting for proxies on wss?://[^ ]*:(\d+)$", timeout=timeout
        )
        return int(match.group(1))


class ProxyProcess(ServiceProcess):
    """`python -m codexnet.proxy --config FILE`; `env` is the codex child's too
    (`tests.fakes.codex_env.write_codex_home`)."""

    module = "codexnet.proxy"

    def app_server_pids(self) -> list[int]:
        """Live `codex app-server` processes below the proxy (with the npm wrapper
        instead of the native binary, the node process and its child both count)."""
        if self.returncode is not None:
            return []
        return [p.pid for p in descendants(self.pid) if p.alive and "app-server" in cmdline(p.pid)]
