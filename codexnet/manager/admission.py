"""The manager-side capacity queue: when a queued prompt may go, and where.

Every prompt that is ready to be dispatched asks `Admission.admit`. The fleet's
state — who is online and healthy, each machine's labels, how many tasks the
manager has dispatched to it and not seen finish — goes to the scheduler
(`scheduler.decide`, a pure function); a prompt that must wait (its machine is
full or offline, or every machine of its pool is) joins the queue.

The queue is the task journal itself: a waiting prompt is a `queued` task in
the store, so it survives a restart, and its place is its arrival order
(`seq`). Whenever capacity may have changed — a task finished, a proxy came or
went, its health or load changed — the waiting tasks are decided again, oldest
first, each seeing the slots the older ones just took: a machine never runs
more than its capacity, and in a pool the oldest waiting task takes whichever
machine frees up first (unless its conversation lives on one machine).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Final

import attrs
import trio

from codexnet.config import ManagerConfig
from codexnet.manager.hub import Hub
from codexnet.manager.scheduler import (
    Chat,
    Decision,
    Machine,
    Mode,
    decide,
    effective_mode,
)
from codexnet.manager.store import ConversationKey, ManagerStore, TaskRecord

log = logging.getLogger(__name__)

RECENT_S: Final = 600.0  # "fewest recent tasks" counts the last ten minutes


@attrs.define(eq=False)
class _Waiter:
    task: TaskRecord
    decision: Decision | None = None  # the last one (wait: why, and for what)
    place: int = 0  # 1-based, among the waiters for the same machine or pool
    done: trio.Event = attrs.Factory(trio.Event)  # decided: run or refuse


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class Admission:
    def __init__(self, config: ManagerConfig, store: ManagerStore, hub: Hub) -> None:
        self._config = config
        self._store = store
        self._hub = hub
        self._waiting: dict[str, _Waiter] = {}  # by task id, in arrival order (seq)
        self._granted: dict[str, str] = {}  # task id → machine, until it is dispatched
        self._recent: dict[str, collections.deque[float]] = {}
        self.changed = trio.Event()  # replaced after each pump: waiting tasks' places moved

    # ------------------------------------------------------------------ the fleet

    def chat_for(self, task: TaskRecord) -> Chat:
        """The task's conversation as the scheduler sees it."""
        if task.target is not None:  # an /all task: that machine, a new thread
            return Chat(Mode("pinned", proxy_id=task.target), fresh=True)
        return self.chat_of(task.conversation)

    def chat_of(self, key: ConversationKey) -> Chat:
        conv = self._store.conversation(key)
        mode = effective_mode(conv.mode, self._config.default_proxy, self._hub.known())
        current = conv.proxy
        if mode.kind in ("pool", "auto") and (conv.reset or current not in conv.threads):
            current = None  # nothing lives anywhere yet: a new conversation
        return Chat(mode, current)

    def running(self) -> collections.Counter[str]:
        """Tasks the manager has given each machine and not seen finish."""
        counts: collections.Counter[str] = collections.Counter()
        for task in self._store.tasks.values():
            if task.state in ("sent", "acked") and task.proxy_id is not None:
                counts[task.proxy_id] += 1
        for task_id, proxy_id in list(self._granted.items()):
            granted = self._store.tasks.get(task_id)
            if granted is None or granted.state != "queued":
                del self._granted[task_id]  # dispatched (counted above) or gone
            else:
                counts[proxy_id] += 1
        return counts

    def queued(self) -> collections.Counter[str]:
        """Tasks waiting at the manager for one machine (its slots, or its return)."""
        counts: collections.Counter[str] = collections.Counter()
        for waiter in self._waiting.values():
            d = waiter.decision
            if d is not None and d.action == "wait" and d.proxy_id is not None:
                counts[d.proxy_id] += 1
        return counts

    def fleet(
        self,
        running: collections.Counter[str] | None = None,
        queued: collections.Counter[str] | None = None,
    ) -> dict[str, Machine]:
        running = self.running() if running is None else running
        queued = self.queued() if queued is None else queued
        now = time.time()
        cutoff = now - RECENT_S
        fleet: dict[str, Machine] = {}
        for proxy_id in self._hub.known():
            conn = self._hub.online.get(proxy_id)
            recent = self._recent.get(proxy_id)
            while recent and recent[0] < cutoff:
                recent.popleft()
            since = self._hub.offline_since.get(proxy_id)
            fleet[proxy_id] = Machine(
                proxy_id,
                online=conn is not None,
                capacity=conn.capacity if conn is not None else self._capacity_seen(proxy_id),
                labels=frozenset(self._hub.labels(proxy_id)),
                running=running[proxy_id],
                queued=queued[proxy_id],
                recent=len(recent) if recent else 0,
                unhealthy=self._hub.unhealthy(proxy_id),
                offline_for=0.0 if conn is not None or since is None else now - since,
            )
        return fleet

    def _capacity_seen(self, proxy_id: str) -> int:
        seen = self._hub.last_seen(proxy_id)
        return seen.capacity if seen is not None else 1

    # ------------------------------------------------------------------ deciding

    def decide_now(self, task: TaskRecord) -> Decision:
        """For a prompt that just arrived: behind everything already waiting."""
        return decide(self.fleet(), self.chat_for(task), wait_s=self._config.proxy_wait_s)

    def granted(self, task: TaskRecord, proxy_id: str) -> None:
        """The task goes to `proxy_id` now (counted until its dispatch is journalled)."""
        self._granted[task.task_id] = proxy_id
        self._recent.setdefault(proxy_id, collections.deque()).append(time.time())

    async def admit(
        self,
        task: TaskRecord,
        *,
        deadline: float,
        on_wait: Callable[[str], None] = lambda step: None,
    ) -> Decision:
        """Wait for the task's turn; a `run` (with its machine) or a `refuse`.

        A wait for a machine (or pool) to come online ends at the trio
        `deadline` with a refusal naming it; a wait for a free slot does not
        end (the queue is the point). `on_wait(step)` is told the task's place
        whenever it changes ("queued: 2nd for proxy1"). A cancelled task
        returns its last decision at once (the caller ends it).
        """
        waiter = _Waiter(task)
        self._waiting[task.task_id] = waiter
        try:
            self.pump()
            shown = ""
            while not waiter.done.is_set():
                decision = waiter.decision
                assert decision is not None
                now = trio.current_time()
                if task.cancel:
                    return decision
                if decision.offline and now >= deadline:
                    return Decision("refuse", why=decision.why)
                step = self.describe_wait(waiter)
                if step != shown:
                    on_wait(step)
                    shown = step
                wake = deadline if decision.offline else float("inf")
                if decision.recheck_in is not None:
                    wake = min(wake, now + decision.recheck_in)
                changed, done, poked = self.changed, waiter.done, task.changed
                with trio.move_on_at(wake) as timer:
                    async with trio.open_nursery() as nursery:
                        for event in (changed, done, poked):
                            nursery.start_soon(_set_then_cancel, event, nursery.cancel_scope)
                if timer.cancelled_caught:
                    self.pump()  # time alone may have changed it (a failover is due)
            assert waiter.decision is not None
            return waiter.decision
        finally:
            del self._waiting[task.task_id]
            if not waiter.done.is_set() and self._waiting:
                self.pump()  # it left the line (cancelled, gave up): the others move up

    def pump(self) -> None:
        """Decide every waiting task again, oldest first (synchronous: no one
        sees the queue half-done)."""
        running = self.running()
        queued: collections.Counter[str] = collections.Counter()
        places: collections.Counter[str] = collections.Counter()
        wait_s = self._config.proxy_wait_s
        for waiter in sorted(self._waiting.values(), key=lambda w: w.task.seq):
            if waiter.done.is_set():
                continue
            decision = decide(
                self.fleet(running, queued), self.chat_for(waiter.task), wait_s=wait_s
            )
            waiter.decision = decision
            if decision.action == "run":
                assert decision.proxy_id is not None
                running[decision.proxy_id] += 1  # the younger ones see it taken
                self.granted(waiter.task, decision.proxy_id)  # and so does the next pump
                waiter.done.set()
            elif decision.action == "refuse":
                waiter.done.set()
            else:
                key = decision.proxy_id or self.chat_for(waiter.task).mode.target
                if decision.proxy_id is not None:
                    queued[decision.proxy_id] += 1
                places[key] += 1
                waiter.place = places[key]
        self.changed.set()
        self.changed = trio.Event()

    def describe_wait(self, waiter: _Waiter) -> str:
        decision = waiter.decision
        assert decision is not None
        if decision.offline:
            return decision.why
        what = decision.proxy_id or self.chat_for(waiter.task).mode.target
        return f"queued: {ordinal(waiter.place)} for {what}"

    def waiting_for(self, proxy_id: str) -> int:
        return self.queued()[proxy_id]

    def waiting_total(self) -> int:
        return sum(1 for w in self._waiting.values() if not w.done.is_set())

    async def watch(self) -> None:
        """Decide again whenever a proxy comes, goes, or changes health or load."""
        while True:
            await self._hub.wait_change()
            if self._waiting:
                self.pump()


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
