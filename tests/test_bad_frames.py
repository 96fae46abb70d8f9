"""Hostile or broken frames, both ways, at the real WebSockets (docs/SECURITY.md).

The hub gets them from `RawProxy` (a raw WebSocket client): each is refused
with close code 4400 and one WARNING line, never a traceback, and the hub goes
on serving. The proxy gets them from `FakeManager`: each is ignored with one
WARNING line; the proxy keeps its link (no exit, no reconnect) and runs the
next good task on it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from codexnet.config import ProxyEntry
from codexnet.protocol import CLOSE_BAD_FRAME, PROTOCOL_VERSION, Task, TaskAck, TaskResult
from codexnet.proxy.appserver import AppServer
from codexnet.proxy.service import ProxyService
from tests.fakes.hubrun import HubRunner, open_hub
from tests.fakes.rawmanager import FakeManager
from tests.fakes.rawproxy import raw_connection, raw_proxy
from tests.test_appserver import fake_codex, proxy_config

TOKEN = "token-of-p1-0123456789"
PROXIES = {"p1": ProxyEntry(TOKEN)}
DEEP = "[" * 100_000 + "]" * 100_000


def hello(**changes: Any) -> str:
    frame: dict[str, Any] = {
        "type": "hello",
        "proxy_id": "p1",
        "token": TOKEN,
        "protocol": PROTOCOL_VERSION,
        "capacity": 2,
    }
    frame.update(changes)
    return json.dumps(frame)


def event(**changes: Any) -> str:
    frame: dict[str, Any] = {"type": "task_event", "task_id": "t1", "seq": 1, "kind": "delta"}
    frame.update(changes)
    return json.dumps(frame)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []


@pytest.fixture
async def hub() -> AsyncIterator[HubRunner]:
    async with open_hub(PROXIES) as runner:
        yield runner


# ------------------------------------------------------------------ proxy → hub

BAD_HELLOS = {
    "100 000 deep": (DEEP, "nested deeper than 16 levels"),
    "deep inside a field": (
        hello().replace('"capacity": 2', f'"capacity": 2, "labels": {DEEP}'),
        "nested deeper than 16 levels",
    ),
    # Brackets inside a string are text, not nesting.
    "100 000 brackets in a label": (hello(labels=[DEEP]), "labels: [0]: longer than 64"),
    "NaN capacity": (hello(capacity=float("nan")), "NaN is not a number"),
    "Infinity": (hello().replace('"capacity": 2', '"capacity": Infinity'), "Infinity is not"),
    "1e400": (hello().replace('"capacity": 2', '"capacity": 1e400'), "out of range"),
    "capacity 0": (hello(capacity=0), "capacity: expected 1..1000, got 0"),
    "capacity 10**30": (hello(capacity=10**30), "capacity: expected 1..1000"),
    "capacity as text": (hello(capacity="2"), "expected int @ $.capacity"),
    "negative protocol": (hello(protocol=-1), "protocol: expected 0..2147483648"),
    "lone surrogate in the token": (hello(token="\ud800"), "token: contains NUL or a lone"),
    "NUL in the version": (hello(version="a\x00b"), "version: contains NUL"),
    "a 10 000-character version": (hello(version="v" * 10_000), "version: longer than 200"),
    "a newline in a label": (hello(labels=["gpu\nFAKE"]), "labels: [0]: contains a control"),
    "a space in the proxy id": (hello(proxy_id="p 1"), "proxy_id: expected 1-64 letters"),
    "a running task id of 1 000 characters": (
        hello(running=["t" * 1000]),
        "running: [0]: longer than 128 characters",
    ),
}


@pytest.mark.parametrize(("raw", "reason"), BAD_HELLOS.values(), ids=BAD_HELLOS.keys())
async def test_a_bad_hello_is_closed_with_4400_and_one_warning(
    hub: HubRunner, caplog: pytest.LogCaptureFixture, raw: str, reason: str
) -> None:
    caplog.set_level(logging.WARNING)
    async with raw_connection(hub.port) as proxy:
        await proxy.send_raw(raw)
        closed = await proxy.closed()
    assert closed.code == CLOSE_BAD_FRAME
    assert reason in closed.reason  # type: ignore[operator]
    lines = [r.getMessage() for r in caplog.records if r.name == "codexnet.manager.hub"]
    assert len(lines) == 1
    assert lines[0].startswith("refusing a connection from 127.0.0.1:")
    assert reason in lines[0]
    no_tracebacks(caplog)
    assert hub.hub.online == {}
    async with raw_proxy(hub.port, "p1", TOKEN):  # the hub serves on
        assert "p1" in hub.hub.online


BAD_FRAMES = {
    "100 000 deep": (DEEP, "nested deeper than 16 levels"),
    "NaN seq": (event().replace('"seq": 1', '"seq": NaN'), "NaN is not a number"),
    "negative seq": (event(seq=-1), "seq: expected 0..9007199254740992, got -1"),
    "lone surrogate in the text": (event(text="ok \udc80"), "text: contains NUL or a lone"),
    "NUL in the text": (event(text="a\x00b"), "text: contains NUL"),
    "a task id with a newline": (event(task_id="t1\nFAKE"), "task_id: expected 1-128"),
    "negative usage": (
        json.dumps(
            {"type": "task_result", "task_id": "t1", "status": "completed", "usage": {"n": -5}}
        ),
        "usage: ['n']: expected 0..",
    ),
    "a thread id of 129 characters": (
        json.dumps(
            {"type": "task_result", "task_id": "t1", "status": "completed", "thread_id": "x" * 129}
        ),
        "thread_id: longer than 128 characters",
    ),
    "negative load": (
        json.dumps({"type": "load", "running": -1, "capacity": 2}),
        "running: expected 0..",
    ),
    "an approval id of 1 000 characters": (
        json.dumps({"type": "decision_ack", "task_id": "t1", "approval_id": "a" * 1000}),
        "approval_id: longer than 128 characters",
    ),
}


@pytest.mark.parametrize(("raw", "reason"), BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
async def test_a_bad_frame_after_hello_is_closed_with_4400_and_one_warning(
    hub: HubRunner, caplog: pytest.LogCaptureFixture, raw: str, reason: str
) -> None:
    caplog.set_level(logging.WARNING)
    async with raw_proxy(hub.port, "p1", TOKEN) as proxy:
        await proxy.send_raw(raw)
        closed = await proxy.closed()
    assert closed.code == CLOSE_BAD_FRAME
    assert reason in closed.reason  # type: ignore[operator]
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "codexnet.manager.hub" and "bad frame" in r.getMessage()
    ]
    assert len(lines) == 1
    assert lines[0].startswith("proxy 'p1' sent a bad frame, disconnecting: ")
    assert reason in lines[0]
    no_tracebacks(caplog)


# ------------------------------------------------------------------ manager → proxy


@pytest.fixture
async def manager(nursery: trio.Nursery) -> FakeManager:
    manager = FakeManager()
    await nursery.start(manager.serve)
    return manager


@pytest.fixture
def service(tmp_path: Path, manager: FakeManager) -> ProxyService:
    config = attrs.evolve(
        proxy_config(tmp_path, fake_codex(tmp_path)), manager_ws=f"ws://127.0.0.1:{manager.port}"
    )
    return ProxyService(config, AppServer(config, env=dict(os.environ)))


def task(**changes: Any) -> str:
    frame: dict[str, Any] = {"type": "task", "task_id": "bad", "chat_id": 1, "prompt": "p"}
    frame.update(changes)
    return json.dumps(frame)


BAD_MANAGER_FRAMES = {
    "100 000 deep": (DEEP, "nested deeper than 16 levels"),
    "timeout NaN": (task().replace("}", ', "timeout_s": NaN}'), "NaN is not a number"),
    "timeout -1": (task(timeout_s=-1), "timeout_s: expected seconds in (0, 604800], got -1.0"),
    "timeout 0": (task(timeout_s=0), "timeout_s: expected seconds in (0, 604800], got 0.0"),
    "timeout 1e300": (task(timeout_s=1e300), "timeout_s: expected seconds in (0, 604800]"),
    "timeout Infinity": (
        task().replace("}", ', "timeout_s": -Infinity}'),
        "-Infinity is not a number",
    ),
    "lone surrogate in the prompt": (task(prompt="\udfff"), "prompt: contains NUL or a lone"),
    "a thread id with a slash": (task(thread_id="../x"), "thread_id: expected 1-128"),
    "chat id as text": (task(chat_id="1"), "expected int @ $.chat_id"),
    "a decision for a 1 000-character id": (
        json.dumps(
            {
                "type": "approval_decision",
                "task_id": "t" * 1000,
                "approval_id": "a",
                "decision": "accept",
            }
        ),
        "task_id: longer than 128 characters",
    ),
    "not JSON": ("{", "not JSON"),
}


@pytest.mark.parametrize(
    ("raw", "reason"), BAD_MANAGER_FRAMES.values(), ids=BAD_MANAGER_FRAMES.keys()
)
async def test_the_proxy_ignores_a_bad_frame_and_keeps_its_link(
    service: ProxyService,
    manager: FakeManager,
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    raw: str,
    reason: str,
) -> None:
    caplog.set_level(logging.WARNING)
    nursery.start_soon(service.run)  # an exit would fail the test through the nursery
    link = await manager.accept()
    await link.send_raw(raw)
    # The same link still works: the proxy neither exited nor reconnected.
    await link.send(Task("t1", 1, "hello", timeout_s=60))
    with trio.fail_after(20):
        await link.expect(TaskAck, lambda f: f.task_id == "t1")
        result = await link.expect(TaskResult)
    assert result.text == "Echo: hello"
    assert not [f for f in link.received if getattr(f, "task_id", None) == "bad"]
    lines = [r.getMessage() for r in caplog.records if r.name == "codexnet.proxy.service"]
    assert lines == [f"ignoring a bad frame from the manager: {lines[0].split(': ', 1)[1]}"]
    assert reason in lines[0]
    no_tracebacks(caplog)
