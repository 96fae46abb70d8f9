"""End to end: the conversation's model, effort, directory and thread.

Fake Telegram over HTTP → manager → proxy → real codex → fake model. What the
chat sets is asserted where it matters: in the request the model receives
(model name, reasoning effort, the cwd in the environment context, the
earlier thread's history after /resume), and in what the chat shows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.fakes.codex_env import require_codex
from tests.fakes.responses_api import RecordedRequest
from tests.fakes.stack import USER, Stack, open_stack

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path) as stack:
        stack.telegram.add_chat(USER)
        (tmp_path / "work").mkdir()
        yield stack


def texts(stack: Stack) -> list[str]:
    return [m.text or "" for m in stack.telegram.messages(USER)]


async def say(stack: Stack, text: str, *, expect: str) -> str:
    """Write `text`; the first new bot message containing `expect`."""
    since = len(texts(stack))
    stack.telegram.push_message(USER, text)
    with trio.fail_after(60):
        await stack.telegram.wait_until(lambda: any(expect in t for t in texts(stack)[since:]))
    return next(t for t in texts(stack)[since:] if expect in t)


async def ask(stack: Stack, text: str) -> RecordedRequest:
    """Send a prompt; the model's request for it, once the answer is in the chat."""
    await say(stack, text, expect=f"Echo: {text}")
    return next(r for r in reversed(stack.model.requests) if r.last_user_text == text)


async def test_model_and_effort_reach_the_model_and_bad_ones_change_nothing(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        first = await ask(stack, "before")
        assert first.body["model"] == "mock-model"  # codex's own default
        line = await say(stack, "/model gpt-6.1-sol", expect="Model")
        assert line == "Model for this conversation: gpt-6.1-sol."
        line = await say(stack, "/effort high", expect="Effort")
        assert line == "Effort for this conversation: high."
        request = await ask(stack, "with a model")
        assert (request.body["model"], request.body["reasoning"]["effort"]) == (
            "gpt-6.1-sol",
            "high",
        )
        # Refused: one line each, and the next turn runs as before.
        line = await say(stack, "/effort bogus", expect="effort")
        assert line == (
            "gpt-6.1-sol has no effort 'bogus'. Valid: low, medium, high, xhigh, max, ultra."
        )
        line = await say(stack, "/model " + "x" * 1000, expect="model name")
        assert line == "A model name is at most 128 characters (that one has 1000)."
        line = await say(stack, "/model gpt 5; rm -rf", expect="model name")
        assert (
            line == "'gpt 5; rm -rf' is not a model name (letters, digits and . _ : / @ + - only)."
        )
        request = await ask(stack, "unchanged")
        assert (request.body["model"], request.body["reasoning"]["effort"]) == (
            "gpt-6.1-sol",
            "high",
        )
        # A model the list does not know (a custom provider's) is used anyway, said so.
        line = await say(stack, "/model my-local-llm", expect="Model")
        assert line == (
            "Model for this conversation: my-local-llm. It is not in proxy1's model list; it is "
            "used anyway (a custom model provider may serve it)."
        )
        line = await say(stack, "/effort ultra", expect="effort")
        assert (
            line == "my-local-llm has no effort 'ultra'. Valid: minimal, low, medium, high, xhigh."
        )
        await say(stack, "/effort minimal", expect="Effort for this conversation: minimal.")
        request = await ask(stack, "custom")
        assert (request.body["model"], request.body["reasoning"]["effort"]) == (
            "my-local-llm",
            "minimal",
        )
        status = await say(stack, "/status", expect="Model:")
        assert "Model: my-local-llm (chosen here)" in status
        assert "Effort: minimal (chosen here)" in status
        # /model alone offers the machine's models as buttons; a press picks one.
        line = await say(stack, "/model", expect="Model: my-local-llm.")
        offer = next(m for m in stack.telegram.messages(USER) if m.text == line)
        assert offer.reply_markup is not None
        buttons = [b for row in offer.reply_markup["inline_keyboard"] for b in row]
        assert "m:gpt-6-astra" in [b["callback_data"] for b in buttons]
        since = len(texts(stack))
        stack.telegram.push_callback(USER, offer.message_id, "m:gpt-6-astra")
        with trio.fail_after(60):
            await stack.telegram.wait_until(
                lambda: any("gpt-6-astra." in t for t in texts(stack)[since:])
            )
        # Its efforts do not include the one chosen before: back to the default, said so.
        assert texts(stack)[since:] == [
            "Model for this conversation: gpt-6-astra. Effort back to the default: gpt-6-astra "
            "does not offer minimal."
        ]
        await say(stack, "/model default", expect="the machine's default")
        await say(stack, "/effort default", expect="the machine's default")
        status = await say(stack, "/status", expect="Model:")
        assert "Model: the machine's default" in status


async def test_cd_moves_the_conversation_inside_the_allowed_roots_only(stack: Stack) -> None:
    work = stack.tmp / "work"
    (work / "sub").mkdir()
    other = stack.tmp / "other"
    other.mkdir()
    async with stack.manager() as hub, stack.proxy(hub, allowed_roots=(work, other)):
        assert (await ask(stack, "at home")).cwd == str(work)
        line = await say(stack, "/cd sub", expect="Directory")
        assert line == f"Directory on proxy1: {work / 'sub'}"
        assert (await ask(stack, "in sub")).cwd == str(work / "sub")
        for bad, why in (
            ("../..", "'../..' is outside the allowed directories"),
            ("/etc", "'/etc' is outside the allowed directories"),
            ("nowhere", "'nowhere' does not exist"),
            ("a\x00b", "a path cannot contain NUL or line breaks"),
        ):
            line = await say(stack, f"/cd {bad}", expect=why.split()[-1])
            assert line.startswith(why), line
        assert (await ask(stack, "still in sub")).cwd == str(work / "sub")
        status = await say(stack, "/status", expect="Directory")
        assert f"Directory: {work / 'sub'} (chosen with /cd)" in status
        assert (
            await say(stack, "/cd", expect="Directory")
        ) == f"Directory on proxy1: {work / 'sub'}"
        # A file sent now lands in the conversation's directory.
        since = len(texts(stack))
        stack.telegram.push_document(USER, b"data", file_name="in-sub.txt")
        with trio.fail_after(60):
            await stack.telegram.wait_until(lambda: any("📎" in t for t in texts(stack)[since:]))
        assert (work / "sub" / "telegram-files" / "in-sub.txt").read_bytes() == b"data"
        # Another allowed root, by its absolute path; then back home.
        await say(stack, f"/cd {other}", expect=f"Directory on proxy1: {other}")
        assert (await ask(stack, "elsewhere")).cwd == str(other)
        await say(stack, "/cd .", expect=f"Directory on proxy1: {work}")
        status = await say(stack, "/status", expect="Directory")
        assert f"Directory: {work} (proxy1's default)" in status


async def test_threads_lists_terminal_threads_and_resume_continues_one(stack: Stack) -> None:
    work = stack.tmp / "work"
    # Someone used codex in a terminal on that machine, same CODEX_HOME.
    with trio.fail_after(60):
        terminal = await trio.run_process(
            [require_codex(), "exec", "--skip-git-repo-check", "hello from a terminal"],
            cwd=work,
            env=stack.codex_env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert terminal.returncode == 0, terminal.stderr[-2000:]
    async with stack.manager() as hub, stack.proxy(hub):
        await ask(stack, "chat one")
        status = await say(stack, "/status", expect="Codex thread")
        chat_thread = status.split("Codex thread: ")[1].split()[0]
        listing = await say(stack, "/threads", expect="Recent Codex threads")
        lines = listing.splitlines()
        terminal_line = next(line for line in lines if "hello from a terminal" in line)
        assert next(line for line in lines if "chat one" in line).endswith(
            f"{chat_thread} (this conversation)"
        )
        terminal_thread = terminal_line.split(" — ")[-1]
        offer = next(m for m in stack.telegram.messages(USER) if m.text == listing)
        assert offer.reply_markup is not None
        assert f"r:{terminal_thread}" in str(offer.reply_markup)
        # Unknown or malformed ids: one line, the conversation stays on its thread.
        unknown = "01a20ae8-d49d-77e1-a254-5123c20b0a9b"
        line = await say(stack, f"/resume {unknown}", expect="thread")
        assert line == f"No Codex thread {unknown} on this machine."
        line = await say(stack, "/resume ../../etc", expect="thread id")
        assert line == "'../../etc' is not a thread id; /threads lists them."
        assert (await ask(stack, "chat two")).user_prompts == ["chat one", "chat two"]
        # Resume the terminal's thread: the model gets its history.
        line = await say(stack, f"/resume {terminal_thread}", expect="continues")
        assert line == (
            f"This conversation now continues thread {terminal_thread} (“hello from a terminal”) "
            "on proxy1."
        )
        request = await ask(stack, "back in the chat")
        assert request.user_prompts == ["hello from a terminal", "back in the chat"]
        # And the chat's own thread by its button.
        since = len(texts(stack))
        stack.telegram.push_callback(USER, offer.message_id, f"r:{chat_thread}")
        with trio.fail_after(60):
            await stack.telegram.wait_until(
                lambda: any("continues thread" in t for t in texts(stack)[since:])
            )
        request = await ask(stack, "chat three")
        assert request.user_prompts == ["chat one", "chat two", "chat three"]


async def test_the_machine_defaults_apply_until_the_conversation_chooses(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub, model="gpt-6-sol", effort="medium"):
        request = await ask(stack, "defaults")
        assert (request.body["model"], request.body["reasoning"]["effort"]) == (
            "gpt-6-sol",
            "medium",
        )
        await say(stack, "/effort xhigh", expect="Effort for this conversation: xhigh.")
        request = await ask(stack, "chosen")
        assert (request.body["model"], request.body["reasoning"]["effort"]) == (
            "gpt-6-sol",
            "xhigh",
        )
