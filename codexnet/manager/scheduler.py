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

A machine is *full* when running + queued ≥ capacity: a task never makes a
machine run more than its capacity, and extra tasks wait at the manager.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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

    @property
    def full(self) -> bool:
        return self.running + self.queued >= max(1, self.capacity)

    @property
    def load(self) -> float:
        return (self.running + self.queued) / max(1, self.capacity)


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


def parse_mode(text: str, known: Iterable[str]) -> Mode:
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
    known = sorted(known)
    if text not in known:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise ModeError(f"Unknown proxy {shown!r}. Known: {', '.join(known) or 'none'}.")
    return Mode("pinned", proxy_id=text)


def effective_mode(chosen: str | None, default: str | None, known: Iterable[str]) -> Mode:
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


def least_loaded(candidates: Iterable[Machine]) -> Machine | None:
    best: Machine | None = None
    best_key: tuple[float, int, str] | None = None
    for m in candidates:
        key = (m.load, m.recent, m.proxy_id)
        if best_key is None or key < best_key:
            best, best_key = m, key
    return best


def decide(fleet: Mapping[str, Machine], chat: Chat, *, wait_s: float) -> Decision:
    mode = chat.mode
    if mode.kind == "pinned":
        assert mode.proxy_id is not None
        return _on_machine(fleet, mode.proxy_id, "chosen for this chat")
    if mode.kind == "unset":
        if chat.current is not None and chat.current in fleet:
            return _on_machine(fleet, chat.current, "chosen for this chat")
        online = [m for m in fleet.values() if m.online]
        if len(online) == 1:
            return _on_machine(fleet, online[0].proxy_id, "the only proxy online")
        if not online:
            return Decision(
                "wait", why="No proxy is online right now. Start one, then try again.", offline=True
            )
        names = ", ".join(sorted(m.proxy_id for m in online))
        return Decision(
            "refuse", why=f"Several proxies are online ({names}). Pick one with /use <proxy>."
        )
    return _in_pool(fleet, chat, wait_s)


def _on_machine(fleet: Mapping[str, Machine], proxy_id: str, why: str) -> Decision:
    machine = fleet.get(proxy_id)
    if machine is None:
        return Decision("refuse", why=f"⚠️ proxy {proxy_id} is not configured")
    if not machine.online:
        return Decision("wait", proxy_id, f"⚠️ proxy {proxy_id} is offline", offline=True)
    if machine.full:
        return Decision("wait", proxy_id, f"all {machine.capacity} slots of {proxy_id} are busy")
    return Decision("run", proxy_id, why)


def _in_pool(fleet: Mapping[str, Machine], chat: Chat, wait_s: float) -> Decision:
    mode = chat.mode
    pool = members(fleet, mode)
    if not pool:
        labels = ", ".join(sorted(mode.labels))
        return Decision("refuse", why=f"⚠️ No machine has the labels {labels}.")
    moved_from: str | None = None
    current = fleet.get(chat.current) if chat.current is not None else None
    if current is not None and current in pool:
        if current.online:
            return _on_machine(fleet, current.proxy_id, "this conversation lives there")
        if current.offline_for < wait_s:
            return Decision(
                "wait",
                current.proxy_id,
                f"⚠️ proxy {current.proxy_id} is offline",
                offline=True,
                recheck_in=wait_s - current.offline_for,
            )
        moved_from = current.proxy_id  # gone too long: a new conversation elsewhere
    eligible = [m for m in pool if m.online and m.unhealthy is None]
    if not eligible:
        what = mode.target if mode.kind == "pool" else "any machine"
        unhealthy = [m for m in pool if m.online and m.unhealthy is not None]
        if unhealthy:
            reasons = "; ".join(f"{m.proxy_id}: {m.unhealthy}" for m in unhealthy[:3])
            why = f"⚠️ no healthy machine for {what} ({reasons})"
        else:
            why = f"⚠️ no machine for {what} is online"
        return Decision("wait", why=why, offline=True)
    best = least_loaded(m for m in eligible if not m.full)
    if best is None:
        return Decision("wait", why=f"all machines for {mode.target} are busy")
    how = "the least-loaded machine" if len(eligible) > 1 else "the only machine available"
    return Decision("run", best.proxy_id, how, moved_from=moved_from)
