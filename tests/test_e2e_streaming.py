"""The Telegram experience end to end: live view, formatting, cancel, approvals, limits.

Real codex against the fake model, the manager against the fake Bot API over
HTTP (which answers 429 the moment the bot goes over Telegram's limits).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.fakes.responses_api import long_text
from tests.fakes.stack import STRANGER, USER, Stack, open_stack
from tests.fakes.telegram_api import StoredMessage
from tests.test_e2e_telegram import closed_status, say, texts

pytestmark = pytest.mark.e2e
GROUP = -100500


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path) as stack:
        yield stack


def status_message(stack: Stack, chat_id: int = USER) -> StoredMessage:
    return [
        m
        for m in stack.telegram.messages(chat_id)
        if m.reply_markup or (m.text or "").startswith(("⏳", "✅", "⏹", "⚠️"))
    ][-1]


def button_data(message: StoredMessage) -> list[str]:
    markup = message.reply_markup or {}
    return [b["callback_data"] for row in markup.get("inline_keyboard", []) for b in row]


async def wait(stack: Stack, predicate: object, seconds: float = 60) -> None:
    with trio.fail_after(seconds):
        await stack.telegram.wait_until(predicate)  # type: ignore[arg-type]


async def test_a_slow_answer_streams_into_a_draft_without_a_single_429(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        await say(stack, "[[slow:8]]", expect="tick 8")
        status = await closed_status(stack)
    drafts = [t for texts_ in stack.telegram.drafts(USER).values() for t in texts_]
    partial = {t for t in drafts if "tick 1" in t and "tick 8" not in t}
    assert len(partial) >= 2, drafts  # the person saw it grow
    assert all(re.match(r"⏳ proxy1 · 0:\d\d · ", t) for t in drafts)
    assert texts(stack)[-1] == " ".join(f"tick {i}" for i in range(1, 9))
    assert re.fullmatch(r"✅ Done · proxy1 · 0:0\d", status)
    assert stack.telegram.chat_actions(USER)  # "typing" while it worked
    assert stack.telegram.stats.too_many_requests == 0


async def test_in_a_group_the_placeholder_is_edited_at_most_every_3_s(stack: Stack) -> None:
    stack.telegram.add_chat(GROUP, chat_type="group", title="team")
    async with stack.manager() as hub, stack.proxy(hub):
        stack.telegram.push_message(GROUP, "[[slow:12]]", user_id=USER)
        await wait(stack, lambda: any("tick 12" in t for t in texts(stack, GROUP)))
    status = status_message(stack, GROUP)
    partial = [h for h in status.history if "tick 1" in h]
    assert partial, status.history
    edits = [
        r.time
        for r in stack.telegram.requests
        if r.method == "editMessageText" and r.params.get("chat_id") == GROUP
    ]
    gaps = [b - a for a, b in itertools.pairwise(edits)]
    assert all(gap >= 2.9 for gap in gaps[:-1]), gaps  # the final edit may follow sooner
    assert stack.telegram.drafts(GROUP) == {}  # no drafts in groups
    assert stack.telegram.stats.too_many_requests == 0


async def test_markdown_arrives_as_formatting(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        await say(stack, "[[markdown]]", expect="Done.")
    [answer] = [m for m in stack.telegram.messages(USER) if "Done." in (m.text or "")]
    assert "**" not in (answer.text or "")
    assert "```" not in (answer.text or "")
    kinds = {e["type"] for e in answer.entities or []}
    assert {"bold", "italic", "code", "text_link", "pre"} <= kinds
    [pre] = [e for e in answer.entities or [] if e["type"] == "pre"]
    assert pre.get("language") == "python"


async def test_slash_cancel_stops_a_long_turn(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        stack.telegram.push_message(USER, "[[slow:120]]")
        await wait(
            stack,
            lambda: any("tick 2" in t for ts in stack.telegram.drafts(USER).values() for t in ts),
        )
        started = trio.current_time()
        await say(stack, "/cancel", expect="Cancelled")
        assert trio.current_time() - started < 10
        status = await closed_status(stack)
    assert texts(stack)[-1].startswith("⏹ Cancelled.")
    assert re.match(r"⏹ Cancelled · proxy1", status)
    with trio.fail_after(10):
        await stack.model.requests[-1].wait_ended()
    assert stack.model.requests[-1].disconnected  # codex really stopped the model call


async def test_the_cancel_button_stops_the_turn(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        stack.telegram.push_message(USER, "[[slow:120]]")
        await wait(stack, lambda: any(button_data(m) for m in stack.telegram.messages(USER)))
        status = status_message(stack)
        [data] = button_data(status)
        assert len(data.encode()) <= 64
        stack.telegram.push_callback(USER, status.message_id, data)
        await wait(stack, lambda: any(t.startswith("⏹ Cancelled.") for t in texts(stack)), 20)
        assert button_data(status_message(stack)) == []  # the button is gone
        # A late press on the same button gets a toast, not an error.
        stack.telegram.push_callback(USER, status.message_id, data)
        await wait(
            stack,
            lambda: any(
                a.text == "That task has already finished." for a in stack.telegram.callback_answers
            ),
            20,
        )


async def approval_round_trip(stack: Stack, choice: str, **manager: object) -> StoredMessage:
    async with (
        stack.manager(**manager) as hub,
        stack.proxy(hub, approval_policy="untrusted", sandbox="workspace-write"),
    ):
        stack.telegram.push_message(USER, "[[shell:touch approved.txt]]")
        await wait(
            stack,
            lambda: any(
                "Codex wants to run" in (m.text or "") for m in stack.telegram.messages(USER)
            ),
        )
        [question] = [
            m for m in stack.telegram.messages(USER) if "Codex wants to run" in (m.text or "")
        ]
        assert "touch approved.txt" in (question.text or "")
        data = button_data(question)
        assert [d[-1] for d in data] == ["y", "s", "n"]
        assert all(len(d.encode()) <= 64 for d in data)
        if choice:
            # Only allowed users may decide.
            stack.telegram.push_callback(USER, question.message_id, data[0], user_id=STRANGER)
            [pick] = [d for d in data if d.endswith(choice)]
            stack.telegram.push_callback(USER, question.message_id, pick)
        await wait(
            stack,
            lambda: any(t.startswith(("Command output", "⚠️", "⏹")) for t in texts(stack)),
            90,
        )
        return stack.telegram.message(USER, question.message_id)


async def test_approve_runs_the_command(stack: Stack) -> None:
    question = await approval_round_trip(stack, "y")
    assert (stack.tmp / "work" / "approved.txt").exists()
    assert re.search(r"✅ Approved by \S+\.$", question.text or "")
    assert button_data(question) == []
    answers = [a.text for a in stack.telegram.callback_answers]
    assert "You are not allowed to do that." in answers
    assert "✅ Approved" in answers


async def test_deny_does_not_run_the_command(stack: Stack) -> None:
    question = await approval_round_trip(stack, "n")
    assert not (stack.tmp / "work" / "approved.txt").exists()
    assert re.search(r"🚫 Denied by \S+\.$", question.text or "")


async def test_an_unanswered_approval_is_denied_after_the_timeout(stack: Stack) -> None:
    question = await approval_round_trip(stack, "", approval_timeout_s=2.0)
    assert not (stack.tmp / "work" / "approved.txt").exists()
    assert (question.text or "").endswith("⌛ No answer within 2 s: denied.")


async def test_a_forced_429_is_waited_out(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        stack.telegram.fail_next("sendMessage", error_code=429, retry_after=3, times=1)
        await say(stack, "hello", expect="Echo: hello (turn 1)")
    assert stack.telegram.stats.too_many_requests == 1  # the injected one only
    assert stack.telegram.stats.early_retries == 0  # nothing sent inside the window


async def test_a_very_long_answer_also_arrives_as_a_document(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        stack.telegram.push_message(USER, "[[long:20000]]")
        await wait(stack, lambda: any(m.document for m in stack.telegram.messages(USER)))
    parts = texts(stack)
    assert all(len(p) <= 4096 for p in parts)
    assert " ".join(parts).split() == long_text(20000).split()
    [doc] = [m.document for m in stack.telegram.messages(USER) if m.document]
    assert doc.filename == "answer.md"
    assert doc.content is not None
    assert doc.content.decode() == long_text(20000)
    assert stack.telegram.stats.too_many_requests == 0


async def test_use_without_argument_offers_buttons(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        await say(stack, "/use", expect="Pick the machine")
        [offer] = [
            m
            for m in stack.telegram.messages(USER)
            if m.text == "Pick the machine (or a pool of machines by label) for this chat:"
        ]
        data, *pools = button_data(offer)
        assert re.fullmatch(r"u:[A-Za-z0-9_-]{12}:proxy1", data)
        assert [p.split(":", 2)[2] for p in pools] == ["label:linux", "auto"]
        stack.telegram.push_callback(USER, offer.message_id, data)
        await wait(stack, lambda: "This chat now uses proxy1 (online)." in texts(stack))


async def test_fifty_chats_streaming_at_once_stay_under_every_limit(stack: Stack) -> None:
    users = [USER + i for i in range(50)]
    async with (
        stack.manager(telegram_allowed_user_ids=frozenset(users)) as hub,
        stack.proxy(hub, capacity=50),
    ):
        for user in users:
            stack.telegram.push_message(user, "[[slow:6]]")
        await wait(
            stack,
            lambda: all(any("tick 6" in t for t in texts(stack, u)) for u in users),
            240,
        )
    assert stack.telegram.stats.too_many_requests == 0
    assert stack.telegram.stats.violations == 0


async def test_a_turn_over_its_time_limit_is_stopped_and_says_so(stack: Stack) -> None:
    async with stack.manager(task_timeout_s=3.0) as hub, stack.proxy(hub):
        [line] = await say(stack, "[[slow:60]]", expect="Timed out")
        status = await closed_status(stack)
    assert line.startswith("⏱ Timed out: no answer within 3 s.\n\ntick 1")
    assert re.match(r"⏱ Timed out · proxy1 · 0:0\d", status)


async def test_a_crashed_app_server_is_reported_and_replaced(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub) as proxy:
        stack.telegram.push_message(USER, "[[slow:60]]")
        await wait(
            stack,
            lambda: any("tick 1" in t for ts in stack.telegram.drafts(USER).values() for t in ts),
        )
        child = proxy._app._child
        assert child is not None
        child.process.kill()  # the codex process dies mid-turn
        new = await say(stack, "after the crash", expect="Echo: after the crash")
        assert any(
            t.startswith("⚠️ Codex failed: the Codex app-server crashed\n\ntick 1")
            for t in texts(stack)
        )
        # The new app-server resumed the same Codex thread from disk.
        assert new[-1] == "Echo: after the crash (turn 2)"
        assert proxy._app.restarts == 1


async def test_the_live_view_shows_the_running_command(stack: Stack) -> None:
    await approval_round_trip(stack, "", approval_timeout_s=3.0)
    shown = [t for ts in stack.telegram.drafts(USER).values() for t in ts]
    assert any("· running `touch approved.txt`" in t for t in shown), shown
