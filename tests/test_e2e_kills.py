"""Crashes at any moment: the manager, the proxy and the app-server as real processes.

SIGKILL (no clean-up at all, like an OOM kill or a power cut of the process),
SIGTERM, and Telegram failing or unreachable, against the fake Bot API and
fake model in this process. Each test asserts what the chat shows — exactly
one complete answer, or one clear line — and how often the model was asked.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.fakes.processes import ManagerProcess, ProxyProcess, manager_config, proxy_config
from tests.fakes.relay import TcpRelay
from tests.fakes.stack import USER, Stack, free_port, open_stack
from tests.test_e2e_telegram import journal, texts, wait_journal

pytestmark = pytest.mark.e2e

TICKS = " ".join(f"tick {i}" for i in range(1, 7))


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path) as stack:
        yield stack


class Fleet:
    """One manager and one proxy as processes, on a fixed port so restarts find each other."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.port = free_port()
        self.restarts = 0

    def manager(self, **changes: Any) -> ManagerProcess:
        self.restarts += 1
        config = manager_config(
            self.stack.state_dir, self.stack.telegram.base_url, self.port, **changes
        )
        return ManagerProcess(config, self.stack.tmp / f"manager-{self.restarts}")

    def proxy(self, port: int | None = None, **changes: Any) -> ProxyProcess:
        self.restarts += 1
        config = proxy_config(
            self.port if port is None else port,
            self.stack.tmp / "work",
            state_dir=str(self.stack.tmp / "proxy-state"),
            **changes,
        )
        return ProxyProcess(config, self.stack.tmp / f"proxy-{self.restarts}", self.stack.codex_env)


async def online(manager: ManagerProcess) -> None:
    await manager.wait_for_log(r"proxy 'proxy1' online", timeout=60)


async def wait_text(stack: Stack, predicate: Any, seconds: float = 60) -> None:
    with trio.fail_after(seconds):
        await stack.telegram.wait_until(lambda: any(predicate(t) for t in texts(stack)))


def drafted(stack: Stack, fragment: str) -> bool:
    return any(fragment in t for ts in stack.telegram.drafts(USER).values() for t in ts)


async def test_manager_killed_before_dispatch(stack: Stack) -> None:
    fleet = Fleet(stack)
    async with fleet.manager() as manager:
        await manager.wait_for_log(r"Telegram bot @\w+ ready")
        stack.telegram.push_message(USER, "while nobody is home")
        await wait_journal(stack, ["queued"], 20)
        manager.kill()
    async with fleet.manager() as manager, fleet.proxy():
        await wait_text(stack, lambda t: t == "Echo: while nobody is home (turn 1)")
    assert texts(stack) == ["Echo: while nobody is home (turn 1)"]
    assert len(stack.model.requests) == 1


async def test_manager_killed_mid_turn(stack: Stack) -> None:
    fleet = Fleet(stack)
    async with fleet.proxy():
        async with fleet.manager() as manager:
            await online(manager)
            stack.telegram.push_message(USER, "[[slow:6]]")
            with trio.fail_after(60):
                await stack.telegram.wait_until(lambda: drafted(stack, "tick 1"))
            manager.kill()
        async with fleet.manager():
            await wait_text(stack, lambda t: t == TICKS)
    assert texts(stack) == [TICKS]
    assert len(stack.model.requests) == 1


async def test_manager_killed_after_the_result_arrived_while_telegram_fails(
    stack: Stack,
) -> None:
    fleet = Fleet(stack)
    async with fleet.proxy():
        async with fleet.manager() as manager:
            await online(manager)
            stack.telegram.push_message(USER, "[[slow:3]]")
            await wait_journal(stack, ["acked"], 60)
            stack.telegram.fail_all(502)  # the answer cannot be delivered
            await wait_journal(stack, ["finished"], 60)
            manager.kill()
        stack.telegram.stop_failing()
        async with fleet.manager():
            await wait_text(stack, lambda t: t == "tick 1 tick 2 tick 3")
    assert texts(stack) == ["tick 1 tick 2 tick 3"]
    assert len(stack.model.requests) == 1


async def test_manager_killed_while_the_answer_is_on_its_way_to_telegram(stack: Stack) -> None:
    fleet = Fleet(stack)
    async with fleet.proxy():
        async with fleet.manager() as manager:
            await online(manager)
            stack.telegram.delay_next("sendMessage", 3)  # in flight when the manager dies
            stack.telegram.push_message(USER, "in flight")
            await wait_journal(stack, ["finished"], 60)
            await trio.sleep(0.5)  # the answer's sendMessage is being held by Telegram
            manager.kill()
        # Telegram still posts the message it was processing when the manager died.
        with trio.fail_after(10):
            await stack.telegram.wait_until(lambda: "Echo: in flight (turn 1)" in texts(stack))
        async with fleet.manager():
            await wait_journal(stack, ["done"], 60)
    # After the restart it looked for the part before sending it again: one answer.
    assert texts(stack) == ["Echo: in flight (turn 1)"]
    assert len(stack.model.requests) == 1


async def test_manager_sigterm_mid_turn(stack: Stack) -> None:
    fleet = Fleet(stack)
    async with fleet.proxy():
        async with fleet.manager() as manager:
            await online(manager)
            stack.telegram.push_message(USER, "[[slow:6]]")
            with trio.fail_after(60):
                await stack.telegram.wait_until(lambda: drafted(stack, "tick 1"))
            assert await manager.terminate() == 0
        async with fleet.manager():
            await wait_text(stack, lambda t: t == TICKS)
    assert texts(stack) == [TICKS]
    assert len(stack.model.requests) == 1


async def test_proxy_killed_mid_turn_is_one_clear_line(stack: Stack) -> None:
    fleet = Fleet(stack)
    async with fleet.manager() as manager:
        async with fleet.proxy() as proxy:
            await online(manager)
            stack.telegram.push_message(USER, "[[slow:60]]")
            with trio.fail_after(60):
                await stack.telegram.wait_until(lambda: drafted(stack, "tick 1"))
            proxy.kill()
        async with fleet.proxy():
            await wait_text(stack, lambda t: "restarted" in t)
    assert texts(stack) == [
        "⚠️ Codex failed: the proxy restarted while this turn was running, so the turn was "
        "stopped; send the message again to retry"
    ]
    assert len(stack.model.requests) == 1


async def test_proxy_killed_with_its_result_not_yet_acknowledged(stack: Stack) -> None:
    fleet = Fleet(stack)
    async with trio.open_nursery() as nursery, fleet.manager() as manager:
        await manager.wait_for_log(r"waiting for proxies")
        relay = TcpRelay("127.0.0.1", fleet.port)
        relay_port = await nursery.start(relay.serve)
        trap = relay.blackhole_on("up", "task_result")  # the result never reaches the manager
        async with fleet.proxy(port=relay_port) as proxy:
            await online(manager)
            stack.telegram.push_message(USER, "stored first")
            with trio.fail_after(60):
                await trap.wait()
            proxy.kill()  # …and then the proxy dies: only its proxy.db has the answer
        relay.restore()
        async with fleet.proxy(port=relay_port):
            await wait_text(stack, lambda t: t == "Echo: stored first (turn 1)")
        nursery.cancel_scope.cancel()
    assert texts(stack) == ["Echo: stored first (turn 1)"]
    assert len(stack.model.requests) == 1


async def test_app_server_killed_mid_turn(stack: Stack) -> None:
    fleet = Fleet(stack)
    async with fleet.manager() as manager, fleet.proxy() as proxy:
        await online(manager)
        stack.telegram.push_message(USER, "[[slow:60]]")
        with trio.fail_after(60):
            await stack.telegram.wait_until(lambda: drafted(stack, "tick 1"))
        [pid] = proxy.app_server_pids()
        os.kill(pid, signal.SIGKILL)
        await wait_text(
            stack, lambda t: t.startswith("⚠️ Codex failed: the Codex app-server crashed")
        )
        await proxy.wait_for_log(r"codex app-server ready", since=1, timeout=60)
    [line] = texts(stack)
    assert line.startswith("⚠️ Codex failed: the Codex app-server crashed\n\ntick 1")
    assert len(stack.model.requests) == 1


async def test_telegram_unreachable_mid_turn_then_back(stack: Stack) -> None:
    fleet = Fleet(stack)
    async with fleet.manager() as manager, fleet.proxy():
        await online(manager)
        stack.telegram.push_message(USER, "[[slow:6]]")
        with trio.fail_after(60):
            await stack.telegram.wait_until(lambda: drafted(stack, "tick 1"))
        await stack.telegram.go_down()  # connection refused, for longer than the turn
        await trio.sleep(10)  # the turn ends meanwhile: its answer waits in the store
        assert journal(stack) == ["finished"]
        await stack.telegram.come_up()
        await wait_text(stack, lambda t: t == TICKS, 90)
    assert texts(stack) == [TICKS]
    assert len(stack.model.requests) == 1


async def test_a_lost_answer_to_a_send_is_not_posted_twice(stack: Stack) -> None:
    fleet = Fleet(stack)
    async with fleet.manager() as manager, fleet.proxy():
        await online(manager)
        stack.telegram.drop_after_next("sendMessage")  # posted, then the connection dies
        stack.telegram.push_message(USER, "exactly once")
        await wait_text(stack, lambda t: t == "Echo: exactly once (turn 1)")
        await wait_journal(stack, ["done"], 30)
    assert texts(stack) == ["Echo: exactly once (turn 1)"]
    assert len(stack.model.requests) == 1
