"""The manager-side capacity queue, in memory on virtual time: the real store, the
real hub registry (connections registered as a hello would), the real scheduler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from codexnet.config import ProxyEntry
from codexnet.manager.admission import Admission
from codexnet.manager.hub import Hub, ProxyConn
from codexnet.manager.scheduler import Decision, Machine
from codexnet.manager.service import open_store
from codexnet.manager.store import ManagerStore, Outcome, TaskRecord
from tests.fakes.stack import manager_config

PROXIES = {
    "p1": ProxyEntry("p1-secret-token-0123456789", ("linux",)),
    "p2": ProxyEntry("p2-secret-token-0123456789", ("linux",)),
    "p3": ProxyEntry("p3-secret-token-0123456789", ("windows",)),
}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ManagerStore]:
    async with open_store(tmp_path / "state", inline_writes=True) as store:
        yield store


def online(hub: Hub, proxy_id: str, capacity: int, **kw: Any) -> ProxyConn:
    conn = ProxyConn(proxy_id, None, capacity, PROXIES[proxy_id].labels, "test", **kw)  # type: ignore[arg-type]
    hub.online[proxy_id] = conn
    hub.offline_since.pop(proxy_id, None)
    return conn


def setup(store: ManagerStore, tmp_path: Path, **changes: Any) -> tuple[Hub, Admission]:
    config = attrs.evolve(
        manager_config("http://x", tmp_path), proxies=PROXIES, proxy_wait_s=20.0, **changes
    )
    hub = Hub(PROXIES, heartbeat_timeout_s=30.0)
    return hub, Admission(config, store, hub)


async def new_task(store: ManagerStore, n: int, mode: str | None = None) -> TaskRecord:
    task = store.new_task(100 + n, 0, f"prompt {n}", task_id=f"t{n}", timeout_s=60)
    store.conversation(task.conversation).mode = mode
    await store.add_task(task)
    return task


async def admit_all(
    admission: Admission,
    tasks: list[TaskRecord],
    results: dict[str, Decision],
    steps: dict[str, str],
) -> None:
    async def one(task: TaskRecord) -> None:
        def on_wait(step: str) -> None:
            steps[task.task_id] = step

        decision = await admission.admit(task, deadline=trio.current_time() + 20, on_wait=on_wait)
        results[task.task_id] = decision
        if decision.action == "run":
            assert decision.proxy_id is not None
            await store_dispatch(admission, task, decision.proxy_id)

    async with trio.open_nursery() as nursery:
        for task in tasks:
            nursery.start_soon(one, task)
            await trio.sleep(0.01)  # arrival order


async def store_dispatch(admission: Admission, task: TaskRecord, proxy_id: str) -> None:
    await admission._store.mark_dispatched(task, proxy_id, None)


async def test_a_machine_never_gets_more_than_its_capacity_and_the_queue_is_in_order(
    store: ManagerStore, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    hub, admission = setup(store, tmp_path)
    online(hub, "p1", capacity=1)
    tasks = [await new_task(store, n, "proxy:p1") for n in range(3)]
    results: dict[str, Decision] = {}
    steps: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admit_all, admission, tasks, results, steps)
        await trio.sleep(1)
        assert list(results) == ["t0"]
        assert steps == {"t1": "queued: 1st for p1", "t2": "queued: 2nd for p1"}
        assert admission.fleet()["p1"].queued == 2
        await store.mark_finished(tasks[0], Outcome("completed"))
        admission.pump()  # the dispatcher's on_finished
        await trio.sleep(1)
        assert list(results) == ["t0", "t1"]
        assert steps["t2"] == "queued: 1st for p1"
        await store.mark_finished(tasks[1], Outcome("completed"))
        admission.pump()
    assert [results[t.task_id].proxy_id for t in tasks] == ["p1", "p1", "p1"]


async def test_a_waiting_pool_task_takes_whichever_machine_frees_up_first(
    store: ManagerStore, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    hub, admission = setup(store, tmp_path)
    online(hub, "p1", capacity=1)
    online(hub, "p2", capacity=1)
    online(hub, "p3", capacity=5)  # idle, but not linux
    tasks = [await new_task(store, n, "label:linux") for n in range(3)]
    results: dict[str, Decision] = {}
    steps: dict[str, str] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admit_all, admission, tasks, results, steps)
        await trio.sleep(1)
        assert {t: d.proxy_id for t, d in results.items()} == {"t0": "p1", "t1": "p2"}
        assert steps == {"t2": "queued: 1st for label:linux"}
        # Waiting for the pool, not for one machine: /status counts it there.
        assert admission.queued_for_pools() == {"label:linux": 1}
        assert admission.queued() == {}
        await store.mark_finished(tasks[1], Outcome("completed"))  # p2 frees up first
        admission.pump()
    assert results["t2"].proxy_id == "p2"


async def test_a_machine_whose_app_server_restarts_is_not_chosen_and_status_says_why(
    store: ManagerStore, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    hub, admission = setup(store, tmp_path)
    online(
        hub, "p1", capacity=2, health="restarting", health_detail="app-server exited with code 1"
    )
    online(hub, "p2", capacity=2)
    task = await new_task(store, 1, "label:linux")
    assert admission.decide_now(task).proxy_id == "p2"
    assert admission.fleet()["p1"].unhealthy == (
        "app-server restarting: app-server exited with code 1"
    )


async def test_late_heartbeats_make_a_machine_unhealthy(
    store: ManagerStore, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    hub, admission = setup(store, tmp_path)
    conn = online(hub, "p1", capacity=2)
    other = online(hub, "p2", capacity=2)
    await trio.sleep(25)
    other.last_heard = trio.current_time() - 5  # a pong 5 s ago
    assert conn.last_heard == trio.current_time() - 25  # silent for 25 of 30 s
    assert admission.fleet()["p1"].unhealthy == "heartbeats late (silent for 25 s)"
    assert admission.fleet()["p2"].unhealthy is None


async def test_an_offline_wait_ends_at_the_deadline_with_its_line(
    store: ManagerStore, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    _hub, admission = setup(store, tmp_path)
    task = await new_task(store, 1, "proxy:p1")
    start = trio.current_time()
    decision = await admission.admit(task, deadline=start + 20)
    assert (decision.action, decision.why) == ("refuse", "⚠️ proxy p1 is offline")
    assert trio.current_time() - start == pytest.approx(20)


async def test_default_proxy_is_the_mode_of_chats_that_chose_nothing(
    store: ManagerStore, tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    hub, admission = setup(store, tmp_path, default_proxy="label:windows")
    for proxy_id in PROXIES:
        online(hub, proxy_id, capacity=1)
    unset = await new_task(store, 1)
    assert admission.decide_now(unset).proxy_id == "p3"
    chosen = await new_task(store, 2, "proxy:p1")
    assert admission.decide_now(chosen).proxy_id == "p1"


async def test_a_proxy_coming_online_rebuilds_its_machine_only(
    store: ManagerStore,
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # At 5 000 proxies, rebuilding every machine on each registration was O(n²):
    # 50 s of CPU for the fleet to come up.
    fleet = {f"m{i:04}": ProxyEntry(f"m{i:04}-secret-token-0123456789", ()) for i in range(2000)}
    config = attrs.evolve(manager_config("http://x", tmp_path), proxies=fleet, proxy_wait_s=20.0)
    hub = Hub(fleet, heartbeat_timeout_s=30.0)
    admission = Admission(config, store, hub)
    assert not admission.machines()["m0042"].online
    built: list[str] = []
    machine = admission._machine

    def counted(proxy_id: str, wall: float) -> Machine:
        built.append(proxy_id)
        return machine(proxy_id, wall)

    monkeypatch.setattr(admission, "_machine", counted)
    for proxy_id in ("m0042", "m1999"):
        hub.online[proxy_id] = ProxyConn(proxy_id, None, 3, (), "test")  # type: ignore[arg-type]
        hub._notify_online_changed(proxy_id)
    machines = admission.machines()
    assert machines["m0042"].online
    assert machines["m1999"].capacity == 3
    assert sorted(built) == ["m0042", "m1999"]
    assert list(machines) == sorted(fleet)  # still in id order for the scheduler
    await trio.sleep(1.5)  # late heartbeats and offline times move with time alone
    built.clear()
    admission.machines()
    assert len(built) == 2000
