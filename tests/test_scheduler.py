"""The scheduler's rules, in memory: a pure function of the fleet and the chat's mode."""

from __future__ import annotations

import pytest

from codexnet.manager.scheduler import (
    Chat,
    Machine,
    Mode,
    ModeError,
    decide,
    effective_mode,
    mode_text,
    parse_mode,
)

WAIT_S = 20.0


def fleet(*machines: Machine) -> dict[str, Machine]:
    return {m.proxy_id: m for m in machines}


def m(proxy_id: str, *labels: str, **kw: object) -> Machine:
    kw.setdefault("online", True)
    kw.setdefault("capacity", 2)
    return Machine(proxy_id, labels=frozenset(labels), **kw)  # type: ignore[arg-type]


POOL_LINUX = Mode("pool", labels=frozenset({"linux"}))
AUTO = Mode("auto")


# ---------------------------------------------------------------- parsing a mode


def test_a_mode_is_a_proxy_a_label_pool_or_auto() -> None:
    known = ["proxy1", "proxy2"]
    assert parse_mode("proxy1", known) == Mode("pinned", proxy_id="proxy1")
    assert parse_mode("label:gpu, linux", known) == Mode("pool", labels=frozenset({"gpu", "linux"}))
    assert parse_mode("auto", known) == Mode("auto")
    assert mode_text(parse_mode("label:linux,gpu", known)) == "label:gpu,linux"
    assert effective_mode("proxy:proxy2", "auto", known) == Mode("pinned", proxy_id="proxy2")
    assert effective_mode(None, "label:gpu", known) == Mode("pool", labels=frozenset({"gpu"}))
    assert effective_mode(None, None, known) == Mode("unset")
    # A stored choice naming a proxy no longer configured falls back to the default.
    assert effective_mode("proxy:gone", "auto", known) == Mode("auto")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("label:", "label: needs at least one label, e.g. /use label:linux"),
        ("label: , ", "label: needs at least one label, e.g. /use label:linux"),
        ("proxy1\nproxy2", "Give one machine, label:<a>[,<b>…] or auto, on one line."),
        ("x" * 1000, "That is too long (1000 characters) to be a machine or labels."),
        ("nowhere", "Unknown proxy 'nowhere'. Known: proxy1, proxy2."),
    ],
)
def test_a_bad_mode_is_one_line(text: str, line: str) -> None:
    with pytest.raises(ModeError) as caught:
        parse_mode(text, ["proxy1", "proxy2"])
    assert str(caught.value) == line


# ---------------------------------------------------------------- pinned


def test_pinned_runs_on_its_machine_while_it_has_a_free_slot() -> None:
    chat = Chat(Mode("pinned", proxy_id="p1"))
    d = decide(fleet(m("p1", running=1), m("p2")), chat, wait_s=WAIT_S)
    assert (d.action, d.proxy_id) == ("run", "p1")


def test_pinned_waits_for_a_full_machine_even_with_an_idle_one_online() -> None:
    chat = Chat(Mode("pinned", proxy_id="p1"))
    d = decide(fleet(m("p1", running=2), m("p2")), chat, wait_s=WAIT_S)
    assert (d.action, d.proxy_id, d.offline) == ("wait", "p1", False)
    assert d.why == "all 2 slots of p1 are busy"


def test_tasks_queued_at_the_manager_count_as_load() -> None:
    chat = Chat(Mode("pinned", proxy_id="p1"))
    d = decide(fleet(m("p1", running=1, queued=1)), chat, wait_s=WAIT_S)
    assert d.action == "wait"


def test_pinned_waits_for_an_offline_machine_and_refuses_an_unknown_one() -> None:
    d = decide(fleet(m("p1", online=False)), Chat(Mode("pinned", proxy_id="p1")), wait_s=WAIT_S)
    assert (d.action, d.offline, d.why) == ("wait", True, "⚠️ proxy p1 is offline")
    d = decide(fleet(m("p1")), Chat(Mode("pinned", proxy_id="gone")), wait_s=WAIT_S)
    assert d.action == "refuse"


# ---------------------------------------------------------------- unset


def test_unset_uses_the_sticky_machine_then_the_only_one_online_else_asks() -> None:
    unset = Mode("unset")
    both = fleet(m("p1"), m("p2"))
    assert decide(both, Chat(unset, current="p2"), wait_s=WAIT_S).proxy_id == "p2"
    one = fleet(m("p1"), m("p2", online=False))
    assert decide(one, Chat(unset), wait_s=WAIT_S).proxy_id == "p1"
    d = decide(both, Chat(unset), wait_s=WAIT_S)
    assert (d.action, d.why) == (
        "refuse",
        "Several proxies are online (p1, p2). Pick one with /use <proxy>.",
    )
    d = decide(fleet(m("p1", online=False)), Chat(unset), wait_s=WAIT_S)
    assert (d.action, d.offline) == ("wait", True)


# ---------------------------------------------------------------- pools


def test_a_new_pool_conversation_goes_to_the_least_loaded_machine_with_the_labels() -> None:
    machines = fleet(
        m("a", "linux", running=1),
        m("b", "linux", "gpu", capacity=4, running=1),  # 1/4 beats 1/2
        m("c", "windows"),  # idle, but not in the pool
    )
    d = decide(machines, Chat(POOL_LINUX), wait_s=WAIT_S)
    assert (d.action, d.proxy_id) == ("run", "b")
    gpu = Mode("pool", labels=frozenset({"linux", "gpu"}))  # all the labels
    assert decide(machines, Chat(gpu), wait_s=WAIT_S).proxy_id == "b"


def test_ties_go_to_fewest_recent_tasks_then_the_smallest_id() -> None:
    machines = fleet(m("b", "linux"), m("a", "linux", recent=3), m("c", "linux"))
    assert decide(machines, Chat(POOL_LINUX), wait_s=WAIT_S).proxy_id == "b"
    machines = fleet(m("c", "linux"), m("b", "linux"))
    assert decide(machines, Chat(POOL_LINUX), wait_s=WAIT_S).proxy_id == "b"


def test_a_busy_pool_member_is_skipped() -> None:
    machines = fleet(m("a", "linux", capacity=1, running=1), m("b", "linux", running=1))
    assert decide(machines, Chat(POOL_LINUX), wait_s=WAIT_S).proxy_id == "b"


def test_a_full_pool_waits_for_whichever_member_frees_up() -> None:
    machines = fleet(m("a", "linux", capacity=1, running=1), m("b", "linux", capacity=1, queued=1))
    d = decide(machines, Chat(POOL_LINUX), wait_s=WAIT_S)
    assert (d.action, d.proxy_id, d.offline) == ("wait", None, False)
    assert d.why == "all machines for label:linux are busy"


def test_unhealthy_machines_are_not_chosen_for_new_conversations() -> None:
    machines = fleet(
        m("a", "linux", unhealthy="app-server restarting: exited with code 1"),
        m("b", "linux", running=1, capacity=1),
        m("c", "linux", unhealthy="heartbeats late (silent for 25 s)"),
    )
    d = decide(machines, Chat(POOL_LINUX), wait_s=WAIT_S)
    assert (d.action, d.proxy_id) == ("wait", None)  # b is busy; a and c are not healthy
    only_sick = fleet(m("a", "linux", unhealthy="app-server failed: cannot start 'codex'"))
    d = decide(only_sick, Chat(POOL_LINUX), wait_s=WAIT_S)
    assert d.action == "wait"
    assert d.offline
    assert d.why == (
        "⚠️ no healthy machine for label:linux (a: app-server failed: cannot start 'codex')"
    )


def test_a_pool_nobody_has_is_refused() -> None:
    d = decide(fleet(m("a", "linux")), Chat(Mode("pool", labels=frozenset({"gpu"}))), wait_s=1)
    assert (d.action, d.why) == ("refuse", "⚠️ No machine has the labels gpu.")


def test_a_pool_with_nobody_online_waits_for_one() -> None:
    d = decide(fleet(m("a", "linux", online=False)), Chat(POOL_LINUX), wait_s=WAIT_S)
    assert (d.action, d.offline, d.why) == ("wait", True, "⚠️ no machine for label:linux is online")


def test_auto_is_a_pool_of_every_machine() -> None:
    machines = fleet(m("a", "linux", running=2), m("b", "windows", running=1), m("c", running=1))
    assert decide(machines, Chat(AUTO), wait_s=WAIT_S).proxy_id == "b"


# ---------------------------------------------------------------- a running conversation


def test_a_conversation_stays_on_its_machine_even_when_it_is_busy() -> None:
    machines = fleet(m("a", "linux", capacity=1, running=1), m("b", "linux"))
    d = decide(machines, Chat(POOL_LINUX, current="a"), wait_s=WAIT_S)
    assert (d.action, d.proxy_id, d.offline) == ("wait", "a", False)


def test_a_conversation_waits_for_its_machine_for_wait_s_then_moves() -> None:
    gone_a_while = fleet(m("a", "linux", online=False, offline_for=5.0), m("b", "linux"))
    d = decide(gone_a_while, Chat(POOL_LINUX, current="a"), wait_s=WAIT_S)
    assert (d.action, d.proxy_id, d.offline, d.recheck_in) == ("wait", "a", True, 15.0)
    gone_long = fleet(m("a", "linux", online=False, offline_for=25.0), m("b", "linux"))
    d = decide(gone_long, Chat(POOL_LINUX, current="a"), wait_s=WAIT_S)
    assert (d.action, d.proxy_id, d.moved_from) == ("run", "b", "a")


def test_a_conversation_on_a_machine_outside_the_pool_starts_anew_in_it() -> None:
    machines = fleet(m("w", "windows"), m("b", "linux"))
    d = decide(machines, Chat(POOL_LINUX, current="w"), wait_s=WAIT_S)
    assert (d.action, d.proxy_id, d.moved_from) == ("run", "b", None)


def test_an_all_task_is_pinned_to_its_machine() -> None:
    machines = fleet(m("a", capacity=1, running=1), m("b"))
    d = decide(machines, Chat(Mode("pinned", proxy_id="a"), fresh=True), wait_s=WAIT_S)
    assert (d.action, d.proxy_id) == ("wait", "a")


def test_an_ordered_fleet_gives_the_same_answers_sooner() -> None:
    machines = fleet(
        m("a", "linux", running=1, capacity=1),
        m("b", "linux", recent=1),
        m("c", "linux"),
        m("d", "linux"),
    )
    for mode in (POOL_LINUX, AUTO):
        plain = decide(machines, Chat(mode), wait_s=WAIT_S)
        ordered = decide(machines, Chat(mode), wait_s=WAIT_S, ordered=True)
        assert plain.proxy_id == ordered.proxy_id == "c"


def test_an_unknown_proxy_in_a_fleet_of_thousands_names_twenty_of_them() -> None:
    known = {f"m{i:04}" for i in range(5000)}
    with pytest.raises(ModeError) as info:
        parse_mode("nope", known)
    assert str(info.value) == (
        f"Unknown proxy 'nope'. Known: {', '.join(sorted(known)[:20])} and 4980 more."
    )
    assert parse_mode("m4999", known) == Mode("pinned", proxy_id="m4999")
