"""Hostile or broken config files: one line naming the file and the key, exit 2, no traceback.

In-process for every key (fast); as subprocesses for each kind of bad input,
both roles, both `--check-config` and a normal start — what a person or
systemd sees (docs/SECURITY.md, "Config files and secrets").
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from codexnet.config import ConfigError, load_manager_config, load_proxy_config
from tests.fakes.stack import BOT_TOKEN, PROXY_TOKEN, USER
from tests.fakes.terminal import child_env, python_module

MANAGER_SECONDS = {
    "task_timeout_s": "(0, 604800]",
    "proxy_wait_s": "[0, 86400]",
    "live_interval_private_s": "(0, 3600]",
    "live_interval_group_s": "(0, 3600]",
    "approval_timeout_s": "(0, 604800]",
    "delivery_give_up_s": "(0, 2592000]",
}
# JSON5 reads NaN and Infinity; 1e400 is Infinity too.
NOT_FINITE = {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf", "1e400": "inf"}


def manager_text(tmp_path: Path, **values: str) -> Path:
    """A manager config with `values` spliced in as JSON5 source text."""
    base = {
        "telegram_bot_token": json.dumps(BOT_TOKEN),
        "telegram_allowed_user_ids": f"[{USER}]",
        "proxies": json.dumps({"proxy1": {"token": PROXY_TOKEN}}),
        "state_dir": json.dumps(str(tmp_path / "state")),
    }
    base.update(values)
    path = tmp_path / "manager.jsonc"
    path.write_text("{\n" + ",\n".join(f'  "{k}": {v}' for k, v in base.items()) + "\n}\n")
    return path


def proxy_text(tmp_path: Path, **values: str) -> Path:
    base = {
        "manager_ws": json.dumps("ws://127.0.0.1:9"),
        "proxy_id": json.dumps("proxy1"),
        "proxy_token": json.dumps(PROXY_TOKEN),
        "codex_cwd": json.dumps(str(tmp_path)),
        "state_dir": json.dumps(str(tmp_path / "proxy-state")),
    }
    base.update(values)
    path = tmp_path / "proxy.jsonc"
    path.write_text("{\n" + ",\n".join(f'  "{k}": {v}' for k, v in base.items()) + "\n}\n")
    return path


def manager_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_manager_config(path, env={})
    message = str(info.value)
    assert "\n" not in message
    return message.removeprefix(f"{path}: ")


def proxy_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_proxy_config(path, env={})
    message = str(info.value)
    assert "\n" not in message
    return message.removeprefix(f"{path}: ")


# ------------------------------------------------------------------ every key, in process


@pytest.mark.parametrize("key", MANAGER_SECONDS)
@pytest.mark.parametrize("value", [*NOT_FINITE, "-1", "1e12"])
def test_every_manager_duration_must_be_finite_and_in_range(
    tmp_path: Path, key: str, value: str
) -> None:
    shown = NOT_FINITE.get(value) or repr(json.loads(value))
    assert manager_error(manager_text(tmp_path, **{key: value})) == (
        f"{key}: expected a number of seconds in {MANAGER_SECONDS[key]}, got {shown}"
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("task_timeout_s", "true", "expected a number of seconds"),
        ("task_timeout_s", '"60"', "expected a number of seconds"),
        ("heartbeat_timeout_s", "NaN", "expected a number of seconds in (0, 3600], got nan"),
        ("heartbeat_timeout_s", "1", "expected 3..3600 seconds"),
        ("telegram_poll_timeout_s", "NaN", "expected an integer"),
        ("telegram_poll_timeout_s", "-1", "expected 0..50 (Telegram caps it at 50)"),
        ("max_open_approvals_per_task", "0", "expected an integer in 1..100, got 0"),
        ("max_open_approvals_per_task", "1e400", "expected an integer"),
        ("max_open_approvals_per_task", "10000000000", "expected an integer in 1..100"),
        ("telegram_allowed_user_ids", "[-5]", "-5 is not a Telegram user id"),
        ("telegram_allowed_user_ids", "[0]", "0 is not a Telegram user id"),
        ("telegram_allowed_user_ids", f"[{2**60}]", f"{2**60} is not a Telegram user id"),
        ("telegram_allowed_user_ids", "[NaN]", "expected a list of integer user ids"),
        ("manager_ws_listen", '"h:99999999"', "expected HOST:PORT, got 'h:99999999'"),
    ],
)
def test_other_manager_numbers(tmp_path: Path, key: str, value: str, message: str) -> None:
    assert manager_error(manager_text(tmp_path, **{key: value})).startswith(f"{key}: {message}")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("capacity", "NaN", "expected an integer"),
        ("capacity", "Infinity", "expected an integer"),
        ("capacity", "-1", "expected an integer in 1..1000, got -1"),
        ("capacity", "100000", "expected an integer in 1..1000, got 100000"),
        ("capacity", "2.5", "expected an integer"),
        ("heartbeat_timeout_s", "NaN", "expected a number of seconds in (0, 3600], got nan"),
        ("heartbeat_timeout_s", "-Infinity", "expected a number of seconds in (0, 3600]"),
    ],
)
def test_proxy_numbers(tmp_path: Path, key: str, value: str, message: str) -> None:
    assert proxy_error(proxy_text(tmp_path, **{key: value})).startswith(f"{key}: {message}")


MANAGER_STRINGS = ["telegram_bot_token", "telegram_api_base", "state_dir", "default_proxy"]
PROXY_STRINGS = [
    "manager_ws",
    "proxy_id",
    "proxy_token",
    "codex_cwd",
    "codex_bin",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "state_dir",
    "manager_ca_file",
]
BAD_CHARS = {
    '"a\\u0000b"': "contains a control character (U+0000) at position 1",
    '"a\\u0007b"': "contains a control character (U+0007) at position 1",
    '"a\\u0085b"': "contains a control character (U+0085) at position 1",
    '"a\\u2028b"': "contains a control character (U+2028) at position 1",
    '"a\\ud800b"': "contains a lone surrogate (U+D800) at position 1",
}


@pytest.mark.parametrize("key", MANAGER_STRINGS)
@pytest.mark.parametrize(("value", "message"), BAD_CHARS.items(), ids=BAD_CHARS.keys())
def test_no_manager_string_holds_a_control_character_or_a_lone_surrogate(
    tmp_path: Path, key: str, value: str, message: str
) -> None:
    assert manager_error(manager_text(tmp_path, **{key: value})) == f"{key}: {message}"


@pytest.mark.parametrize("key", PROXY_STRINGS)
@pytest.mark.parametrize(("value", "message"), BAD_CHARS.items(), ids=BAD_CHARS.keys())
def test_no_proxy_string_holds_a_control_character_or_a_lone_surrogate(
    tmp_path: Path, key: str, value: str, message: str
) -> None:
    assert proxy_error(proxy_text(tmp_path, **{key: value})) == f"{key}: {message}"


def test_proxy_entries_labels_and_ids(tmp_path: Path) -> None:
    def proxies(value: Any) -> str:
        return manager_error(manager_text(tmp_path, proxies=json.dumps(value)))

    token = {"token": PROXY_TOKEN}
    assert proxies({"my laptop": token}) == (
        "proxies.my laptop: not a usable proxy id: expected 1-64 letters, digits or _ . -, "
        "starting with a letter or digit; got 'my laptop'"
    )
    assert proxies({"p\n1": token}) == (
        "proxies.p\\x0a1: contains a control character (U+000A) at position 1"
    )
    assert proxies({"p1": {"token": "a\ud800"}}) == (
        "proxies.p1.token: contains a lone surrogate (U+D800) at position 1"
    )
    assert proxies({"p1": {**token, "labels": ["gpu\tx"]}}) == (
        "proxies.p1.labels[0]: contains a control character (U+0009) at position 3"
    )
    assert proxies({"p1": {**token, "labels": ["l" * 65]}}) == (
        "proxies.p1.labels[0]: longer than 64 characters (65)"
    )
    assert proxies({"p1": {**token, "labels": ["l"] * 33}}) == (
        "proxies.p1.labels: more than 32 labels (33)"
    )
    assert proxy_error(proxy_text(tmp_path, proxy_id='"../x"')).startswith(
        "proxy_id: not a usable proxy id"
    )


@pytest.mark.parametrize("token", ['"T\\n"', '" T"', '"T "', '"T\\t"', '"T\\r\\n"'])
def test_a_token_with_whitespace_at_an_end_is_refused_at_load(tmp_path: Path, token: str) -> None:
    token = token.replace("T", BOT_TOKEN)
    message = "has leading or trailing whitespace (a pasted newline or space?)"
    assert manager_error(manager_text(tmp_path, telegram_bot_token=token)) == (
        f"telegram_bot_token: {message}"
    )
    entry = '{"p1": {"token": ' + token.replace(BOT_TOKEN, PROXY_TOKEN) + "}}"
    assert manager_error(manager_text(tmp_path, proxies=entry)) == f"proxies.p1.token: {message}"
    proxy = proxy_text(tmp_path, proxy_token=token.replace(BOT_TOKEN, PROXY_TOKEN))
    assert proxy_error(proxy) == f"proxy_token: {message}"


def test_a_token_from_the_environment_is_checked_too(tmp_path: Path) -> None:
    path = manager_text(tmp_path)
    with pytest.raises(ConfigError, match="telegram_bot_token: has leading or trailing"):
        load_manager_config(path, env={"TELEGRAM_BOT_TOKEN": BOT_TOKEN + "\n"})


def test_an_unknown_key_with_a_newline_is_still_one_line(tmp_path: Path) -> None:
    path = manager_text(tmp_path, **{"evil\\nFAKE: OK": "1"})
    assert manager_error(path) == "evil\\x0aFAKE: OK: unknown key"


def test_the_file_must_be_utf8(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonc"
    path.write_bytes(b'{\n  "state_dir": "st\xffate"\n}\n')
    with pytest.raises(ConfigError) as info:
        load_manager_config(path, env={})
    assert str(info.value) == f"{path}: not UTF-8: byte 0xff at line 2, column 19"


def test_deep_nesting_is_refused_before_the_parser(tmp_path: Path) -> None:
    path = manager_text(tmp_path, proxies="[" * 3000 + "]" * 3000)
    assert manager_error(path) == "not valid JSONC: line 4: nested deeper than 16 levels"
    # Brackets in strings and comments are not nesting.
    text = "// " + "[" * 100 + '\n{"telegram_bot_token": "' + "{" * 100 + '"}'
    (tmp_path / "ok.jsonc").write_text(text)
    assert load_manager_config(tmp_path / "ok.jsonc", env={}).telegram_bot_token == "{" * 100


# ------------------------------------------------------------------ subprocesses

# (manager key: value, proxy key: value, the message) per kind of bad input.
HOSTILE = {
    "a non-UTF-8 byte": (None, None, "not UTF-8: byte 0xff at line "),
    "3 000-deep nesting": (
        ("proxies", "[" * 3000 + "]" * 3000),
        ("labels", "[" * 3000 + "]" * 3000),
        "not valid JSONC: line ",
    ),
    "NaN": (
        ("task_timeout_s", "NaN"),
        ("heartbeat_timeout_s", "NaN"),
        "expected a number of seconds in (0, ",
    ),
    "a token with a trailing newline": (
        ("telegram_bot_token", json.dumps(BOT_TOKEN + "\n")),
        ("proxy_token", json.dumps(PROXY_TOKEN + " ")),
        "token: has leading or trailing whitespace",
    ),
    "a lone surrogate": (
        ("state_dir", '"state\\udc80"'),
        ("codex_cwd", '"\\ud800"'),
        "contains a lone surrogate",
    ),
    "a control character": (
        ("telegram_api_base", '"https://api.telegram.org\\u0000"'),
        ("codex_bin", '"codex\\u001b[2J"'),
        "contains a control character",
    ),
}


def write_hostile(tmp_path: Path, role: str, spec: tuple[str, str] | None) -> Path:
    writer = manager_text if role == "manager" else proxy_text
    if spec is None:  # a raw 0xff inside the state_dir string
        path = writer(tmp_path, state_dir='"state-XX"')
        path.write_bytes(path.read_bytes().replace(b"XX", b"\xff"))
        return path
    key, value = spec
    return writer(tmp_path, **{key: value})


@pytest.mark.parametrize(("manager", "proxy", "message"), HOSTILE.values(), ids=HOSTILE.keys())
def test_each_kind_of_bad_input_is_one_line_for_check_config_and_start(
    tmp_path: Path,
    manager: tuple[str, str] | None,
    proxy: tuple[str, str] | None,
    message: str,
) -> None:
    paths = {
        "manager": write_hostile(tmp_path, "manager", manager),
        "proxy": write_hostile(tmp_path, "proxy", proxy),
    }
    runs = [(role, extra) for role in paths for extra in (("--check-config",), ())]
    # All four at once: each is a fresh interpreter (~0.2 s).
    children = [
        subprocess.Popen(
            python_module(f"codexnet.{role}", "--config", str(paths[role]), *extra),
            cwd=tmp_path,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for role, extra in runs
    ]
    try:
        results = [(*child.communicate(timeout=20), child.returncode) for child in children]
    finally:  # a config that is wrongly accepted starts a service: stop it
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    for (role, extra), (out, err, code) in zip(runs, results, strict=True):
        what = f"{role} {' '.join(extra) or 'start'}"
        assert "Traceback" not in out + err, what
        assert code == 2, (what, err)
        assert out == "", what
        prefix = f"codexnet-{role}: config error: {paths[role]}: "
        assert err.startswith(prefix), (what, err)
        assert err.count("\n") == 1, (what, err)
        assert message in err, (what, err)
    assert not (tmp_path / "state").exists()  # refused before anything started
