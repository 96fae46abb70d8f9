"""The manager ↔ proxy wire protocol: round trips and clean rejection of bad frames."""

from __future__ import annotations

import json

import pytest

from codexnet.protocol import (
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


def test_health_defaults_to_ok_for_older_proxies_and_is_checked() -> None:
    old_load = decode_proxy_frame('{"type":"load","running":1,"capacity":2}')
    assert isinstance(old_load, Load)
    assert (old_load.health, old_load.health_detail) == ("ok", "")
    old_hello = decode_proxy_frame(
        '{"type":"hello","proxy_id":"p","token":"t","protocol":3,"capacity":1}'
    )
    assert isinstance(old_hello, Hello)
    assert old_hello.health == "ok"
    sick = Load(0, 2, health="restarting", health_detail="app-server exited with code 1")
    assert decode_proxy_frame(encode(sick)) == sick
    with pytest.raises(ProtocolError, match="bad 'load' frame"):
        decode_proxy_frame('{"type":"load","running":1,"capacity":2,"health":"sleepy"}')
