"""The app-server supervisor and turn runner against a scripted child process.

Real processes run on the real clock (virtual time would fire timeouts while
the child is working), each test under a generous deadline.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from codexnet.config import ProxyConfig
from codexnet.proxy.appserver import (
    AppServer,
    AppServerUnavailable,
    Turn,
    TurnOutcome,
    TurnSettings,
)
from codexnet.proxy.server_requests import Approval

FAKE = Path(__file__).parent / "fakes" / "fake_appserver.py"


def proxy_config(tmp_path: Path, codex_bin: str) -> ProxyConfig:
    return ProxyConfig(
        source="test",
        manager_ws="ws://127.0.0.1:1",
        proxy_id="p",
        proxy_token="t",
        codex_cwd=tmp_path,
        codex_bin=codex_bin,
        approval_policy="never",
        sandbox="read-only",
        capacity=2,
        labels=(),
        http_proxy=None,
        https_proxy=None,
        no_proxy=None,
        state_dir=tmp_path / "proxy-state",
    )


def fake_codex(tmp_path: Path) -> str:
    """An executable that runs the scripted app-server whatever arguments it gets."""
    script = tmp_path / "fake-codex"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -u {FAKE}\n")
    script.chmod(0o755)
    return str(script)


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[AppServer]:
    server = AppServer(proxy_config(tmp_path, fake_codex(tmp_path)))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def never_asked(approval: Approval) -> str:
    raise AssertionError(f"unexpected approval {approval}")


async def run(app: AppServer, prompt: str, thread_id: str | None = None, **kw: object) -> object:
    turns: list[Turn] = []
    with trio.fail_after(30):
        return await app.run_turn(
            thread_id,
            prompt,
            on_change=lambda: None,
            on_approval=kw.get("on_approval", never_asked),  # type: ignore[arg-type]
            on_turn=turns.append,
            cancel=kw.get("cancel", trio.Event()),  # type: ignore[arg-type]
        )


async def test_a_turn_returns_the_completed_text_and_thread(app: AppServer) -> None:
    outcome = await run(app, "hello")
    assert outcome.status == "completed"  # type: ignore[attr-defined]
    assert outcome.text == "Echo: hello"  # type: ignore[attr-defined]
    assert outcome.thread_id  # type: ignore[attr-defined]
    assert app.version == "0.0-fake"
    again = await run(app, "more", outcome.thread_id)  # type: ignore[attr-defined]
    assert again.thread_id == outcome.thread_id  # type: ignore[attr-defined]


async def test_an_unknown_thread_starts_a_new_one_and_says_so(app: AppServer) -> None:
    outcome = await run(app, "hello", "gone-thread")
    assert outcome.status == "completed"  # type: ignore[attr-defined]
    assert outcome.thread_id != "gone-thread"  # type: ignore[attr-defined]
    assert "could not be resumed" in outcome.notice  # type: ignore[attr-defined]


async def test_a_known_thread_is_resumed(app: AppServer) -> None:
    outcome = await run(app, "hello", "keep-123")
    assert outcome.thread_id == "keep-123"  # type: ignore[attr-defined]
    assert outcome.notice is None  # type: ignore[attr-defined]


async def test_approval_goes_to_the_handler_and_back(app: AppServer) -> None:
    asked: list[Approval] = []

    async def approve(approval: Approval) -> str:
        asked.append(approval)
        return "acceptForSession"

    outcome = await run(app, "approve", on_approval=approve)
    assert asked == [Approval("command", "touch x", "in /w")]
    assert outcome.text == "decision: acceptForSession"  # type: ignore[attr-defined]


async def test_model_failure_is_reported(app: AppServer) -> None:
    outcome = await run(app, "fail")
    assert outcome.status == "failed"  # type: ignore[attr-defined]
    assert "high demand" in outcome.error  # type: ignore[attr-defined]


async def test_a_turn_names_its_directory_only_when_it_changes(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Codex keeps a turn's cwd for the turns after it (and a cwd in turn/start costs
    it ~3 ms even when unchanged): a turn says where it runs only when that changed
    since the thread was loaded or last told."""
    calls = tmp_path / "calls.log"
    env = {**os.environ, "FAKE_APPSERVER_CALLS": str(calls)}
    server = AppServer(proxy_config(tmp_path, fake_codex(tmp_path)), env=env)
    await nursery.start(server.serve)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()

    async def pwd(thread_id: str | None, cwd: Path) -> TurnOutcome:
        with trio.fail_after(30):
            outcome = await server.run_turn(
                thread_id,
                "pwd",
                on_change=lambda: None,
                on_approval=never_asked,
                on_turn=lambda turn: None,
                cancel=trio.Event(),
                settings=TurnSettings(cwd=str(cwd)),
            )
        assert isinstance(outcome, TurnOutcome)
        return outcome

    first = await pwd(None, a)  # thread/start names `a`
    thread = first.thread_id
    texts = [first.text] + [(await pwd(thread, cwd)).text for cwd in (a, b, b, a)]
    assert texts == [f"cwd: {d}" for d in (a, a, b, b, a)]
    starts = [line for line in calls.read_text().splitlines() if line.startswith("turn/start")]
    assert starts == [
        f"turn/start {thread}",
        f"turn/start {thread}",
        f"turn/start {thread} cwd={b}",
        f"turn/start {thread}",
        f"turn/start {thread} cwd={a}",
    ]


async def test_cancel_interrupts_the_turn(app: AppServer, nursery: trio.Nursery) -> None:
    cancel = trio.Event()
    turns: list[Turn] = []
    changed = trio.Event()

    async def cancel_when_working() -> None:
        await changed.wait()
        cancel.set()

    nursery.start_soon(cancel_when_working)
    with trio.fail_after(30):
        outcome = await app.run_turn(
            None,
            "hang",
            on_change=changed.set,
            on_approval=never_asked,
            on_turn=turns.append,
            cancel=cancel,
        )
    assert outcome.status == "interrupted"
    assert outcome.text == "working"


async def test_a_crashed_child_fails_the_turn_and_is_restarted(app: AppServer) -> None:
    outcome = await run(app, "crash")
    assert outcome.status == "failed"  # type: ignore[attr-defined]
    assert outcome.error == "the Codex app-server crashed"  # type: ignore[attr-defined]
    # The supervisor brings a new child up; the next prompt just works.
    again = await run(app, "hello")
    assert again.text == "Echo: hello"  # type: ignore[attr-defined]
    assert app.restarts == 1


async def test_a_missing_codex_binary_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("codexnet.proxy.appserver.READY_WAIT_S", 1.0)
    server = AppServer(proxy_config(tmp_path, str(tmp_path / "no-such-codex")))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        with pytest.raises(AppServerUnavailable, match=r"cannot start .*no-such-codex"):
            await run(server, "hello")
        nursery.cancel_scope.cancel()


async def test_shutdown_stops_the_child(tmp_path: Path) -> None:
    server = AppServer(proxy_config(tmp_path, fake_codex(tmp_path)))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        await run(server, "hello")
        child = server._child
        assert child is not None
        pid = child.process.pid
        nursery.cancel_scope.cancel()
    assert child.process.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_a_child_that_dies_before_initialize_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("codexnet.proxy.appserver.READY_WAIT_S", 1.0)
    broken = tmp_path / "broken-codex"
    broken.write_text("#!/bin/sh\necho 'error: unknown flag' >&2\nexit 7\n")
    broken.chmod(0o755)
    server = AppServer(proxy_config(tmp_path, str(broken)))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        with pytest.raises(AppServerUnavailable, match=r"failed to initialize.*\(exit code 7\)"):
            await run(server, "hello")
        nursery.cancel_scope.cancel()
