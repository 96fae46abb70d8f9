"""Services as real subprocesses (tests/fakes/processes.py): start, log, kill, reap."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
import trio

from tests.fakes.codex_env import write_codex_home
from tests.fakes.processes import (
    ManagerProcess,
    ProcessExited,
    ProcInfo,
    ProxyProcess,
    ServiceProcess,
    descendants,
    manager_config,
    proxy_config,
    read_stat,
    still_running,
    wait_gone,
)
from tests.fakes.responses_api import FakeResponsesAPI
from tests.fakes.stack import BOT_TOKEN, USER, free_port
from tests.fakes.telegram_api import FakeTelegram

ROOT = Path(__file__).resolve().parent.parent


class TreeProcess(ServiceProcess):
    """tests/fakes/tree_service.py: a process tree like the proxy's, without codex."""

    module = "tests.fakes.tree_service"


def tree_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


async def child_pids(service: ServiceProcess) -> list[int]:
    match = await service.wait_for_log(r"^children ?(.*)$", timeout=10)
    return [int(pid) for pid in match.group(1).split()]


@pytest.fixture
async def telegram(nursery: trio.Nursery) -> FakeTelegram:
    fake = FakeTelegram(BOT_TOKEN)
    fake.add_chat(USER)
    await nursery.start(fake.serve)
    return fake


# ------------------------------------------------------------------ the real manager


async def test_manager_answers_help_and_sigkill_leaves_nothing(
    tmp_path: Path, telegram: FakeTelegram
) -> None:
    config = manager_config(tmp_path / "state", telegram.base_url)
    with trio.fail_after(20):
        async with ManagerProcess(config, tmp_path / "manager") as manager:
            port = await manager.hub_port()
            assert port > 0
            await manager.wait_for_log(r"Telegram bot @\w+ ready")
            telegram.push_message(USER, "/help")
            await telegram.wait_until(
                lambda: (
                    telegram.count_messages(USER, lambda t: t.startswith("Send me a message")) == 1
                )
            )
            manager.kill()
            await manager.wait_tree_gone()
            assert manager.returncode == -signal.SIGKILL
            assert manager.survivors() == []
            mode = stat.S_IMODE(manager.config_path.stat().st_mode)
            assert mode == 0o600
    assert any("waiting for proxies" in line for line in manager.lines)


async def test_manager_sigterm_exits_cleanly(tmp_path: Path, telegram: FakeTelegram) -> None:
    config = manager_config(tmp_path / "state", telegram.base_url)
    with trio.fail_after(20):
        async with ManagerProcess(config, tmp_path / "manager") as manager:
            await manager.wait_for_log(r"Telegram bot @\w+ ready")
            assert await manager.terminate() == 0
            await manager.wait_for_log("SIGTERM received, shutting down")


async def test_wait_for_log_fails_at_once_when_the_process_ends(tmp_path: Path) -> None:
    """A config error: exit code 2; waiting for a line that never comes fails fast."""
    config = manager_config(tmp_path / "state", "not-a-url")
    with trio.fail_after(10):
        async with ManagerProcess(config, tmp_path / "manager") as manager:
            with pytest.raises(ProcessExited, match="telegram_api_base"):
                await manager.wait_for_log("Telegram bot .* ready", timeout=10)
            assert await manager.wait() == 2
    assert "config error" in manager.lines[-1]


# ------------------------------------------------------------------ process trees


async def test_kill_takes_down_children_in_their_own_sessions(tmp_path: Path) -> None:
    config = {"children": [{"session": True}, {"session": False}]}
    with trio.fail_after(10):
        async with TreeProcess(config, tmp_path, tree_env()) as service:
            await service.wait_for_log("^ready$")
            children = await child_pids(service)
            tree = descendants(service.pid)
            assert len(tree) == 4  # two sh, each with a sleep
            assert {read_stat(pid).sid for pid in children} == {children[0], service.pid}  # type: ignore[union-attr]
            service.kill()
            await service.wait_tree_gone()
            assert still_running(tree) == []
            assert service.returncode == -signal.SIGKILL


async def test_kill_leader_only_orphans_the_children_until_the_block_ends(
    tmp_path: Path,
) -> None:
    config = {"children": [{"session": True}]}
    with trio.fail_after(10):
        async with TreeProcess(config, tmp_path, tree_env()) as service:
            await service.wait_for_log("^ready$")
            tree = descendants(service.pid)
            service.kill_leader_only()
            assert await service.wait() == -signal.SIGKILL
            survivors = service.survivors()
            assert sorted(p.pid for p in survivors) == sorted(p.pid for p in tree)
            assert all(p.ppid != service.pid for p in survivors)  # re-parented
        await wait_gone(tree)  # the block's exit killed them
    assert still_running(tree) == []


async def test_terminate_returns_the_exit_code(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with TreeProcess({"exit_code": 7}, tmp_path, tree_env()) as service:
            await service.wait_for_log("^ready$")
            assert await service.terminate(5) == 7
            assert service.returncode == 7
            await service.wait_for_log("SIGTERM received")


async def test_leaving_the_block_on_an_error_reaps_everything(tmp_path: Path) -> None:
    config = {"children": [{"session": True}]}
    tree: list[ProcInfo] = []

    async def failing_body() -> None:
        async with TreeProcess(config, tmp_path, tree_env()) as service:
            await service.wait_for_log("^ready$")
            tree.extend(descendants(service.pid))
            raise RuntimeError("boom")

    with trio.fail_after(10):
        with pytest.raises(RuntimeError, match="boom"):  # unwrapped, not in a group
            await failing_body()
        await wait_gone(tree)
    assert len(tree) == 2


# ------------------------------------------------------------------ with codex


@pytest.mark.e2e
async def test_proxy_connects_and_its_app_server_can_be_killed_alone(
    tmp_path: Path, telegram: FakeTelegram, nursery: trio.Nursery
) -> None:
    model = FakeResponsesAPI()
    await nursery.start(model.serve)
    codex_env = write_codex_home(tmp_path / "codex-home", model.base_url)
    port = free_port()
    config = manager_config(tmp_path / "state", telegram.base_url, port)
    with trio.fail_after(60):
        async with (
            ManagerProcess(config, tmp_path / "manager") as manager,
            ProxyProcess(
                proxy_config(port, tmp_path / "work"), tmp_path / "proxy", codex_env
            ) as proxy,
        ):
            await manager.wait_for_log(r"proxy 'proxy1' online")
            first = await proxy.wait_for_log(r"codex app-server ready \(pid (\d+)")
            pids = proxy.app_server_pids()
            assert pids == [int(first.group(1))]
            os.kill(pids[0], signal.SIGKILL)  # only the app-server: the proxy restarts it
            again = await proxy.wait_for_log(
                r"codex app-server ready \(pid (\d+)", since=len(proxy.lines)
            )
            assert proxy.app_server_pids() == [int(again.group(1))] != pids
            proxy.kill()
            await proxy.wait_tree_gone()
            assert proxy.survivors() == []
            await manager.wait_for_log(r"proxy 'proxy1' went offline")


@pytest.mark.e2e
async def test_codex_exits_by_itself_when_only_the_proxy_dies(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    model = FakeResponsesAPI()
    await nursery.start(model.serve)
    codex_env = write_codex_home(tmp_path / "codex-home", model.base_url)
    with trio.fail_after(60):
        # No manager: the proxy retries the connection and starts codex anyway.
        async with ProxyProcess(
            proxy_config(free_port(), tmp_path / "work"), tmp_path / "proxy", codex_env
        ) as proxy:
            await proxy.wait_for_log(r"codex app-server ready")
            [pid] = proxy.app_server_pids()
            proxy.kill_leader_only()
            await proxy.wait_tree_gone(10)  # codex saw EOF on its stdin
            assert read_stat(pid) is None or not read_stat(pid).alive  # type: ignore[union-attr]
