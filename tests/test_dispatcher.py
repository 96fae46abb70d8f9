"""The delivery rules between manager and proxy, at the hub's real WebSocket.

The real hub, dispatcher and store; the proxy is `RawProxy`, the wire
protocol driven frame by frame, so each rule is checked on its own: what is
sent again after a reconnect, what is applied once, what a proxy may not touch.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from codexnet.config import ProxyEntry
from codexnet.db import Database, StateError
from codexnet.manager.approvals import Approvals
from codexnet.manager.replies import Replies
from codexnet.manager.store import ApprovalRecord, Outcome, TaskRecord
from codexnet.protocol import (
    CLOSE_FOREIGN,
    ApprovalDecision,
    ApprovalRequest,
    CancelAck,
    DecisionAck,
    FileFetch,
    FilePart,
    ResultAck,
    Task,
    TaskAck,
    TaskCancel,
    TaskEvent,
    TaskResult,
    Welcome,
)
from tests.fakes.hubrun import HubRunner, open_hub
from tests.fakes.rawproxy import RawProxy, raw_proxy
from tests.fakes.stack import USER
from tests.fakes.telegram_api import FakeTelegram

PROXIES = {"p1": ProxyEntry("token-of-p1-0123456789"), "p2": ProxyEntry("token-of-p2-0123456789")}
T1, T2 = PROXIES["p1"].token, PROXIES["p2"].token


@pytest.fixture
async def hub() -> AsyncIterator[HubRunner]:
    async with open_hub(PROXIES) as runner:
        yield runner


async def until(task: TaskRecord, predicate: object) -> None:
    with trio.fail_after(10):
        while not predicate():  # type: ignore[operator]
            await task.changed.wait()


async def acked_task(hub: HubRunner, proxy: RawProxy) -> TaskRecord:
    """A task sent to `proxy` and acknowledged by it, the ack's own (non-essential)
    write committed: a test may then make the database refuse what comes next."""
    task = await hub.start_task("p1", "hello")
    await proxy.expect(Task)
    await proxy.send(TaskAck(task.task_id))
    await until(task, lambda: task.state == "acked")
    await hub.store.db.write(lambda c: None)  # writes commit in order: the ack's is before
    return task


def stored_task(hub: HubRunner, task_id: str) -> tuple[str, str | None]:
    rows = hub.store.db.read(
        lambda c: c.execute(
            "SELECT state, outcome FROM tasks WHERE task_id = ?", (task_id,)
        ).fetchall()
    )
    return rows[0][0], rows[0][1]


async def test_a_task_lost_with_the_link_is_sent_again_until_acknowledged(hub: HubRunner) -> None:
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        task = await hub.start_task("p1", "hello")
        first = await proxy.expect(Task)
        assert first.task_id == task.task_id
    # The link died before our task_ack: the task is not delivered, and not failed.
    state: str = task.state
    assert state == "sent"
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        again = await proxy.expect(Task)
        assert again == first  # the same id: a proxy that got it drops the repeat
        await proxy.send(TaskAck(task.task_id))
        await until(task, lambda: task.state == "acked")
    async with raw_proxy(hub.port, "p1", T1, running=[task.task_id]) as proxy:
        assert [f for f in await proxy.nothing_for(0.5) if isinstance(f, Task)] == []
        await proxy.send(TaskResult(task.task_id, "completed", text="hi", thread_id="th"))
        await proxy.expect(ResultAck)
    assert task.outcome is not None
    assert task.outcome.text == "hi"


async def test_the_result_is_stored_before_result_ack(hub: HubRunner) -> None:
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        task = await hub.start_task("p1", "hello")
        await proxy.expect(Task)
        await proxy.send(TaskAck(task.task_id))
        await proxy.send(TaskResult(task.task_id, "completed", text="kept"))
        await proxy.expect(ResultAck)
        # By the time the proxy may forget it, the answer is in the database.
        state, outcome = stored_task(hub, task.task_id)
        assert state == "finished"
        assert outcome is not None
        assert '"kept"' in outcome
        # A repeat (the ack was lost) is acknowledged again and changes nothing.
        await proxy.send(TaskResult(task.task_id, "failed", error="stale"))
        await proxy.expect(ResultAck)
    assert task.outcome is not None
    assert task.outcome.text == "kept"


def fill_database(db: Database, *, full: bool) -> None:
    """Full: a write that needs one more page fails as on a full disk (SQLite's own
    SQLITE_FULL, "database or disk is full"); not full: room again."""

    def limit(conn: sqlite3.Connection) -> None:
        pages = conn.execute("PRAGMA page_count").fetchone()[0] if full else 1_073_741_823
        conn.execute(f"PRAGMA max_page_count = {int(pages)}").fetchone()

    db.read(limit)


async def test_a_result_that_cannot_be_stored_is_not_acknowledged_and_is_stored_when_sent_again(
    hub: HubRunner, caplog: pytest.LogCaptureFixture
) -> None:
    answer = "long answer " * 6_000  # needs pages the full database has no room for
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        task = await acked_task(hub, proxy)
        fill_database(hub.store.db, full=True)
        await proxy.send(TaskResult(task.task_id, "completed", text=answer, thread_id="th1"))
        await proxy.closed()  # dropped, never acknowledged: the proxy keeps the result
    assert not [f for f in proxy.received if isinstance(f, ResultAck)]
    # Nothing shows or counts an answer the database does not have.
    assert (task.state, task.outcome) == ("acked", None)
    assert hub.store.running == {"p1": 1}
    assert hub.store.conversation(task.conversation).threads == {}
    assert stored_task(hub, task.task_id) == ("acked", None)
    assert any(
        "the disk is full; dropping proxy 'p1' so it sends the result again" in r.getMessage()
        for r in caplog.records
    )
    fill_database(hub.store.db, full=False)
    async with raw_proxy(hub.port, "p1", T1, finished=[task.task_id]) as proxy:
        await proxy.send(TaskResult(task.task_id, "completed", text=answer, thread_id="th1"))
        await proxy.expect(ResultAck)
        state, outcome = stored_task(hub, task.task_id)
        assert state == "finished"
        assert outcome is not None
        assert answer in json.loads(outcome)["text"]
    assert task.outcome is not None
    assert task.outcome.text == answer
    assert hub.store.running == {}
    assert hub.store.conversation(task.conversation).threads == {"p1": "th1"}


async def test_a_result_sent_twice_at_once_is_stored_once_and_acknowledged_twice(
    hub: HubRunner,
) -> None:
    ended: list[str] = []
    hub.dispatcher.on_finished = lambda task: ended.append(task.task_id)
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        task = await hub.start_task("p1", "hello")
        await proxy.expect(Task)
        await proxy.send(TaskAck(task.task_id))
        result = TaskResult(task.task_id, "completed", text="once", thread_id="th1")
        await proxy.send(result)
        await proxy.send(result)  # the second waits while the first is committed
        for _ in range(2):
            await proxy.expect(ResultAck)
            assert stored_task(hub, task.task_id)[0] == "finished"
    assert ended == [task.task_id]


def refuse_task_updates(db: Database, *, refuse: bool) -> None:
    """While refused, SQLite itself fails every UPDATE of a task ("not authorized")."""

    def authorize(action: int, table: str | None, *rest: object) -> int:
        denied = action == sqlite3.SQLITE_UPDATE and table == "tasks"
        return sqlite3.SQLITE_DENY if denied else sqlite3.SQLITE_OK

    db.read(lambda c: c.set_authorizer(authorize if refuse else None))


async def test_a_dispatch_that_cannot_be_stored_leaves_the_task_queued_and_unsent(
    hub: HubRunner,
) -> None:
    task = hub.store.new_task(0, 0, "hello", task_id="t-unstored", timeout_s=120)
    await hub.store.add_task(task)
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        refuse_task_updates(hub.store.db, refuse=True)
        with pytest.raises(StateError, match="not authorized"):
            await hub.dispatcher.dispatch(task, "p1", None)
        assert (task.state, task.proxy_id) == ("queued", None)
        assert hub.store.running == {}
        assert not [f for f in await proxy.nothing_for(0.3) if isinstance(f, Task)]
    refuse_task_updates(hub.store.db, refuse=False)
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        # Not journalled as sent, so not sent again after a reconnect either.
        assert not [f for f in await proxy.nothing_for(0.3) if isinstance(f, Task)]
        await hub.dispatcher.dispatch(task, "p1", None)  # the lane's retry
        assert (await proxy.expect(Task)).task_id == "t-unstored"
    assert hub.store.running == {"p1": 1}


async def test_a_result_arriving_while_another_end_is_committed_is_not_acknowledged_before_it(
    hub: HubRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager ends a task (its timeout, say) while its result comes in: the
    result waits for that commit, which may fail and undo the end."""
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        task = await acked_task(hub, proxy)
        # The timeout's commit is held until the result has arrived; then both are refused.
        held = trio.Event()
        write = hub.store.db.write

        async def held_write(*args: Any, **kwargs: Any) -> None:
            await held.wait()
            await write(*args, **kwargs)

        monkeypatch.setattr(hub.store.db, "write", held_write)
        refuse_task_updates(hub.store.db, refuse=True)
        async with trio.open_nursery() as nursery:

            async def time_out() -> None:
                with pytest.raises(StateError):
                    await hub.dispatcher.finish(task, Outcome("failed", line="⏱ timed out"))

            nursery.start_soon(time_out)
            await trio.testing.wait_all_tasks_blocked()
            await proxy.send(TaskResult(task.task_id, "completed", text="the answer"))
            await trio.testing.wait_all_tasks_blocked()
            held.set()
        await proxy.closed()  # the result could not be stored either: dropped, unacknowledged
    assert not [f for f in proxy.received if isinstance(f, ResultAck)]
    assert (task.state, task.outcome) == ("acked", None)
    refuse_task_updates(hub.store.db, refuse=False)
    async with raw_proxy(hub.port, "p1", T1, finished=[task.task_id]) as proxy:
        await proxy.send(TaskResult(task.task_id, "completed", text="the answer"))
        await proxy.expect(ResultAck)
    assert task.outcome is not None
    assert task.outcome.text == "the answer"


async def test_an_acked_task_the_proxy_no_longer_has_ends_with_one_clear_line(
    hub: HubRunner,
) -> None:
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        task = await hub.start_task("p1", "hello")
        await proxy.expect(Task)
        await proxy.send(TaskAck(task.task_id))
        await until(task, lambda: task.state == "acked")
    # It comes back with neither the task nor its result: its state was wiped.
    async with raw_proxy(hub.port, "p1", T1):
        await until(task, lambda: task.outcome is not None)
    assert task.outcome is not None
    assert task.outcome.line == (
        "⚠️ proxy p1 no longer has this task (its state was lost or reset); please send it again"
    )


async def test_a_result_for_an_unknown_task_is_acknowledged_and_dropped(hub: HubRunner) -> None:
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        await proxy.send(TaskResult("never-ours", "completed", text="?"))
        assert (await proxy.expect(ResultAck)).task_id == "never-ours"
    assert hub.store.tasks == {}


async def test_a_file_fetch_for_a_task_gone_here_gets_an_error_not_silence(
    hub: HubRunner,
) -> None:
    # Otherwise a proxy holding a task the manager withdrew would ask for its file forever.
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        await proxy.send(FileFetch("gone-task", 0, 0, 1024))
        part = await proxy.expect(FilePart)
    assert (part.task_id, part.index, part.data) == ("gone-task", 0, "")
    assert part.error == "the manager no longer has this task"


async def test_a_cancel_is_sent_again_until_acknowledged(hub: HubRunner) -> None:
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        task = await hub.start_task("p1", "long")
        await proxy.expect(Task)
        await proxy.send(TaskAck(task.task_id))
        await until(task, lambda: task.state == "acked")
        await hub.dispatcher.request_cancel(task)
        await proxy.expect(TaskCancel)  # lost with the link: no cancel_ack
    async with raw_proxy(hub.port, "p1", T1, running=[task.task_id]) as proxy:
        await proxy.expect(TaskCancel)
        await proxy.send(CancelAck(task.task_id))
        await until(task, lambda: task.cancel == "acked")
    async with raw_proxy(hub.port, "p1", T1, running=[task.task_id]) as proxy:
        assert [f for f in await proxy.nothing_for(0.5) if isinstance(f, TaskCancel)] == []


async def test_an_approval_is_asked_once_and_its_decision_sent_until_acknowledged(
    hub: HubRunner,
) -> None:
    asked: list[ApprovalRequest] = []

    async def on_approval(task: TaskRecord, request: ApprovalRequest) -> None:
        asked.append(request)

    hub.dispatcher.on_approval = on_approval
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        task = await hub.start_task("p1", "needs approval")
        await proxy.expect(Task)
        await proxy.send(TaskAck(task.task_id))
        request = ApprovalRequest(task.task_id, "a1", "command", "ls", "")
        await proxy.send(request)
        await proxy.send(request)  # sent again after a reconnect, say
        await proxy.nothing_for(0.3)
    assert len(asked) == 2  # the dispatcher forwards; Approvals deduplicates by key
    approval = ApprovalRecord(task.task_id, "a1", "k", 0, 0, "command", "ls", "", 0.0)
    approval.state, approval.decision = "closed", "accept"
    await hub.store.add_approval(approval)
    async with raw_proxy(hub.port, "p1", T1, running=[task.task_id]) as proxy:
        decision = await proxy.expect(ApprovalDecision)
        assert (decision.approval_id, decision.decision) == ("a1", "accept")
        await proxy.send(DecisionAck(task.task_id, "a1"))
        await until(task, lambda: approval.decision_acked)
    async with raw_proxy(hub.port, "p1", T1, running=[task.task_id]) as proxy:
        assert [f for f in await proxy.nothing_for(0.5) if isinstance(f, ApprovalDecision)] == []


async def test_a_proxy_cannot_touch_another_proxys_task(
    hub: HubRunner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with raw_proxy(hub.port, "p1", T1) as owner, raw_proxy(hub.port, "p2", T2) as other:
        task = await hub.start_task("p1", "mine")
        await owner.expect(Task)
        await owner.send(TaskAck(task.task_id))
        await until(task, lambda: task.state == "acked")
        for frame in (
            TaskEvent(task.task_id, 1, "snapshot", "spoofed text"),
            ApprovalRequest(task.task_id, "evil", "command", "rm -rf /", ""),
            TaskResult(task.task_id, "completed", text="spoofed", thread_id="evil-thread"),
        ):
            await other.send(frame)
        assert [f for f in await other.nothing_for(0.5) if isinstance(f, ResultAck)] == []
        assert task.text == ""
        assert task.outcome is None
        await owner.send(TaskResult(task.task_id, "completed", text="real", thread_id="th"))
        await owner.expect(ResultAck)
    assert task.outcome is not None
    assert task.outcome.text == "real"
    assert hub.store.conversation((0, 0)).threads == {"p1": "th"}
    warnings = [r for r in caplog.records if "belongs to 'p1'" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited: one line, not one per frame


async def test_a_proxy_that_keeps_speaking_for_others_is_disconnected(hub: HubRunner) -> None:
    async with raw_proxy(hub.port, "p1", T1) as owner, raw_proxy(hub.port, "p2", T2) as other:
        task = await hub.start_task("p1", "mine")
        await owner.expect(Task)
        for seq in range(1, 6):  # the fifth frame for a task that is not its own
            await other.send(TaskEvent(task.task_id, seq, "snapshot", "spoofed"))
        with trio.fail_after(5), pytest.raises(ConnectionClosed) as info:
            await other.expect(Welcome)  # nothing comes but the close
        assert info.value.reason is not None
        assert info.value.reason.code == CLOSE_FOREIGN
        assert info.value.reason.reason == "frames for tasks of another proxy"
        assert "p1" in hub.hub.online  # the owner is untouched
        assert task.text == ""


async def test_events_are_applied_once_in_order(hub: HubRunner) -> None:
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        task = await hub.start_task("p1", "stream")
        await proxy.expect(Task)
        await proxy.send(TaskAck(task.task_id))
        for event in (
            TaskEvent(task.task_id, 1, "delta", "Hel"),
            TaskEvent(task.task_id, 2, "delta", "lo"),
            TaskEvent(task.task_id, 2, "delta", "lo"),  # a duplicate
            TaskEvent(task.task_id, 1, "delta", "Hel"),  # a stale one
            TaskEvent(task.task_id, 3, "progress", "running `ls`"),
        ):
            await proxy.send(event)
        await until(task, lambda: task.step == "running `ls`")
        assert task.text == "Hello"
        # After a reconnect the proxy sends the whole text again as a snapshot.
    async with raw_proxy(hub.port, "p1", T1, running=[task.task_id]) as proxy:
        await proxy.send(TaskEvent(task.task_id, 4, "snapshot", "Hello, world"))
        await until(task, lambda: task.text == "Hello, world")


async def test_a_flood_of_approval_requests_asks_only_the_first_few(
    hub: HubRunner,
    fake: FakeTelegram,
    replies: Replies,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    approvals = Approvals(
        replies, hub.store, hub.dispatcher.send_decision, timeout_s=600, is_online=lambda p: True
    )
    approvals.nursery = nursery
    hub.dispatcher.on_approval = approvals.on_request
    assert hub.dispatcher.max_open_approvals == 3  # the default of max_open_approvals_per_task
    async with raw_proxy(hub.port, "p1", T1) as proxy:
        task = await hub.start_task("p1", "flood", chat_id=USER)
        await proxy.expect(Task)
        await proxy.send(TaskAck(task.task_id))
        for n in range(10):
            await proxy.send(ApprovalRequest(task.task_id, f"a{n}", "command", f"cmd {n}", ""))
        with trio.fail_after(10):
            declined = [await proxy.expect(ApprovalDecision) for _ in range(7)]
        assert [(d.approval_id, d.decision) for d in declined] == [
            (f"a{n}", "decline") for n in range(3, 10)
        ]
        with trio.fail_after(10):
            await fake.wait_until(lambda: fake.count_messages(USER) == 3)
        assert fake.texts(USER) == [f"🔐 Codex wants to run:\n\ncmd {n}" for n in range(3)]
        # One answered: the next new request is asked again.
        first = hub.store.approval(task.task_id, "a0")
        assert first is not None
        # (In the background: closing the question edits its message, at the chat's pace.)
        nursery.start_soon(approvals.decide, first, "accept", "✅ Approved by @owner.")
        accepted = await proxy.expect(ApprovalDecision)
        assert (accepted.approval_id, accepted.decision) == ("a0", "accept")
        await proxy.send(ApprovalRequest(task.task_id, "a10", "command", "cmd 10", ""))
        await proxy.send(ApprovalRequest(task.task_id, "a11", "command", "cmd 11", ""))
        assert (await proxy.expect(ApprovalDecision)).approval_id == "a11"
        asked = [a.approval_id for a in hub.store.approvals_of(task.task_id) if a.state == "open"]
        assert sorted(asked) == ["a1", "a10", "a2"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "codexnet.manager.dispatcher"]
    assert warnings == [
        f"task {task.task_id}: proxy 'p1' asks for more than 3 approvals at once "
        "(max_open_approvals_per_task); declining the extra ones"
    ]
