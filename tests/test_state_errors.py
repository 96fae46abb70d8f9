"""A state database that cannot be used: one line naming the file, exit code 4, no traceback."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.fakes.processes import ManagerProcess, ProxyProcess, manager_config
from tests.fakes.stack import BOT_TOKEN, PROXY_TOKEN, free_port
from tests.fakes.telegram_api import FakeTelegram


async def test_a_corrupt_manager_database_is_one_line_and_exit_4(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    telegram = FakeTelegram(BOT_TOKEN)
    await nursery.start(telegram.serve)
    state = tmp_path / "state"
    state.mkdir()
    (state / "codexnet.db").write_bytes(b"garbage " * 512)
    async with ManagerProcess(manager_config(state, telegram.base_url), tmp_path / "m") as manager:
        with trio.fail_after(20):
            assert await manager.wait() == 4
    output = "\n".join(manager.lines)
    assert "Traceback" not in output
    assert f"{state / 'codexnet.db'}: is not a valid SQLite database (corrupt?)" in output
    assert (state / "codexnet.db").read_bytes() == b"garbage " * 512  # left as it was


async def test_a_corrupt_proxy_database_is_one_line_and_exit_4(tmp_path: Path) -> None:
    state = tmp_path / "proxy-state"
    state.mkdir()
    (state / "proxy.db").write_bytes(b"garbage " * 512)
    (tmp_path / "work").mkdir()
    config = {
        "manager_ws": f"ws://127.0.0.1:{free_port()}",
        "proxy_id": "proxy1",
        "proxy_token": PROXY_TOKEN,
        "codex_cwd": str(tmp_path / "work"),
        "codex_bin": "true",  # never started: the state is checked first
        "state_dir": str(state),
    }
    async with ProxyProcess(config, tmp_path / "p") as proxy:
        with trio.fail_after(20):
            assert await proxy.wait() == 4
    output = "\n".join(proxy.lines)
    assert "Traceback" not in output
    assert f"{state / 'proxy.db'}: is not a valid SQLite database (corrupt?)" in output
