"""The manager ↔ proxy wire protocol: round trips and clean rejection of bad frames."""

from __future__ import annotations

import json
from typing import get_args

import attrs
import pytest

from codexnet.protocol import (
    _CHECKS,
    ApprovalDecision,
    ApprovalRequest,
    Frame,
    Hello,
    Load,
    ProtocolError,
    ResultAck,
    Task,
    TaskAck,
    TaskCancel,
    TaskEvent,
    TaskResult,
    Welcome,
    decode_manager_frame,
    decode_proxy_frame,
    encode,
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
]
MANAGER_FRAMES: list[Frame] = [
    Welcome(),
    Task("t1", 42, "hello", None, 60.0),
    Task("t2", 42, "again", "thread-1"),
    TaskCancel("t1"),
    ApprovalDecision("t1", "a1", "acceptForSession"),
    ResultAck("t1"),
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
