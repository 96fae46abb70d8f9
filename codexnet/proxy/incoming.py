"""Fetch a task's files from the manager into the staging area, chunk by chunk.

The proxy pulls (`file_fetch` → `file_part`): it asks for at most
`WINDOW` chunks ahead of what it has written, so neither side ever holds more
than a few chunks of a 20 MB file in memory. Each part is appended to
`state_dir/incoming/<task>/<index>` as it arrives; the file on disk *is* the
progress, so after a reconnect — or a restart of the proxy — it asks again
from where the file ends. A part that is not the next one (a repeat, or one
asked for on a link that has since broken) is dropped. When the last byte is
in, the SHA-256 the manager computed must match, or the file is refetched
from the start once and then reported damaged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import attrs
import trio

from codexnet.events import wait_first
from codexnet.protocol import CHUNK_BYTES, FileFetch, FilePart, FileRef, ProxyFrame, Task
from codexnet.proxy.workspace import Workspace

log = logging.getLogger(__name__)

WINDOW: Final = 4  # chunks asked for ahead of what is written
STALL_S: Final = 30.0  # nothing new for this long while asked: ask again


class FetchFailed(Exception):
    """A file of the task could not be fetched; the message is one line for the chat."""


@attrs.define(eq=False)
class _Fetch:
    ref: FileRef
    write: Callable[[bytes], Awaitable[object]]
    received: int
    requested: int
    sha: hashlib._Hash
    error: str | None = None
    changed: trio.Event = attrs.Factory(trio.Event)

    def poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Incoming:
    def __init__(self, workspace: Workspace, send: Callable[[ProxyFrame], Awaitable[bool]]) -> None:
        self._workspace = workspace
        self._send = send
        self._active: dict[tuple[str, int], _Fetch] = {}

    async def fetch(self, task: Task, cancel: trio.Event) -> list[Path] | None:
        """Every file of `task`, staged; None if cancelled meanwhile. Raises `FetchFailed`."""
        paths = []
        for ref in task.files:
            path = self._workspace.staging(task.task_id, ref.index)
            for attempt in range(2):
                digest = await self._fetch_one(task.task_id, ref, path, cancel)
                if digest is None:
                    return None
                if digest == ref.sha256:
                    break
                path.unlink(missing_ok=True)
                if attempt:
                    raise FetchFailed(f"{ref.name} arrived damaged twice; nothing was run")
                log.warning("task %s: %s arrived damaged; fetching again", task.task_id, ref.name)
            paths.append(path)
        return paths

    async def _fetch_one(
        self, task_id: str, ref: FileRef, path: Path, cancel: trio.Event
    ) -> str | None:
        """Fetch what the staged file lacks; its SHA-256 (None if cancelled)."""
        await trio.to_thread.run_sync(lambda: path.parent.mkdir(parents=True, exist_ok=True))
        have = await trio.to_thread.run_sync(_size, path)
        if have > ref.size:  # not this file: start over
            await trio.to_thread.run_sync(path.unlink)
            have = 0
        sha = await trio.to_thread.run_sync(_hasher, path)
        async with await trio.open_file(path, "ab") as handle:
            fetch = _Fetch(ref, handle.write, have, have, sha)
            key = (task_id, ref.index)
            self._active[key] = fetch
            try:
                while fetch.received < ref.size:
                    # Taken before asking: a part may arrive while a request is sent.
                    changed = fetch.changed
                    await self._ask(task_id, fetch)
                    with trio.move_on_after(STALL_S) as stall:
                        await wait_first(changed, cancel)
                    if cancel.is_set():
                        return None
                    if fetch.error is not None:
                        raise FetchFailed(f"could not get {ref.name}: {fetch.error}")
                    if stall.cancelled_caught:
                        fetch.requested = fetch.received  # lost on the way: ask again
            finally:
                del self._active[key]
            await handle.flush()
        return fetch.sha.hexdigest()

    async def _ask(self, task_id: str, fetch: _Fetch) -> None:
        limit = min(fetch.ref.size, fetch.received + WINDOW * CHUNK_BYTES)
        while fetch.requested < limit:
            length = min(CHUNK_BYTES, fetch.ref.size - fetch.requested)
            frame = FileFetch(task_id, fetch.ref.index, fetch.requested, length)
            if not await self._send(frame):
                return  # offline: asked again after the reconnect
            fetch.requested += length

    async def on_part(self, part: FilePart) -> None:
        """A chunk from the manager: appended if it is the next one."""
        fetch = self._active.get((part.task_id, part.index))
        if fetch is None:
            return
        if part.error is not None:
            fetch.error = part.error
            fetch.poke()
            return
        if part.offset != fetch.received:
            return  # a repeat, or asked for on a link that broke since
        try:
            data = base64.b64decode(part.data, validate=True)
        except binascii.Error:
            data = b""
        if not data or fetch.received + len(data) > fetch.ref.size:
            fetch.error = "the manager sent a bad part"
            fetch.poke()
            return
        await fetch.write(data)
        fetch.sha.update(data)
        fetch.received += len(data)
        fetch.poke()

    def resume(self) -> None:
        """After a reconnect: what was asked on the old link is asked again."""
        for fetch in self._active.values():
            fetch.requested = fetch.received
            fetch.poke()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _hasher(path: Path) -> hashlib._Hash:
    sha = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1024 * 1024):
                sha.update(chunk)
    except FileNotFoundError:
        pass
    return sha


def prompt_with_files(prompt: str, placed: list[tuple[FileRef, Path, bool]], cwd: Path) -> str:
    """The prompt Codex gets: the caption (or a default one) and where the files are.

    `placed`: each file, where it was written, and whether its name was changed.
    """
    names = [_relative(path, cwd) for _, path, _ in placed]
    if not prompt.strip():
        photos = all(ref.kind == "photo" for ref, _, _ in placed)
        many = len(placed) > 1
        what = ("these images" if many else "this image") if photos else "what I sent"
        prompt = f"Have a look at {what}."
    listing = ", ".join(names)
    return f"{prompt}\n\n(Sent with this message and saved in the working directory: {listing})"


def files_notice(placed: list[tuple[FileRef, Path, bool]], cwd: Path) -> str:
    """One line per file for the chat: where it went, and its name as sent if changed."""
    lines = []
    for ref, path, changed in placed:
        line = f"📎 {_relative(path, cwd)}"
        if changed or path.name != (ref.name or path.name):
            shown = ref.name if len(ref.name) <= 60 else ref.name[:57] + "..."
            line += f" (sent as {shown!r})"
        lines.append(line)
    return "\n".join(lines)


def _relative(path: Path, cwd: Path) -> str:
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)
