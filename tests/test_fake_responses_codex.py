"""Smoke tests of `FakeResponsesAPI` against the real `codex app-server` (real clock).

The app-server is driven directly over stdio with a minimal inline NDJSON reader;
the project's own JSON-RPC client lives elsewhere and is tested elsewhere.
"""

from __future__ import annotations

import json
import math
import subprocess
import tomllib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.fakes.codex_env import find_codex, require_codex, write_codex_home
from tests.fakes.responses_api import MARKDOWN_SAMPLE, FakeResponsesAPI, long_text

e2e = pytest.mark.e2e  # runs the real codex binary

Message = dict[str, Any]
TEST_TIMEOUT = 60


class AppServer:
    """A `codex app-server --listen stdio://` child and its NDJSON stream."""

    def __init__(self, proc: trio.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.log: list[Message] = []  # every message received, in order
        self._next_id = 0
        self._send, self._recv = trio.open_memory_channel[Message](math.inf)

    async def read_loop(self) -> None:
        assert self.proc.stdout is not None
        buf = b""
        async with self._send:
            async for chunk in self.proc.stdout:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        msg = json.loads(line)
                        self.log.append(msg)
                        await self._send.send(msg)

    async def send(self, msg: Message) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(json.dumps(msg).encode() + b"\n")

    async def request(self, method: str, params: Message | None = None) -> Message:
        """Send a request and wait for its response; return `result` (fail on `error`)."""
        rid = self._next_id
        self._next_id += 1
        msg: Message = {"id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        await self.send(msg)
        reply = await self.until(lambda m: "method" not in m and m.get("id") == rid)
        assert "error" not in reply, reply
        result: Message = reply["result"]
        return result

    async def until(self, pred: Callable[[Message], bool]) -> Message:
        """Skip messages until one matches (skipped ones stay in `log`)."""
        while True:
            try:
                msg = await self._recv.receive()
            except trio.EndOfChannel:
                stderr = self.stderr_path.read_text(errors="replace")[-4000:]
                raise AssertionError(f"codex app-server closed stdout; stderr:\n{stderr}") from None
            if pred(msg):
                return msg

    async def until_method(self, method: str) -> Message:
        return await self.until(lambda m: m.get("method") == method)

    async def handshake(self) -> None:
        await self.request(
            "initialize",
            {"clientInfo": {"name": "codexnet_tests", "title": "codexnet tests", "version": "0"}},
        )
        await self.send({"method": "initialized"})

    async def start_thread(self, cwd: Path, **params: Any) -> str:
        result = await self.request(
            "thread/start",
            {"cwd": str(cwd), "approvalPolicy": "never", "sandbox": "read-only", **params},
        )
        thread_id: str = result["thread"]["id"]
        return thread_id

    async def run_turn(self, thread_id: str, text: str) -> tuple[Message, list[Message]]:
        """Start a turn and wait for its `turn/completed`; return it and the turn's messages."""
        start = len(self.log)
        result = await self.request(
            "turn/start", {"threadId": thread_id, "input": [{"type": "text", "text": text}]}
        )
        turn_id = result["turn"]["id"]
        done = await self.until(
            lambda m: m.get("method") == "turn/completed" and m["params"]["turn"]["id"] == turn_id
        )
        return done, self.log[start:]


@asynccontextmanager
async def app_server(codex: str, env: dict[str, str], cwd: Path) -> AsyncIterator[AppServer]:
    """Run the app-server for the block; always close stdin, then kill if it lingers."""
    stderr_path = cwd.parent / "codex-stderr.log"
    with stderr_path.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [codex, "app-server", "--listen", "stdio://"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            cwd=str(cwd),
        )
    try:
        server = AppServer(proc, stderr_path)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.read_loop)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            assert proc.stdin is not None
            assert proc.stdout is not None
            await proc.stdin.aclose()  # EOF: codex exits 0 within ~30 ms
            with trio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await proc.stdout.aclose()


@pytest.fixture
def codex() -> str:
    return require_codex()


@pytest.fixture
async def fake(nursery: trio.Nursery) -> FakeResponsesAPI:
    api = FakeResponsesAPI()
    await nursery.start(api.serve)
    return api


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@asynccontextmanager
async def started(
    codex: str, fake: FakeResponsesAPI, tmp_path: Path, workdir: Path
) -> AsyncIterator[AppServer]:
    env = write_codex_home(tmp_path / "codex-home", fake.base_url)
    async with app_server(codex, env, workdir) as server:
        await server.handshake()
        yield server


def _deltas(messages: list[Message]) -> list[str]:
    return [m["params"]["delta"] for m in messages if m.get("method") == "item/agentMessage/delta"]


def _agent_texts(messages: list[Message]) -> list[str]:
    return [
        m["params"]["item"]["text"]
        for m in messages
        if m.get("method") == "item/completed" and m["params"]["item"]["type"] == "agentMessage"
    ]


@e2e
async def test_echo_turn_streams_deltas(
    codex: str, fake: FakeResponsesAPI, tmp_path: Path, workdir: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with started(codex, fake, tmp_path, workdir) as server:
            thread_id = await server.start_thread(workdir)
            done, messages = await server.run_turn(thread_id, "hello there world")

    assert done["params"]["turn"]["status"] == "completed"
    deltas = _deltas(messages)
    assert len(deltas) > 1
    assert "".join(deltas) == "Echo: hello there world (turn 1)"
    assert _agent_texts(messages) == ["Echo: hello there world (turn 1)"]
    usage = [m for m in messages if m.get("method") == "thread/tokenUsage/updated"]
    assert usage
    assert usage[-1]["params"]["tokenUsage"]["last"]["outputTokens"] > 0

    [request] = await fake.wait_requests(1)
    assert request.body["stream"] is True
    assert request.user_prompts == ["hello there world"]
    assert "exec_command" in request.tool_names
    assert "authorization" not in request.headers
    assert not request.disconnected


@e2e
async def test_history_carries_across_turns(
    codex: str, fake: FakeResponsesAPI, tmp_path: Path, workdir: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with started(codex, fake, tmp_path, workdir) as server:
            thread_id = await server.start_thread(workdir)
            first, _ = await server.run_turn(thread_id, "one")
            second, messages = await server.run_turn(thread_id, "two")

    assert first["params"]["turn"]["status"] == "completed"
    assert second["params"]["turn"]["status"] == "completed"
    assert _agent_texts(messages) == ["Echo: two (turn 2)"]
    requests = await fake.wait_requests(2)
    assert requests[1].user_prompts == ["one", "two"]
    assert requests[0].body["prompt_cache_key"] == requests[1].body["prompt_cache_key"]


@e2e
@pytest.mark.parametrize(("decision", "ran"), [("accept", True), ("decline", False)])
async def test_shell_command_approval(
    codex: str,
    fake: FakeResponsesAPI,
    tmp_path: Path,
    workdir: Path,
    decision: str,
    ran: bool,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with started(codex, fake, tmp_path, workdir) as server:
            thread_id = await server.start_thread(
                workdir, approvalPolicy="untrusted", sandbox="workspace-write"
            )
            start = len(server.log)
            result = await server.request(
                "turn/start",
                {
                    "threadId": thread_id,
                    "input": [{"type": "text", "text": "[[shell:echo hi > x.txt]]"}],
                },
            )
            turn_id = result["turn"]["id"]
            approval = await server.until_method("item/commandExecution/requestApproval")
            params = approval["params"]
            assert params["threadId"] == thread_id
            assert params["turnId"] == turn_id
            assert "echo hi > x.txt" in params["command"]
            assert not (workdir / "x.txt").exists()  # nothing runs before the answer
            await server.send({"id": approval["id"], "result": {"decision": decision}})
            done = await server.until(
                lambda m: (
                    m.get("method") == "turn/completed" and m["params"]["turn"]["id"] == turn_id
                )
            )
            messages = server.log[start:]

    assert done["params"]["turn"]["status"] == "completed"
    commands = [
        m["params"]["item"]
        for m in messages
        if m.get("method") == "item/completed" and m["params"]["item"]["type"] == "commandExecution"
    ]
    assert len(commands) == 1
    assert (workdir / "x.txt").exists() is ran
    requests = await fake.wait_requests(2)
    assert requests[1].last_item is not None
    assert requests[1].last_item["type"] == "function_call_output"
    [text] = _agent_texts(messages)
    assert text.startswith("Command output: ")
    if ran:
        assert (workdir / "x.txt").read_text() == "hi\n"
        assert commands[0]["status"] == "completed"
        assert commands[0]["exitCode"] == 0
        assert text == "Command output: (no output)"
    else:
        assert commands[0]["status"] == "declined"
        assert "rejected by user" in text


@e2e
@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("[[reply:exactly *this*]]", "exactly *this*"),
        ("[[markdown]]", MARKDOWN_SAMPLE),
        ("[[long:5000]]", long_text(5000)),
    ],
    ids=["reply", "markdown", "long"],
)
async def test_text_directives_pass_through(
    codex: str,
    fake: FakeResponsesAPI,
    tmp_path: Path,
    workdir: Path,
    prompt: str,
    expected: str,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with started(codex, fake, tmp_path, workdir) as server:
            thread_id = await server.start_thread(workdir)
            done, messages = await server.run_turn(thread_id, prompt)

    assert done["params"]["turn"]["status"] == "completed"
    assert "".join(_deltas(messages)) == expected
    assert _agent_texts(messages) == [expected]


@e2e
@pytest.mark.parametrize("directive", ["http500", "http400", "failed", "truncate"])
async def test_model_failures_fail_the_turn(
    codex: str, fake: FakeResponsesAPI, tmp_path: Path, workdir: Path, directive: str
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with started(codex, fake, tmp_path, workdir) as server:
            thread_id = await server.start_thread(workdir)
            failed, messages = await server.run_turn(thread_id, f"[[{directive}]]")
            after, later = await server.run_turn(thread_id, "still there?")

    turn = failed["params"]["turn"]
    assert turn["status"] == "failed"
    assert turn["error"]["message"]
    errors = [m["params"] for m in messages if m.get("method") == "error"]
    assert errors
    assert errors[-1]["willRetry"] is False
    assert after["params"]["turn"]["status"] == "completed"
    [text] = _agent_texts(later)
    assert text.startswith("Echo: still there? (turn ")
    assert len(fake.requests) == 2  # retries are off


@e2e
async def test_interrupt_disconnects_slow_stream(
    codex: str, fake: FakeResponsesAPI, tmp_path: Path, workdir: Path
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with started(codex, fake, tmp_path, workdir) as server:
            thread_id = await server.start_thread(workdir)
            result = await server.request(
                "turn/start",
                {"threadId": thread_id, "input": [{"type": "text", "text": "[[slow:40]]"}]},
            )
            turn_id = result["turn"]["id"]
            first = await server.until_method("item/agentMessage/delta")
            assert first["params"]["delta"] == "tick 1 "
            await server.request("turn/interrupt", {"threadId": thread_id, "turnId": turn_id})
            done = await server.until_method("turn/completed")
            assert done["params"]["turn"]["status"] == "interrupted"
            [request] = await fake.wait_requests(1)
            await request.wait_ended()  # within a tick (0.5 s) of codex dropping the stream
            assert request.disconnected
            _, messages = await server.run_turn(thread_id, "next")

    assert _agent_texts(messages) == ["Echo: next (turn 2)"]


# ------------------------------------------------- the helpers themselves (no codex)


def test_write_codex_home_config_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    monkeypatch.delenv("TMPDIR", raising=False)
    home = tmp_path / "codex-home"
    env = write_codex_home(home, "http://127.0.0.1:1234/v1")

    config = tomllib.loads((home / "config.toml").read_text())
    assert config["model_provider"] == "mock"
    provider = config["model_providers"]["mock"]
    assert provider["base_url"] == "http://127.0.0.1:1234/v1"
    assert provider["request_max_retries"] == provider["stream_max_retries"] == 0
    assert "env_key" not in provider
    assert config["features"]["plugins"] is False
    assert config["features"]["unbounded_connection_retries"] is False
    assert config["analytics"]["enabled"] is config["feedback"]["enabled"] is False

    assert env["CODEX_HOME"] == str(home)
    assert "OPENAI_API_KEY" not in env
    # Codex refuses its helper aliases when CODEX_HOME is under temp_dir() (trap #10);
    # tmp_path is under /tmp, so TMPDIR must move somewhere that is not an ancestor.
    tmpdir = Path(env["TMPDIR"])
    assert tmpdir.is_dir()
    assert not home.is_relative_to(tmpdir)
    assert not home.resolve().is_relative_to(tmpdir.resolve())
    assert Path(env["HOME"]).is_dir()


def _fake_npm_layout(root: Path, *, native: bool) -> Path:
    package = root / "node_modules" / "@openai" / "codex"
    (package / "bin").mkdir(parents=True)
    wrapper = package / "bin" / "codex.js"
    wrapper.write_text("#!/usr/bin/env node\n")
    wrapper.chmod(0o755)
    bin_dir = root / "node_modules" / ".bin"
    bin_dir.mkdir()
    (bin_dir / "codex").symlink_to("../@openai/codex/bin/codex.js")
    if native:
        vendor = root / "node_modules" / "@openai" / "codex-linux-x64" / "vendor"
        binary = vendor / "x86_64-unknown-linux-musl" / "bin" / "codex"
        binary.parent.mkdir(parents=True)
        binary.write_bytes(b"\x7fELF fake")
        binary.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("native", [True, False])
def test_find_codex_prefers_native_binary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    bin_dir = _fake_npm_layout(tmp_path, native=native)
    monkeypatch.setenv("PATH", str(bin_dir))
    found = find_codex()
    assert found is not None
    if native:
        assert found.endswith("vendor/x86_64-unknown-linux-musl/bin/codex")
    else:
        assert found == str(bin_dir / "codex")


@pytest.mark.parametrize("ci", ["true", ""])
def test_require_codex_skips_locally_fails_under_ci(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if ci else pytest.skip.Exception
    with pytest.raises(expected, match="codex not on PATH"):
        require_codex()


async def test_fake_sse_framing_script_hook_and_wait(fake: FakeResponsesAPI) -> None:
    fake.script(lambda request: "scripted!" if "script me" in request.last_user_text else None)
    body: dict[str, Any] = {
        "model": "m",
        "stream": True,
        "tools": [{"type": "function", "name": "exec_command"}],
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "<environment_context>x</environment_context>"}
                ],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "please script me"}],
            },
        ],
    }
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            waited: list[int] = []

            async def waiter() -> None:
                waited.append(len(await fake.wait_requests(2)))

            nursery.start_soon(waiter)
            async with httpx.AsyncClient(base_url=fake.base_url) as client:
                response = await client.post("/responses", json=body)
                assert response.headers["content-type"] == "text/event-stream"
                events = [
                    (block.split("\n")[0], json.loads(block.split("\n")[1].removeprefix("data: ")))
                    for block in response.text.strip().split("\n\n")
                ]
                body["input"][-1]["content"][0]["text"] = "[[shell:ls]]"
                second = await client.post("/responses", json=body)
                error = await client.post(
                    "/responses",
                    json={
                        **body,
                        "input": [{"type": "message", "role": "user", "content": "[[http500]]"}],
                    },
                )

    assert [name for name, _ in events] == [f"event: {data['type']}" for _, data in events]
    kinds = [data["type"] for _, data in events]
    assert kinds[:2] == ["response.created", "response.output_item.added"]
    assert kinds[-2:] == ["response.output_item.done", "response.completed"]
    assert "".join(d["delta"] for _, d in events if "delta" in d) == "scripted!"
    assert events[-1][1]["response"]["usage"]["total_tokens"] > 0
    assert '"name": "exec_command"' in second.text
    assert '\\"cmd\\": \\"ls\\"' in second.text
    assert error.status_code == 500
    assert waited == [2]
    assert len(fake.requests) == 3
    assert fake.requests[0].user_prompts == ["please script me"]
    assert all(r.ended and not r.disconnected for r in fake.requests)
