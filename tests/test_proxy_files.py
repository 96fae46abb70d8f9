"""The proxy's side of the workspace, against a manager reduced to its protocol.

Files sent with a prompt are pulled chunk by chunk (`file_fetch` → `file_part`),
resumed after a broken link or a restart, checked, and placed in the working
directory; queries and reads answer with one frame each, and nothing outside
allowed_roots is ever read or written.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
import trio

from codexnet.protocol import (
    CHUNK_BYTES,
    FileFetch,
    FilePart,
    FileRef,
    Query,
    QueryResult,
    ReadFile,
    ReadResult,
    ResultAck,
    Task,
    TaskResult,
)
from tests.fakes.rawmanager import FakeManager, Link
from tests.test_proxy_delivery import Proxy, run

CONTENT = bytes(range(256)) * (CHUNK_BYTES * 5 // 2 // 256)  # two and a half chunks


@pytest.fixture
async def manager(nursery: trio.Nursery) -> FakeManager:
    manager = FakeManager()
    await nursery.start(manager.serve)
    return manager


@pytest.fixture
def proxy(tmp_path: Path, manager: FakeManager) -> Proxy:
    return Proxy(tmp_path, manager)


def file_task(task_id: str, content: bytes = CONTENT, name: str = "report.txt") -> Task:
    ref = FileRef(0, name, len(content), hashlib.sha256(content).hexdigest())
    return Task(task_id, 1, "summarise it", files=[ref])


def part(fetch: FileFetch, content: bytes) -> FilePart:
    data = content[fetch.offset : fetch.offset + fetch.length]
    return FilePart(fetch.task_id, fetch.index, fetch.offset, base64.b64encode(data).decode())


async def serve_file(link: Link, content: bytes, *, stop_after: int | None = None) -> int:
    """Answer file_fetch frames until the result comes (or `stop_after` parts); parts sent."""
    sent = 0
    while stop_after is None or sent < stop_after:
        fetch = await link.expect(FileFetch)
        await link.send(part(fetch, content))
        sent += 1
        if fetch.offset + fetch.length >= len(content):
            break
    return sent


async def staged_size(tmp_path: Path, task_id: str, size: int) -> None:
    """Wait until the proxy's staged copy has `size` bytes (another task writes it, and
    a file sends no notification: looked at every 20 ms, under the caller's deadline)."""
    path = tmp_path / "proxy-state" / "incoming" / task_id / "0"
    while not path.exists() or path.stat().st_size < size:  # noqa: ASYNC110
        await trio.sleep(0.02)


async def test_a_file_is_pulled_in_chunks_and_placed_in_the_working_directory(
    tmp_path: Path, manager: FakeManager, nursery: trio.Nursery
) -> None:
    proxy = Proxy(tmp_path, manager)
    await run(proxy.service(), nursery)
    link = await manager.accept()
    await link.send(file_task("t1"))
    with trio.fail_after(20):
        await serve_file(link, CONTENT)
        result = await link.expect(TaskResult)
    fetches = [f for f in link.received if isinstance(f, FileFetch)]
    assert [f.offset for f in fetches] == [0, CHUNK_BYTES, 2 * CHUNK_BYTES]
    assert result.status == "completed"
    assert result.text.startswith("📎 telegram-files/report.txt\n\nEcho: summarise it")
    assert (tmp_path / "telegram-files" / "report.txt").read_bytes() == CONTENT
    [asked] = proxy.asked()[:1]
    assert asked == "summarise it"  # the first line; the saved path follows in the prompt
    assert not (tmp_path / "proxy-state" / "incoming" / "t1").exists()


async def test_a_broken_link_and_a_restart_resume_where_the_file_ends(
    tmp_path: Path, manager: FakeManager, nursery: trio.Nursery
) -> None:
    proxy = Proxy(tmp_path, manager)
    first = await run(proxy.service(), nursery)
    link = await manager.accept()
    await link.send(file_task("t1"))
    with trio.fail_after(20):
        await serve_file(link, CONTENT, stop_after=1)
        await link.expect(FileFetch, lambda f: f.offset == CHUNK_BYTES)  # asked, never answered
    await link.drop()
    link = await manager.accept()
    assert link.hello.running == ["t1"]
    with trio.fail_after(20):
        again = await link.expect(FileFetch)
        assert again.offset == CHUNK_BYTES  # from where the file on disk ends
        await link.send(part(again, CONTENT))
        await staged_size(tmp_path, "t1", 2 * CHUNK_BYTES)
    await first.stop()  # and now the proxy restarts, two chunks in
    await run(proxy.service(), nursery)
    link = await manager.accept()
    with trio.fail_after(20):
        resumed = await link.expect(FileFetch)
        assert resumed.offset == 2 * CHUNK_BYTES
        await link.send(part(resumed, CONTENT))
        result = await link.expect(TaskResult)
    assert result.status == "completed", result.error
    assert (tmp_path / "telegram-files" / "report.txt").read_bytes() == CONTENT
    assert proxy.asked()[0] == "summarise it"  # one turn, after the whole file was in


async def test_a_damaged_file_is_fetched_again_then_reported(
    proxy: Proxy, manager: FakeManager, nursery: trio.Nursery, tmp_path: Path
) -> None:
    await run(proxy.service(), nursery)
    link = await manager.accept()
    await link.send(file_task("t1"))
    wrong = bytes(len(CONTENT))
    with trio.fail_after(20):
        await serve_file(link, wrong)
        await serve_file(link, wrong)  # asked again from the start, once
        result = await link.expect(TaskResult)
    assert (result.status, result.error) == (
        "failed",
        "report.txt arrived damaged twice; nothing was run",
    )
    assert proxy.asked() == []
    assert not (tmp_path / "telegram-files").exists()


async def test_a_file_the_manager_lost_fails_the_task_with_one_line(
    proxy: Proxy, manager: FakeManager, nursery: trio.Nursery
) -> None:
    await run(proxy.service(), nursery)
    link = await manager.accept()
    await link.send(file_task("t1"))
    with trio.fail_after(20):
        fetch = await link.expect(FileFetch)
        await link.send(FilePart("t1", 0, fetch.offset, error="the manager no longer has it"))
        result = await link.expect(TaskResult)
    assert result.error == "could not get report.txt: the manager no longer has it"
    assert proxy.asked() == []
    await link.send(ResultAck("t1"))


async def test_a_hostile_name_is_made_safe_and_said_so(
    proxy: Proxy, manager: FakeManager, nursery: trio.Nursery, tmp_path: Path
) -> None:
    await run(proxy.service(), nursery)
    link = await manager.accept()
    await link.send(file_task("t1", b"abc", name="../../evil\n.sh"))
    with trio.fail_after(20):
        await serve_file(link, b"abc")
        result = await link.expect(TaskResult)
    first_line = result.text.splitlines()[0]
    assert first_line == "📎 telegram-files/_.._evil_.sh (sent as '../../evil\\n.sh')"
    assert (tmp_path / "telegram-files" / "_.._evil_.sh").read_bytes() == b"abc"
    assert not (tmp_path.parent / "evil\n.sh").exists()


async def test_a_directory_outside_the_roots_fails_before_anything_runs(
    proxy: Proxy, manager: FakeManager, nursery: trio.Nursery
) -> None:
    await run(proxy.service(), nursery)
    link = await manager.accept()
    await link.send(Task("t1", 1, "hello", cwd="/etc"))
    with trio.fail_after(20):
        result = await link.expect(TaskResult)
    assert result.status == "failed"
    assert result.error is not None
    assert "'/etc' is outside the allowed directories" in result.error
    assert result.error.endswith("; nothing was run")
    assert proxy.asked() == []


async def test_queries_and_reads_stay_inside_the_allowed_roots(
    proxy: Proxy, manager: FakeManager, nursery: trio.Nursery, tmp_path: Path
) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "main.py").write_text("print('hi')\n")
    await run(proxy.service(), nursery)
    link = await manager.accept()
    assert link.hello.workdir == str(tmp_path)
    await link.send(Query("q1", "cwd", "src"))
    await link.send(Query("q2", "cwd", "../.."))
    await link.send(ReadFile("r1", "main.py", cwd=str(tmp_path / "src")))
    await link.send(ReadFile("r2", "/etc/passwd"))
    await link.send(ReadFile("r3", "../" * 10 + "etc/hostname", cwd=str(tmp_path / "src")))
    await link.send(ReadFile("r4", "t-unknown", kind="diff"))
    with trio.fail_after(20):
        q1 = await link.expect(QueryResult, lambda f: f.request_id == "q1")
        q2 = await link.expect(QueryResult, lambda f: f.request_id == "q2")
        r1 = await link.expect(ReadResult, lambda f: f.request_id == "r1")
        r2 = await link.expect(ReadResult, lambda f: f.request_id == "r2")
        r3 = await link.expect(ReadResult, lambda f: f.request_id == "r3")
        r4 = await link.expect(ReadResult, lambda f: f.request_id == "r4")
    assert (q1.path, q1.error) == (str(tmp_path / "src"), None)
    assert q2.error is not None
    assert q2.error.startswith("'../..' is outside the allowed directories")
    assert (r1.name, r1.size, base64.b64decode(r1.data)) == ("main.py", 12, b"print('hi')\n")
    assert r2.error is not None
    assert r2.error.startswith("'/etc/passwd' is outside the allowed directories")
    assert r3.error is not None
    assert "is outside the allowed directories" in r3.error
    assert r4.error == "this machine no longer has that diff"
