"""Questions to a machine, and the files its tasks fetch from the manager.

* `query`: one `query` frame, one `query_result` (models, threads, a thread, a
  directory). A reply, not a task: nothing is journalled. It waits at most
  `ANSWER_TIMEOUT_S`; a question to a machine that reconnects meanwhile is
  asked again on the new link.
* `read_to_file`: a file on the machine (or a turn's diff) pulled with
  `read_file` frames, a few chunks in flight, each written where it belongs in
  a file under `state_dir/outgoing/` — a 50 MB file never sits in memory.
* `on_file_fetch`: a proxy asks for a chunk of one of its task's files (the
  dispatcher has checked that the task is that proxy's); it is read from disk
  and sent as a `file_part`.

Answers are matched by request id and accepted only from the machine asked.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import uuid
from pathlib import Path
from typing import Final, Literal

import attrs
import trio

from codexnet.manager.files import Files, megabytes
from codexnet.manager.hub import Hub, ProxyConn
from codexnet.manager.store import TaskRecord
from codexnet.protocol import (
    CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    FileFetch,
    FilePart,
    ManagerFrame,
    ProtocolError,
    Query,
    QueryKind,
    QueryResult,
    ReadFile,
    ReadResult,
    check_frame,
    path_problem,
)

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S: Final = 30.0
READ_WINDOW: Final = 4  # chunks of a /get in flight


class MachineProblem(Exception):
    """The machine cannot answer, or says no; the message is one line for the chat."""


@attrs.define(eq=False)
class _Pending:
    proxy_id: str
    frame: ManagerFrame
    done: trio.Event = attrs.Factory(trio.Event)
    answer: QueryResult | ReadResult | None = None


class MachineRequests:
    def __init__(self, hub: Hub, files: Files) -> None:
        self._hub = hub
        self._files = files
        self._pending: dict[str, _Pending] = {}
        self.nursery: trio.Nursery | None = None  # for questions asked again on a new link

    # ------------------------------------------------------------------ asking

    async def _ask(self, proxy_id: str, frame: Query | ReadFile) -> QueryResult | ReadResult:
        if proxy_id not in self._hub.online:
            raise MachineProblem(f"{proxy_id} is offline right now; try again when it is back.")
        try:
            check_frame(frame)  # what the proxy would refuse is not sent
        except ProtocolError as exc:
            raise MachineProblem(str(exc)) from None
        pending = _Pending(proxy_id, frame)
        self._pending[frame.request_id] = pending
        try:
            await self._hub.send(proxy_id, frame)
            with trio.move_on_after(ANSWER_TIMEOUT_S):
                await pending.done.wait()
        finally:
            del self._pending[frame.request_id]
        if pending.answer is None:
            raise MachineProblem(f"No answer from {proxy_id} within {ANSWER_TIMEOUT_S:.0f} s.")
        return pending.answer

    async def query(self, proxy_id: str, kind: QueryKind, arg: str = "") -> QueryResult:
        """Ask `proxy_id`; its answer (raises `MachineProblem`, also for its error)."""
        problem = path_problem(arg)  # a directory, or a thread id
        if problem is not None:
            raise MachineProblem(problem)
        answer = await self._ask(proxy_id, Query(uuid.uuid4().hex, kind, arg))
        assert isinstance(answer, QueryResult)
        if answer.error is not None:
            raise MachineProblem(answer.error)
        return answer

    async def _read(
        self, proxy_id: str, path: str, cwd: str | None, kind: Literal["file", "diff"], offset: int
    ) -> ReadResult:
        problem = path_problem(path)
        if problem is not None:
            raise MachineProblem(problem)
        frame = ReadFile(uuid.uuid4().hex, path, offset, CHUNK_BYTES, cwd, kind)
        answer = await self._ask(proxy_id, frame)
        assert isinstance(answer, ReadResult)
        if answer.error is not None:
            raise MachineProblem(answer.error)
        return answer

    async def read_to_file(
        self,
        proxy_id: str,
        path: str,
        *,
        cwd: str | None,
        kind: Literal["file", "diff"] = "file",
        max_bytes: int,
    ) -> tuple[Path, str]:
        """Pull a file from the machine to a file of ours; (our path, its name).

        Raises `MachineProblem`: outside allowed_roots, missing, over `max_bytes`,
        empty, changed while it was read, the machine gone. The caller removes
        the file.
        """
        first = await self._read(proxy_id, path, cwd, kind, 0)
        size, name = first.size, first.name or "file"
        if size > max_bytes:
            raise MachineProblem(
                f"{name} is {megabytes(size)}; Telegram bots can send files of up to "
                f"{megabytes(max_bytes)}."
            )
        if size == 0:
            raise MachineProblem(f"{name} is empty; there is nothing to send.")
        dest = await trio.to_thread.run_sync(self._files.outgoing)
        fd = await trio.to_thread.run_sync(
            os.open, dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
        )
        try:
            await self._put(fd, first, size)
            offsets = list(range(CHUNK_BYTES, size, CHUNK_BYTES))

            async def worker() -> None:
                while offsets:
                    offset = offsets.pop(0)
                    await self._put(fd, await self._read(proxy_id, path, cwd, kind, offset), size)

            async with trio.open_nursery() as nursery:
                for _ in range(READ_WINDOW):
                    nursery.start_soon(worker)
        except BaseException:
            await trio.to_thread.run_sync(dest.unlink)
            raise
        finally:
            await trio.to_thread.run_sync(os.close, fd)
        return dest, name

    @staticmethod
    async def _put(fd: int, chunk: ReadResult, size: int) -> None:
        try:
            data = base64.b64decode(chunk.data, validate=True)
        except binascii.Error:
            raise MachineProblem("the machine sent a damaged part of the file") from None
        expected = min(CHUNK_BYTES, size - chunk.offset)
        if len(data) != expected:
            raise MachineProblem("the file changed while it was being read; try again")
        await trio.to_thread.run_sync(os.pwrite, fd, data, chunk.offset)

    # ------------------------------------------------------------------ hub events

    def on_reply(self, conn: ProxyConn, frame: QueryResult | ReadResult) -> None:
        pending = self._pending.get(frame.request_id)
        if pending is None or pending.proxy_id != conn.proxy_id:
            log.debug("%s %s not awaited from %r", frame.type, frame.request_id, conn.proxy_id)
            return
        pending.answer = frame
        pending.done.set()

    def on_online(self, proxy_id: str) -> None:
        """A machine (re)connected: what was asked on its old link is asked again."""
        for pending in list(self._pending.values()):
            if pending.proxy_id == proxy_id and not pending.done.is_set():
                frame = pending.frame

                async def resend(frame: ManagerFrame = frame) -> None:
                    await self._hub.send(proxy_id, frame)

                assert self.nursery is not None
                self.nursery.start_soon(resend)

    async def on_file_fetch(self, conn: ProxyConn, task: TaskRecord, frame: FileFetch) -> None:
        """A chunk of one of the task's files, from our disk (the proxy owns the task)."""
        attachment = next((a for a in task.files if a.index == frame.index), None)
        if attachment is None or attachment.sha256 is None:
            await conn.send(
                FilePart(frame.task_id, frame.index, frame.offset, error="no such file")
            )
            return
        path = self._files.path(task.task_id, attachment.index)
        length = max(0, min(frame.length, MAX_CHUNK_BYTES, attachment.size - frame.offset))

        def read() -> bytes:
            with path.open("rb") as f:
                f.seek(max(0, frame.offset))
                return f.read(length)

        try:
            data = await trio.to_thread.run_sync(read)
        except OSError as exc:
            log.error("task %s: its file %s is gone: %s", task.task_id, path, exc.strerror)
            await conn.send(
                FilePart(
                    frame.task_id,
                    frame.index,
                    frame.offset,
                    error="the manager no longer has this file",
                )
            )
            return
        await conn.send(
            FilePart(frame.task_id, frame.index, frame.offset, base64.b64encode(data).decode())
        )
