"""Secrets in config files: short tokens refused, loose file modes and plain ws:// said.

The real entry points as subprocesses, on real files, as in test_clean_failures.py.
A start is made to end right after its checks: the manager with a port in use,
the proxy with its state_dir locked by the test (exit 4).
"""

from __future__ import annotations

import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from codexnet.checks import file_mode_problem, open_listen_problem, plain_ws_problem
from codexnet.statelock import hold_state_lock
from tests.fakes.stack import BOT_TOKEN, PROXY_TOKEN
from tests.fakes.terminal import child_env
from tests.test_clean_failures import manager_file, proxy_file, run

MANAGER_HOLDS = "holds secrets (telegram_bot_token, proxies.*.token)"


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def fake_codex(tmp_path: Path) -> Path:
    """Something executable for codex_bin: the checks only look for it."""
    path = tmp_path / "codex"
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(0o755)
    return path


def start_manager(config: Path, port: int, cwd: Path) -> tuple[int, list[str]]:
    result = run(
        "codexnet.manager",
        "--config",
        str(config),
        "--ws-listen",
        f"127.0.0.1:{port}",
        cwd=cwd,
    )
    return result.returncode, result.stderr.splitlines()


def start_proxy(config: Path, state_dir: Path, cwd: Path) -> tuple[int, list[str]]:
    with hold_state_lock(state_dir, "proxy"):
        result = run("codexnet.proxy", "--config", str(config), cwd=cwd)
    return result.returncode, result.stderr.splitlines()


def logged(lines: list[str], level: str, text: str) -> list[str]:
    """Log lines (`<time> LEVEL name: message`) at `level` that end with `text`."""
    return [line for line in lines if f" {level} " in line and line.endswith(text)]


# ------------------------------------------------------------------ token length


def test_a_short_proxy_token_stops_a_proxy_start(tmp_path: Path, fake_codex: Path) -> None:
    config = proxy_file(tmp_path / "p.json", proxy_token="tiny", codex_bin=str(fake_codex))
    result = run("codexnet.proxy", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"codexnet-proxy: config error: {config}: proxy_token: shorter than 16 characters; "
        "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    ]
    assert not (tmp_path / "proxy-state").exists()  # refused before anything started


# ------------------------------------------------------------------ file modes


def test_a_manager_config_others_may_read_is_warned_about(tmp_path: Path, busy_port: int) -> None:
    config = manager_file(tmp_path / "c.json")
    config.chmod(0o644)
    warning = (
        f"{config}: {MANAGER_HOLDS} but its group may read it, others may read it "
        f"(mode 0644); fix: chmod 600 {config}"
    )
    result = run("codexnet.manager", "--config", str(config), "--check-config", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [f"WARNING: {warning}"]
    assert result.stdout == f"{config}: OK (1 proxies, 1 warning)\n"
    code, lines = start_manager(config, busy_port, tmp_path)
    assert code == 1  # the busy port: it got past the checks
    assert len(logged(lines, "WARNING", warning)) == 1


@pytest.mark.parametrize(
    ("mode", "problem"),
    [
        (0o600, None),
        (0o400, None),
        (0o610, None),  # execute bits: nobody can read or change it
        (0o640, ("but its group may read it (mode 0640)", False)),
        (0o660, ("but its group may read and change it (mode 0660)", False)),
        (0o620, ("but its group may change it (mode 0620)", False)),
        (0o664, ("but its group may read and change it, others may read it (mode 0664)", False)),
        (0o602, ("and is world-writable (mode 0602)", True)),
        (0o777, ("and is world-writable (mode 0777)", True)),
    ],
)
def test_which_modes_are_warned_about_or_refused(
    tmp_path: Path, mode: int, problem: tuple[str, bool] | None
) -> None:
    path = tmp_path / "c.json"
    path.write_text("{}")
    path.chmod(mode)
    found = file_mode_problem(path, ["proxy_token"])
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert found[0].startswith(f"holds secrets (proxy_token) {problem[0]}")
        assert found[0].endswith(f"; fix: chmod 600 {path}")
        assert found[1] is problem[1]
    assert file_mode_problem(path, []) is None  # nothing secret in it: any mode


def test_a_systemd_credential_is_left_alone(tmp_path: Path, busy_port: int) -> None:
    # systemd makes it 0400 with an ACL for the service's user, which stat shows as 0440.
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    config = manager_file(credentials / "codex_config.json")
    config.chmod(0o440)
    env = child_env(CREDENTIALS_DIRECTORY=str(credentials))
    result = run(
        "codexnet.manager", "--config", str(config), "--check-config", cwd=tmp_path, env=env
    )
    assert (result.returncode, result.stderr) == (0, "")
    # The same file outside it is warned about.
    assert file_mode_problem(config, ["proxy_token"], {}) is not None


def test_a_proxy_config_others_may_read_is_warned_about(tmp_path: Path, fake_codex: Path) -> None:
    config = proxy_file(tmp_path / "p.json", codex_bin=str(fake_codex))
    config.chmod(0o604)
    warning = (
        f"{config}: holds secrets (proxy_token) but others may read it (mode 0604); "
        f"fix: chmod 600 {config}"
    )
    result = run("codexnet.proxy", "--config", str(config), "--check-config", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [f"WARNING: {warning}"]
    assert result.stdout.endswith(", 1 warning)\n")
    code, lines = start_proxy(config, tmp_path / "proxy-state", tmp_path)
    assert code == 4  # the locked state_dir: it got past the checks
    assert len(logged(lines, "WARNING", warning)) == 1


@pytest.mark.parametrize("role", ["manager", "proxy"])
def test_a_world_writable_config_is_refused(tmp_path: Path, fake_codex: Path, role: str) -> None:
    if role == "manager":
        config = manager_file(tmp_path / "c.json")
        holds = MANAGER_HOLDS
    else:
        config = proxy_file(tmp_path / "p.json", codex_bin=str(fake_codex))
        holds = "holds secrets (proxy_token)"
    config.chmod(0o666)
    line = (
        f"codexnet-{role}: config error: {config}: {holds} and is world-writable (mode 0666): "
        f"anyone on this machine can change it; fix: chmod 600 {config}"
    )
    for args in (["--check-config"], []):
        result = run(f"codexnet.{role}", "--config", str(config), *args, cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [line]
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "proxy-state").exists()


def test_private_files_and_secrets_from_the_environment_are_fine(
    tmp_path: Path, fake_codex: Path
) -> None:
    config = manager_file(tmp_path / "c.json")  # 0600
    result = run("codexnet.manager", "--config", str(config), "--check-config", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")
    # A file without secrets (they come from the environment) may be readable.
    proxy = proxy_file(tmp_path / "p.json", codex_bin=str(fake_codex))
    text = proxy.read_text().replace(f'"proxy_token": "{PROXY_TOKEN}", ', "")
    assert PROXY_TOKEN not in text
    proxy.write_text(text)
    proxy.chmod(0o644)
    env = child_env(CODEXNET_PROXY_TOKEN=PROXY_TOKEN)
    result = run("codexnet.proxy", "--config", str(proxy), "--check-config", cwd=tmp_path, env=env)
    assert (result.returncode, result.stderr) == (0, "")
    assert BOT_TOKEN not in result.stdout + result.stderr
    assert stat.S_IMODE(proxy.stat().st_mode) == 0o644  # a check changes nothing


# ------------------------------------------------------------------ plain ws://


@pytest.mark.parametrize(
    "url",
    [
        "ws://127.0.0.1:8765",
        "ws://127.8.9.10:1",
        "ws://[::1]:8765",
        "ws://localhost:8765",
        "ws://LOCALHOST.:8765",
        "ws://box.localhost:8765",
        "wss://10.0.0.2:8765",
    ],
)
def test_no_warning_for_loopback_or_wss(url: str) -> None:
    assert plain_ws_problem(url) is None


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("ws://10.0.0.2:8765", "10.0.0.2"),
        ("ws://manager.example.org", "manager.example.org"),
        ("ws://[fd00::1]:1", "fd00::1"),
        ("ws://0.0.0.0:1", "0.0.0.0"),
        ("ws://localhost.example.org:1", "localhost.example.org"),
    ],
)
def test_plain_ws_to_another_machine_is_a_problem(url: str, host: str) -> None:
    assert (plain_ws_problem(url) or "").startswith(f"plain ws:// to {host}, another machine")


def test_plain_ws_to_another_machine_is_warned_about(tmp_path: Path, fake_codex: Path) -> None:
    config = proxy_file(
        tmp_path / "p.json", manager_ws="ws://10.0.0.2:8765", codex_bin=str(fake_codex)
    )
    warning = (
        f"{config}: manager_ws: plain ws:// to 10.0.0.2, another machine: the proxy "
        "token and every prompt and answer cross the network unencrypted; use wss:// (the "
        "manager's manager_tls_cert and manager_tls_key), with manager_ca_file here if its "
        "certificate is self-signed"
    )
    result = run("codexnet.proxy", "--config", str(config), "--check-config", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [f"WARNING: {warning}"]
    code, lines = start_proxy(config, tmp_path / "proxy-state", tmp_path)
    assert code == 4
    assert len(logged(lines, "WARNING", warning)) == 1
    # On this machine: nothing to say.
    config = proxy_file(tmp_path / "p.json", codex_bin=str(fake_codex))
    result = run("codexnet.proxy", "--config", str(config), "--check-config", cwd=tmp_path)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize(
    ("host", "tls", "where"),
    [
        ("127.0.0.1", False, None),
        ("::1", False, None),
        ("localhost", False, None),
        ("10.0.0.2", True, None),
        ("0.0.0.0", True, None),
        ("0.0.0.0", False, "every address"),
        ("::", False, "every address"),
        ("10.0.0.2", False, "10.0.0.2"),
        ("manager.example.org", False, "manager.example.org"),
    ],
)
def test_a_hub_listening_beyond_this_machine_without_tls_is_a_problem(
    host: str, tls: bool, where: str | None
) -> None:
    problem = open_listen_problem(host, 8765, tls=tls)
    if where is None:
        assert problem is None
    else:
        assert (problem or "").startswith(f"the hub listens on {where} (port 8765) without")


def test_a_hub_listening_beyond_this_machine_without_tls_is_warned_about(
    tmp_path: Path, busy_port: int
) -> None:
    config = manager_file(tmp_path / "c.json", manager_ws_listen=f"0.0.0.0:{busy_port}")
    warning = (
        f"{config}: manager_ws_listen: the hub listens on every address (port {busy_port}) "
        "without manager_tls_cert: proxy tokens and every prompt and answer cross the network "
        "unencrypted; set manager_tls_cert and manager_tls_key (proxies then use wss://), or "
        "listen on 127.0.0.1 behind a tunnel"
    )
    result = run("codexnet.manager", "--config", str(config), "--check-config", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stderr.splitlines() == [f"WARNING: {warning}"]
