"""End to end: files into the chat's machine and back out again.

Fake Telegram over HTTP → manager → proxy → real codex → fake model. A
document or photo arrives with getFile and the download URL, lands under the
working directory's telegram-files/, and is named in the prompt (a photo is
also an image input the model receives); /get sends a file back; a turn that
changed files offers its diff. Everything that must be refused is one line,
nothing runs, and nothing is written outside the allowed roots.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.fakes.stack import USER, Stack, free_port, open_stack
from tests.fakes.telegram_api import MAX_DOWNLOAD_BYTES, StoredMessage

pytestmark = pytest.mark.e2e

PNG = bytes.fromhex(  # a 1×1 image Codex accepts (the model gets it as a data: URL)
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d4944415478da63fccfc0500f000485018084a98c210000000049454e44ae426082"
)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    async with open_stack(tmp_path) as stack:
        stack.telegram.add_chat(USER)
        yield stack


def work(stack: Stack) -> Path:
    return stack.tmp / "work"


def answers(stack: Stack) -> list[StoredMessage]:
    """The bot's messages in the chat, without live-view status lines."""
    return [
        m
        for m in stack.telegram.messages(USER)
        if not (m.text or "").startswith(("⏳", "✅ Done", "⚠️ Failed", "⏹", "⏱"))
    ]


async def wait_message(stack: Stack, expect: str, *, since: int) -> StoredMessage:
    """The first bot message after the first `since` whose text or caption has `expect`."""

    def found() -> list[StoredMessage]:
        return [m for m in answers(stack)[since:] if expect in (m.text or m.caption or "")]

    with trio.fail_after(60):
        await stack.telegram.wait_until(lambda: bool(found()))
    return found()[0]


async def say(stack: Stack, text: str, *, expect: str) -> str:
    since = len(answers(stack))
    stack.telegram.push_message(USER, text)
    message = await wait_message(stack, expect, since=since)
    return message.text or message.caption or ""


def outside_snapshot(stack: Stack) -> set[str]:
    """Every file under the test's directory but the working directory and the states."""
    skip = (work(stack), stack.state_dir, stack.tmp / "proxy-state", stack.tmp / "codex-home")
    return {
        str(p)
        for p in stack.tmp.rglob("*")
        if p.is_file() and not any(p.is_relative_to(s) for s in skip)
    }


async def test_a_document_lands_in_telegram_files_is_named_in_the_prompt_and_comes_back(
    stack: Stack,
) -> None:
    content = b"name,qty\nwidget,3\n" * 1000
    async with stack.manager() as hub, stack.proxy(hub):
        since = len(answers(stack))
        stack.telegram.push_document(
            USER, content, file_name="orders.csv", caption="How many widgets?"
        )
        answer = await wait_message(stack, "Echo:", since=since)
        assert (work(stack) / "telegram-files" / "orders.csv").read_bytes() == content
        assert (answer.text or "").startswith("📎 telegram-files/orders.csv\n\nEcho: How many")
        [request] = stack.model.requests
        assert request.last_user_text.startswith("How many widgets?\n\n")
        assert "telegram-files/orders.csv" in request.last_user_text
        # The same name again is never written over.
        since = len(answers(stack))
        stack.telegram.push_document(USER, b"v2", file_name="orders.csv")
        second = await wait_message(stack, "Echo:", since=since)
        assert (second.text or "").startswith("📎 telegram-files/orders-1.csv")
        assert (work(stack) / "telegram-files" / "orders.csv").read_bytes() == content
        assert stack.model.requests[-1].last_user_text.startswith("Have a look at what I sent.")
        # And back out: /get sends the file as a document.
        since = len(answers(stack))
        stack.telegram.push_message(USER, "/get telegram-files/orders.csv")
        sent = await wait_message(stack, "orders.csv from proxy1", since=since)
    assert sent.document is not None
    assert (sent.document.filename, sent.document.content) == ("orders.csv", content)
    assert not any((stack.state_dir / "files").iterdir())  # the manager let go of them
    assert not (stack.state_dir / "outgoing").exists() or not any(
        (stack.state_dir / "outgoing").iterdir()
    )


async def test_a_photo_is_an_image_input_and_an_album_is_one_prompt(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub):
        since = len(answers(stack))
        stack.telegram.push_photo(USER, PNG)
        await wait_message(stack, "Echo: Have a look at this image.", since=since)
        [request] = stack.model.requests
        assert len(request.images) == 1
        assert request.images[0].startswith("data:image/png;base64,")
        assert (work(stack) / "telegram-files" / "photo.jpg").read_bytes() == PNG
        # An album: three photos, the caption on the second, one prompt.
        since = len(answers(stack))
        for n in range(3):
            stack.telegram.push_photo(
                USER, PNG, caption="compare them" if n == 1 else None, media_group_id="trip"
            )
        answer = await wait_message(stack, "Echo: compare them", since=since)
    assert len(stack.model.requests) == 2
    album = stack.model.requests[1]
    assert len(album.images) == 3
    assert (answer.text or "").count("📎 telegram-files/photo-") == 3


async def test_files_that_cannot_be_taken_are_one_line_each_and_nothing_runs(
    stack: Stack,
) -> None:
    before = outside_snapshot(stack)
    async with stack.manager() as hub, stack.proxy(hub):
        since = len(answers(stack))
        stack.telegram.push_document(USER, b"x" * (MAX_DOWNLOAD_BYTES + 1), file_name="big.iso")
        line = (await wait_message(stack, "big.iso", since=since)).text
        assert line == (
            "big.iso is 20.0 MB; Telegram lets bots fetch files of up to 20 MB, so nothing was run."
        )
        since = len(answers(stack))
        stack.telegram.push_document(USER, b"", file_name="empty.txt")
        line = (await wait_message(stack, "empty", since=since)).text
        assert line == "empty.txt is empty; nothing was run."
        # A download that breaks off halfway, every time: one line.
        stack.telegram.cut_download_next(times=3)
        since = len(answers(stack))
        stack.telegram.push_document(USER, b"y" * 600_000, file_name="flaky.bin")
        line = (await wait_message(stack, "flaky.bin", since=since)).text or ""
        assert line.startswith("Could not fetch flaky.bin from Telegram (the download broke off")
        assert line.endswith("; nothing was run.")
        # Once is survived: it is fetched again.
        stack.telegram.cut_download_next(times=1)
        since = len(answers(stack))
        stack.telegram.push_document(USER, b"z" * 600_000, file_name="once.bin")
        await wait_message(stack, "📎 telegram-files/once.bin", since=since)
        # Hostile names are made safe, and the chat is told the name it was given.
        since = len(answers(stack))
        name = "../../" + "n" * 300 + "\n.sh"
        stack.telegram.push_document(USER, b"#!/bin/sh\n", file_name=name)
        answer = (await wait_message(stack, "📎", since=since)).text or ""
        [saved] = [p for p in (work(stack) / "telegram-files").iterdir() if p.name.startswith("_")]
        assert answer.startswith(f"📎 telegram-files/{saved.name} (sent as ")
        assert len(saved.name) <= 120
        # The conversation went on as if the refused ones never came.
        assert [r.last_user_text.split("\n")[0] for r in stack.model.requests] == [
            "Have a look at what I sent.",
            "Have a look at what I sent.",
        ]
        assert (await say(stack, "still here?", expect="Echo: still here?")).endswith("(turn 3)")
    assert outside_snapshot(stack) == before
    assert not (work(stack) / "telegram-files" / "flaky.bin").exists()


async def test_get_refuses_paths_outside_the_allowed_roots_and_big_files(stack: Stack) -> None:
    outside = stack.tmp / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    work(stack).mkdir(exist_ok=True)
    (work(stack) / "link").symlink_to(outside)
    with (work(stack) / "huge.bin").open("wb") as f:
        f.truncate(51 * 1024 * 1024)  # sparse: 51 MB that costs nothing
    async with stack.manager() as hub, stack.proxy(hub):
        line = await say(stack, "/get ../outside/secret.txt", expect="outside")
        assert line.startswith("'../outside/secret.txt' is outside the allowed directories (")
        line = await say(stack, "/get link/secret.txt", expect="outside")
        assert line.startswith("'link/secret.txt' is outside the allowed directories")
        line = await say(stack, f"/get {outside}/secret.txt", expect="outside")
        assert "is outside the allowed directories" in line
        line = await say(stack, "/get nothing.txt", expect="exist")
        assert line == "'nothing.txt' does not exist"
        line = await say(stack, "/get huge.bin", expect="huge.bin")
        assert line == "huge.bin is 51.0 MB; Telegram bots can send files of up to 50.0 MB."
        line = await say(stack, "/get", expect="Usage")
        assert line.startswith("Usage: /get <path>")
    assert not any(m.document for m in stack.telegram.messages(USER))


async def test_a_turn_that_changed_files_offers_its_diff(stack: Stack) -> None:
    async with stack.manager() as hub, stack.proxy(hub, sandbox="workspace-write"):
        since = len(answers(stack))
        stack.telegram.push_message(USER, "[[addfile:notes.md]]")
        answer = await wait_message(stack, "Added notes.md", since=since)
        assert (work(stack) / "notes.md").read_text() == "hello from the model\n"
        markup = next(
            m.reply_markup
            for m in stack.telegram.messages(USER)
            if m.reply_markup and "Diff" in str(m.reply_markup)
        )
        [[button]] = markup["inline_keyboard"]
        holder = next(m for m in stack.telegram.messages(USER) if m.reply_markup == markup)
        assert holder.message_id in (answer.message_id, answer.message_id - 1)
        since = len(answers(stack))
        stack.telegram.push_callback(USER, holder.message_id, button["callback_data"])
        sent = await wait_message(stack, "What the turn changed", since=since)
        # A plain answer has no such button.
        await say(stack, "just talk", expect="Echo: just talk")
    assert sent.document is not None
    assert sent.document.filename == "changes.diff"
    diff = (sent.document.content or b"").decode()
    assert "+++ b/notes.md" in diff
    assert "+hello from the model" in diff
    assert sum("Diff" in str(m.reply_markup) for m in stack.telegram.messages(USER)) == 1


async def test_a_file_is_journalled_with_its_task_across_a_manager_restart(stack: Stack) -> None:
    listen = ("127.0.0.1", free_port())
    async with stack.manager(manager_ws_listen=listen, proxy_wait_s=120):
        stack.telegram.push_document(USER, b"kept\n" * 5000, file_name="kept.txt")
        db = stack.state_dir / "codexnet.db"
        with trio.fail_after(30):
            while not _stored(db):  # noqa: ASYNC110 - another process's database
                await trio.sleep(0.05)
    # The manager went down with the file fetched and the task queued: no proxy yet.
    assert [p.name for p in (stack.state_dir / "files").iterdir()]
    async with stack.manager(manager_ws_listen=listen) as hub, stack.proxy(hub):
        await wait_message(stack, "📎 telegram-files/kept.txt", since=0)
    assert (work(stack) / "telegram-files" / "kept.txt").read_bytes() == b"kept\n" * 5000
    assert len(stack.telegram.calls("downloadFile")) == 1  # fetched from Telegram once
    assert len(stack.model.requests) == 1


def _stored(db: Path) -> bool:
    if not db.exists():
        return False
    with sqlite3.connect(db) as conn:
        try:
            rows = conn.execute("SELECT sha256 FROM attachments").fetchall()
        except sqlite3.OperationalError:
            return False
    return bool(rows) and all(sha for (sha,) in rows)
