"""The two example configs document every key, mark what a person must fill in,
and pass --check-config once exactly those keys are filled."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import attrs
import json5
import pytest

from codexnet.checks import check_manager, check_proxy, pinned_codex
from codexnet.config import ManagerConfig, ProxyConfig, load_manager_config, load_proxy_config
from tests.fakes.stack import BOT_TOKEN
from tests.fakes.terminal import child_env, python_module

ROOT = Path(__file__).resolve().parent.parent
MANAGER = ROOT / "config.manager.example.jsonc"
PROXY = ROOT / "config.proxy.example.jsonc"
# A key, live or commented out: `"key": …` or `// "key": …`.
_KEY_LINE = re.compile(r'^(?://\s*)?"(?P<key>[a-z_]+)":')


def keys(cls: type) -> set[str]:
    return {f.name for f in attrs.fields(cls)} - {"source"}


def documented(path: Path) -> dict[str, str]:
    """Each top-level key → the comment block right above it.

    A key on the line after another key shares that key's comment (e.g. the two
    live-view intervals); commented-out keys count as keys.
    """
    comments: dict[str, str] = {}
    block: list[str] = []
    previous: str | None = None  # the comment of the key on the line before
    depth = 0
    for raw in path.read_text().splitlines():
        line = raw.strip()
        match = _KEY_LINE.match(line)
        if match and depth == 1:
            comment = " ".join(block) if block else (previous or "")
            comments[match["key"]] = comment
            block, previous = [], comment
        elif line.startswith("//"):
            block.append(line)
            previous = None
        else:
            block, previous = [], None
        if not line.startswith("//"):
            depth += line.count("{") - line.count("}")
    return comments


@pytest.mark.parametrize(("path", "cls"), [(MANAGER, ManagerConfig), (PROXY, ProxyConfig)])
def test_every_key_is_documented_and_nothing_else(path: Path, cls: type) -> None:
    comments = documented(path)
    assert set(comments) == keys(cls)
    for key, comment in comments.items():
        assert comment.startswith("//"), f"{key} has no comment"


@pytest.mark.parametrize(
    ("path", "required"),
    [
        (MANAGER, {"telegram_bot_token", "telegram_allowed_user_ids", "proxies"}),
        (PROXY, {"manager_ws", "proxy_id", "proxy_token", "codex_cwd"}),
    ],
)
def test_the_required_keys_are_marked(path: Path, required: set[str]) -> None:
    marked = {key for key, comment in documented(path).items() if "REQUIRED" in comment}
    assert marked == required


def fill_manager(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    data["telegram_bot_token"] = BOT_TOKEN
    data["telegram_allowed_user_ids"] = [1001]
    data["proxies"] = {"laptop": {"token": "a-generated-token-0123456789abcdef"}}
    return data


def fill_proxy(data: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    data = dict(data)
    data["proxy_token"] = "a-generated-token-0123456789abcdef"
    data["codex_cwd"] = str(tmp_path)
    return data


def check(module: str, path: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        python_module(module, "--config", str(path), "--check-config"),
        cwd=cwd,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_the_examples_fail_as_shipped(tmp_path: Path) -> None:
    manager = check("codexnet.manager", MANAGER, tmp_path)
    assert manager.returncode == 2
    assert "telegram_bot_token: required" in manager.stderr
    proxy = check("codexnet.proxy", PROXY, tmp_path)
    assert proxy.returncode == 2
    assert "proxy_token: required" in proxy.stderr


def test_the_manager_example_passes_once_the_required_keys_are_filled(tmp_path: Path) -> None:
    path = tmp_path / "codex_config.json"
    path.write_text(json.dumps(fill_manager(json5.loads(MANAGER.read_text()))))
    path.chmod(0o600)  # it holds tokens (a looser mode is warned about)
    result = check("codexnet.manager", path, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # not even a warning
    assert result.stdout == f"{path}: OK (1 proxies)\n"


def test_the_proxy_example_passes_once_the_required_keys_are_filled(tmp_path: Path) -> None:
    path = tmp_path / "proxy_config.json"
    path.write_text(json.dumps(fill_proxy(json5.loads(PROXY.read_text()), tmp_path)))
    path.chmod(0o600)
    config = load_proxy_config(path, env={})
    findings = check_proxy(config, environ={"PATH": ""})
    if pinned_codex().exists():
        assert findings == []
    else:  # nothing else may be wrong
        assert [f.key for f in findings] == ["codex_bin"]


def uncommented(path: Path, tmp_path: Path) -> dict[str, Any]:
    """The example with its commented-out optional keys switched on."""
    text = re.sub(r'^(\s*)//\s*("[a-z_]+":)', r"\1\2", path.read_text(), flags=re.M)
    data: dict[str, Any] = json5.loads(text)
    for key in ("manager_tls_cert", "manager_tls_key", "manager_ca_file"):
        if key in data:
            (tmp_path / key).write_text("not checked by the loader, only by ssl at start")
            data[key] = str(tmp_path / key)
    if "allowed_roots" in data:  # directories that exist, codex_cwd (tmp_path) among them
        (tmp_path / "other").mkdir()
        data["allowed_roots"] = [str(tmp_path), str(tmp_path / "other")]
    return data


def test_the_optional_keys_load_too(tmp_path: Path) -> None:
    manager = fill_manager(uncommented(MANAGER, tmp_path))
    proxy = fill_proxy(uncommented(PROXY, tmp_path), tmp_path)
    (tmp_path / "m.json").write_text(json.dumps(manager))
    (tmp_path / "p.json").write_text(json.dumps(proxy))
    config = load_manager_config(tmp_path / "m.json", env={})
    assert config.default_proxy == "laptop"
    assert [f for f in check_manager(config, state_dir="skip") if f.fatal] == []
    assert load_proxy_config(tmp_path / "p.json", env={}).http_proxy is not None
