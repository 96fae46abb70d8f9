"""Restarts at awkward moments, end to end with the real codex and the fake Bot API.

The manager is stopped the way SIGTERM stops it (cancellation, shielded
steps bounded) and started again on the same state_dir and port; the proxy
keeps running and reconnects by itself. Each test asserts what the chat shows
— exactly one complete answer or one clear line — and how often the model
was asked. Hard kills (SIGKILL) are in test_e2e_faults.py.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.fakes.stack import USER, Stack, free_port, open_stack
from tests.test_e2e_streaming import button_data, status_message, wait
from tests.test_e2e_telegram import closed_status, journal, statuses, texts, wait_journal

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path) as stack:
        yield stack


def drafted(stack: Stack, fragment: str) -> bool:
    return any(fragment in t for ts in stack.telegram.drafts(USER).values() for t in ts)


async def test_a_prompt_that_found_no_proxy_is_answered_after_a_restart(stack: Stack) -> None:
    listen = ("127.0.0.1", free_port())
    async with stack.manager(manager_ws_listen=listen):
        stack.telegram.push_message(USER, "nobody home")
        await wait_journal(stack, ["queued"])
    # Stopped within proxy_wait_s: the prompt is journalled, not lost, not answered.
    assert texts(stack) == []
    async with stack.manager(manager_ws_listen=listen), stack.proxy(port=listen[1]):
        await wait(stack, lambda: "Echo: nobody home (turn 1)" in texts(stack))
    assert texts(stack) == ["Echo: nobody home (turn 1)"]
    assert len(stack.model.requests) == 1
    assert journal(stack) == ["done"]


async def test_after_a_restart_the_live_view_resumes_and_its_cancel_button_works(
    stack: Stack,
) -> None:
    listen = ("127.0.0.1", free_port())
    async with stack.proxy(port=listen[1]):
        async with stack.manager(manager_ws_listen=listen) as manager:
            with trio.fail_after(60):
                await manager.hub.wait_online("proxy1")
            stack.telegram.push_message(USER, "[[slow:120]]")
            await wait(stack, lambda: any(button_data(m) for m in stack.telegram.messages(USER)))
            await wait(stack, lambda: drafted(stack, "tick 2"))
        view = status_message(stack)
        [cancel] = button_data(view)
        async with stack.manager(manager_ws_listen=listen):
            # The old button, pressed after the restart, still stops the task.
            stack.telegram.push_callback(USER, view.message_id, cancel)
            await wait(stack, lambda: any(t.startswith("⏹ Cancelled.") for t in texts(stack)))
            await closed_status(stack)
    final = stack.telegram.message(USER, view.message_id)
    assert re.match(r"⏹ Cancelled · proxy1 · \d:\d\d", final.text or ""), final.text
    assert button_data(final) == []
    assert [a.text for a in stack.telegram.callback_answers] == ["Cancelling…"]
    assert len([t for t in texts(stack) if t.startswith("⏹ Cancelled.")]) == 1
    assert len(stack.model.requests) == 1


async def test_a_restart_mid_turn_keeps_the_view_and_delivers_one_answer(stack: Stack) -> None:
    listen = ("127.0.0.1", free_port())
    async with stack.proxy(port=listen[1]):
        async with stack.manager(manager_ws_listen=listen) as manager:
            with trio.fail_after(60):
                await manager.hub.wait_online("proxy1")
            stack.telegram.push_message(USER, "[[slow:10]]")
            await wait(stack, lambda: any(button_data(m) for m in stack.telegram.messages(USER)))
        view = status_message(stack)
        async with stack.manager(manager_ws_listen=listen):
            await wait(stack, lambda: any("tick 10" in t for t in texts(stack)))
            await closed_status(stack)
    assert texts(stack) == [" ".join(f"tick {i}" for i in range(1, 11))]
    # One status message, carried across the restart and closed with its final line.
    assert len(statuses(stack)) == 1
    assert re.match(
        r"✅ Done · proxy1 · 0:\d\d", stack.telegram.message(USER, view.message_id).text or ""
    )
    assert len(stack.model.requests) == 1


async def test_an_open_approval_is_asked_once_and_answerable_after_a_restart(
    stack: Stack,
) -> None:
    listen = ("127.0.0.1", free_port())
    async with stack.proxy(port=listen[1], approval_policy="untrusted", sandbox="workspace-write"):
        async with stack.manager(manager_ws_listen=listen) as manager:
            with trio.fail_after(60):
                await manager.hub.wait_online("proxy1")
            stack.telegram.push_message(USER, "[[shell:touch approved.txt]]")
            await wait(
                stack,
                lambda: any(
                    "Codex wants to run" in (m.text or "") for m in stack.telegram.messages(USER)
                ),
            )
        async with stack.manager(manager_ws_listen=listen):
            # The proxy re-sends the open request on its new link: still one question.
            [question] = [
                m for m in stack.telegram.messages(USER) if "Codex wants to run" in (m.text or "")
            ]
            approve = button_data(question)[0]
            stack.telegram.push_callback(USER, question.message_id, approve)
            await wait(stack, lambda: any(t.startswith("Command output") for t in texts(stack)), 90)
    questions = [m for m in stack.telegram.messages(USER) if "Codex wants to run" in (m.text or "")]
    assert len(questions) == 1
    assert re.search(r"✅ Approved by \S+\.$", questions[0].text or "")
    assert (stack.tmp / "work" / "approved.txt").exists()
