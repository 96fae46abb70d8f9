"""The manager's questions about this machine: models, threads, directories, files.

Each `query` and `read_file` gets exactly one answer frame, with `error` set to
one line for the chat when it cannot be done. Nothing here changes anything:
a query only looks (`model/list`, `thread/list`, `thread/read`, a directory
resolved inside allowed_roots), a read only reads (a file inside
allowed_roots, or a finished turn's diff).
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any, Final

import attrs
import trio

from codexnet.protocol import (
    MAX_CHUNK_BYTES,
    ModelInfo,
    ProtocolError,
    Query,
    QueryResult,
    ReadFile,
    ReadResult,
    ThreadInfo,
    check_frame,
    model_info_problem,
    thread_info_problem,
)
from codexnet.proxy.appserver import AppServer, AppServerUnavailable
from codexnet.proxy.jsonrpc import RpcError
from codexnet.proxy.workspace import Workspace, WorkspaceError

log = logging.getLogger(__name__)

THREADS_SHOWN: Final = 10
MODEL_PAGES: Final = 5
PREVIEW_CHARS: Final = 200
# thread/list shows only "interactive" sources by default; a thread started with
# `codex exec` in a terminal on this machine is one the person wants to see too.
SOURCE_KINDS: Final = ["cli", "vscode", "exec", "appServer"]


async def answer_query(query: Query, app: AppServer, workspace: Workspace) -> QueryResult:
    """The answer, always one the manager's decoder accepts (see `_acceptable`)."""
    return _acceptable(await _answer_query(query, app, workspace))


def _acceptable(result: QueryResult) -> QueryResult:
    """`result` without the models and threads a frame may not carry (an id of
    500 characters, say): the manager would refuse the whole frame, and with
    it the link."""
    models = [m for m in result.models if model_info_problem(m) is None]
    threads = [t for t in result.threads if thread_info_problem(t) is None]
    if len(models) < len(result.models) or len(threads) < len(result.threads):
        log.warning(
            "left out %d model(s) and %d thread(s) the protocol cannot carry",
            len(result.models) - len(models),
            len(result.threads) - len(threads),
        )
        result = attrs.evolve(result, models=models, threads=threads)
    try:
        check_frame(result)
    except ProtocolError as exc:
        log.warning("an answer the manager would refuse: %s", exc)
        return QueryResult(result.request_id, error="the machine's answer could not be sent")
    return result


async def _answer_query(query: Query, app: AppServer, workspace: Workspace) -> QueryResult:
    try:
        if query.kind == "models":
            return QueryResult(query.request_id, models=await _models(app))
        if query.kind == "threads":
            return QueryResult(query.request_id, threads=await _threads(app))
        if query.kind == "thread":
            return QueryResult(query.request_id, threads=[await _thread(app, query.arg)])
        if query.kind == "cwd":
            path = await trio.to_thread.run_sync(workspace.directory, query.arg or ".")
            return QueryResult(query.request_id, path=str(path))
    except (WorkspaceError, AppServerUnavailable) as exc:
        return QueryResult(query.request_id, error=str(exc))
    except RpcError as exc:
        return QueryResult(query.request_id, error=f"codex: {exc.message}")
    return QueryResult(query.request_id, error=f"unknown query {query.kind!r}")


async def _models(app: AppServer) -> list[ModelInfo]:
    models: list[ModelInfo] = []
    cursor = None
    for _ in range(MODEL_PAGES):
        params: dict[str, Any] = {"cursor": cursor} if cursor else {}
        result = await app.call("model/list", params)
        for raw in _list(result, "data"):
            efforts = [
                str(e["reasoningEffort"])
                for e in _list(raw, "supportedReasoningEfforts")
                if isinstance(e.get("reasoningEffort"), str)
            ]
            default = raw.get("defaultReasoningEffort")
            models.append(
                ModelInfo(
                    id=str(raw.get("id") or raw.get("model") or ""),
                    name=str(raw.get("displayName") or ""),
                    efforts=efforts,
                    default_effort=default if isinstance(default, str) else None,
                    is_default=bool(raw.get("isDefault")),
                )
            )
        cursor = result.get("nextCursor") if isinstance(result, dict) else None
        if not cursor:
            break
    return [m for m in models if m.id]


async def _threads(app: AppServer) -> list[ThreadInfo]:
    result = await app.call(
        "thread/list",
        {"limit": THREADS_SHOWN, "sortKey": "updated_at", "sourceKinds": SOURCE_KINDS},
    )
    return [_thread_info(raw) for raw in _list(result, "data") if raw.get("id")]


async def _thread(app: AppServer, thread_id: str) -> ThreadInfo:
    try:
        result = await app.call("thread/read", {"threadId": thread_id})
    except RpcError as exc:
        log.info("thread/read %s: %s", thread_id, exc.message)
        raise WorkspaceError(f"No Codex thread {thread_id} on this machine.") from None
    raw = result.get("thread") if isinstance(result, dict) else None
    if not isinstance(raw, dict):
        raise WorkspaceError(f"No Codex thread {thread_id} on this machine.")
    return _thread_info(raw)


def _thread_info(raw: dict[str, Any]) -> ThreadInfo:
    updated = raw.get("updatedAt")
    preview = " ".join(str(raw.get("name") or raw.get("preview") or "").split())
    return ThreadInfo(
        id=str(raw["id"]),
        preview=preview[:PREVIEW_CHARS],
        updated=updated if isinstance(updated, int) else int(time.time()),
        cwd=str(raw.get("cwd") or ""),
    )


def _list(value: Any, key: str) -> list[dict[str, Any]]:
    items = value.get(key) if isinstance(value, dict) else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


async def answer_read(frame: ReadFile, workspace: Workspace) -> ReadResult:
    """A chunk of a file in the allowed roots, or of a turn's diff (in a thread: disk)."""

    def read() -> ReadResult:
        if frame.kind == "diff":
            path = workspace.diff_path(frame.path)
            name = "changes.diff"
            if not path.is_file():
                raise WorkspaceError("this machine no longer has that diff")
        else:
            path = workspace.file(frame.path, frame.cwd)
            name = path.name
        data, size = workspace.read(path, frame.offset, min(frame.length, MAX_CHUNK_BYTES))
        return ReadResult(
            frame.request_id,
            offset=frame.offset,
            data=base64.b64encode(data).decode("ascii"),
            size=size,
            name=name,
        )

    try:
        return await trio.to_thread.run_sync(read)
    except WorkspaceError as exc:
        return ReadResult(frame.request_id, error=str(exc))
    except OSError as exc:
        return ReadResult(frame.request_id, error=f"cannot read {frame.path!r}: {exc.strerror}")
