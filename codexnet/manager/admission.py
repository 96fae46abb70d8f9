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
    Load,
    Machine,
    Mode,
    decide,
    effective_mode,
)
from codexnet.manager.store import ConversationKey, ManagerStore, TaskRecord

log = logging.getLogger(__name__)

RECENT_S: Final = 600.0  # "fewest recent tasks" counts the last ten minutes
SNAPSHOT_S: Final = 1.0  # the fleet's state (without load) is refreshed this often


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
        self._recent_n: collections.Counter[str] = collections.Counter()
        self._snapshot: dict[str, Machine] | None = None
        self._snapshot_at = 0.0  # trio time of its last whole rebuild
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
        """Tasks the manager has given each machine and not seen finish (and those
        granted a slot a moment ago, until their dispatch is journalled)."""
        counts = collections.Counter(self._store.running)
        for task_id, proxy_id in list(self._granted.items()):
            granted = self._store.tasks.get(task_id)
            if granted is None or granted.state != "queued":
                del self._granted[task_id]  # dispatched (counted in the store) or gone
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

    def queued_for_pools(self) -> collections.Counter[str]:
        """Tasks waiting at the manager for any machine of a pool (by "label:a,b" or
        "any machine"): in no machine's count until one frees up."""
        counts: collections.Counter[str] = collections.Counter()
        for waiter in self._waiting.values():
            d = waiter.decision
            if waiter.done.is_set() or d is None or d.action != "wait" or d.proxy_id is not None:
                continue
            counts[self.chat_for(waiter.task).mode.target] += 1
        return counts

    def machines(self, *, fresh: bool = False) -> dict[str, Machine]:
        """Each machine without its load, not rebuilt on a decision's path: the
        machines the hub reports changed are rebuilt (one each), and all of them
        once the snapshot is `SNAPSHOT_S` old (late heartbeats and offline times
        move on their own) or with `fresh`."""
        now = trio.current_time()
        if fresh or self._snapshot is None or now - self._snapshot_at >= SNAPSHOT_S:
            self._hub.take_changed()
            self._snapshot, self._snapshot_at = self._build(), now
        elif changed := self._hub.take_changed():
            wall = time.time()
            for proxy_id in changed:
                if proxy_id in self._snapshot:
                    self._snapshot[proxy_id] = self._machine(proxy_id, wall)
        return self._snapshot

    def _build(self) -> dict[str, Machine]:
        wall = time.time()
        cutoff = wall - RECENT_S
        for proxy_id, recent in self._recent.items():
            while recent and recent[0] < cutoff:
                recent.popleft()
                self._recent_n[proxy_id] -= 1
        # In id order (`decide(..., ordered=True)`); a rebuilt one keeps its place.
        return {proxy_id: self._machine(proxy_id, wall) for proxy_id in self._hub.known()}

    def _machine(self, proxy_id: str, wall: float) -> Machine:
        conn = self._hub.online.get(proxy_id)
        since = self._hub.offline_since.get(proxy_id)
        return Machine(
            proxy_id,
            online=conn is not None,
            capacity=conn.capacity if conn is not None else self._capacity_seen(proxy_id),
            labels=frozenset(self._hub.labels(proxy_id)),
            unhealthy=self._hub.unhealthy(proxy_id),
            offline_for=0.0 if conn is not None or since is None else wall - since,
        )

    def load(self) -> Load:
        return Load(self.running(), self.queued(), self._recent_n)

    def fleet(self) -> dict[str, Machine]:
        """Every machine with its load (for /status and the commands)."""
        load = self.load()
        return {
            p: attrs.evolve(
                m,
                running=load.running.get(p, 0),
                queued=load.queued.get(p, 0),
                recent=self._recent_n.get(p, 0),
            )
            for p, m in self.machines().items()
        }

    def _capacity_seen(self, proxy_id: str) -> int:
        seen = self._hub.last_seen(proxy_id)
        return seen.capacity if seen is not None else 1

    # ------------------------------------------------------------------ deciding

    def decide_now(self, task: TaskRecord) -> Decision:
        """For a prompt that just arrived: behind everything already waiting."""
        return decide(
            self.machines(),
            self.chat_for(task),
            wait_s=self._config.proxy_wait_s,
            load=self.load(),
            ordered=True,
        )

    def granted(self, task: TaskRecord, proxy_id: str) -> None:
        """The task goes to `proxy_id` now (counted until its dispatch is journalled)."""
        self._granted[task.task_id] = proxy_id
        self._recent.setdefault(proxy_id, collections.deque()).append(time.time())
        self._recent_n[proxy_id] += 1

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
                    self.pump(fresh=True)  # time alone may have changed it (a failover is due)
            assert waiter.decision is not None
            return waiter.decision
        finally:
            del self._waiting[task.task_id]
            if not waiter.done.is_set() and self._waiting:
                self.pump()  # it left the line (cancelled, gave up): the others move up

    def pump(self, *, fresh: bool = False) -> None:
        """Decide every waiting task again, oldest first (synchronous: no one
        sees the queue half-done).

        Tasks of the same mode wait for the same thing: once one of them must
        wait, the next ones do too until a slot is taken, so each distinct
        situation is decided once per pass.
        """
        machines = self.machines(fresh=fresh)
        running = self.running()
        queued: collections.Counter[str] = collections.Counter()
        load = Load(running, queued, self._recent_n)
        places: collections.Counter[str] = collections.Counter()
        wait_s = self._config.proxy_wait_s
        waits: dict[Chat, Decision] = {}
        for waiter in sorted(self._waiting.values(), key=lambda w: w.task.seq):
            if waiter.done.is_set():
                continue
            chat = self.chat_for(waiter.task)
            decision = waits.get(chat)
            if decision is None:
                decision = decide(machines, chat, wait_s=wait_s, load=load, ordered=True)
            waiter.decision = decision
            if decision.action == "run":
                assert decision.proxy_id is not None
                running[decision.proxy_id] += 1  # the younger ones see it taken
                self.granted(waiter.task, decision.proxy_id)  # and so does the next pump
                waiter.done.set()
                waits.clear()
            elif decision.action == "refuse":
                waiter.done.set()
            else:
                if decision.proxy_id is not None:
                    queued[decision.proxy_id] += 1
                    waits.clear()  # a machine's queue grew: its load changed
                else:
                    waits[chat] = decision
                key = decision.proxy_id or chat.mode.target
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
        """Decide again whenever a proxy comes, goes, or changes health or load, and
        every `SNAPSHOT_S` meanwhile (a failover may be due by time alone). With
        nothing waiting there is nothing to decide: the snapshot is brought up to
        date when the next decision asks for it."""
        while True:
            with trio.move_on_after(SNAPSHOT_S):
                await self._hub.wait_change()
            if self._waiting:
                self.pump()


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
