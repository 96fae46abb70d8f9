"""A scripted stand-in for `codex app-server --listen stdio://`, run as a real process.

Speaks the same NDJSON dialect as codex 0.169.0 (see docs/ARCHITECTURE.md) for
the handful of methods the proxy uses. The prompt text picks the behaviour:

    crash        exit with code 3 in the middle of the turn
    approve      ask for a command approval (server request id 0, colliding
                 with our ids on purpose), answer with the decision it got
    hang         stream one delta, then wait for turn/interrupt
    fail         an `error` notification, then turn/completed status failed
    slow         one delta, 1.5 s of silence, then the echo
    pwd          "cwd: <dir>": the directory the turn runs in
    anything     echo: "Echo: <prompt>"

As codex does, a thread runs in the `cwd` its thread/start or thread/resume
named, until a turn/start names another: that one stays for later turns too.

With FAKE_APPSERVER_TURNS set, every prompt a turn starts with is appended to
that file, one per line: how often "the model" was asked. With
FAKE_APPSERVER_CALLS set, every thread method is appended to that file as
"<method> <threadId>"; a turn/start naming a directory as
"<method> <threadId> cwd=<dir>".

Threads are loaded by `thread/start` and `thread/resume`; `thread/unsubscribe`
unloads one at once and says `thread/closed` (codex 0.169.0 does so about a
minute later); `turn/start` on a thread that is not loaded fails as on an
unknown one.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def read() -> dict[str, Any] | None:
    line = sys.stdin.readline()
    if not line:
        return None
    return json.loads(line)  # type: ignore[no-any-return]


def note_call(method: str, thread_id: str, cwd: object = None) -> None:
    if os.environ.get("FAKE_APPSERVER_CALLS"):
        with open(os.environ["FAKE_APPSERVER_CALLS"], "a", encoding="utf-8") as log:
            log.write(f"{method} {thread_id}{f' cwd={cwd}' if cwd else ''}\n")


def main() -> None:
    threads: set[str] = set()  # known (on disk)
    loaded: set[str] = set()
    cwds: dict[str, str] = {}  # thread → the directory its turns run in
    print("fake app-server starting", file=sys.stderr, flush=True)
    while (message := read()) is not None:
        method, params, rid = message.get("method"), message.get("params") or {}, message.get("id")
        if isinstance(method, str) and method.startswith(("thread/", "turn/")):
            cwd = params.get("cwd") if method == "turn/start" else None
            note_call(method, str(params.get("threadId", "")), cwd)
        if method == "initialize":
            send({"id": rid, "result": {"userAgent": "codexnet/0.0-fake (test)"}})
        elif method == "initialized":
            pass
        elif method == "thread/start":
            thread_id = str(uuid.uuid4())
            threads.add(thread_id)
            loaded.add(thread_id)
            cwds[thread_id] = str(params.get("cwd") or os.getcwd())
            note_call("started", thread_id)
            send({"id": rid, "result": {"thread": {"id": thread_id, "cwd": params.get("cwd")}}})
        elif method == "thread/resume":
            if params["threadId"] in threads or params["threadId"].startswith("keep-"):
                threads.add(params["threadId"])
                loaded.add(params["threadId"])
                cwds[params["threadId"]] = str(params.get("cwd") or os.getcwd())
                send({"id": rid, "result": {"thread": {"id": params["threadId"]}}})
            else:
                send(
                    {
                        "id": rid,
                        "error": {
                            "code": -32600,
                            "message": f"thread not found: {params['threadId']}",
                        },
                    }
                )
        elif method == "thread/unsubscribe":
            if params["threadId"] in loaded:
                loaded.discard(params["threadId"])
                send({"id": rid, "result": {"status": "unsubscribed"}})
                send({"method": "thread/closed", "params": {"threadId": params["threadId"]}})
            else:
                send({"id": rid, "result": {"status": "notLoaded"}})
        elif method == "turn/start":
            if params["threadId"] in loaded:
                if params.get("cwd"):
                    cwds[params["threadId"]] = str(params["cwd"])
                run_turn(rid, params, cwds[params["threadId"]])
            else:
                error = {"code": -32600, "message": f"thread not found: {params['threadId']}"}
                send({"id": rid, "error": error})
        elif method == "turn/interrupt":
            send({"id": rid, "error": {"code": -32600, "message": "no active turn to interrupt"}})
        else:
            send({"id": rid, "error": {"code": -32600, "message": f"unknown variant `{method}`"}})


def run_turn(rid: Any, params: dict[str, Any], cwd: str) -> None:
    thread_id = params["threadId"]
    prompt = params["input"][0]["text"]
    if os.environ.get("FAKE_APPSERVER_TURNS"):
        with open(os.environ["FAKE_APPSERVER_TURNS"], "a", encoding="utf-8") as log:
            log.write(prompt + "\n")
    turn_id = str(uuid.uuid4())
    base = {"threadId": thread_id, "turnId": turn_id}
    send({"id": rid, "result": {"turn": {"id": turn_id, "status": "inProgress"}}})
    send({"method": "turn/started", "params": {"threadId": thread_id, "turn": {"id": turn_id}}})

    def say(text: str, status: str = "completed", error: Any = None) -> None:
        send(
            {
                "method": "item/started",
                "params": {**base, "item": {"type": "agentMessage", "id": "msg1", "text": ""}},
            }
        )
        for piece in (text[: len(text) // 2], text[len(text) // 2 :]):
            send(
                {
                    "method": "item/agentMessage/delta",
                    "params": {**base, "itemId": "msg1", "delta": piece},
                }
            )
        send(
            {
                "method": "item/completed",
                "params": {**base, "item": {"type": "agentMessage", "id": "msg1", "text": text}},
            }
        )
        send(
            {
                "method": "turn/completed",
                "params": {
                    "threadId": thread_id,
                    "turn": {"id": turn_id, "status": status, "error": error},
                },
            }
        )

    if prompt == "crash":
        send(
            {
                "method": "item/agentMessage/delta",
                "params": {**base, "itemId": "msg1", "delta": "about to"},
            }
        )
        sys.exit(3)
    elif prompt == "approve":
        send(
            {
                "method": "item/started",
                "params": {
                    **base,
                    "item": {
                        "type": "commandExecution",
                        "id": "call1",
                        "command": "/bin/bash -lc 'touch x'",
                        "commandActions": [{"type": "unknown", "command": "touch x"}],
                    },
                },
            }
        )
        send(
            {
                "id": 0,
                "method": "item/commandExecution/requestApproval",
                "params": {
                    **base,
                    "itemId": "call1",
                    "command": "/bin/bash -lc 'touch x'",
                    "cwd": "/w",
                    "commandActions": [{"type": "unknown", "command": "touch x"}],
                },
            }
        )
        answer = read()
        assert answer is not None
        assert answer.get("id") == 0, answer
        say(f"decision: {answer['result']['decision']}")
    elif prompt == "hang":
        send(
            {
                "method": "item/agentMessage/delta",
                "params": {**base, "itemId": "msg1", "delta": "working"},
            }
        )
        while (message := read()) is not None:
            if message.get("method") == "turn/interrupt":
                send({"id": message["id"], "result": {}})
                send(
                    {
                        "method": "turn/completed",
                        "params": {
                            "threadId": thread_id,
                            "turn": {"id": turn_id, "status": "interrupted", "error": None},
                        },
                    }
                )
                return
    elif prompt == "slow":
        send(
            {
                "method": "item/agentMessage/delta",
                "params": {**base, "itemId": "msg1", "delta": "..."},
            }
        )
        time.sleep(1.5)
        say(f"Echo: {prompt}")
    elif prompt == "fail":
        error = {
            "message": "We're currently experiencing high demand",
            "codexErrorInfo": "internalServerError",
        }
        send({"method": "error", "params": {**base, "error": error, "willRetry": False}})
        send(
            {
                "method": "turn/completed",
                "params": {
                    "threadId": thread_id,
                    "turn": {"id": turn_id, "status": "failed", "error": error},
                },
            }
        )
    elif prompt == "pwd":
        say(f"cwd: {cwd}")
    else:
        say(f"Echo: {prompt}")


if __name__ == "__main__":
    main()
