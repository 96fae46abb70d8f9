"""config.example.jsonc documents every key, and each half of it loads as it is."""

from __future__ import annotations

import json
from pathlib import Path

import attrs
import json5

from codexnet.config import ManagerConfig, ProxyConfig, load_manager_config, load_proxy_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.jsonc"


def keys(cls: type) -> set[str]:
    return {f.name for f in attrs.fields(cls)} - {"source"}


def test_every_key_is_documented_and_nothing_else() -> None:
    example = json5.loads(EXAMPLE.read_text())
    assert set(example) == keys(ManagerConfig) | keys(ProxyConfig)
    lines = [line.strip() for line in EXAMPLE.read_text().splitlines()]
    for key in example:
        # The nearest line above the key that is not another key is its comment.
        at = next(i for i, line in enumerate(lines) if line.startswith(f'"{key}"'))
        above = next(line for line in reversed(lines[:at]) if not line.startswith('"'))
        assert above.startswith("//"), f"{key} has no comment"


def test_each_half_of_the_example_loads(tmp_path: Path) -> None:
    example = json5.loads(EXAMPLE.read_text())
    manager = {k: v for k, v in example.items() if k in keys(ManagerConfig)}
    proxy = {k: v for k, v in example.items() if k in keys(ProxyConfig)}
    proxy["codex_cwd"] = str(tmp_path)
    for key, holder in (
        ("manager_tls_cert", manager),
        ("manager_tls_key", manager),
        ("manager_ca_file", proxy),
    ):
        (tmp_path / key).write_text("not checked by the loader, only by ssl at start")
        holder[key] = str(tmp_path / key)
    (tmp_path / "m.json").write_text(json.dumps(manager))
    (tmp_path / "p.json").write_text(json.dumps(proxy))
    assert load_manager_config(tmp_path / "m.json", env={}).default_proxy == "laptop"
    assert load_proxy_config(tmp_path / "p.json", env={}).proxy_id == "laptop"
