"""`--add-proxy NAME`: the manager's JSONC keeps its comments; the printed config works."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import json5
import pytest

from codexnet.checks import check_proxy, errors, pinned_codex
from codexnet.config import load_manager_config, load_proxy_config
from codexnet.jsonc_edit import EditError, add_member
from tests.fakes.stack import BOT_TOKEN
from tests.fakes.terminal import child_env, python_module

MANAGER_JSONC = f"""\
// my manager, hand-edited
{{
  "telegram_bot_token": "{BOT_TOKEN}", // from BotFather {{not a brace that counts}}
  /* "proxies": {{"fake": 1}} in a comment must not be taken */
  "manager_ws_listen": "0.0.0.0:8765",
  "proxies": {{
    // the first machine
    "laptop": {{"token": "laptop-token-0123456789abcdef"}},
  }},
}}
"""


def add(tmp_path: Path, name: str, text: str = MANAGER_JSONC) -> subprocess.CompletedProcess[str]:
    (tmp_path / "codex_config.json").write_text(text)
    (tmp_path / "codex_config.json").chmod(0o600)
    return subprocess.run(
        python_module("codexnet.manager", "--add-proxy", name),
        cwd=tmp_path,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_add_proxy_keeps_the_file_and_prints_a_working_proxy_config(tmp_path: Path) -> None:
    result = add(tmp_path, "buildbox")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "codex_config.json"
    text = path.read_text()
    assert "// my manager, hand-edited" in text
    assert "// the first machine" in text
    assert '/* "proxies"' in text
    config = load_manager_config(path, env={})
    assert set(config.proxies) == {"laptop", "buildbox"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    backup = tmp_path / "codex_config.json.bak"
    assert "buildbox" not in backup.read_text()
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600

    # The printed config is the new machine's, once it says where Codex works.
    printed = json5.loads(result.stdout)
    assert printed["proxy_id"] == "buildbox"
    assert printed["proxy_token"] == config.proxies["buildbox"].token
    assert len(printed["proxy_token"]) >= 32
    assert printed["manager_ws"].startswith("ws://")
    assert printed["manager_ws"].endswith(":8765")
    printed["codex_cwd"] = str(tmp_path)
    printed["state_dir"] = str(tmp_path / "proxy-state")
    (tmp_path / "proxy_config.json").write_text(json.dumps(printed))
    proxy = load_proxy_config(tmp_path / "proxy_config.json", env={})
    if pinned_codex().exists():  # without it, codex_bin is (rightly) an error
        assert errors(check_proxy(proxy)) == []
    assert "restart the manager" in result.stderr
    assert config.proxies["buildbox"].token not in result.stderr


def test_add_proxy_refuses_an_id_that_is_there(tmp_path: Path) -> None:
    result = add(tmp_path, "laptop")
    assert result.returncode == 2
    assert result.stderr.endswith("codex_config.json: proxies.laptop: already there\n")
    assert not (tmp_path / "codex_config.json.bak").exists()


def test_add_proxy_warns_when_only_this_machine_can_connect(tmp_path: Path) -> None:
    result = add(tmp_path, "box", MANAGER_JSONC.replace("0.0.0.0:8765", "127.0.0.1:8765"))
    assert result.returncode == 0
    assert "manager_ws_listen is 127.0.0.1:8765: other machines cannot connect" in result.stderr


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1}',
        "{}",
        '{\n  "proxies": {},\n}',
        "{proxies: {'x': {token: 'x-token-0123456789abc'}}, b: [1, {c: '}'}]}",
        '{"other": {"proxies": {"nested": 1}}, "proxies": {"p": {"token": "t"}}}',
        '{"s": "a \\" quote and } brace", // c } \n "proxies": {"p": {}}}',
    ],
)
def test_add_member_changes_exactly_one_thing(text: str) -> None:
    before = json5.loads(text)
    after = json5.loads(add_member(text, "proxies", "new", {"token": "t"}))
    expected = dict(before)
    expected["proxies"] = {"new": {"token": "t"}, **before.get("proxies", {})}
    assert after == expected


@pytest.mark.parametrize("text", ["[1, 2]", '{"proxies": [1]}', '{"a": "never closed'])
def test_add_member_refuses_shapes_it_cannot_edit(text: str) -> None:
    with pytest.raises(EditError):
        add_member(text, "proxies", "new", {"token": "t"})


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can hand a file to another user")
def test_root_editing_someones_config_leaves_it_theirs(tmp_path: Path) -> None:
    path = tmp_path / "codex_config.json"
    path.write_text(MANAGER_JSONC)
    os.chown(path, 65534, 65534)
    result = subprocess.run(
        python_module("codexnet.manager", "--add-proxy", "box"),
        cwd=tmp_path,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)
