"""The proxy tells the manager how its app-server is (hello and load frames), against a
manager reduced to its protocol and the scripted app-server."""

from __future__ import annotations

from pathlib import Path

import trio

from codexnet.protocol import Load, Task
from tests.fakes.rawmanager import FakeManager
from tests.test_proxy_delivery import Proxy, manager, run

__all__ = ["manager"]  # the fixture


async def test_a_crash_is_reported_as_restarting_then_ok(
    tmp_path: Path, manager: FakeManager, nursery: trio.Nursery
) -> None:
    proxy = Proxy(tmp_path, manager)
    await run(proxy.service(), nursery)
    link = await manager.accept()
    with trio.fail_after(20):
        if link.hello.health != "ok":
            await link.expect(Load, lambda f: f.health == "ok")
        await link.send(Task("t1", 1, "crash"))
        sick = await link.expect(Load, lambda f: f.health != "ok")
        assert (sick.health, sick.health_detail) == ("restarting", "app-server exited with code 3")
        back = await link.expect(Load, lambda f: f.health == "ok")
    assert back.health_detail == ""


async def test_a_codex_that_cannot_start_is_reported_as_failed(
    tmp_path: Path, manager: FakeManager, nursery: trio.Nursery
) -> None:
    proxy = Proxy(tmp_path, manager, codex_bin=str(tmp_path / "no-codex"))
    await run(proxy.service(), nursery)
    link = await manager.accept()
    with trio.fail_after(20):
        if link.hello.health != "failed":
            assert link.hello.health == "starting"
            failed = await link.expect(Load, lambda f: f.health == "failed")
        else:
            failed = link.hello
    assert failed.health_detail.startswith(f"cannot start '{tmp_path / 'no-codex'}'")
