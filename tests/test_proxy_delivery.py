"""The proxy's half of the delivery rules, against a manager reduced to its protocol.

A real `ProxyService` with its real store (SQLite in a temp dir) drives the
scripted app-server (`tests/fakes/fake_appserver.py`), which logs every turn
it starts: that log is "how often the model was asked".
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from pathlib import Path

import attrs
import pytest
import trio

from codexnet.protocol import (
    ApprovalDecision,
    ApprovalRequest,
    CancelAck,
    DecisionAck,
    Load,
    ResultAck,
    Task,
    TaskAck,
    TaskCancel,
    TaskEvent,
    TaskResult,
)
from codexnet.proxy.appserver import AppServer
from codexnet.proxy.service import ProxyService
from codexnet.proxy.store import RESTARTED_ERROR
from tests.fakes.rawmanager import FakeManager
from tests.test_appserver import fake_codex, proxy_config


@pytest.fixture
async def manager(nursery: trio.Nursery) -> FakeManager:
    manager = FakeManager()
    await nursery.start(manager.serve)
    return manager


class Proxy:
    """Start and stop a proxy on one state directory, like a machine restarting it."""

    def __init__(self, tmp_path: Path, manager: FakeManager, **changes: object) -> None:
        self.turns = tmp_path / "turns.log"
        base = proxy_config(tmp_path, fake_codex(tmp_path))
        self.config = attrs.evolve(
            base,
            manager_ws=f"ws://127.0.0.1:{manager.port}",
            **changes,  # type: ignore[arg-type]
        )
        self.env = {**os.environ, "FAKE_APPSERVER_TURNS": str(self.turns)}

    def asked(self) -> list[str]:
        return self.turns.read_text().splitlines() if self.turns.exists() else []

    def service(self) -> ProxyService:
        return ProxyService(self.config, AppServer(self.config, env=self.env))


@pytest.fixture
def proxy(tmp_path: Path, manager: FakeManager) -> Proxy:
    return Proxy(tmp_path, manager)


@attrs.define
class Running:
    scope: trio.CancelScope
    done: trio.Event

    async def stop(self) -> None:
        """Stop the proxy and wait until it has let go of its state (its lock)."""
        self.scope.cancel()
        with trio.fail_after(20):
            await self.done.wait()


async def run(service: ProxyService, nursery: trio.Nursery) -> Running:
    running = Running(trio.CancelScope(), trio.Event())

    async def go() -> None:
        try:
            with running.scope:
                await service.run()
        finally:
            running.done.set()

    nursery.start_soon(go)
    return running


async def test_a_repeated_task_is_acknowledged_and_run_once(
    proxy: Proxy, manager: FakeManager, nursery: trio.Nursery
) -> None:
    await run(proxy.service(), nursery)
    link = await manager.accept()
    task = Task("t1", 1, "hello")
    await link.send(task)
    await link.send(task)  # our ack was lost, say: the manager sends it again
    with trio.fail_after(20):
        await link.expect(TaskAck)
        await link.expect(TaskAck)
        result = await link.expect(TaskResult)
    assert result.text == "Echo: hello"
    await link.send(ResultAck("t1"))
    await link.send(task)  # even after its result was acknowledged
    with trio.fail_after(20):
        await link.expect(TaskAck)
    assert proxy.asked() == ["hello"]


async def test_the_turn_starts_before_the_fsync_and_the_ack_waits_for_it(
    proxy: Proxy, manager: FakeManager, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk slow to sync (another program flushing, say) does not hold the answer
    back: the stored task's turn runs meanwhile, and only its task_ack waits."""
    await run(proxy.service(), nursery)
    link = await manager.accept()
    disk_done = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:  # on the database's worker thread
        disk_done.wait(30)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    try:
        await link.send(Task("t1", 1, "hello"))
        with trio.fail_after(20):
            result = await link.expect(TaskResult)
        assert result.text == "Echo: hello"
        assert not any(isinstance(f, TaskAck) for f in link.received)
    finally:
        disk_done.set()
    with trio.fail_after(20):
        await link.expect(TaskAck)
    assert proxy.asked() == ["hello"]


async def test_a_failed_fsync_withholds_the_ack_until_the_task_comes_again(
    proxy: Proxy,
    manager: FakeManager,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The disk fails to sync: the task runs once and answers, but is not acknowledged
    (it is not power-safe); sent again after a reconnect, it is acknowledged then."""
    await run(proxy.service(), nursery)
    link = await manager.accept()
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    task = Task("t1", 1, "hello")
    await link.send(task)
    with trio.fail_after(20):
        result = await link.expect(TaskResult)
    assert result.text == "Echo: hello"
    assert not any(isinstance(f, TaskAck) for f in link.received)
    assert any(
        "proxy.db" in r.getMessage() and "task t1 is not acknowledged yet" in r.getMessage()
        for r in caplog.records
    )
    monkeypatch.setattr(os, "fsync", real_fsync)
    await link.drop()
    link = await manager.accept()
    await link.send(task)  # never acknowledged: the manager sends it again
    with trio.fail_after(20):
        await link.expect(TaskAck)
    assert proxy.asked() == ["hello"]


async def test_the_log_says_how_long_codex_took_for_each_task(
    proxy: Proxy, manager: FakeManager, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """Told apart from the relay's own time: what the turn took at codex."""
    caplog.set_level(logging.INFO, logger="codexnet.proxy.service")
    await run(proxy.service(), nursery)
    link = await manager.accept()
    await link.send(Task("t1", 1, "slow"))  # the scripted app-server takes 1.5 s
    with trio.fail_after(20):
        await link.expect(TaskResult)
        await link.expect(Load, lambda f: f.running == 0)  # sent after the line
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task t1: ")]
    match = re.fullmatch(r"task t1: completed \(codex's turn: (\d+\.\d\d) s\)", lines[-1])
    assert match is not None, lines
    assert 1.4 <= float(match[1]) < 5


async def test_the_load_counts_a_task_from_its_ack(
    proxy: Proxy, manager: FakeManager, nursery: trio.Nursery
) -> None:
    """The manager hears the new count right after the ack, also for a task that
    waits for a slot (capacity 2 here), before any turn has ended."""
    await run(proxy.service(), nursery)
    link = await manager.accept()
    for n in (1, 2, 3):
        await link.send(Task(f"t{n}", 1, "slow"))  # 1.5 s each
    with trio.fail_after(20):
        await link.expect(TaskAck, lambda f: f.task_id == "t3")
        await link.expect(Load, lambda f: f.running == 3)
        assert not any(isinstance(f, TaskResult) for f in link.received)
        results = [await link.expect(TaskResult) for _ in range(3)]
        await link.expect(Load, lambda f: f.running == 0)
    assert [r.text for r in results] == ["Echo: slow"] * 3
    assert sorted(proxy.asked()) == ["slow"] * 3


async def test_a_result_waits_for_result_ack_across_reconnects_and_a_restart(
    proxy: Proxy, manager: FakeManager, nursery: trio.Nursery
) -> None:
    first = await run(proxy.service(), nursery)
    link = await manager.accept()
    await link.send(Task("t1", 1, "hello"))
    with trio.fail_after(20):
        await link.expect(TaskResult)
    await link.drop()  # no result_ack
    link = await manager.accept()
    assert link.hello.finished == ["t1"]
    with trio.fail_after(20):
        assert (await link.expect(TaskResult)).text == "Echo: hello"
    await first.stop()  # the proxy restarts, still without our ack
    await run(proxy.service(), nursery)
    link = await manager.accept()
    assert link.hello.finished == ["t1"]
    with trio.fail_after(20):
        assert (await link.expect(TaskResult)).text == "Echo: hello"
    await link.send(ResultAck("t1"))
    await link.drop()
    link = await manager.accept()
    assert link.hello.finished == []
    assert proxy.asked() == ["hello"]


async def test_after_a_restart_a_started_task_is_reported_and_a_waiting_one_runs(
    tmp_path: Path, manager: FakeManager, nursery: trio.Nursery
) -> None:
    proxy = Proxy(tmp_path, manager, capacity=1)
    first = await run(proxy.service(), nursery)
    link = await manager.accept()
    await link.send(Task("running", 1, "hang"))
    await link.send(Task("waiting", 1, "second"))
    with trio.fail_after(20):
        await link.expect(TaskAck, lambda f: f.task_id == "waiting")
        await link.expect(TaskEvent, lambda f: f.task_id == "running")  # its turn is running
    await first.stop()  # the proxy dies with one task running and one queued behind it
    await run(proxy.service(), nursery)
    link = await manager.accept()
    assert sorted(link.hello.running + link.hello.finished) == ["running", "waiting"]
    with trio.fail_after(20):
        lost = await link.expect(TaskResult, lambda f: f.task_id == "running")
        ran = await link.expect(TaskResult, lambda f: f.task_id == "waiting")
    assert (lost.status, lost.error) == ("failed", RESTARTED_ERROR)
    assert ran.text == "Echo: second"
    assert proxy.asked() == ["hang", "second"]  # nothing was asked twice


async def test_a_cancel_is_acknowledged_and_a_queued_task_never_runs(
    tmp_path: Path, manager: FakeManager, nursery: trio.Nursery
) -> None:
    proxy = Proxy(tmp_path, manager, capacity=1)
    await run(proxy.service(), nursery)
    link = await manager.accept()
    await link.send(Task("busy", 1, "hang"))
    await link.send(Task("queued", 1, "never"))
    with trio.fail_after(20):
        await link.expect(TaskAck, lambda f: f.task_id == "queued")
        await link.expect(TaskEvent, lambda f: f.task_id == "busy")  # its turn is running
    await link.send(TaskCancel("queued"))
    await link.send(TaskCancel("queued"))  # re-sent: applied once
    await link.send(TaskCancel("unknown-id"))
    with trio.fail_after(20):
        acks = [await link.expect(CancelAck) for _ in range(3)]
        assert [a.task_id for a in acks] == ["queued", "queued", "unknown-id"]
        cancelled = await link.expect(TaskResult, lambda f: f.task_id == "queued")
    assert cancelled.status == "interrupted"
    await link.send(TaskCancel("busy"))
    with trio.fail_after(20):
        assert (await link.expect(TaskResult, lambda f: f.task_id == "busy")).status == (
            "interrupted"
        )
    assert proxy.asked() == ["hang"]


async def test_a_decision_is_acknowledged_and_applied_once(
    proxy: Proxy, manager: FakeManager, nursery: trio.Nursery
) -> None:
    await run(proxy.service(), nursery)
    link = await manager.accept()
    await link.send(Task("t1", 1, "approve"))
    with trio.fail_after(20):
        request = await link.expect(ApprovalRequest)
    await link.drop()  # the question is sent again on the next link, same id
    link = await manager.accept()
    with trio.fail_after(20):
        again = await link.expect(ApprovalRequest)
    assert again == request
    # A repeat (or a late second press) is ignored: the first decision wins.
    await link.send(ApprovalDecision("t1", request.approval_id, "accept"))
    await link.send(ApprovalDecision("t1", request.approval_id, "decline"))
    with trio.fail_after(20):
        await link.expect(DecisionAck)
        await link.expect(DecisionAck)
        result = await link.expect(TaskResult)
    assert result.text == "decision: accept"
