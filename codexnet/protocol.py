"""The manager ↔ proxy wire protocol: JSON text frames with a `type` tag.

Every frame is a frozen attrs class; one private cattrs converter encodes and
decodes them. Decoding is strict (unknown fields and unknown types are errors)
because both ends are ours: a mismatch means a version skew or a bug and must
be loud. All decode failures become one `ProtocolError` at this boundary —
cattrs raises exception groups, which must never reach a nursery.

Delivery (docs/ARCHITECTURE.md): every frame that must arrive is sent again
until the other side acknowledges it, and its receiver applies it once:

    task              → task_ack      (task id, chosen by the manager)
    task_result       → result_ack
    task_cancel       → cancel_ack
    approval_decision → decision_ack  ((task id, approval id))

`task_event`s carry a per-task `seq`; after a reconnect the proxy sends the
whole text again as one `snapshot`. `approval_request`s are re-sent after every
reconnect while open; the manager keys them by (task id, approval id).

The workspace (files, directories, models, threads) is pulled, never pushed,
so whoever asks bounds what is in flight and asks again after a reconnect:

    file_fetch  → file_part     a task's file, chunk by chunk (proxy asks)
    read_file   → read_result   a file on the machine or a turn's diff (manager asks)
    query       → query_result  models, threads, a thread, a directory (manager asks)

A task's files are part of the task: the manager keeps their bytes (on disk)
until the task has ended, and the proxy fetches whatever it does not have yet
after every reconnect or restart. Reads and queries are replies: a lost one is
asked again or reported, never journalled.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal, get_args

import attrs
import cattrs
from cattrs.strategies import configure_tagged_union

PROTOCOL_VERSION: Final = 3
MAX_FRAME_BYTES: Final = 4 * 1024 * 1024
# Bytes of a file per file_part / read_result (base64 makes it 4/3 on the wire).
CHUNK_BYTES: Final = 512 * 1024
MAX_CHUNK_BYTES: Final = 2 * 1024 * 1024

# WebSocket close codes (4000-4999 are for applications).
CLOSE_BAD_FRAME: Final = 4400
CLOSE_UNAUTHORIZED: Final = 4401  # unknown proxy id or wrong token: one code for both
CLOSE_FOREIGN: Final = 4403  # frames for tasks of another proxy
CLOSE_UNKNOWN_PROXY: Final = 4404  # sent by earlier managers; still final for a proxy
CLOSE_HELLO_TIMEOUT: Final = 4408
CLOSE_DUPLICATE: Final = 4409  # this proxy id is connected already and answering
CLOSE_PROTOCOL_VERSION: Final = 4426
CLOSE_TRY_LATER: Final = 4429  # too many failed authentications from this address

TaskStatus = Literal["completed", "failed", "interrupted", "timeout"]
# The proxy's Codex app-server: `ok`, `starting` (not ready yet), `restarting`
# (it exited and is started again after a backoff), `failed` (it could not be
# started or did not initialize). A manager does not choose a machine that is
# not `ok` for a new conversation. Absent (older proxies): `ok`.
Health = Literal["ok", "starting", "restarting", "failed"]


class ProtocolError(Exception):
    """A frame could not be decoded or is not allowed here."""


# --------------------------------------------------------------------- proxy → manager


@attrs.frozen
class Hello:
    proxy_id: str
    token: str = attrs.field(repr=False)
    protocol: int
    capacity: int
    labels: list[str] = attrs.Factory(list)
    version: str = ""
    # Tasks this proxy still runs / holds unacknowledged results for: after a
    # reconnect the manager can tell which of its in-flight tasks survived.
    running: list[str] = attrs.Factory(list)
    finished: list[str] = attrs.Factory(list)
    workdir: str = ""  # its codex_cwd: where a conversation works unless it chose (/cd)
    health: Health = "ok"
    health_detail: str = ""  # why it is not ok (the app-server's last error), one line
    type: Literal["hello"] = "hello"


@attrs.frozen
class TaskAck:
    task_id: str
    type: Literal["task_ack"] = "task_ack"


@attrs.frozen
class TaskEvent:
    """Something happened inside a running task.

    kind `delta`: `text` is the whole answer so far (not an increment), so a
    lost or duplicated event can never corrupt the text; kind `progress`:
    `text` describes the current step; kind `thread`: `text` is the thread id.
    """

    task_id: str
    seq: int
    kind: str
    text: str = ""
    type: Literal["task_event"] = "task_event"


@attrs.frozen
class ApprovalRequest:
    task_id: str
    approval_id: str
    kind: str  # "command" | "file_change" | other server-request names
    summary: str
    detail: str = ""
    type: Literal["approval_request"] = "approval_request"


@attrs.frozen
class TaskResult:
    task_id: str
    status: TaskStatus
    text: str = ""
    thread_id: str | None = None
    error: str | None = None
    usage: dict[str, int] = attrs.Factory(dict)
    # The turn changed files: its diff (this many bytes) is kept by the proxy
    # and sent on request (`read_file` kind "diff").
    diff_bytes: int = 0
    type: Literal["task_result"] = "task_result"


@attrs.frozen
class CancelAck:
    task_id: str
    type: Literal["cancel_ack"] = "cancel_ack"


@attrs.frozen
class DecisionAck:
    task_id: str
    approval_id: str
    type: Literal["decision_ack"] = "decision_ack"


@attrs.frozen
class Load:
    """The proxy's load and health, sent whenever either changes."""

    running: int
    capacity: int
    health: Health = "ok"
    health_detail: str = ""
    type: Literal["load"] = "load"


@attrs.frozen
class FileFetch:
    """Send `length` bytes of file `index` of task `task_id` from `offset` (a `file_part`)."""

    task_id: str
    index: int
    offset: int
    length: int
    type: Literal["file_fetch"] = "file_fetch"


@attrs.frozen
class ModelInfo:
    id: str
    name: str = ""
    efforts: list[str] = attrs.Factory(list)  # reasoning efforts it advertises
    default_effort: str | None = None
    is_default: bool = False


@attrs.frozen
class ThreadInfo:
    id: str
    preview: str = ""  # usually its first prompt
    updated: int = 0  # unix time
    cwd: str = ""


@attrs.frozen
class QueryResult:
    request_id: str
    error: str | None = None  # one line for the chat
    models: list[ModelInfo] = attrs.Factory(list)
    threads: list[ThreadInfo] = attrs.Factory(list)
    path: str = ""  # kind "cwd": the directory, resolved
    type: Literal["query_result"] = "query_result"


@attrs.frozen
class ReadResult:
    request_id: str
    offset: int = 0
    data: str = ""  # base64 of the bytes from `offset`
    size: int = 0  # the whole file's size
    name: str = ""  # its file name
    error: str | None = None  # one line for the chat
    type: Literal["read_result"] = "read_result"


# --------------------------------------------------------------------- manager → proxy


@attrs.frozen
class Welcome:
    protocol: int = PROTOCOL_VERSION
    type: Literal["welcome"] = "welcome"


@attrs.frozen
class FileRef:
    """A file sent with a prompt; its bytes come with `file_fetch`."""

    index: int
    name: str  # as the person's app named it (the proxy makes it a safe file name)
    size: int
    sha256: str
    kind: Literal["document", "photo"] = "document"


@attrs.frozen
class Task:
    task_id: str
    chat_id: int
    prompt: str
    thread_id: str | None = None  # None: start a new Codex thread
    # Counted by the proxy from when it accepts the task (time queued behind
    # its capacity included), so the manager's own deadline can follow it.
    timeout_s: float = 1800.0
    model: str | None = None  # None: the proxy's default
    effort: str | None = None
    cwd: str | None = None  # None: the proxy's codex_cwd
    files: list[FileRef] = attrs.Factory(list)
    type: Literal["task"] = "task"


@attrs.frozen
class TaskCancel:
    task_id: str
    type: Literal["task_cancel"] = "task_cancel"


@attrs.frozen
class ApprovalDecision:
    task_id: str
    approval_id: str
    decision: Literal["accept", "acceptForSession", "decline", "cancel"]
    type: Literal["approval_decision"] = "approval_decision"


@attrs.frozen
class ResultAck:
    task_id: str
    type: Literal["result_ack"] = "result_ack"


@attrs.frozen
class FilePart:
    """The answer to a `file_fetch`: `data` (base64) from `offset`, or why not."""

    task_id: str
    index: int
    offset: int
    data: str = ""
    error: str | None = None
    type: Literal["file_part"] = "file_part"


QueryKind = Literal["models", "threads", "thread", "cwd"]


@attrs.frozen
class Query:
    """models: model/list; threads: the recent ones; thread: does `arg` exist;
    cwd: resolve directory `arg` (relative to codex_cwd) inside allowed_roots."""

    request_id: str
    kind: QueryKind
    arg: str = ""
    type: Literal["query"] = "query"


@attrs.frozen
class ReadFile:
    """Read `length` bytes from `offset` of `path` (relative to `cwd`, else codex_cwd),
    or with kind "diff" of the diff of task `path`; answered by `read_result`."""

    request_id: str
    path: str
    offset: int = 0
    length: int = CHUNK_BYTES
    cwd: str | None = None
    kind: Literal["file", "diff"] = "file"
    type: Literal["read_file"] = "read_file"


ProxyFrame = (
    Hello
    | TaskAck
    | TaskEvent
    | ApprovalRequest
    | TaskResult
    | CancelAck
    | DecisionAck
    | Load
    | FileFetch
    | QueryResult
    | ReadResult
)
ManagerFrame = (
    Welcome | Task | TaskCancel | ApprovalDecision | ResultAck | FilePart | Query | ReadFile
)
Frame = ProxyFrame | ManagerFrame

_converter = cattrs.Converter(forbid_extra_keys=True)
configure_tagged_union(
    Frame,
    _converter,
    tag_name="type",
    tag_generator=lambda cls: attrs.fields(cls).type.default,
)


_TYPES: Final = frozenset(attrs.fields(cls).type.default for cls in get_args(Frame))


def encode(frame: Frame) -> str:
    return json.dumps(_converter.unstructure(frame, Frame), separators=(",", ":"))


def _decode(raw: str | bytes, union: Any) -> Any:
    if isinstance(raw, bytes):
        raise ProtocolError("binary frames are not part of the protocol")
    if len(raw) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(raw)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError("a frame must be a JSON object with a string 'type'")
    if data["type"] not in _TYPES:
        raise ProtocolError(f"unknown frame type {data['type']!r}")
    try:
        return _converter.structure(data, union)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"bad {data['type']!r} frame: {_describe(exc)}") from None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return "; ".join(cattrs.transform_error(exc))
    return str(exc) or type(exc).__name__


def decode_proxy_frame(raw: str | bytes) -> ProxyFrame:
    """Decode a frame sent by a proxy; anything else is a `ProtocolError`."""
    frame = _decode(raw, Frame)
    if not isinstance(frame, ProxyFrame):
        raise ProtocolError(f"{frame.type!r} is not a proxy frame")
    return frame


def decode_manager_frame(raw: str | bytes) -> ManagerFrame:
    """Decode a frame sent by the manager; anything else is a `ProtocolError`."""
    frame = _decode(raw, Frame)
    if not isinstance(frame, ManagerFrame):
        raise ProtocolError(f"{frame.type!r} is not a manager frame")
    return frame
