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
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal, get_args

import attrs
import cattrs
from cattrs.strategies import configure_tagged_union

PROTOCOL_VERSION: Final = 2
MAX_FRAME_BYTES: Final = 4 * 1024 * 1024

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
    running: int
    capacity: int
    type: Literal["load"] = "load"


# --------------------------------------------------------------------- manager → proxy


@attrs.frozen
class Welcome:
    protocol: int = PROTOCOL_VERSION
    type: Literal["welcome"] = "welcome"


@attrs.frozen
class Task:
    task_id: str
    chat_id: int
    prompt: str
    thread_id: str | None = None  # None: start a new Codex thread
    # Counted by the proxy from when it accepts the task (time queued behind
    # its capacity included), so the manager's own deadline can follow it.
    timeout_s: float = 1800.0
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


ProxyFrame = (
    Hello | TaskAck | TaskEvent | ApprovalRequest | TaskResult | CancelAck | DecisionAck | Load
)
ManagerFrame = Welcome | Task | TaskCancel | ApprovalDecision | ResultAck
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
