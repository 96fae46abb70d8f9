"""End to end: scheduling across three machines with different labels and capacities.

The fake Bot API over HTTP → the manager → three proxies, each with its own
working directory and CODEX_HOME, each driving a real codex → the fake model,
which tells the machines apart by the working directory Codex sends and counts
how many turns each runs at once.

    proxy1  labels linux           capacity 1
    proxy2  labels linux + gpu     capacity 2   ("gpu" is the proxy's own label)
    proxy3  labels windows         capacity 1
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from codexnet.config import ProxyEntry
from codexnet.manager.service import Manager
from tests.fakes.stack import PROXY_TOKEN, USER, Stack, free_port, open_stack
from tests.test_e2e_telegram import texts

pytestmark = pytest.mark.e2e

TOKENS = {
    "proxy1": PROXY_TOKEN,
    "proxy2": "proxy2-secret-token-9876543210",
    "proxy3": "proxy3-secret-token-5555555555",
}
PROXIES = {
    "proxy1": ProxyEntry(TOKENS["proxy1"], ("linux",)),
    "proxy2": ProxyEntry(TOKENS["proxy2"], ("linux",)),
    "proxy3": ProxyEntry(TOKENS["proxy3"], ("windows",)),
}
MACHINES: dict[str, dict[str, Any]] = {
    "proxy1": {"capacity": 1, "labels": ()},
    "proxy2": {"capacity": 2, "labels": ("gpu",)},
    "proxy3": {"capacity": 1, "labels": ()},
}
GROUPS = (-101, -102, -103, -104)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path) as stack:
        yield stack


def workdir(stack: Stack, proxy_id: str) -> str:
    return str((stack.tmp / f"work-{proxy_id}").resolve())


def asked(stack: Stack, proxy_id: str) -> list[str]:
    """The prompts the model got from one machine, in order."""
    return [r.last_user_text for r in stack.model.requests if r.cwd == workdir(stack, proxy_id)]


@asynccontextmanager
async def machine(stack: Stack, hub: Manager, proxy_id: str, **changes: Any) -> AsyncIterator[None]:
    settings = {**MACHINES[proxy_id], **changes}
    async with stack.proxy(
        hub, machine=True, proxy_id=proxy_id, proxy_token=TOKENS[proxy_id], **settings
    ):
        if "codex_bin" not in changes:  # ready for new conversations: its codex is up
            with trio.fail_after(60):
                while (conn := hub.hub.online.get(proxy_id)) is None or conn.health != "ok":
                    await hub.hub.wait_change()
        yield


@asynccontextmanager
async def fleet(stack: Stack, hub: Manager, *ids: str) -> AsyncIterator[None]:
    async with AsyncExitStack() as machines:
        for proxy_id in ids or tuple(MACHINES):
            await machines.enter_async_context(machine(stack, hub, proxy_id))
        yield


def manager(stack: Stack, **changes: Any) -> Any:
    return stack.manager(proxies=PROXIES, **changes)


async def say(stack: Stack, text: str, *, expect: str, chat_id: int = USER) -> list[str]:
    """Write `text` as the user (in a group too) and wait for a bot message with `expect`."""
    before = len(texts(stack, chat_id))
    stack.telegram.push_message(chat_id, text, user_id=USER)
    with trio.fail_after(60):
        await stack.telegram.wait_until(
            lambda: any(expect in t for t in texts(stack, chat_id)[before:])
        )
    return texts(stack, chat_id)[before:]


async def ask(stack: Stack, chat_id: int, text: str) -> None:
    """Send a prompt and wait until the model has it."""
    n = len(stack.model.requests)
    stack.telegram.push_message(chat_id, text, user_id=USER)
    with trio.fail_after(60):
        await stack.model.wait_requests(n + 1)


def shown(stack: Stack, chat_id: int, text: str) -> bool:
    """The chat showed `text` at some point (in a message, or before an edit)."""
    return any(
        text in (m.text or "") or any(text in h for h in m.history)
        for m in stack.telegram.messages(chat_id)
    )


async def until(stack: Stack, predicate: Any, seconds: float = 60) -> None:
    with trio.fail_after(seconds):
        await stack.telegram.wait_until(predicate)


async def test_label_pools_choose_the_least_loaded_free_machine_and_queue_at_the_manager(
    stack: Stack,
) -> None:
    async with manager(stack) as hub, fleet(stack, hub):
        # The proxy's own label counts: only proxy2 has "gpu".
        [line] = await say(stack, "/use label:gpu", expect="now uses")
        assert line == (
            "This chat now uses the pool label:gpu: proxy2 (1 online). Each new conversation "
            "goes to the least-loaded healthy machine."
        )
        await say(stack, "[[reply:on the gpu]]", expect="on the gpu")
        assert asked(stack, "proxy2") == ["[[reply:on the gpu]]"]

        # Four conversations in the linux pool (proxy1: 1 slot, proxy2: 2 slots).
        for group in GROUPS:
            await say(stack, "/use label:linux", expect="now uses", chat_id=group)
        for group in GROUPS[:3]:
            await ask(stack, group, f"[[slow:8]] {group}")
        # Equally idle at first: proxy1 has had fewer recent tasks. Then proxy1 is
        # full and skipped, and proxy2 takes the next two.
        assert asked(stack, "proxy1") == ["[[slow:8]] -101"]
        assert asked(stack, "proxy2")[1:] == ["[[slow:8]] -102", "[[slow:8]] -103"]
        # The fourth waits at the manager, and its live view says so.
        stack.telegram.push_message(GROUPS[3], "[[reply:my turn]]", user_id=USER)
        await until(stack, lambda: shown(stack, GROUPS[3], "queued: 1st for label:linux"))
        assert not any("my turn" in r.last_user_text for r in stack.model.requests)
        # /status counts it where it waits: for the pool, not for one machine.
        [status] = await say(stack, "/status", expect="queued at the manager for a pool")
        assert "⏳ queued at the manager for a pool: 1 for label:linux" in status
        await until(stack, lambda: "my turn" in texts(stack, GROUPS[3]))
        for group in GROUPS[:3]:
            await until(stack, lambda g=group: any("tick 8" in t for t in texts(stack, g)))
    # No machine ever ran more turns at once than its capacity.
    assert stack.model.peak[workdir(stack, "proxy1")] == 1
    assert stack.model.peak[workdir(stack, "proxy2")] == 2
    assert stack.telegram.stats.too_many_requests == 0


async def test_a_pinned_machine_never_runs_more_than_its_capacity(stack: Stack) -> None:
    async with manager(stack) as hub, fleet(stack, hub, "proxy1"):
        for group in GROUPS[:3]:
            await say(stack, "/use proxy1", expect="now uses", chat_id=group)
        for group in GROUPS[:3]:
            stack.telegram.push_message(group, f"[[slow:4]] {group}", user_id=USER)
        # (The three chats' updates are handled concurrently: any order of arrival.)
        for place in ("1st", "2nd"):
            text = f"queued: {place} for proxy1"
            await until(stack, lambda t=text: any(shown(stack, g, t) for g in GROUPS[:3]))
        for group in GROUPS[:3]:
            await until(stack, lambda g=group: any("tick 4" in t for t in texts(stack, g)))
    assert stack.model.peak[workdir(stack, "proxy1")] == 1
    assert len(asked(stack, "proxy1")) == 3


async def test_a_pool_conversation_moves_when_its_machine_is_gone_with_one_notice(
    stack: Stack,
) -> None:
    async with manager(stack, proxy_wait_s=2.0) as hub, fleet(stack, hub, "proxy2", "proxy3"):
        async with machine(stack, hub, "proxy1"):
            await say(stack, "/use label:linux", expect="now uses")
            await say(stack, "first", expect="Echo: first (turn 1)")
            assert asked(stack, "proxy1") == ["first"]
            await say(stack, "second", expect="Echo: second (turn 2)")  # it stays there
        [answer] = await say(stack, "third", expect="Echo: third")
        assert answer == (
            "proxy1 is offline; continuing on proxy2 in a new conversation\n\nEcho: third (turn 1)"
        )
        [answer] = await say(stack, "fourth", expect="Echo: fourth")
        assert answer == "Echo: fourth (turn 2)"  # the conversation lives on proxy2 now
    assert asked(stack, "proxy3") == []


async def test_all_asks_every_machine_once_and_leaves_the_conversation_alone(
    stack: Stack,
) -> None:
    async with manager(stack) as hub, fleet(stack, hub):
        await say(stack, "/use proxy1", expect="now uses")
        await say(stack, "mine", expect="Echo: mine (turn 1)")
        before = len(texts(stack))
        stack.telegram.push_message(USER, "/all hello fleet")
        await until(stack, lambda: sum("hello fleet" in t for t in texts(stack)[before:]) == 3)
        answers = sorted(t for t in texts(stack)[before:] if "hello fleet" in t)
        assert answers == [
            f"🖥 {p}\n\nEcho: hello fleet (turn 1)" for p in ("proxy1", "proxy2", "proxy3")
        ]
        for proxy_id in MACHINES:
            assert [p for p in asked(stack, proxy_id) if p == "hello fleet"] == ["hello fleet"]
        # The chat's own conversation goes on where it was.
        await say(stack, "mine again", expect="Echo: mine again (turn 2)")

        before = len(texts(stack))
        stack.telegram.push_message(USER, "/all label:linux linux only")
        await until(stack, lambda: sum("linux only" in t for t in texts(stack)[before:]) == 2)
        assert sorted(t.split("\n")[0] for t in texts(stack)[before:] if "linux only" in t) == [
            "🖥 proxy1",
            "🖥 proxy2",
        ]
        assert "linux only" not in asked(stack, "proxy3")

        # /cancel stops every machine of a run.
        before = len(texts(stack))
        n = len(stack.model.requests)
        stack.telegram.push_message(USER, "/all [[slow:40]]")
        with trio.fail_after(60):
            await stack.model.wait_requests(n + 3)

        # One live view for the run (a private chat: in the draft), a line per machine.
        def every_machine_shown() -> bool:
            return any(
                text.startswith("⏳ /all · ")
                and all(f"\n{p}: " in text for p in MACHINES)
                and "tick" not in text.split("\n")[0]
                for texts_ in stack.telegram.drafts(USER).values()
                for text in texts_
            )

        await until(stack, every_machine_shown)
        stack.telegram.push_message(USER, "/cancel")
        await until(stack, lambda: sum("Cancelled" in t for t in texts(stack)[before:]) == 3)
        await until(
            stack,
            lambda: any(
                (m.text or "").startswith("⏹ Cancelled · 0/3 machines answered · /all · ")
                for m in stack.telegram.messages(USER)
            ),
        )
    assert stack.telegram.stats.too_many_requests == 0


async def test_status_shows_health_load_labels_and_a_stopped_machine(stack: Stack) -> None:
    async with manager(stack) as hub, fleet(stack, hub, "proxy1", "proxy2"):
        # proxy3's codex cannot start: online, but not chosen.
        async with machine(stack, hub, "proxy3", codex_bin="/bin/false"):
            with trio.fail_after(30):
                while (conn := hub.hub.online.get("proxy3")) is None or conn.health != "failed":
                    await hub.hub.wait_change()
            await say(stack, "/use auto", expect="now uses")
            [status] = await say(stack, "/status", expect="This chat:")
            assert "🟡 proxy3: online since " in status
            assert "not chosen: app-server failed" in status
        [status] = await say(stack, "/status", expect="This chat:")
        lines = status.split("\n")
        assert lines[0].startswith("🟢 proxy1: online since ")
        assert ", healthy, 0/1 running, 0 queued, labels: linux, codexnet" in lines[0]
        assert ", healthy, 0/2 running, 0 queued, labels: gpu, linux, codexnet" in lines[1]
        assert lines[2].startswith("⚪ proxy3: offline since ")
        assert lines[2].endswith(", 0 queued, labels: windows")
        assert (
            "This chat: auto (all machines); a new conversation goes to proxy1 "
            "(the least-loaded machine)." in status
        )


async def test_bad_scheduling_input_is_one_line_and_nothing_is_dispatched(stack: Stack) -> None:
    async with manager(stack) as hub, fleet(stack, hub, "proxy1"):
        cases = {
            "/use label:": "label: needs at least one label, e.g. /use label:linux",
            "/use label:nope": "No machine has the labels nope. Labels: linux, windows.",
            "/use " + "x" * 1000: "That is too long (1000 characters) to be a machine or labels.",
            "/use proxy1\nproxy2": "Give one machine, label:<a>[,<b>…] or auto, on one line.",
            "/all": "Usage: /all [label:<a>[,<b>]] <prompt> — runs the prompt on every online "
            "machine.",
            "/all label:linux": "Usage: /all [label:<a>[,<b>]] <prompt> — runs the prompt on "
            "every online machine.",
            "/all label:nope hi": "No machine has the labels nope.",
        }
        for command, line in cases.items():
            new = await say(stack, command, expect=line.split(" ")[0])
            assert new == [line]
        assert stack.model.requests == []
        # Runs that ask every machine are bounded per conversation.
        for _ in range(3):
            stack.telegram.push_message(USER, "/all [[slow:40]]")
        new = await say(stack, "/all one more", expect="/all runs are open")
        assert new == ["3 /all runs are open here already; wait or /cancel."]
        await say(stack, "/cancel", expect="Cancelled")
    assert "one more" not in [r.last_user_text for r in stack.model.requests]


async def test_a_prompt_queued_at_the_manager_survives_a_manager_restart(stack: Stack) -> None:
    listen = ("127.0.0.1", free_port())
    settings = {**MACHINES["proxy1"], "proxy_id": "proxy1", "proxy_token": TOKENS["proxy1"]}
    async with stack.proxy(port=listen[1], machine=True, **settings):
        async with manager(stack, manager_ws_listen=listen) as hub:
            with trio.fail_after(60):
                while (conn := hub.hub.online.get("proxy1")) is None or conn.health != "ok":
                    await hub.hub.wait_change()
            for group in GROUPS[:2]:
                await say(stack, "/use proxy1", expect="now uses", chat_id=group)
            await ask(stack, GROUPS[0], "[[slow:8]]")
            stack.telegram.push_message(GROUPS[1], "[[reply:after the restart]]", user_id=USER)
            await until(stack, lambda: shown(stack, GROUPS[1], "queued: 1st for proxy1"))
        async with manager(stack, manager_ws_listen=listen):
            await until(stack, lambda: "after the restart" in texts(stack, GROUPS[1]))
            await until(stack, lambda: any("tick 8" in t for t in texts(stack, GROUPS[0])))
    assert stack.model.peak[workdir(stack, "proxy1")] == 1
    assert [r.last_user_text for r in stack.model.requests] == [
        "[[slow:8]]",
        "[[reply:after the restart]]",
    ]


async def test_an_all_run_survives_a_manager_restart(stack: Stack) -> None:
    listen = ("127.0.0.1", free_port())
    machines = [
        {**MACHINES[p], "proxy_id": p, "proxy_token": TOKENS[p]} for p in ("proxy1", "proxy2")
    ]
    async with AsyncExitStack() as running:
        for settings in machines:
            await running.enter_async_context(stack.proxy(port=listen[1], machine=True, **settings))
        async with manager(stack, manager_ws_listen=listen) as hub:
            with trio.fail_after(60):
                while not all(
                    (c := hub.hub.online.get(p)) is not None and c.health == "ok"
                    for p in ("proxy1", "proxy2")
                ):
                    await hub.hub.wait_change()
            n = len(stack.model.requests)
            stack.telegram.push_message(USER, "/all [[slow:8]]")
            with trio.fail_after(60):
                await stack.model.wait_requests(n + 2)
            # Its one view is up before the manager stops.
            await until(
                stack,
                lambda: any((m.text or "").startswith("⏳") for m in stack.telegram.messages(USER)),
            )
        async with manager(stack, manager_ws_listen=listen):
            await until(stack, lambda: sum("tick 8" in t for t in texts(stack)) == 2)
            await until(
                stack,
                lambda: any(
                    (m.text or "").startswith("✅ Done · 2/2 machines answered · /all · ")
                    for m in stack.telegram.messages(USER)
                ),
            )
    assert sorted(t.split("\n")[0] for t in texts(stack) if "tick 8" in t) == [
        "🖥 proxy1",
        "🖥 proxy2",
    ]
    assert [r.last_user_text for r in stack.model.requests].count("[[slow:8]]") == 2
    # The same status message was closed after the restart: none is left at "⏳".
    views = [
        m.text or ""
        for m in stack.telegram.messages(USER)
        if m.history or (m.text or "")[:1] == "⏳"
    ]
    assert [text.split(" · ")[0] for text in views] == ["✅ Done"]
