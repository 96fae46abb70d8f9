"""Config loading: JSONC, environment overrides, and errors that name file and key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from codexnet.config import (
    ConfigError,
    load_manager_config,
    load_proxy_config,
    parse_listen,
)

MANAGER = """
// the manager's config, with comments
{
  "telegram_bot_token": "123456:ABCDEFGHIJKLMNOPQRSTUVWXYZ",
  /* block comment */
  "telegram_allowed_user_ids": [42, 43],
  "manager_ws_listen": "0.0.0.0:9000",
  "default_proxy": "proxy1",
  "proxies": {
    "proxy1": {"token": "secret-one", "labels": ["gpu"]},
    "proxy2": {"token": "secret-two"},   // trailing comma next
  },
  "state_dir": "/var/lib/codexnet",
}
"""


def write(tmp_path: Path, text: str, name: str = "c.jsonc") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_manager_config_reads_jsonc(tmp_path: Path) -> None:
    config = load_manager_config(write(tmp_path, MANAGER), env={})
    assert config.telegram_allowed_user_ids == {42, 43}
    assert config.manager_ws_listen == ("0.0.0.0", 9000)
    assert config.proxies["proxy1"].labels == ("gpu",)
    assert config.proxies["proxy2"].token == "secret-two"
    assert config.default_proxy == "proxy1"
    assert config.state_dir == Path("/var/lib/codexnet")
    assert config.telegram_api_base == "https://api.telegram.org"
    # Secrets never show in reprs (which end up in logs and tracebacks).
    assert "ABCDEFGHIJ" not in repr(config)
    assert "secret-one" not in repr(config)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "TELEGRAM_BOT_TOKEN": "999:fromenv-fromenv-fromenv",
        "TELEGRAM_API_BASE": "http://127.0.0.1:1234/",
        "TELEGRAM_ALLOWED_USER_IDS": "7, 8",
        "MANAGER_WS_LISTEN": "127.0.0.1:7000",
        "CODEXNET_STATE_DIR": "/tmp/state",
    }
    config = load_manager_config(write(tmp_path, MANAGER), env=env)
    assert config.telegram_bot_token == "999:fromenv-fromenv-fromenv"
    assert config.telegram_api_base == "http://127.0.0.1:1234"
    assert config.telegram_allowed_user_ids == {7, 8}
    assert config.manager_ws_listen == ("127.0.0.1", 7000)
    assert config.state_dir == Path("/tmp/state")


def test_empty_allowlist_means_nobody(tmp_path: Path) -> None:
    path = write(tmp_path, '{"telegram_bot_token": "1:x"}')
    assert load_manager_config(path, env={}).telegram_allowed_user_ids == frozenset()


def test_default_path_is_codex_config_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, '{"telegram_bot_token": "1:x", "proxies": {}}', "codex_config.json")
    assert load_manager_config(env={}).source == "codex_config.json"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"proxies": {"proxy1": {"token": 5}}, "telegram_bot_token": "1:x"}',
            "c.jsonc: proxies.proxy1.token: expected a string",
        ),
        (
            '{"proxies": {"proxy1": {}}, "telegram_bot_token": "1:x"}',
            "c.jsonc: proxies.proxy1.token: required",
        ),
        (
            '{"proxies": {"proxy1": {"token": "t", "colour": 1}}, "telegram_bot_token": "1:x"}',
            "c.jsonc: proxies.proxy1.colour: unknown key",
        ),
        ('{"proxies": [], "telegram_bot_token": "1:x"}', "c.jsonc: proxies: expected an object"),
        ('{"telegram_bot_token": 12}', "c.jsonc: telegram_bot_token: expected a string"),
        ("{}", "c.jsonc: telegram_bot_token: required (or set TELEGRAM_BOT_TOKEN)"),
        (
            '{"telegram_bot_token": "1:x", "telegram_allowed_user_ids": ["a"]}',
            "c.jsonc: telegram_allowed_user_ids: expected a list of integer user ids",
        ),
        (
            '{"telegram_bot_token": "1:x", "manager_ws_listen": "nope"}',
            "c.jsonc: manager_ws_listen: expected HOST:PORT, got 'nope'",
        ),
        (
            '{"telegram_bot_token": "1:x", "default_proxy": "label: ,"}',
            "c.jsonc: default_proxy: label: needs at least one label",
        ),
        (
            '{"telegram_bot_token": "1:x", "default_proxy": "ghost"}',
            "c.jsonc: default_proxy: 'ghost' is not listed under proxies (or write"
            ' "label:<a>" or "auto")',
        ),
        (
            '{"telegram_bot_token": "1:x", "telegram_api_base": "ftp://x"}',
            "c.jsonc: telegram_api_base: expected an http:// or https:// URL",
        ),
        ('{"telegram_bot_token": "1:x", "tokne": 1}', "c.jsonc: tokne: unknown key"),
        ("[1, 2]", "c.jsonc: expected an object at the top level"),
        (
            '{"telegram_bot_token": "1:x", "manager_tls_cert": "/no/cert.pem"}',
            "c.jsonc: manager_tls_cert: '/no/cert.pem' is not a file",
        ),
    ],
)
def test_manager_config_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_manager_config(write(tmp_path, text), env={})
    assert str(info.value).replace(str(tmp_path) + "/", "") == message


@pytest.mark.parametrize("mode", ["auto", "label:gpu", "label:gpu,linux"])
def test_default_proxy_may_be_a_pool_or_auto(tmp_path: Path, mode: str) -> None:
    text = json.dumps({"telegram_bot_token": "1:x", "default_proxy": mode})
    assert load_manager_config(write(tmp_path, text), env={}).default_proxy == mode


def test_broken_jsonc_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c\.jsonc: not valid JSONC"):
        load_manager_config(write(tmp_path, '{"a": '), env={})


def test_explicit_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.json: file not found"):
        load_manager_config(tmp_path / "nope.json", env={})


def test_bad_env_value_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, '{"telegram_bot_token": "1:x"}')
    with pytest.raises(ConfigError, match="telegram_allowed_user_ids: expected a comma-separated"):
        load_manager_config(path, env={"TELEGRAM_ALLOWED_USER_IDS": "7,x"})


def test_ws_only_needs_no_token(tmp_path: Path) -> None:
    config = load_manager_config(write(tmp_path, "{}"), env={}, require_telegram=False)
    assert config.telegram_bot_token is None


def proxy_text(tmp_path: Path, **extra: object) -> str:
    import json

    data: dict[str, object] = {
        "manager_ws": "ws://127.0.0.1:8765",
        "proxy_id": "proxy1",
        "proxy_token": "secret-one",
        "codex_cwd": str(tmp_path),
    }
    data.update(extra)
    return "// proxy\n" + json.dumps(data)


def test_proxy_config_defaults(tmp_path: Path) -> None:
    config = load_proxy_config(write(tmp_path, proxy_text(tmp_path)), env={})
    assert config.codex_bin == "codex"
    assert config.capacity == 2
    assert config.codex_cwd == tmp_path
    assert config.approval_policy == "on-request"
    assert config.sandbox == "workspace-write"
    assert config.thread_idle_unload_s == 1800
    assert "secret-one" not in repr(config)


def test_allowed_roots_default_to_codex_cwd_and_resolve_symlinks(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(project)
    config = load_proxy_config(write(tmp_path, proxy_text(project)), env={})
    assert config.roots == (project,)
    text = proxy_text(project / "src", allowed_roots=[str(link)], model="gpt-5.5", effort="high")
    config = load_proxy_config(write(tmp_path, text), env={})
    assert config.roots == (project,)  # the link, resolved
    assert (config.model, config.effort) == ("gpt-5.5", "high")


def test_proxy_settings_reach_the_child_env(tmp_path: Path) -> None:
    text = proxy_text(tmp_path, http_proxy="http://p:3128", no_proxy="localhost")
    config = load_proxy_config(write(tmp_path, text), env={})
    env = config.child_env({"CODEX_HOME": "/srv/codex"})
    assert env["CODEX_HOME"] == "/srv/codex"
    assert env["http_proxy"] == env["HTTP_PROXY"] == "http://p:3128"
    assert env["no_proxy"] == "localhost"
    assert "https_proxy" not in env


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"capacity": 0}, r"capacity: expected an integer in 1\.\.1000, got 0"),
        ({"capacity": "2"}, "capacity: expected an integer"),
        ({"approval_policy": "always"}, "approval_policy: expected one of untrusted, on-request"),
        ({"sandbox": "none"}, "sandbox: expected one of read-only"),
        ({"manager_ws": "http://x"}, "manager_ws: expected a ws:// or wss:// URL"),
        ({"codex_cwd": "/no/such/dir"}, "codex_cwd: '/no/such/dir' is not a directory"),
        ({"proxy_token": ""}, "proxy_token: required"),
        ({"labels": "gpu"}, "labels: expected a list of strings"),
        (
            {"thread_idle_unload_s": -1},
            r"thread_idle_unload_s: expected a number of seconds in \[0, 604800\], got -1",
        ),
        ({"allowed_roots": []}, "allowed_roots: expected at least one directory"),
        ({"allowed_roots": ["/no/such/root"]}, "allowed_roots: '/no/such/root' is not a dir"),
        ({"allowed_roots": ["/usr"]}, "allowed_roots: codex_cwd .* is not inside any of them"),
        ({"model": "x" * 1000}, "model: expected a model name like gpt-5.5; got 'xxx"),
        ({"model": "gpt 5"}, "model: expected a model name"),
        ({"effort": "HIGH!"}, "effort: expected a reasoning effort like medium"),
    ],
)
def test_proxy_config_errors(tmp_path: Path, extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_proxy_config(write(tmp_path, proxy_text(tmp_path, **extra)), env={})


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8765") == ("127.0.0.1", 8765)
    assert parse_listen("[::1]:80") == ("::1", 80)
    with pytest.raises(ConfigError, match="--ws-listen: expected HOST:PORT"):
        parse_listen("8765x")


def test_a_bad_certificate_names_the_keys(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    text = f'{{"telegram_bot_token": "1:x", "manager_tls_cert": "{tmp_path}/cert.pem"}}'
    config = load_manager_config(write(tmp_path, text), env={})
    with pytest.raises(ConfigError, match="manager_tls_cert/manager_tls_key: cannot load"):
        config.ssl_context()


def test_tls_key_without_cert_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text("x")
    text = f'{{"telegram_bot_token": "1:x", "manager_tls_key": "{tmp_path}/key.pem"}}'
    with pytest.raises(ConfigError, match="manager_tls_key: given without manager_tls_cert"):
        load_manager_config(write(tmp_path, text), env={})


def test_a_missing_default_file_is_not_an_empty_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^codex_config\.json: file not found$"):
        load_manager_config(env={"MANAGER_WS_LISTEN": "127.0.0.1:1"})
    with pytest.raises(ConfigError, match=r"^proxy_config\.json: file not found$"):
        load_proxy_config(env={"CODEXNET_PROXY_ID": "p"})
    # Every required setting in the environment: a config by variables alone.
    assert load_manager_config(env={"TELEGRAM_BOT_TOKEN": "1:x"}).telegram_bot_token == "1:x"
    env = {"CODEXNET_MANAGER_WS": "ws://h:1", "CODEXNET_PROXY_ID": "p", "CODEXNET_PROXY_TOKEN": "t"}
    assert load_proxy_config(env=env).proxy_id == "p"
