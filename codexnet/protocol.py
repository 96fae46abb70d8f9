"""The manager ↔ proxy wire protocol: JSON text frames with a `type` tag.

Every frame is a frozen attrs class; one private cattrs converter encodes and
decodes them. Decoding is strict (unknown fields and unknown types are errors)
because both ends are ours: a mismatch means a version skew or a bug and must
be loud. All decode failures become one `ProtocolError` at this boundary —
cattrs raises exception groups, which must never reach a nursery.

The other end may also be hostile or broken, so decoding is where bad input
stops (docs/SECURITY.md): nesting deeper than `MAX_DEPTH` is refused before
`json.loads` sees it (measured without recursion: a 100 000-deep frame made
the parser raise RecursionError, which ended the proxy), NaN and Infinity are
not numbers, every value has its exact JSON type (no `"5"` for 5), every
number is finite and in range, ids are short and of a safe alphabet, and no
string holds NUL or a lone surrogate (either breaks the UTF-8 that SQLite and
Telegram need later). What the decoder
rejects, `encode` never produces from our own text: it replaces NUL and lone
surrogates with U+FFFD, so one odd answer cannot make a frame that its
receiver refuses on every reconnect.

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

import itertools
import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal, get_args

import attrs
import cattrs
from cattrs.strategies import configure_tagged_union

PROTOCOL_VERSION: Final = 3
# Heartbeats. The proxy pings when this share of `heartbeat_timeout_s` has gone
# by since its last ping (jittered down to 85 % of it, so a fleet spreads out):
# the pong has the rest of the timeout to come back before either end calls
# the link dead. Each ping is a wake-up at the hub: at 5 000 proxies a ping
# every third of the timeout (500 a second) cost 8 % of a core.
PROXY_PING_FRACTION: Final = 0.5
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

# What a well-formed frame can hold (docs/SECURITY.md). Our frames nest three
# deep (frame → usage → value), so 16 is generous.
MAX_DEPTH: Final = 16
MAX_ID_CHARS: Final = 128  # task, approval and thread ids
MAX_TOKEN_CHARS: Final = 1024
MAX_VERSION_CHARS: Final = 200
MAX_HEALTH_CHARS: Final = 200  # the proxy cuts its app-server error to this
MAX_KIND_CHARS: Final = 64
MAX_LABEL_CHARS: Final = 64
MAX_LABELS: Final = 32
MAX_LISTED_TASKS: Final = 100_000  # a hello's running/finished lists
MAX_USAGE_KEYS: Final = 64
MAX_CAPACITY: Final = 1000
MAX_COUNT: Final = 2**53  # JSON's exact integers
MAX_TIMEOUT_S: Final = 7 * 86400.0  # a week; a task's timeout is at most that
# The workspace's frames.
MAX_PATH_CHARS: Final = 1024  # a path the chat names (/get, /cd)
MAX_DIR_CHARS: Final = 4096  # a directory the machine reports (PATH_MAX)
MAX_FILE_NAME_CHARS: Final = 1024  # a name as the person's app sent it (the proxy makes it safe)
MAX_FILES: Final = 100  # files with one prompt (an album has at most 10)
MAX_MODEL_CHARS: Final = 128
MAX_MODELS: Final = 1000
MAX_THREADS: Final = 1000
MAX_ERROR_CHARS: Final = 2000  # one line for the chat
MAX_DATA_CHARS: Final = (MAX_CHUNK_BYTES + 2) // 3 * 4  # base64 of the largest chunk
SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The setup wizard's alphabet for proxy ids (they also name state directories).
PROXY_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
PROXY_ID_ALPHABET: Final = "_ . -"
ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")  # MAX_ID_CHARS
# NUL and lone surrogates (a Python str holds a surrogate only when it is lone).
_UNSAFE_CHAR: Final = re.compile("[\x00\ud800-\udfff]")
# C0, DEL, C1 and the Unicode line and paragraph separators.
CONTROL_CHAR: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


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


# Exact JSON types: cattrs alone would turn 5 into "5", "5" into 5 and 2.7 into 2.
def _structure_str(value: Any, _: type) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string")
    return value


def _structure_int(value: Any, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError("expected an integer")
    return value


def _structure_bool(value: Any, _: type) -> bool:
    if not isinstance(value, bool):
        raise TypeError("expected true or false")
    return value


def _structure_float(value: Any, _: type) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("expected a number")
    if isinstance(value, int) and abs(value) > MAX_COUNT:
        raise ValueError("number out of range")
    return float(value)


def unsafe(text: str) -> bool:
    """True if `text` holds NUL or a lone surrogate.

    Without a regex over the whole text (~6 ns a character, 0.6 ms for a
    100 kB answer): an ASCII string cannot hold a surrogate, and UTF-8
    encoding (C speed) fails on one.
    """
    if "\x00" in text:
        return True
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def scrub(text: str) -> str:
    """`text` with NUL and lone surrogates replaced by U+FFFD (a no-op for sane text)."""
    return _UNSAFE_CHAR.sub("\ufffd", text) if unsafe(text) else text


_converter = cattrs.Converter(forbid_extra_keys=True)
# Registered before the union, whose per-class functions are made with these.
_converter.register_structure_hook(str, _structure_str)
_converter.register_structure_hook(int, _structure_int)
_converter.register_structure_hook(float, _structure_float)
_converter.register_structure_hook(bool, _structure_bool)
_converter.register_unstructure_hook(str, scrub)
configure_tagged_union(
    Frame,
    _converter,
    tag_name="type",
    tag_generator=lambda cls: attrs.fields(cls).type.default,
)


_TYPES: Final = frozenset(attrs.fields(cls).type.default for cls in get_args(Frame))


def encode(frame: Frame) -> str:
    return json.dumps(_converter.unstructure(frame, Frame), separators=(",", ":"))


# ----------------------------------------------------------------------- validation


def too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """True if JSON `text` nests arrays/objects deeper than `limit`, found without recursion.

    Brackets inside strings do not count. Almost every frame has fewer
    brackets than `limit` in all and is answered by two `count`s; the rest
    (code in an answer) by string methods at C speed: drop the escaped
    backslashes and quotes, split at the quotes, keep what lies outside.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    if '\\"' in text:  # escaped quotes (and the escaped backslashes before a quote)
        text = text.replace("\\\\", "").replace('\\"', "")
    outside = "".join(text.split('"')[::2])
    if outside.count("[") + outside.count("{") <= limit:
        return False
    brackets = _NOT_BRACKET.sub("", outside)
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets))) > limit


_NOT_BRACKET: Final = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP: Final = {"[": 1, "{": 1, "]": -1, "}": -1}


def _reject_constant(name: str) -> float:
    raise ProtocolError(f"{name} is not a number the protocol allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ProtocolError(f"number {_show(text)} is out of range")
    return value


# Made once: `json.loads(raw, parse_float=...)` would build a decoder per frame.
_JSON: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _show(value: object, limit: int = 40) -> str:
    """A peer's value for an error message: short, one line, ASCII."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text.encode("ascii", "backslashreplace").decode("ascii")


# A check returns what is wrong with a value, or None.
Check = Callable[[Any], str | None]


def _text(value: str) -> str | None:
    if unsafe(value):
        return "contains NUL or a lone surrogate"
    return None


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _short_text(limit: int, *, controls: bool) -> Check:
    def check(value: str) -> str | None:
        if len(value) > limit:
            return f"longer than {limit} characters ({len(value)})"
        if not controls and CONTROL_CHAR.search(value):
            return "contains a control character"
        return _text(value)

    return check


def _identifier(pattern: re.Pattern[str], limit: int, alphabet: str) -> Check:
    def check(value: str) -> str | None:
        if pattern.fullmatch(value) is None:
            if len(value) > limit:
                return f"longer than {limit} characters ({len(value)})"
            return (
                f"expected 1-{limit} letters, digits or {alphabet}, starting with a letter"
                f" or digit; got {_show(value)}"
            )
        return None

    return check


def _integer(low: int, high: int) -> Check:
    def check(value: int) -> str | None:
        if not low <= value <= high:
            return f"expected {low}..{high}, got {_show(value)}"
        return None

    return check


def _seconds(value: float) -> str | None:
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S):
        return f"expected seconds in (0, {MAX_TIMEOUT_S:g}], got {_show(value)}"
    return None


def _each(check: Check, most: int) -> Check:
    def check_all(values: list[Any]) -> str | None:
        if len(values) > most:
            return f"more than {most} entries ({len(values)})"
        for index, value in enumerate(values):
            problem = check(value)
            if problem is not None:
                return f"[{index}]: {problem}"
        return None

    return check_all


def usable_usage(usage: Mapping[str, Any]) -> dict[str, int]:
    """The entries of a token-usage map that a frame may carry (statistics: drop the rest)."""
    return {
        key: value
        for key, value in usage.items()
        if isinstance(key, str)
        and isinstance(value, int)
        and not isinstance(value, bool)
        and _KIND(key) is None
        and _COUNT(value) is None
    }


def _usage(values: Mapping[str, int]) -> str | None:
    if len(values) > MAX_USAGE_KEYS:
        return f"more than {MAX_USAGE_KEYS} entries ({len(values)})"
    for key, value in values.items():
        problem = _KIND(key) or _COUNT(value)
        if problem is not None:
            return f"[{_show(key)}]: {problem}"
    return None


def path_problem(path: str) -> str | None:
    """What is wrong with a path the chat named, for the chat; None if it may be sent.

    Both ends use it: the manager before it asks a machine (so the chat hears
    why, rather than a frame the proxy must refuse), the proxy again on arrival.
    """
    if "\0" in path or "\n" in path or "\r" in path:
        return "a path cannot contain NUL or line breaks"
    if len(path) > MAX_PATH_CHARS:
        return f"a path is at most {MAX_PATH_CHARS} characters"
    return _text(path)


def _pattern(regex: re.Pattern[str], what: str) -> Check:
    def check(value: str) -> str | None:
        if regex.fullmatch(value) is None:
            return f"expected {what}; got {_show(value)}"
        return None

    return check


def _base64(value: str) -> str | None:
    # Its alphabet is checked where it is decoded (`b64decode(validate=True)`, at
    # C speed): a regex over a 700 kB chunk here cost 1.8 ms, more than the JSON.
    if len(value) > MAX_DATA_CHARS:
        return f"longer than {MAX_DATA_CHARS} characters ({len(value)})"
    if len(value) % 4 or not value.isascii():
        return "not base64"
    return None


def _fields(cls: type, checks: Mapping[str, Check]) -> Check:
    """A nested record (a file, a model, a thread): each of its fields checked."""

    def check(value: Any) -> str | None:
        for name, field_check in checks.items():
            problem = field_check(getattr(value, name))
            if problem is not None:
                return f"{name}: {problem}"
        return None

    return check


_TASK_ID: Final = _identifier(ID_RE, MAX_ID_CHARS, "_ . : -")
_THREAD_ID: Final = _optional(_TASK_ID)
# Public: the config files hold proxy ids and labels, and must hold only what a hello may.
proxy_id_problem: Final = _identifier(PROXY_ID_RE, 64, PROXY_ID_ALPHABET)
label_problem: Final = _short_text(MAX_LABEL_CHARS, controls=False)
_KIND: Final = _short_text(MAX_KIND_CHARS, controls=False)
_COUNT: Final = _integer(0, MAX_COUNT)
_CAPACITY: Final = _integer(1, MAX_CAPACITY)
_PROTOCOL: Final = _integer(0, 2**31)
_ERROR: Final = _optional(_short_text(MAX_ERROR_CHARS, controls=True))
_REQUEST_ID: Final = _pattern(REQUEST_ID_RE, "a request id (1-64 letters, digits, _ or -)")
# A directory or file name on the machine may hold any character but NUL (it is
# shown in the chat; logging escapes it): refusing one would refuse, on every
# reconnect, the task or answer that names it.
_DIRECTORY: Final = _short_text(MAX_DIR_CHARS, controls=True)
_MODEL: Final = _short_text(MAX_MODEL_CHARS, controls=False)
_FILE_INDEX: Final = _integer(0, MAX_FILES - 1)
_CHAT_PATH: Final = path_problem
_FILE_REF: Final = _fields(
    FileRef,
    {
        "index": _FILE_INDEX,
        "name": _short_text(MAX_FILE_NAME_CHARS, controls=True),  # made safe by the proxy
        "size": _COUNT,
        "sha256": _pattern(SHA256_RE, "a SHA-256 in hex"),
        "kind": _text,  # a Literal: cattrs checked it
    },
)
model_info_problem: Final = _fields(
    ModelInfo,
    {
        "id": _MODEL,
        "name": _short_text(MAX_VERSION_CHARS, controls=False),
        "efforts": _each(_KIND, MAX_LABELS),
        "default_effort": _optional(_KIND),
        "is_default": lambda value: None,  # a bool: cattrs checked it
    },
)
thread_info_problem: Final = _fields(
    ThreadInfo,
    {
        "id": _TASK_ID,
        "preview": _short_text(1000, controls=True),  # shown in the chat, never logged
        "updated": _COUNT,
        "cwd": _short_text(MAX_DIR_CHARS, controls=True),
    },
)

# Every field of every frame (but `type`) and what it may hold; a test checks
# that none is missing, so a new field cannot skip validation.
_CHECKS: Final[dict[type, dict[str, Check]]] = {
    Hello: {
        "proxy_id": proxy_id_problem,
        "token": _short_text(MAX_TOKEN_CHARS, controls=False),
        "protocol": _PROTOCOL,
        "capacity": _CAPACITY,
        "labels": _each(label_problem, MAX_LABELS),
        # Shown and logged only (logging escapes control characters).
        "version": _short_text(MAX_VERSION_CHARS, controls=True),
        "running": _each(_TASK_ID, MAX_LISTED_TASKS),
        "finished": _each(_TASK_ID, MAX_LISTED_TASKS),
        "workdir": _DIRECTORY,
        "health": _text,  # a Literal: cattrs checked it
        "health_detail": _short_text(MAX_HEALTH_CHARS, controls=True),  # shown and logged
    },
    TaskAck: {"task_id": _TASK_ID},
    TaskEvent: {"task_id": _TASK_ID, "seq": _COUNT, "kind": _KIND, "text": _text},
    ApprovalRequest: {
        "task_id": _TASK_ID,
        "approval_id": _TASK_ID,
        "kind": _KIND,
        "summary": _text,
        "detail": _text,
    },
    TaskResult: {
        "task_id": _TASK_ID,
        "status": _text,  # a Literal: cattrs checked it
        "text": _text,
        "thread_id": _THREAD_ID,
        "error": _optional(_text),
        "usage": _usage,
        "diff_bytes": _COUNT,
    },
    CancelAck: {"task_id": _TASK_ID},
    DecisionAck: {"task_id": _TASK_ID, "approval_id": _TASK_ID},
    Load: {
        "running": _COUNT,
        "capacity": _CAPACITY,
        "health": _text,  # a Literal: cattrs checked it
        "health_detail": _short_text(MAX_HEALTH_CHARS, controls=True),
    },
    Welcome: {"protocol": _PROTOCOL},
    Task: {
        "task_id": _TASK_ID,
        "chat_id": _integer(-MAX_COUNT, MAX_COUNT),
        "prompt": _text,
        "thread_id": _THREAD_ID,
        "timeout_s": _seconds,
        "model": _optional(_MODEL),
        "effort": _optional(_KIND),
        "cwd": _optional(_DIRECTORY),
        "files": _each(_FILE_REF, MAX_FILES),
    },
    TaskCancel: {"task_id": _TASK_ID},
    ApprovalDecision: {"task_id": _TASK_ID, "approval_id": _TASK_ID, "decision": _text},
    ResultAck: {"task_id": _TASK_ID},
    # The workspace.
    FileFetch: {
        "task_id": _TASK_ID,
        "index": _FILE_INDEX,
        "offset": _COUNT,
        "length": _integer(1, MAX_CHUNK_BYTES),
    },
    FilePart: {
        "task_id": _TASK_ID,
        "index": _FILE_INDEX,
        "offset": _COUNT,
        "data": _base64,
        "error": _ERROR,
    },
    Query: {
        "request_id": _REQUEST_ID,
        "kind": _text,  # a Literal: cattrs checked it
        "arg": _CHAT_PATH,  # a directory, a thread id, or nothing
    },
    QueryResult: {
        "request_id": _REQUEST_ID,
        "error": _ERROR,
        "models": _each(model_info_problem, MAX_MODELS),
        "threads": _each(thread_info_problem, MAX_THREADS),
        "path": _DIRECTORY,
    },
    ReadFile: {
        "request_id": _REQUEST_ID,
        "path": _CHAT_PATH,  # a file, or with kind "diff" a task id
        "offset": _COUNT,
        "length": _integer(1, MAX_CHUNK_BYTES),
        "cwd": _optional(_DIRECTORY),
        "kind": _text,  # a Literal: cattrs checked it
    },
    ReadResult: {
        "request_id": _REQUEST_ID,
        "offset": _COUNT,
        "data": _base64,
        "size": _COUNT,
        "name": _short_text(MAX_FILE_NAME_CHARS, controls=True),
        "error": _ERROR,
    },
}


def check_frame(frame: Frame) -> None:
    """Raise `ProtocolError` naming the first field whose value is out of bounds."""
    for name, check in _CHECKS[type(frame)].items():
        problem = check(getattr(frame, name))
        if problem is not None:
            raise ProtocolError(f"bad {frame.type!r} frame: {name}: {problem}")


# ----------------------------------------------------------------------- decoding


def _decode(raw: str | bytes, union: Any) -> Any:
    if isinstance(raw, bytes):
        raise ProtocolError("binary frames are not part of the protocol")
    if len(raw) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(raw)} bytes exceeds {MAX_FRAME_BYTES}")
    if too_deep(raw):
        raise ProtocolError(f"nested deeper than {MAX_DEPTH} levels")
    try:
        data = _JSON.decode(raw)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"not JSON: {_ascii(str(exc))}") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError("a frame must be a JSON object with a string 'type'")
    if data["type"] not in _TYPES:
        raise ProtocolError(f"unknown frame type {_show(data['type'])}")
    try:
        frame = _converter.structure(data, union)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        raise ProtocolError(f"bad {data['type']!r} frame: {_describe(exc)}") from None
    check_frame(frame)
    return frame


def _ascii(text: str, limit: int = 300) -> str:
    """One line of ASCII, for a reason that may quote the peer (close reasons, logs)."""
    text = CONTROL_CHAR.sub(lambda m: f"\\x{ord(m[0]):02x}", text[:limit])
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        return _ascii("; ".join(cattrs.transform_error(exc)))
    return _ascii(str(exc) or type(exc).__name__)


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
