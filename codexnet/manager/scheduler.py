"""Which machine a prompt runs on, or why it waits: one pure function.

`decide(fleet, chat, wait_s)` looks only at what it is given — the fleet's
state (online, health, labels, load) and the conversation's mode and current
machine — so every rule is tested in memory and a decision over 1 000
machines costs well under a millisecond.

The rules (docs/ARCHITECTURE.md, "Scheduling"):

* **pinned** (`/use proxy1`, or a `default_proxy` id): that machine, when it
  is online and has a free slot; otherwise the prompt waits for it.
* **pool** (`/use label:a,b`) and **auto** (`/use auto`): a conversation that
  lives on a machine of the pool (its Codex thread is there) stays there —
  waiting for a slot, or for the machine to come back — until that machine has
  been offline for `wait_s`; then it moves to another machine of the pool as a
  new conversation (`Decision.moved_from`). A new conversation goes to the
  least-loaded healthy online machine with all the labels: load is
  (running + queued at the manager) / capacity; ties go to the machine with
  the fewest recent tasks, then to the smallest id.
* **unset** (nothing chosen, no `default_proxy`): the machine the conversation
  lives on, else the only machine online; with several online the person is
  asked to pick one (guessing would start a conversation where they did not
  mean it).

A machine is *full* when running + queued ≥ capacity (its own counts plus
the `Load` given with the fleet): a task never makes a
machine run more than its capacity, and extra tasks wait at the manager.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Final, Literal

import attrs

MAX_MODE_CHARS: Final = 200
MAX_LABEL_CHARS: Final = 64

ModeKind = Literal["pinned", "pool", "auto", "unset"]
Action = Literal["run", "wait", "refuse"]


@attrs.frozen
class Machine:
    """One proxy as the scheduler sees it."""

    proxy_id: str
    online: bool
    capacity: int
    labels: frozenset[str] = frozenset()
    running: int = 0  # dispatched by the manager and not finished
    queued: int = 0  # waiting at the manager for this machine
    recent: int = 0  # tasks it got lately (ties between equally loaded machines)
    unhealthy: str | None = None  # why it is not chosen for new conversations
    offline_for: float = 0.0  # seconds it has been offline (0 while online)


@attrs.frozen
class Load:
    """Counts on top of each `Machine`'s own (the manager keeps them apart, so a
    decision over 1 000 machines does not copy 1 000 records)."""

    running: Mapping[str, int] = attrs.Factory(dict)
    queued: Mapping[str, int] = attrs.Factory(dict)
    recent: Mapping[str, int] = attrs.Factory(dict)

    def busy(self, m: Machine) -> int:
        return (
            m.running + m.queued + self.running.get(m.proxy_id, 0) + self.queued.get(m.proxy_id, 0)
        )

    def full(self, m: Machine) -> bool:
        return self.busy(m) >= max(1, m.capacity)

    def key(self, m: Machine) -> tuple[float, int, str]:
        """Least loaded first; ties: fewest recent tasks, then the smallest id."""
        recent = m.recent + self.recent.get(m.proxy_id, 0)
        return (self.busy(m) / max(1, m.capacity), recent, m.proxy_id)


NO_LOAD: Final = Load()


@attrs.frozen
class Mode:
    kind: ModeKind
    proxy_id: str | None = None  # pinned
    labels: frozenset[str] = frozenset()  # pool

    def describe(self) -> str:
        if self.kind == "pinned":
            return f"pinned to {self.proxy_id}"
        if self.kind == "pool":
            return f"pool label:{','.join(sorted(self.labels))}"
        if self.kind == "auto":
            return "auto (all machines)"
        return "no machine chosen"

    @property
    def target(self) -> str:
        """What a queued task waits for, as the chat is told ("queued: 2nd for …")."""
        if self.kind == "pinned":
            return str(self.proxy_id)
        if self.kind == "pool":
            return f"label:{','.join(sorted(self.labels))}"
        return "any machine"


@attrs.frozen
class Chat:
    """The conversation: its mode, and the machine its Codex thread lives on."""

    mode: Mode
    current: str | None = None  # None: a new conversation (or reset)
    fresh: bool = False  # a pinned task that must start a new thread (an /all task)


@attrs.frozen
class Decision:
    action: Action
    proxy_id: str | None = None  # run: where; wait: the one machine it waits for
    why: str = ""  # wait/refuse: for the person; run: how it was chosen
    moved_from: str | None = None  # run: the conversation leaves this (offline) machine
    offline: bool = False  # wait: for a machine to come online (not for a slot)
    recheck_in: float | None = None  # wait: the decision may change by time alone then


class ModeError(ValueError):
    """A `/use` argument or `default_proxy` that is not a mode; the message is one line."""


def parse_mode(text: str, known: Collection[str]) -> Mode:
    """`proxy1`, `label:a,b` or `auto` → a Mode; `ModeError` with one line if not."""
    text = text.strip()
    if "\n" in text or "\r" in text:
        raise ModeError("Give one machine, label:<a>[,<b>…] or auto, on one line.")
    if len(text) > MAX_MODE_CHARS:
        raise ModeError(f"That is too long ({len(text)} characters) to be a machine or labels.")
    if text == "auto":
        return Mode("auto")
    if text.startswith("label:"):
        labels = frozenset(p.strip() for p in text[len("label:") :].split(",") if p.strip())
        if not labels:
            raise ModeError("label: needs at least one label, e.g. /use label:linux")
        if any(len(label) > MAX_LABEL_CHARS for label in labels):
            raise ModeError(f"A label is at most {MAX_LABEL_CHARS} characters.")
        return Mode("pool", labels=labels)
    if text not in known:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ModeError(f"Unknown proxy {shown!r}. Known: {known_list(known)}.")
    return Mode("pinned", proxy_id=text)


def known_list(known: Collection[str], most: int = 20) -> str:
    """The ids for a one-line message: at most `most` of them, so that a fleet of
    thousands still fits one Telegram message."""
    names = sorted(known)
    if not names:
        return "none"
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def effective_mode(chosen: str | None, default: str | None, known: Collection[str]) -> Mode:
    """The chat's own choice (as stored), else `default_proxy`, else unset."""
    for text in (chosen, default):
        if text:
            try:
                return parse_mode(text.removeprefix("proxy:"), known)
            except ModeError:
                continue  # a stored choice naming a proxy no longer configured
    return Mode("unset")


def mode_text(mode: Mode) -> str:
    """How a mode is stored (conversations.mode)."""
    if mode.kind == "pinned":
        return f"proxy:{mode.proxy_id}"
    if mode.kind == "pool":
        return f"label:{','.join(sorted(mode.labels))}"
    return mode.kind


def members(fleet: Mapping[str, Machine], mode: Mode) -> list[Machine]:
    """The machines a pool or auto chat may use."""
    if mode.kind == "pool":
        return [m for m in fleet.values() if mode.labels <= m.labels]
    return list(fleet.values())


def least_loaded(candidates: Iterable[Machine], load: Load = NO_LOAD) -> Machine | None:
    best: Machine | None = None
    best_key: tuple[float, int, str] | None = None
    for m in candidates:
        key = load.key(m)
        if best_key is None or key < best_key:
            best, best_key = m, key
    return best


def decide(
    fleet: Mapping[str, Machine],
    chat: Chat,
    *,
    wait_s: float,
    load: Load = NO_LOAD,
    ordered: bool = False,
) -> Decision:
    """`ordered`: `fleet` iterates in id order, so the first idle machine of a pool
    (nothing running, queued or lately given) is the least loaded at once."""
    mode = chat.mode
    if mode.kind == "pinned":
        assert mode.proxy_id is not None
        return _on_machine(fleet, load, mode.proxy_id, "chosen for this chat")
    if mode.kind == "unset":
        if chat.current is not None and chat.current in fleet:
            return _on_machine(fleet, load, chat.current, "chosen for this chat")
        online = [m for m in fleet.values() if m.online]
        if len(online) == 1:
            return _on_machine(fleet, load, online[0].proxy_id, "the only proxy online")
        if not online:
            return Decision(
                "wait", why="No proxy is online right now. Start one, then try again.", offline=True
            )
        names = ", ".join(sorted(m.proxy_id for m in online))
        return Decision(
            "refuse", why=f"Several proxies are online ({names}). Pick one with /use <proxy>."
        )
    return _in_pool(fleet, load, chat, wait_s, ordered)


def _on_machine(fleet: Mapping[str, Machine], load: Load, proxy_id: str, why: str) -> Decision:
    machine = fleet.get(proxy_id)
    if machine is None:
        return Decision("refuse", why=f"⚠️ proxy {proxy_id} is not configured")
    if not machine.online:
        return Decision("wait", proxy_id, f"⚠️ proxy {proxy_id} is offline", offline=True)
    if load.full(machine):
        return Decision("wait", proxy_id, f"all {machine.capacity} slots of {proxy_id} are busy")
    return Decision("run", proxy_id, why)


def _in_pool(
    fleet: Mapping[str, Machine], load: Load, chat: Chat, wait_s: float, ordered: bool
) -> Decision:
    mode = chat.mode
    wanted = mode.labels if mode.kind == "pool" else None
    moved_from: str | None = None
    current = fleet.get(chat.current) if chat.current is not None else None
    if current is not None and (wanted is None or wanted <= current.labels):
        if current.online:
            return _on_machine(fleet, load, current.proxy_id, "this conversation lives there")
        if current.offline_for < wait_s:
            return Decision(
                "wait",
                current.proxy_id,
                f"⚠️ proxy {current.proxy_id} is offline",
                offline=True,
                recheck_in=wait_s - current.offline_for,
            )
        moved_from = current.proxy_id  # gone too long: a new conversation elsewhere
    # One pass over the fleet (this is the decision that must stay cheap with
    # a thousand machines): the pool, who of it may take a new conversation,
    # and the least loaded of those with a free slot.
    running, queued, recent = load.running, load.queued, load.recent
    in_pool = eligible = 0
    unhealthy: list[Machine] = []
    best: Machine | None = None
    best_ratio, best_recent, best_id = 2.0, 0, ""
    for m in fleet.values():
        if wanted is not None and not wanted <= m.labels:
            continue
        in_pool += 1
        if not m.online:
            continue
        if m.unhealthy is not None:
            unhealthy.append(m)
            continue
        eligible += 1
        pid = m.proxy_id
        busy = m.running + m.queued
        if running:
            busy += running.get(pid, 0)
        if queued:
            busy += queued.get(pid, 0)
        capacity = m.capacity if m.capacity > 0 else 1
        if busy >= capacity:
            continue
        ratio = busy / capacity
        if ratio > best_ratio:
            continue
        lately = m.recent + recent.get(pid, 0) if recent else m.recent
        if ratio < best_ratio or (lately, pid) < (best_recent, best_id):
            best, best_ratio, best_recent, best_id = m, ratio, lately, pid
            if ordered and ratio == 0 and lately == 0:
                break  # no machine after it can beat (0, 0, a smaller id)
    if not in_pool:
        labels = ", ".join(sorted(mode.labels))
        return Decision("refuse", why=f"⚠️ No machine has the labels {labels}.")
    if not eligible:
        what = mode.target if mode.kind == "pool" else "any machine"
        if unhealthy:
            reasons = "; ".join(f"{m.proxy_id}: {m.unhealthy}" for m in unhealthy[:3])
            why = f"⚠️ no healthy machine for {what} ({reasons})"
        else:
            why = f"⚠️ no machine for {what} is online"
        return Decision("wait", why=why, offline=True)
    if best is None:
        return Decision("wait", why=f"all machines for {mode.target} are busy")
    how = "the least-loaded machine" if eligible > 1 else "the only machine available"
    return Decision("run", best.proxy_id, how, moved_from=moved_from)
