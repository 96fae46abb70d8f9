"""The manager ↔ proxy wire protocol: round trips and clean rejection of bad frames."""

from __future__ import annotations

import json
from typing import get_args

import attrs
import pytest

from codexnet.protocol import (
    _CHECKS,
    MAX_CHUNK_BYTES,
    ApprovalDecision,
    ApprovalRequest,
    FileFetch,
    FilePart,
    FileRef,
    Frame,
    Hello,
    Load,
    ModelInfo,
    ProtocolError,
    Query,
    QueryResult,
    ReadFile,
    ReadResult,
    ResultAck,
    Task,
    TaskAck,
    TaskCancel,
    TaskEvent,
    TaskResult,
    ThreadInfo,
    Welcome,
    decode_manager_frame,
    decode_proxy_frame,
    encode,
    path_problem,
    too_deep,
    usable_usage,
)

PROXY_FRAMES: list[Frame] = [
    Hello("proxy1", "tok", 1, 2, ["gpu"], "codexnet 0.1", ["t1"], ["t0"]),
    TaskAck("t1"),
    TaskEvent("t1", 3, "delta", "Hel"),
    ApprovalRequest("t1", "a1", "command", "rm -rf build", "in /srv"),
    TaskResult("t1", "completed", "Hello", "thread-1", None, {"totalTokens": 15}),
    Load(1, 2),
    Hello("proxy1", "tok", 3, 1, workdir="/srv/app"),
    TaskResult("t1", "completed", "Done", "thread-1", diff_bytes=120),
    FileFetch("t1", 0, 524288, 524288),
    QueryResult(
        "q1",
        models=[ModelInfo("gpt-5.5", "GPT-5.5", ["low", "high"], "low", True)],
        threads=[ThreadInfo("01a20ae8-d49d-77e1-a254-5123c20b0a9b", "hello\nthere", 1700, "/srv")],
        path="/srv/app/sub",
    ),
    QueryResult("q2", error="'..' is outside the allowed directories"),
    ReadResult("r1", 0, "aGk=", 2, "notes\n.txt"),
]
MANAGER_FRAMES: list[Frame] = [
    Welcome(),
    Task("t1", 42, "hello", None, 60.0),
    Task("t2", 42, "again", "thread-1"),
    TaskCancel("t1"),
    ApprovalDecision("t1", "a1", "acceptForSession"),
    ResultAck("t1"),
    Task(
        "t3",
        -100123,
        "look",
        model="gpt-5.5",
        effort="high",
        cwd="/srv/app",
        files=[FileRef(0, "../../evil\n.sh", 3, "a" * 64), FileRef(1, "", 9, "b" * 64, "photo")],
    ),
    FilePart("t3", 1, 0, "aGk="),
    FilePart("t3", 1, 0, error="no such file"),
    Query("q1", "cwd", "../other"),
    ReadFile("r1", "notes.txt", 0, 524288, "/srv/app"),
    ReadFile("r2", "t3", kind="diff"),
]


@pytest.mark.parametrize("frame", PROXY_FRAMES, ids=lambda f: f.type)
def test_proxy_frames_round_trip(frame: object) -> None:
    assert decode_proxy_frame(encode(frame)) == frame  # type: ignore[arg-type]


@pytest.mark.parametrize("frame", MANAGER_FRAMES, ids=lambda f: f.type)
def test_manager_frames_round_trip(frame: object) -> None:
    assert decode_manager_frame(encode(frame)) == frame  # type: ignore[arg-type]


def test_frames_carry_type_tag_and_ids() -> None:
    data = json.loads(encode(TaskEvent("t9", 7, "progress", "thinking")))
    assert data == {
        "type": "task_event",
        "task_id": "t9",
        "seq": 7,
        "kind": "progress",
        "text": "thinking",
    }


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("not json", "not JSON"),
        ("[1]", "a frame must be a JSON object with a string 'type'"),
        ('{"task_id": "x"}', "a frame must be a JSON object with a string 'type'"),
        ('{"type": "launch_missiles"}', "unknown frame type 'launch_missiles'"),
        ('{"type": "task_ack"}', "bad 'task_ack' frame: required field missing @ $.task_id"),
        ('{"type": "task_ack", "task_id": "x", "x": 1}', "extra fields found"),
        (
            '{"type": "task_event", "task_id": "x", "seq": "one", "kind": "delta"}',
            "bad 'task_event' frame",
        ),
        (
            '{"type": "task_result", "task_id": "x", "status": "exploded"}',
            "bad 'task_result' frame",
        ),
        (
            '{"type": "task", "task_id": "x", "chat_id": 1, "prompt": "p"}',
            "'task' is not a proxy frame",
        ),
        (b"\x00binary", "binary frames are not part of the protocol"),
    ],
)
def test_bad_proxy_frames_are_rejected_with_one_error_type(raw: str | bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message.replace("$", r"\$").replace("(", r"\(")):
        decode_proxy_frame(raw)


def test_proxy_frames_are_not_manager_frames() -> None:
    with pytest.raises(ProtocolError, match="'hello' is not a manager frame"):
        decode_manager_frame(encode(PROXY_FRAMES[0]))


def test_oversized_frame_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_proxy_frame('{"type": "task_ack", "task_id": "' + "x" * 5_000_000 + '"}')


def test_hello_repr_hides_the_token() -> None:
    assert "tok" not in repr(Hello("p", "tok", 1, 1))


@pytest.mark.parametrize("cls", get_args(Frame), ids=lambda cls: cls.__name__)
def test_every_field_of_every_frame_is_validated(cls: type) -> None:
    fields = {f.name for f in attrs.fields(cls)} - {"type"}
    assert set(_CHECKS[cls]) == fields  # a new field must say what it may hold


@pytest.mark.parametrize(
    ("text", "deep"),
    [
        ("[" * 16 + "]" * 16, False),
        ("[" * 17 + "]" * 17, True),
        ('{"a": "' + "[" * 1000 + '"}', False),  # brackets in a string are text
        ('{"a": "\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "b": ' + "[" * 20 + "]" * 20 + "}", True),
        ("[{}]" * 10_000, False),  # many brackets, shallow
        ('{"a": "x\\\\", "b": ' + "[" * 20 + "]" * 20 + "}", True),  # an escaped backslash
        ('{"a": "\\\\\\"' + "[" * 20 + '"}', False),  # \\ then \" inside the string
    ],
)
def test_nesting_depth_is_measured_without_recursion(text: str, deep: bool) -> None:
    assert too_deep(text) is deep


def test_encode_never_sends_what_decode_refuses() -> None:
    frame = TaskResult("t1", "completed", text="a\x00b\ud800c", error="\udfff")
    decoded = decode_proxy_frame(encode(frame))
    assert isinstance(decoded, TaskResult)
    assert (decoded.text, decoded.error) == ("a\ufffdb\ufffdc", "\ufffd")


def test_values_keep_their_exact_json_type() -> None:
    with pytest.raises(ProtocolError, match=r"expected str @ \$\.task_id"):
        decode_proxy_frame('{"type": "task_ack", "task_id": 5}')
    with pytest.raises(ProtocolError, match=r"expected int @ \$\.seq"):
        decode_proxy_frame('{"type": "task_event", "task_id": "t", "seq": 1.5, "kind": "delta"}')
    with pytest.raises(ProtocolError, match=r"expected int @ \$\.seq"):
        decode_proxy_frame('{"type": "task_event", "task_id": "t", "seq": true, "kind": "delta"}')
    # An integer is a number of seconds too.
    task = decode_manager_frame('{"type": "task", "task_id": "t", "chat_id": 1, "prompt": "p", '
                                '"timeout_s": 60}')  # fmt: skip
    assert task == Task("t", 1, "p", None, 60.0)


def test_a_reason_quoting_the_peer_is_one_ascii_line() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_proxy_frame(json.dumps({"type": "task_ack", "task_id": "x", "\n\u00e9\u2028": 1}))
    assert str(info.value).isascii()
    assert str(info.value).isprintable()


def test_usable_usage_keeps_only_what_a_frame_may_carry() -> None:
    usage = {"input": 5, "neg": -1, "flag": True, "x" * 100: 1, "float": 1.5, "huge": 2**60}
    assert usable_usage(usage) == {"input": 5}


def _frame(**fields: object) -> str:
    return json.dumps(fields)


@pytest.mark.parametrize(
    ("raw", "decode", "message"),
    [
        (
            _frame(type="file_fetch", task_id="t", index=0, offset=0, length=MAX_CHUNK_BYTES + 1),
            decode_proxy_frame,
            "length: expected 1..2097152",
        ),
        (
            _frame(type="file_fetch", task_id="t", index=500, offset=0, length=1),
            decode_proxy_frame,
            "index: expected 0..99",
        ),
        (
            _frame(type="file_part", task_id="t", index=0, offset=0, data="not base64, é"),
            decode_manager_frame,
            "data: not base64",
        ),
        (
            _frame(type="query_result", request_id="q", models=[{"id": "x" * 200}]),
            decode_proxy_frame,
            r"models: \[0\]: id: longer than 128",
        ),
        (
            _frame(type="query_result", request_id="q", models=[{"id": "m", "is_default": "yes"}]),
            decode_proxy_frame,
            "bad 'query_result' frame",
        ),
        (
            _frame(type="read_result", request_id="../q"),
            decode_proxy_frame,
            "request_id: expected a request id",
        ),
        (
            _frame(type="query", request_id="q", kind="cwd", arg="a\nb"),
            decode_manager_frame,
            "arg: a path cannot contain NUL or line breaks",
        ),
        (
            _frame(type="query", request_id="q", kind="rm"),
            decode_manager_frame,
            "bad 'query' frame",
        ),
        (
            _frame(
                type="task",
                task_id="t",
                chat_id=1,
                prompt="p",
                files=[{"index": 0, "name": "a", "size": 1, "sha256": "nope"}],
            ),
            decode_manager_frame,
            r"files: \[0\]: sha256: expected a SHA-256",
        ),
        (
            _frame(type="task", task_id="t", chat_id=1, prompt="p", model="gpt 5\n"),
            decode_manager_frame,
            "model: contains a control character",
        ),
    ],
)
def test_bad_workspace_frames_name_the_field(raw: str, decode: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode(raw)  # type: ignore[operator]


def test_a_path_the_chat_names_is_checked_the_same_on_both_ends() -> None:
    assert path_problem("src/app.py") is None
    assert path_problem("") is None  # "nothing given" is each command's own answer
    assert path_problem("a\x00b") == "a path cannot contain NUL or line breaks"
    assert path_problem("a\rb") == "a path cannot contain NUL or line breaks"
    assert path_problem("x" * 1025) == "a path is at most 1024 characters"
