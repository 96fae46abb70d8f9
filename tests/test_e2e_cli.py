"""The two programs as a person runs them: real processes, real codex, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from tests.fakes.codex_env import require_codex, write_codex_home
from tests.fakes.responses_api import FakeResponsesAPI
from tests.fakes.stack import BOT_TOKEN, PROXY_TOKEN, USER, free_port
from tests.fakes.telegram_api import FakeTelegram

pytestmark = pytest.mark.e2e
PROXY2_TOKEN = "proxy2-secret-token-9876543210"


@pytest.fixture
async def model(nursery: trio.Nursery) -> FakeResponsesAPI:
    fake = FakeResponsesAPI()
    await nursery.start(fake.serve)
    return fake


def write_json(path: Path, data: object) -> Path:
    path.write_text("// written by the test\n" + json.dumps(data, indent=2))
    path.chmod(0o600)  # it holds tokens (a looser mode is warned about)
    return path


def manager_config(tmp: Path, port: int, api_base: str = "http://127.0.0.1:9") -> Path:
    return write_json(
        tmp / "codex_config.json",
        {
            "telegram_bot_token": BOT_TOKEN,
            "telegram_api_base": api_base,
            "telegram_allowed_user_ids": [USER],
            "manager_ws_listen": f"127.0.0.1:{port}",
            "proxies": {"proxy1": {"token": PROXY_TOKEN}, "proxy2": {"token": PROXY2_TOKEN}},
            "state_dir": str(tmp / "state"),
            "telegram_poll_timeout_s": 5,
        },
    )


def proxy_config(tmp: Path, port: int, token: str = PROXY_TOKEN) -> Path:
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    return write_json(
        tmp / "proxy_config.json",
        {
            "manager_ws": f"ws://127.0.0.1:{port}",
            "proxy_id": "proxy1",
            "proxy_token": token,
            "codex_cwd": str(work),
            "codex_bin": require_codex(),
            "approval_policy": "never",
            "sandbox": "read-only",
        },
    )


def python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


async def one_shot(
    config: Path, port: int, *, cli_timeout: int
) -> subprocess.CompletedProcess[bytes]:
    """The README's one-shot command: `--ws-only … --dispatch-proxy proxy1 --prompt ping`."""
    return await trio.run_process(
        python(
            "codexnet.manager",
            "--config",
            str(config),
            "--ws-only",
            "--ws-listen",
            f"127.0.0.1:{port}",
            "--dispatch-proxy",
            "proxy1",
            "--prompt",
            "ping",
            "--timeout",
            str(cli_timeout),
        ),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@pytest.fixture
async def codex_env(tmp_path: Path, model: FakeResponsesAPI) -> dict[str, str]:
    return write_codex_home(tmp_path / "codex-home", model.base_url)


async def start(
    nursery: trio.Nursery, command: list[str], env: dict[str, str] | None, log: Path
) -> trio.Process:
    out = log.open("wb")
    process = await trio.lowlevel.open_process(
        command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent
    )
    out.close()
    return process


@pytest.fixture
async def processes() -> AsyncIterator[list[trio.Process]]:
    started: list[trio.Process] = []
    yield started
    for process in started:  # never leave a child behind, whatever the test did
        if process.returncode is None:
            process.kill()
            with trio.move_on_after(5, shield=True):
                await process.wait()


async def test_one_shot_cli_prints_the_answer(
    tmp_path: Path,
    codex_env: dict[str, str],
    nursery: trio.Nursery,
    processes: list[trio.Process],
) -> None:
    port = free_port()
    config = manager_config(tmp_path, port)
    processes.append(
        await start(
            nursery,
            python("codexnet.proxy", "--config", str(proxy_config(tmp_path, port))),
            codex_env,
            tmp_path / "proxy.log",
        )
    )
    with trio.fail_after(90):
        result = await one_shot(config, port, cli_timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().strip() == "Echo: ping (turn 1)"


async def test_one_shot_cli_times_out_with_one_clear_line(tmp_path: Path) -> None:
    port = free_port()
    config = manager_config(tmp_path, port)
    with trio.fail_after(30):
        result = await one_shot(config, port, cli_timeout=2)
    assert result.returncode == 1
    last = result.stderr.decode().strip().splitlines()[-1]
    assert last == "codexnet-manager: no answer from proxy proxy1 within 2 s"


async def test_a_proxy_with_a_wrong_token_is_refused(
    tmp_path: Path,
    codex_env: dict[str, str],
    nursery: trio.Nursery,
    processes: list[trio.Process],
) -> None:
    port = free_port()
    config = manager_config(tmp_path, port)
    processes.append(
        await start(
            nursery,
            python("codexnet.manager", "--config", str(config), "--ws-only"),
            None,
            tmp_path / "manager.log",
        )
    )
    bad = proxy_config(tmp_path, port, token="this-is-not-the-token")
    with trio.fail_after(60):
        result = await trio.run_process(
            python("codexnet.proxy", "--config", str(bad)),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=codex_env,
        )
    output = result.stderr.decode()
    assert result.returncode == 3, output
    assert (
        "the manager refused this proxy: unknown proxy id or wrong token (close code 4401)"
        in output
    )
    assert "this-is-not-the-token" not in output
    manager_log = (tmp_path / "manager.log").read_text()
    assert "refusing a proxy from 127.0.0.1" in manager_log
    assert "wrong token for proxy 'proxy1'" in manager_log
    assert "this-is-not-the-token" not in manager_log
    assert PROXY_TOKEN not in manager_log


@pytest.mark.parametrize(
    ("module", "data", "message"),
    [
        (
            "codexnet.manager",
            {"telegram_bot_token": BOT_TOKEN, "proxies": {"p": {"token": 1}}},
            "c.json: proxies.p.token: expected a string",
        ),
        (
            "codexnet.proxy",
            {"manager_ws": "ws://x:1", "proxy_id": "p"},
            "c.json: proxy_token: required",
        ),
    ],
)
async def test_check_config_names_file_and_key(
    tmp_path: Path, module: str, data: object, message: str
) -> None:
    path = write_json(tmp_path / "c.json", data)
    result = await trio.run_process(
        python(module, "--config", str(path), "--check-config"),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr.decode()
    assert BOT_TOKEN not in result.stderr.decode()


async def test_both_services_answer_log_no_token_and_stop_on_sigterm(
    tmp_path: Path,
    codex_env: dict[str, str],
    nursery: trio.Nursery,
    processes: list[trio.Process],
) -> None:
    telegram = FakeTelegram(BOT_TOKEN)
    await nursery.start(telegram.serve)
    port = free_port()
    config = manager_config(tmp_path, port, telegram.base_url)
    manager = await start(
        nursery,
        python("codexnet.manager", "--config", str(config), "--log-level", "DEBUG"),
        None,
        tmp_path / "manager.log",
    )
    proxy = await start(
        nursery,
        python(
            "codexnet.proxy", "--config", str(proxy_config(tmp_path, port)), "--log-level", "DEBUG"
        ),
        codex_env,
        tmp_path / "proxy.log",
    )
    processes.extend([manager, proxy])
    telegram.push_message(USER, "hello")
    # Sent at once: the manager waits a moment for a proxy that is still connecting.
    with trio.fail_after(60):
        await telegram.wait_until(
            lambda: any(m.text == "Echo: hello (turn 1)" for m in telegram.messages(USER))
        )
    with trio.fail_after(10):  # SIGTERM stops both cleanly within a few seconds
        for process in (proxy, manager):
            process.send_signal(signal.SIGTERM)
        assert await proxy.wait() == 0
        assert await manager.wait() == 0
    logs = (tmp_path / "manager.log").read_text() + (tmp_path / "proxy.log").read_text()
    assert "Telegram bot @codexnet_test_bot ready" in logs
    assert "SIGTERM received, shutting down" in logs
    secret = BOT_TOKEN.split(":", 1)[1]
    for token in (secret, PROXY_TOKEN, PROXY2_TOKEN):
        assert token not in logs
    # The codex child went away with its proxy.
    assert not [
        p
        for p in os.listdir("/proc")
        if p.isdigit() and _cmdline(p).startswith(require_codex()) and str(tmp_path) in _environ(p)
    ]


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _environ(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""
