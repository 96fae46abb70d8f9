"""The link between proxy and manager, broken in every way a real network breaks it.

The real manager and proxy (real codex, fake model, fake Bot API over HTTP),
with a TCP relay between proxy and manager that can cut the link, make it
half-dead (sockets open, bytes vanish), or cut it exactly while a given frame
is on the wire. Heartbeats are 3 s, the smallest the config allows, so a
half-dead link is found quickly. Each test asserts what the chat shows —
exactly one complete answer, or one clear line — and how often the model was
asked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from codexnet.manager.service import Manager
from tests.fakes.relay import TcpRelay
from tests.fakes.stack import USER, Stack, open_stack
from tests.test_e2e_streaming import button_data, wait
from tests.test_e2e_telegram import texts

pytestmark = pytest.mark.e2e

HEARTBEAT_S = 3.0
TICKS = " ".join(f"tick {i}" for i in range(1, 7))


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path) as stack:
        yield stack


@attrs.define
class Linked:
    manager: Manager
    relay: TcpRelay


@asynccontextmanager
async def linked(stack: Stack, **proxy: Any) -> AsyncIterator[Linked]:
    """Manager ← relay ← proxy, both ends with 3 s heartbeats; yields once online."""
    async with stack.manager(heartbeat_timeout_s=HEARTBEAT_S) as manager:
        relay = TcpRelay("127.0.0.1", manager.port)
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(relay.serve)
            async with stack.proxy(port=port, heartbeat_timeout_s=HEARTBEAT_S, **proxy):
                with trio.fail_after(60):
                    await manager.hub.wait_online("proxy1")
                yield Linked(manager, relay)
            nursery.cancel_scope.cancel()


def answered(stack: Stack, text: str) -> bool:
    return text in texts(stack)


async def test_a_link_cut_mid_answer_loses_nothing(stack: Stack) -> None:
    async with linked(stack) as link:
        stack.telegram.push_message(USER, "[[slow:6]]")
        await link.relay.wait_for_frame("up", lambda m: "tick 2" in str(m.get("text", "")))
        link.relay.cut()
        await wait(stack, lambda: answered(stack, TICKS))
    assert texts(stack) == [TICKS]
    assert len(stack.model.requests) == 1


async def test_a_half_dead_link_is_found_within_the_heartbeat_and_the_answer_follows(
    stack: Stack,
) -> None:
    async with linked(stack) as link:
        stack.telegram.push_message(USER, "[[slow:12]]")
        await link.relay.wait_for_frame("up", lambda m: "tick 1" in str(m.get("text", "")))
        old = link.manager.hub.online["proxy1"]
        dead = trio.current_time()
        link.relay.blackhole(new_connections="work")  # the laptop slept; a new link works
        with trio.fail_after(HEARTBEAT_S * 3):
            await link.relay.wait_until(lambda: link.relay.accepted >= 2)  # the proxy noticed
            proxy_found = trio.current_time() - dead
            while link.manager.hub.online.get("proxy1") is old:  # and so did the manager
                await link.manager.hub.wait_change()
            manager_found = trio.current_time() - dead
        # Found within the heartbeat timeout, then reconnected at once (≤ 0.5 s jitter).
        assert proxy_found <= HEARTBEAT_S + 1
        assert manager_found <= HEARTBEAT_S + 1
        await wait(stack, lambda: answered(stack, " ".join(f"tick {i}" for i in range(1, 13))))
    assert len(stack.model.requests) == 1
    assert len(texts(stack)) == 1


async def test_a_result_lost_on_a_half_dead_link_arrives_after_the_reconnect(
    stack: Stack,
) -> None:
    async with linked(stack) as link:
        trap = link.relay.blackhole_on("up", "task_result")
        stack.telegram.push_message(USER, "vanishing result")
        await trap.wait()
        back = trio.current_time()
        await wait(stack, lambda: answered(stack, "Echo: vanishing result (turn 1)"))
        # Found by the heartbeat, sent again on the new link, shown at once.
        assert trio.current_time() - back <= HEARTBEAT_S + 5
    assert texts(stack) == ["Echo: vanishing result (turn 1)"]
    assert len(stack.model.requests) == 1


async def test_a_task_lost_on_the_wire_is_sent_again_and_run_once(stack: Stack) -> None:
    async with linked(stack) as link:
        trap = link.relay.cut_on("down", "task")  # the proxy never sees it
        stack.telegram.push_message(USER, "second try")
        await trap.wait()
        await wait(stack, lambda: answered(stack, "Echo: second try (turn 1)"))
    assert texts(stack) == ["Echo: second try (turn 1)"]
    assert len(stack.model.requests) == 1
    assert len(link.relay.messages("down", "task")) == 2


async def test_a_lost_task_ack_makes_the_manager_send_again_and_the_proxy_run_once(
    stack: Stack,
) -> None:
    async with linked(stack) as link:
        trap = link.relay.cut_on("up", "task_ack")  # the proxy has it; the manager does not know
        stack.telegram.push_message(USER, "[[slow:4]]")
        await trap.wait()
        await wait(stack, lambda: answered(stack, "tick 1 tick 2 tick 3 tick 4"))
    assert len(stack.model.requests) == 1  # the repeat was recognised
    assert texts(stack) == ["tick 1 tick 2 tick 3 tick 4"]


async def test_a_lost_result_ack_shows_the_answer_once(stack: Stack) -> None:
    async with linked(stack) as link:
        trap = link.relay.cut_on("down", "result_ack")  # the proxy will send the result again
        stack.telegram.push_message(USER, "only once")
        await trap.wait()
        await link.relay.wait_for_frame("down", "result_ack", fate="forwarded")
        await wait(stack, lambda: answered(stack, "Echo: only once (turn 1)"))
        await trio.sleep(1)  # a second copy would have arrived by now
    assert texts(stack) == ["Echo: only once (turn 1)"]
    assert len(link.relay.messages("up", "task_result")) == 2


async def test_a_cancel_lost_on_the_wire_still_stops_the_turn(stack: Stack) -> None:
    async with linked(stack) as link:
        stack.telegram.push_message(USER, "[[slow:120]]")
        await link.relay.wait_for_frame("up", lambda m: "tick 1" in str(m.get("text", "")))
        trap = link.relay.cut_on("down", "task_cancel")
        stack.telegram.push_message(USER, "/cancel")
        await trap.wait()
        await wait(stack, lambda: any(t.startswith("⏹ Cancelled.") for t in texts(stack)), 30)
        await link.relay.wait_for_frame("up", "cancel_ack")
    assert len([t for t in texts(stack) if t.startswith("⏹ Cancelled.")]) == 1
    assert len(link.relay.messages("down", "task_cancel")) == 2
    assert len(stack.model.requests) == 1


async def test_an_approval_across_a_cut_is_one_question_and_its_decision_arrives(
    stack: Stack,
) -> None:
    async with linked(stack, approval_policy="untrusted", sandbox="workspace-write") as link:
        stack.telegram.push_message(USER, "[[shell:touch approved.txt]]")
        await link.relay.wait_for_frame("up", "approval_request")
        link.relay.cut()  # the proxy asks again on its new link
        await link.relay.wait_for_frame("up", "approval_request", since=1)
        await wait(
            stack,
            lambda: any(
                "Codex wants to run" in (m.text or "") for m in stack.telegram.messages(USER)
            ),
        )
        [question] = [
            m for m in stack.telegram.messages(USER) if "Codex wants to run" in (m.text or "")
        ]
        trap = link.relay.cut_on("down", "approval_decision")  # and the decision is lost once
        stack.telegram.push_callback(USER, question.message_id, button_data(question)[0])
        await trap.wait()
        await wait(stack, lambda: any(t.startswith("Command output") for t in texts(stack)), 90)
    questions = [m for m in stack.telegram.messages(USER) if "Codex wants to run" in (m.text or "")]
    assert len(questions) == 1
    assert len(link.relay.messages("up", "approval_request")) >= 2
    assert (stack.tmp / "work" / "approved.txt").exists()
