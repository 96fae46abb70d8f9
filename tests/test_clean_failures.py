"""Each way a start can fail says one line naming the thing, exits non-zero, no traceback.

These run the real entry points as a person (or systemd) would: a subprocess,
no terminal, real files, real sockets.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from codexnet.manager.__main__ import _parser as manager_parser
from tests.fakes.stack import BOT_TOKEN, PROXY_TOKEN, USER
from tests.fakes.telegram_api import FakeTelegram
from tests.fakes.terminal import child_env, python_module

GOOD_TOKEN = "a-generated-token-0123456789abcdef"


def run(
    module: str,
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    user: int | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        python_module(module, *args),
        cwd=cwd,
        env=env or child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        user=user,
    )
    assert "Traceback" not in result.stderr + result.stdout
    return result


def manager_file(path: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "telegram_bot_token": BOT_TOKEN,
        "telegram_allowed_user_ids": [USER],
        "proxies": {"proxy1": {"token": PROXY_TOKEN}},
        "state_dir": str(path.parent / "state"),
    }
    data.update(changes)
    path.write_text(json.dumps(data))
    path.chmod(0o600)  # as --init writes it (a looser mode is warned about)
    return path


def proxy_file(path: Path, **changes: Any) -> Path:
    data: dict[str, Any] = {
        "manager_ws": "ws://127.0.0.1:9",
        "proxy_id": "proxy1",
        "proxy_token": PROXY_TOKEN,
        "codex_cwd": str(path.parent),
        "state_dir": str(path.parent / "proxy-state"),
    }
    data.update(changes)
    path.write_text(json.dumps(data))
    path.chmod(0o600)  # as --init writes it (a looser mode is warned about)
    return path


# ------------------------------------------------------------------ no config, bad syntax


def test_no_config_and_no_terminal(tmp_path: Path) -> None:
    manager = run("codexnet.manager", cwd=tmp_path)
    assert manager.returncode == 2
    assert manager.stderr == (
        "codexnet-manager: codex_config.json: file not found; create it with "
        "`python -m codexnet.manager --init` or from config.manager.example.jsonc\n"
    )
    proxy = run("codexnet.proxy", cwd=tmp_path)
    assert proxy.returncode == 2
    assert proxy.stderr.startswith("codexnet-proxy: proxy_config.json: file not found; ")
    assert "--add-proxy NAME" in proxy.stderr
    assert proxy.stderr.count("\n") == 1


def test_a_jsonc_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "codex_config.json"
    path.write_text('{\n  // fine\n  "telegram_bot_token": "x",,\n}\n')
    result = run("codexnet.manager", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"codexnet-manager: config error: {path}: not valid JSONC: line 3, column "
    )
    assert result.stderr.count("\n") == 1


# ------------------------------------------------------------------ command line


def test_version_on_both_entry_points(tmp_path: Path) -> None:
    assert run("codexnet.manager", "--version", cwd=tmp_path).stdout == "codexnet-manager 0.1.0\n"
    assert run("codexnet.proxy", "--version", cwd=tmp_path).stdout == "codexnet-proxy 0.1.0\n"


def test_log_level_is_case_insensitive_and_lists_its_choices(tmp_path: Path) -> None:
    config = manager_file(tmp_path / "c.json")
    ok = run("codexnet.manager", "--config", str(config), "--log-level", "debug", "--check-config",
             cwd=tmp_path)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    bad = run("codexnet.proxy", "--log-level", "loud", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr == (
        "codexnet-proxy: argument --log-level: invalid choice: 'LOUD' "
        "(choose from 'DEBUG', 'INFO', 'WARNING', 'ERROR') (see --help)\n"
    )
    assert "--log-level {DEBUG,INFO,WARNING,ERROR}" in manager_parser().format_help()


# ------------------------------------------------------------------ port, state_dir


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize("mode", [[], ["--ws-only"]])
def test_a_port_in_use(tmp_path: Path, busy_port: int, mode: list[str]) -> None:
    config = manager_file(tmp_path / "c.json", manager_ws_listen=f"127.0.0.1:{busy_port}")
    result = run("codexnet.manager", "--config", str(config), *mode, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"codexnet-manager: cannot listen on 127.0.0.1:{busy_port} (manager_ws_listen): "
        "Address already in use"
    )


def test_a_missing_state_dir_is_created(tmp_path: Path, busy_port: int) -> None:
    # The busy port ends the run right after the state_dir step, which is what is tested.
    config = manager_file(tmp_path / "c.json", manager_ws_listen=f"127.0.0.1:{busy_port}")
    run("codexnet.manager", "--config", str(config), cwd=tmp_path)
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("a-file/state", "cannot be created: "),
        ("a-file", "not a directory"),
    ],
)
def test_a_state_dir_that_cannot_work(tmp_path: Path, where: str, message: str) -> None:
    (tmp_path / "a-file").write_text("")
    state = tmp_path / where
    config = manager_file(tmp_path / "c.json", state_dir=str(state))
    result = run("codexnet.manager", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"codexnet-manager: config error: {config}: state_dir: {state}")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


def read_only_wrapper(folder: Path) -> list[str]:
    """A command prefix under which `folder` cannot be written, even by root.

    As root, permission bits do not stop a write, so `folder` becomes a
    read-only bind mount in a private mount namespace: what a unit's
    `ProtectSystem=strict` does to every path it does not list. Otherwise the
    bits are enough.
    """
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'mount --bind -o ro "{folder}" "{folder}" && exec "$@"', "sh"]  # fmt: skip
    probe = subprocess.run([*wrapper, "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only mount here: {probe.stderr.decode().strip()}")
    return wrapper


def test_an_unwritable_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = manager_file(tmp_path / "c.json", state_dir=str(state))
    wrapper = read_only_wrapper(state)
    for extra, code in (([], 2), (["--check-config"], 2)):
        result = subprocess.run(
            [*wrapper, *python_module("codexnet.manager", "--config", str(config), *extra)],
            cwd=tmp_path,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == code
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith(
            f"codexnet-manager: config error: {config}: state_dir: {state}: not writable"
        )
        assert result.stderr.count("\n") == 1
    state.chmod(0o755)


# ------------------------------------------------------------------ codex, tokens


@pytest.mark.parametrize(
    ("codex_bin", "message"),
    [
        ("/no/such/codex", "'/no/such/codex' does not exist"),
        ("no-such-codex-here", "'no-such-codex-here' not found on PATH"),
    ],
)
def test_a_missing_codex_binary(tmp_path: Path, codex_bin: str, message: str) -> None:
    config = proxy_file(tmp_path / "p.json", codex_bin=codex_bin)
    result = run("codexnet.proxy", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"codexnet-proxy: config error: {config}: codex_bin: {message}")
    assert result.stderr.count("\n") == 1


async def test_a_refused_bot_token_exits_3(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Exit code 3 is in the unit's RestartPreventExitStatus: no restart loop."""
    telegram = FakeTelegram("999:the-token-telegram-really-has-xxxxxxxxxxxxx")
    await nursery.start(telegram.serve)
    config = manager_file(
        tmp_path / "c.json", telegram_api_base=telegram.base_url, manager_ws_listen="127.0.0.1:0"
    )
    result = await trio.run_process(
        python_module("codexnet.manager", "--config", str(config)),
        env=child_env(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    stderr = result.stderr.decode()
    assert result.returncode == 3
    assert "Traceback" not in stderr
    assert stderr.splitlines()[-1].endswith(
        "Telegram refused the bot: deleteWebhook: 401 Unauthorized (is the bot token right?)"
    )
    assert BOT_TOKEN not in stderr


# ------------------------------------------------------------------ --check-config


def test_check_config_warns_but_passes_on_a_config_that_barely_works(tmp_path: Path) -> None:
    config = manager_file(tmp_path / "c.json", proxies={}, telegram_allowed_user_ids=[])
    result = run("codexnet.manager", "--config", str(config), "--check-config", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [
        f"WARNING: {config}: proxies: none listed: no machine can connect; "
        "add one with --add-proxy ID",
        f"WARNING: {config}: telegram_allowed_user_ids: empty: the bot refuses everybody "
        "(and tells each person their user id)",
    ]
    assert result.stdout == f"{config}: OK (0 proxies, 2 warnings)\n"


def test_check_config_fails_on_tokens_that_cannot_work(tmp_path: Path) -> None:
    config = manager_file(
        tmp_path / "c.json",
        proxies={
            "short": {"token": "x"},
            "a": {"token": GOOD_TOKEN},
            "b": {"token": GOOD_TOKEN},
        },
    )
    result = run("codexnet.manager", "--config", str(config), "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    prefix = f"codexnet-manager: config error: {config}: "
    assert result.stderr.splitlines() == [
        prefix + "proxies.short.token: shorter than 16 characters; generate one with: "
        "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'",
        prefix + "proxies.b.token: the same as proxies.a.token",
    ]
    assert GOOD_TOKEN not in result.stderr
    proxy = proxy_file(tmp_path / "p.json", proxy_token="tiny", codex_bin="/no/codex")
    result = run("codexnet.proxy", "--config", str(proxy), "--check-config", cwd=tmp_path)
    assert result.returncode == 2
    assert [line.split(": ")[3] for line in result.stderr.splitlines()] == [
        "proxy_token",
        "codex_bin",
    ]


def test_a_weak_token_also_stops_a_start(tmp_path: Path) -> None:
    config = manager_file(tmp_path / "c.json", proxies={"p": {"token": "short"}})
    result = run("codexnet.manager", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "proxies.p.token: shorter than 16 characters" in result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything started
