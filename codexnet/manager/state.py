"""The manager's durable state under `state_dir`: chat routing and the Telegram offset.

`sessions.json` keeps, per chat, the sticky proxy, one Codex thread id per
proxy, and the reset flag:

    {"chats": {"<chat_id>": {"proxy": "proxy1", "threads": {"proxy1": "<thread>"},
                             "reset": false}}}

`offset.json` keeps the next Telegram update id to ask for. Writes are atomic
(temp file, fsync, rename), so a crash leaves the old or the new file, never a
torn one. A corrupt file is moved aside with a clear log line and the manager
starts with empty state rather than crashing.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs
import trio

log = logging.getLogger(__name__)


@attrs.define
class ChatSession:
    proxy: str | None = None
    threads: dict[str, str] = attrs.Factory(dict)
    reset: bool = False


def write_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # fsync the directory so the rename itself survives a power cut.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_json(path: Path) -> Any:
    """The parsed file, or None when missing; a corrupt file is moved aside."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        os.replace(path, aside)
        log.error("%s is corrupt (%s); moved it to %s and starting empty", path, exc, aside)
        return None


@attrs.frozen
class JournalEntry:
    """A task sent to a proxy whose answer has not reached the chat yet."""

    task_id: str
    chat_id: int
    proxy_id: str
    started: float


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.sessions_path = state_dir / "sessions.json"
        self.offset_path = state_dir / "offset.json"
        self.journal_path = state_dir / "tasks.json"
        self._journal: dict[str, JournalEntry] = {}
        self._chats: dict[int, ChatSession] = {}
        self._offset: int | None = None
        self._lock = trio.Lock()

    def load(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        data = _read_json(self.sessions_path)
        chats = data.get("chats", {}) if isinstance(data, dict) else {}
        for key, raw in chats.items():
            try:
                self._chats[int(key)] = ChatSession(
                    proxy=raw.get("proxy"),
                    threads={str(k): str(v) for k, v in (raw.get("threads") or {}).items()},
                    reset=bool(raw.get("reset", False)),
                )
            except (ValueError, AttributeError, TypeError):
                log.error("%s: skipping malformed entry for chat %r", self.sessions_path, key)
        journal = _read_json(self.journal_path)
        for raw in journal.get("tasks", []) if isinstance(journal, dict) else []:
            try:
                entry = JournalEntry(
                    str(raw["task_id"]),
                    int(raw["chat_id"]),
                    str(raw["proxy_id"]),
                    float(raw["started"]),
                )
            except (KeyError, ValueError, TypeError):
                log.error("%s: skipping malformed entry %r", self.journal_path, raw)
                continue
            self._journal[entry.task_id] = entry
        offset = _read_json(self.offset_path)
        if isinstance(offset, dict) and isinstance(offset.get("offset"), int):
            self._offset = offset["offset"]

    @property
    def offset(self) -> int | None:
        return self._offset

    def chat(self, chat_id: int) -> ChatSession:
        return self._chats.setdefault(chat_id, ChatSession())

    async def save_sessions(self) -> None:
        data = {
            "chats": {
                str(chat_id): attrs.asdict(session) for chat_id, session in self._chats.items()
            }
        }
        async with self._lock:
            await trio.to_thread.run_sync(write_atomic, self.sessions_path, data)

    @property
    def journal(self) -> list[JournalEntry]:
        return sorted(self._journal.values(), key=lambda e: e.started)

    async def journal_add(self, entry: JournalEntry) -> None:
        """Record a task before it is sent, so a restart can still deliver its answer."""
        self._journal[entry.task_id] = entry
        await self._save_journal()

    async def journal_done(self, task_id: str) -> None:
        if self._journal.pop(task_id, None) is not None:
            await self._save_journal()

    async def _save_journal(self) -> None:
        data = {"tasks": [attrs.asdict(e) for e in self.journal]}
        async with self._lock:
            await trio.to_thread.run_sync(write_atomic, self.journal_path, data)

    async def save_offset(self, offset: int) -> None:
        if offset == self._offset:
            return
        self._offset = offset
        async with self._lock:
            await trio.to_thread.run_sync(write_atomic, self.offset_path, {"offset": offset})
