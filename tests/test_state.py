"""Durable chat routing and the Telegram offset under state_dir."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from codexnet.manager.state import StateStore


async def test_sessions_and_offset_survive_a_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.load()
    chat = store.chat(42)
    chat.proxy = "proxy1"
    chat.threads["proxy1"] = "thread-a"
    await store.save_sessions()
    await store.save_offset(1007)

    again = StateStore(tmp_path)
    again.load()
    assert again.chat(42).proxy == "proxy1"
    assert again.chat(42).threads == {"proxy1": "thread-a"}
    assert again.chat(42).reset is False
    assert again.offset == 1007
    data = json.loads((tmp_path / "sessions.json").read_text())
    assert data == {
        "chats": {"42": {"proxy": "proxy1", "reset": False, "threads": {"proxy1": "thread-a"}}}
    }
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


async def test_a_corrupt_file_is_moved_aside_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "sessions.json").write_text('{"chats": {"42": ')
    (tmp_path / "offset.json").write_text("garbage")
    store = StateStore(tmp_path)
    with caplog.at_level(logging.ERROR):
        store.load()
    assert store.chat(42).proxy is None
    assert store.offset is None
    assert "sessions.json is corrupt" in caplog.text
    assert len(list(tmp_path.glob("sessions.json.corrupt-*"))) == 1
    await store.save_sessions()  # and it can write a good one again
    assert json.loads((tmp_path / "sessions.json").read_text())["chats"]["42"]["proxy"] is None


async def test_a_malformed_entry_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "sessions.json").write_text(
        json.dumps({"chats": {"x": {}, "7": {"proxy": "p", "threads": {"p": "t"}}}})
    )
    store = StateStore(tmp_path)
    store.load()
    assert store.chat(7).threads == {"p": "t"}
