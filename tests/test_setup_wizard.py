"""`--init` under a real pseudo-terminal against the fake Bot API over real HTTP."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import trio

from codexnet.checks import check_manager, errors
from codexnet.config import load_manager_config, load_proxy_config
from tests.fakes.stack import BOT_TOKEN, USER
from tests.fakes.telegram_api import FakeTelegram
from tests.fakes.terminal import Terminal, child_env, python_module, spawn


@pytest.fixture
async def telegram(nursery: trio.Nursery) -> FakeTelegram:
    fake = FakeTelegram(BOT_TOKEN)
    await nursery.start(fake.serve)
    return fake


def init_command(tmp_path: Path, *extra: str) -> list[str]:
    return python_module(
        "codexnet.manager", "--init", "--config", str(tmp_path / "codex_config.json"), *extra
    )


async def give_token(term: Terminal, token: str = BOT_TOKEN) -> None:
    await term.expect(r"Bot token \(input hidden\): ")
    await term.send(token + "\r")


async def write_when_waiting(telegram: FakeTelegram, text: str = "hi") -> None:
    """The owner writes once the wizard listens (a message sent earlier is skipped)."""
    with trio.fail_after(15):
        await telegram.wait_for_request("getUpdates", lambda r: r.params.get("offset") == -1)
        await telegram.wait_until(lambda: telegram.polling)
    telegram.push_message(USER, text, first_name="Ada")


def written(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "work")


async def test_init_writes_two_working_configs(tmp_path: Path, telegram: FakeTelegram) -> None:
    (tmp_path / "work").mkdir()
    # An update from before the wizard ran: whoever sent it must not become the owner.
    telegram.push_message(4242, "old message from a stranger")
    env = child_env(TELEGRAM_API_BASE=telegram.base_url)
    async with spawn(init_command(tmp_path), env=env, cwd=tmp_path) as term:
        await give_token(term)
        await term.expect(r"OK: @codexnet_test_bot")
        await term.expect(r"Waiting up to")
        await write_when_waiting(telegram)
        await term.expect(rf"Ada, user id {USER}")
        await term.expect(r"Is that you\? \(y/n\) \[y\]: ")
        await term.send("\r")
        await term.expect(r"Its name \[[^\]]+\]: ")
        await term.send("laptop\r")
        await term.expect(r"Folder Codex works in \[[^\]]+\]: ")
        await term.send(f"{tmp_path / 'work'}\r")
        await term.expect(r"Start them")
        assert await term.wait() == 0
    assert BOT_TOKEN not in term.output  # typed, but never echoed
    assert "-m codexnet.manager --config codex_config.json" in term.output
    assert "-m codexnet.proxy --config proxy_config.json" in term.output

    assert written(tmp_path) == ["codex_config.json", "proxy_config.json"]
    for name in written(tmp_path):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    manager = load_manager_config(tmp_path / "codex_config.json", env={})
    proxy = load_proxy_config(tmp_path / "proxy_config.json", env={})
    assert manager.telegram_bot_token == BOT_TOKEN
    assert manager.telegram_allowed_user_ids == {USER}
    assert manager.telegram_api_base == telegram.base_url
    assert set(manager.proxies) == {"laptop"}
    assert proxy.proxy_id == "laptop"
    assert manager.proxies["laptop"].token == proxy.proxy_token
    assert len(proxy.proxy_token) >= 32
    assert proxy.codex_cwd == tmp_path / "work"
    assert proxy.manager_ws == "ws://127.0.0.1:8765"
    assert errors(check_manager(manager)) == []
    # "hi" was confirmed to Telegram: the manager will not run it as a prompt.
    assert telegram.pending_updates == []
    assert any("codexnet is set up" in (m.text or "") for m in telegram.messages(USER))


async def test_a_refused_token_is_one_line(tmp_path: Path, telegram: FakeTelegram) -> None:
    env = child_env(TELEGRAM_API_BASE=telegram.base_url)
    async with spawn(init_command(tmp_path), env=env, cwd=tmp_path) as term:
        await give_token(term, "123456789:not-the-right-token-at-all-xxxxxxxxxxx")
        await term.expect(r"codexnet-manager: Telegram refused this bot token \(401 Unauthorized\)")
        assert await term.wait() == 2
    assert "Traceback" not in term.output
    assert written(tmp_path) == []


async def test_no_message_within_the_timeout(tmp_path: Path, telegram: FakeTelegram) -> None:
    env = child_env(TELEGRAM_API_BASE=telegram.base_url)
    command = init_command(tmp_path, "--init-timeout", "1")
    async with spawn(command, env=env, cwd=tmp_path) as term:
        await give_token(term)
        await term.expect(
            r"codexnet-manager: no message reached @codexnet_test_bot within 1 s; "
            r"run --init again"
        )
        assert await term.wait() == 1
    assert written(tmp_path) == []


@pytest.mark.parametrize("where", ["waiting for the message", "at the last question"])
async def test_ctrl_c_leaves_nothing_written(
    tmp_path: Path, telegram: FakeTelegram, where: str
) -> None:
    env = child_env(TELEGRAM_API_BASE=telegram.base_url)
    async with spawn(init_command(tmp_path), env=env, cwd=tmp_path) as term:
        await give_token(term)
        await term.expect(r"Waiting up to")
        if where == "at the last question":
            await write_when_waiting(telegram)
            await term.expect(r"\(y/n\) \[y\]: ")
            await term.send("\r")
            await term.expect(r"Its name \[[^\]]+\]: ")
            await term.send("box\r")
            await term.expect(r"Folder Codex works in")
        else:
            with trio.fail_after(15):
                await telegram.wait_until(lambda: telegram.polling)
        await term.send("\x03")
        await term.expect(r"codexnet-manager: set-up cancelled; nothing was written")
        assert await term.wait() == 130
    assert "Traceback" not in term.output
    assert written(tmp_path) == []  # not even a temporary file


async def test_without_a_config_the_manager_offers_init_and_then_runs(
    tmp_path: Path, telegram: FakeTelegram
) -> None:
    """The README's first command on a fresh clone, at a terminal."""
    (tmp_path / "work").mkdir()
    # The written config listens on 8765; any free port will do for the test.
    env = child_env(TELEGRAM_API_BASE=telegram.base_url, MANAGER_WS_LISTEN="127.0.0.1:0")
    command = python_module("codexnet.manager", "--config", "codex_config.json")
    async with spawn(command, env=env, cwd=tmp_path) as term:
        await term.expect(r"codex_config.json does not exist. Create it now\? \[Y/n\] ")
        await term.send("\r")
        await give_token(term)
        await write_when_waiting(telegram)
        await term.expect(r"\(y/n\) \[y\]: ")
        await term.send("y\r")
        await term.expect(r"Its name \[[^\]]+\]: ")
        await term.send("\r")
        await term.expect(r"Folder Codex works in \[[^\]]+\]: ")
        await term.send(f"{tmp_path / 'work'}\r")
        await term.expect(r"Starting the manager now")
        await term.expect(r"Telegram bot @codexnet_test_bot ready")
        await term.send("\x03")
        assert await term.wait() == 0
    assert "Traceback" not in term.output
    assert BOT_TOKEN not in term.output
    assert (tmp_path / "state").is_dir()


async def test_declining_the_offer_is_one_line(tmp_path: Path) -> None:
    command = python_module("codexnet.manager")
    async with spawn(command, env=child_env(), cwd=tmp_path) as term:
        await term.expect(r"Create it now\? \[Y/n\] ")
        await term.send("n\r")
        await term.expect(r"codexnet-manager: codex_config.json: file not found; create it with")
        assert await term.wait() == 2
    assert written(tmp_path) == []


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command,
        cwd=cwd,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_config_path_in_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    result = run(
        python_module("codexnet.manager", "--init", "--config", str(missing / "c.json")), tmp_path
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"codexnet-manager: cannot write {missing / 'c.json'}: "
        f"the directory {missing} does not exist\n"
    )


def test_init_refuses_an_existing_config_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "codex_config.json").write_text("{}")
    result = run(init_command(tmp_path), tmp_path)
    assert result.returncode == 2
    assert "codex_config.json already exists; pass --force to replace" in result.stderr
    assert (tmp_path / "codex_config.json").read_text() == "{}"
    # --force gets past that check (and then needs a terminal: none here).
    forced = run(init_command(tmp_path, "--force"), tmp_path)
    assert forced.returncode == 2
    assert forced.stderr == "codexnet-manager: --init asks questions: run it in a terminal\n"


def test_the_files_are_private_even_with_a_loose_umask(tmp_path: Path) -> None:
    from codexnet.manager.setup_wizard import install_files

    old = os.umask(0)
    try:
        install_files([(tmp_path / "a.json", "{}"), (tmp_path / "b.json", "{}")])
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o600}
