"""One config loader for both roles: JSONC files plus environment overrides.

Files are JSON with comments and trailing commas (parsed by `json5`, a
well-kept JSON5 parser, which accepts JSONC). Every error names the file and
the key, e.g. ``codex_config.json: proxies.proxy1.token: expected a string``,
so a person can fix it without reading code. Unknown keys are errors too: a
typo silently ignored is a setting silently not applied.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
import json5

from codexnet.logs import register_secret

DEFAULT_MANAGER_CONFIG: Final = "codex_config.json"
DEFAULT_PROXY_CONFIG: Final = "proxy_config.json"
DEFAULT_TELEGRAM_API_BASE: Final = "https://api.telegram.org"
APPROVAL_POLICIES: Final = ("untrusted", "on-request", "never")
SANDBOX_MODES: Final = ("read-only", "workspace-write", "danger-full-access")

T = TypeVar("T")


class ConfigError(Exception):
    """A config file or override is unusable; the message says where and why."""


class ConfigMissing(ConfigError):
    """The config file does not exist (the entry points then say how to create one)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path}: file not found")
        self.path = path


def _mask(value: object) -> str:
    return "<set>" if value else "<unset>"


@attrs.frozen
class ProxyEntry:
    """The manager's view of one proxy it accepts."""

    token: str = attrs.field(repr=_mask)
    labels: tuple[str, ...] = ()


@attrs.frozen
class ManagerConfig:
    source: str
    telegram_bot_token: str | None = attrs.field(repr=_mask)
    telegram_api_base: str
    telegram_allowed_user_ids: frozenset[int]
    manager_ws_listen: tuple[str, int]
    default_proxy: str | None
    proxies: Mapping[str, ProxyEntry]
    state_dir: Path
    task_timeout_s: float
    telegram_poll_timeout_s: int
    proxy_wait_s: float
    live_interval_private_s: float
    live_interval_group_s: float
    use_drafts: bool
    approval_timeout_s: float
    heartbeat_timeout_s: float = 30.0
    delivery_give_up_s: float = 86400.0
    hub_max_pending: int | None = None  # None: from the open-file limit (see Hub)
    hub_max_pending_per_address: int = 32
    manager_tls_cert: Path | None = None
    manager_tls_key: Path | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The server-side TLS context for `wss://`, or None for plain `ws://`."""
        if self.manager_tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.manager_tls_cert, self.manager_tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{self.source}: manager_tls_cert/manager_tls_key: cannot load: {exc}"
            ) from None
        return context


@attrs.frozen
class ProxyConfig:
    source: str
    manager_ws: str
    proxy_id: str
    proxy_token: str = attrs.field(repr=_mask)
    codex_cwd: Path
    codex_bin: str
    approval_policy: str
    sandbox: str
    capacity: int
    labels: tuple[str, ...]
    http_proxy: str | None
    https_proxy: str | None
    no_proxy: str | None
    state_dir: Path = Path("state/proxy")
    heartbeat_timeout_s: float = 30.0
    manager_ca_file: Path | None = None
    # A Codex thread unused this long is unloaded from the app-server (0: never).
    thread_idle_unload_s: float = 1800.0

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context for a `wss://` manager (system CAs, or `manager_ca_file`)."""
        if not self.manager_ws.startswith("wss://"):
            return None
        try:
            return ssl.create_default_context(
                cafile=str(self.manager_ca_file) if self.manager_ca_file else None
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{self.source}: manager_ca_file: cannot load: {exc}") from None

    def child_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The codex child's environment: ours (CODEX_HOME etc.) plus the proxy settings."""
        env = dict(base)
        for key, value in (
            ("http_proxy", self.http_proxy),
            ("https_proxy", self.https_proxy),
            ("no_proxy", self.no_proxy),
        ):
            if value is not None:
                env[key] = value
                env[key.upper()] = value
        return env


# --------------------------------------------------------------------------- reading


# json5 words its errors `<string>:3 Unexpected "x" at column 10`.
_JSON5_ERROR: Final = re.compile(r"^<string>:(\d+) (.*?)(?: at column (\d+))?$", re.DOTALL)


def jsonc_error(path: Path | str, exc: ValueError) -> ConfigError:
    """A json5 parse error as `file: not valid JSONC: line 3, column 10: …`."""
    match = _JSON5_ERROR.match(str(exc))
    if match is None:
        return ConfigError(f"{path}: not valid JSONC: {exc}")
    line, what, column = match.groups()
    # json5 quotes the offending character raw; a raw newline would split our one line.
    what = what.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    where = f"line {line}" + (f", column {column}" if column else "")
    return ConfigError(f"{path}: not valid JSONC: {where}: {what}")


def read_config_file(path: Path, *, required: bool) -> dict[str, Any]:
    """Parse a JSONC file into a dict; a missing optional file reads as empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigMissing(path) from None
        return {}
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = json5.loads(text)
    except ValueError as exc:
        raise jsonc_error(path, exc) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object at the top level")
    return data


class _Reader:
    """Typed access to a parsed config object, with errors that name file and key."""

    def __init__(self, source: str, data: Mapping[str, Any], prefix: str = "") -> None:
        self.source = source
        self.data = data
        self.prefix = prefix
        self.seen: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.prefix}{key}: {message}")

    def get(self, key: str, kind: Callable[[str, Any], T], default: T) -> T:
        self.seen.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        return kind(key, self.data[key])

    def require(self, key: str, kind: Callable[[str, Any], T]) -> T:
        self.seen.add(key)
        if key not in self.data or self.data[key] in (None, ""):
            raise self.error(key, "required")
        return kind(key, self.data[key])

    def child(self, key: str, value: Any) -> _Reader:
        if not isinstance(value, Mapping):
            raise self.error(key, "expected an object")
        return _Reader(self.source, value, f"{self.prefix}{key}.")

    def check_unknown(self) -> None:
        for key in self.data:
            if key not in self.seen:
                raise self.error(str(key), "unknown key")

    # value kinds -------------------------------------------------------------

    def string(self, key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise self.error(key, "expected a string")
        return value

    def integer(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, "expected an integer")
        return value

    def positive_number(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise self.error(key, "expected a positive number")
        return float(value)

    def non_negative_number(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise self.error(key, "expected a number of at least 0")
        return float(value)

    def heartbeat(self, key: str, value: Any) -> float:
        seconds = self.positive_number(key, value)
        if not 3 <= seconds <= 3600:
            raise self.error(key, "expected 3..3600 seconds")
        return seconds

    def pending_cap(self, key: str, value: Any) -> int:
        count = self.integer(key, value)
        if not 1 <= count <= 100_000:
            raise self.error(key, "expected 1..100000 connections")
        return count

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, "expected true or false")
        return value

    def existing_file(self, key: str, value: Any) -> Path:
        path = Path(self.string(key, value)).expanduser()
        if not path.is_file():
            raise self.error(key, f"{str(path)!r} is not a file")
        return path

    def strings(self, key: str, value: Any) -> tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(key, "expected a list of strings")
        return tuple(value)

    def user_ids(self, key: str, value: Any) -> frozenset[int]:
        if isinstance(value, str):  # the environment form: "1,2,3"
            parts = [p.strip() for p in value.split(",") if p.strip()]
            try:
                return frozenset(int(p) for p in parts)
            except ValueError:
                raise self.error(key, "expected a comma-separated list of user ids") from None
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise self.error(key, "expected a list of integer user ids")
        return frozenset(value)

    def listen(self, key: str, value: Any) -> tuple[str, int]:
        text = self.string(key, value)
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise self.error(key, f"expected HOST:PORT, got {text!r}")
        return host.strip("[]") or "0.0.0.0", int(port)

    def choice(self, options: tuple[str, ...]) -> Callable[[str, Any], str]:
        def check(key: str, value: Any) -> str:
            text = self.string(key, value)
            if text not in options:
                raise self.error(key, f"expected one of {', '.join(options)}; got {text!r}")
            return text

        return check


def parse_listen(text: str, source: str = "--ws-listen") -> tuple[str, int]:
    """`HOST:PORT` → (host, port), with the same error wording as the config file."""
    return _Reader(source, {}).listen(source, text)


def _apply_env(
    data: dict[str, Any], env: Mapping[str, str], mapping: Mapping[str, str]
) -> dict[str, Any]:
    merged = dict(data)
    for env_key, config_key in mapping.items():
        if env.get(env_key):
            merged[config_key] = env[env_key]
    return merged


def _source_name(
    path: Path | None, default: str, env: Mapping[str, str], required: tuple[str, ...]
) -> tuple[Path, bool]:
    """The file to read, and whether it must exist.

    A named file must exist. The default file may be missing only when the
    environment holds every required setting of the role (a container set up
    by variables alone); otherwise "file not found" beats a misleading
    "telegram_bot_token: required".
    """
    if path is not None:
        return path, True
    return Path(default), not all(env.get(key) for key in required)


# --------------------------------------------------------------------------- manager

MANAGER_ENV: Final = {
    "TELEGRAM_BOT_TOKEN": "telegram_bot_token",
    "TELEGRAM_API_BASE": "telegram_api_base",
    "TELEGRAM_ALLOWED_USER_IDS": "telegram_allowed_user_ids",
    "MANAGER_WS_LISTEN": "manager_ws_listen",
    "CODEXNET_STATE_DIR": "state_dir",
}


def load_manager_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    *,
    require_telegram: bool = True,
) -> ManagerConfig:
    """Load the manager's config from `path` (or ./codex_config.json) plus environment."""
    env = os.environ if env is None else env
    file, required = _source_name(path, DEFAULT_MANAGER_CONFIG, env, ("TELEGRAM_BOT_TOKEN",))
    data = _apply_env(read_config_file(file, required=required), env, MANAGER_ENV)
    r = _Reader(str(file), data)

    token = r.get("telegram_bot_token", r.string, None)
    if require_telegram and not token:
        raise r.error("telegram_bot_token", "required (or set TELEGRAM_BOT_TOKEN)")
    register_secret(token)
    api_base = r.get("telegram_api_base", r.string, DEFAULT_TELEGRAM_API_BASE).rstrip("/")
    if not api_base.startswith(("http://", "https://")):
        raise r.error("telegram_api_base", "expected an http:// or https:// URL")

    proxies: dict[str, ProxyEntry] = {}
    raw_proxies: dict[str, Any] = r.get("proxies", lambda k, v: v, {})
    proxies_reader = r.child("proxies", raw_proxies)
    for proxy_id, raw in raw_proxies.items():
        pr = proxies_reader.child(proxy_id, raw)
        entry = ProxyEntry(
            token=pr.require("token", pr.string),
            labels=pr.get("labels", pr.strings, ()),
        )
        pr.check_unknown()
        register_secret(entry.token)
        proxies[proxy_id] = entry

    default_proxy = r.get("default_proxy", r.string, None)
    if default_proxy is not None and default_proxy not in proxies:
        raise r.error("default_proxy", f"{default_proxy!r} is not listed under proxies")

    config = ManagerConfig(
        source=str(file),
        telegram_bot_token=token,
        telegram_api_base=api_base,
        telegram_allowed_user_ids=r.get("telegram_allowed_user_ids", r.user_ids, frozenset()),
        manager_ws_listen=r.get("manager_ws_listen", r.listen, ("127.0.0.1", 8765)),
        default_proxy=default_proxy,
        proxies=proxies,
        state_dir=Path(r.get("state_dir", r.string, "state")),
        task_timeout_s=r.get("task_timeout_s", r.positive_number, 1800.0),
        telegram_poll_timeout_s=r.get("telegram_poll_timeout_s", r.integer, 50),
        proxy_wait_s=r.get("proxy_wait_s", r.non_negative_number, 20.0),
        live_interval_private_s=r.get("live_interval_private_s", r.positive_number, 1.0),
        live_interval_group_s=r.get("live_interval_group_s", r.positive_number, 3.0),
        use_drafts=r.get("use_drafts", r.boolean, True),
        approval_timeout_s=r.get("approval_timeout_s", r.positive_number, 600.0),
        heartbeat_timeout_s=r.get("heartbeat_timeout_s", r.heartbeat, 30.0),
        delivery_give_up_s=r.get("delivery_give_up_s", r.positive_number, 86400.0),
        hub_max_pending=r.get("hub_max_pending", r.pending_cap, None),
        hub_max_pending_per_address=r.get("hub_max_pending_per_address", r.pending_cap, 32),
        manager_tls_cert=r.get("manager_tls_cert", r.existing_file, None),
        manager_tls_key=r.get("manager_tls_key", r.existing_file, None),
    )
    if config.manager_tls_key is not None and config.manager_tls_cert is None:
        raise r.error("manager_tls_key", "given without manager_tls_cert")
    if (
        config.hub_max_pending is not None
        and config.hub_max_pending_per_address > config.hub_max_pending
    ):
        raise r.error("hub_max_pending_per_address", "must not exceed hub_max_pending")
    if not 0 <= config.telegram_poll_timeout_s <= 50:
        raise r.error("telegram_poll_timeout_s", "expected 0..50 (Telegram caps it at 50)")
    r.check_unknown()
    return config


# --------------------------------------------------------------------------- proxy

PROXY_ENV: Final = {
    "CODEXNET_MANAGER_WS": "manager_ws",
    "CODEXNET_PROXY_ID": "proxy_id",
    "CODEXNET_PROXY_TOKEN": "proxy_token",
    "CODEXNET_CODEX_BIN": "codex_bin",
    "CODEXNET_STATE_DIR": "state_dir",
}


def load_proxy_config(
    path: Path | None = None, env: Mapping[str, str] | None = None
) -> ProxyConfig:
    """Load a proxy's config from `path` (or ./proxy_config.json) plus environment."""
    env = os.environ if env is None else env
    file, required = _source_name(
        path,
        DEFAULT_PROXY_CONFIG,
        env,
        ("CODEXNET_MANAGER_WS", "CODEXNET_PROXY_ID", "CODEXNET_PROXY_TOKEN"),
    )
    data = _apply_env(read_config_file(file, required=required), env, PROXY_ENV)
    r = _Reader(str(file), data)

    manager_ws = r.require("manager_ws", r.string)
    if not manager_ws.startswith(("ws://", "wss://")):
        raise r.error("manager_ws", f"expected a ws:// or wss:// URL, got {manager_ws!r}")
    token = r.require("proxy_token", r.string)
    register_secret(token)
    capacity = r.get("capacity", r.integer, 2)
    if capacity < 1:
        raise r.error("capacity", "expected an integer of at least 1")
    cwd = Path(r.get("codex_cwd", r.string, os.getcwd())).expanduser()
    if not cwd.is_absolute():
        cwd = Path.cwd() / cwd
    if not cwd.is_dir():
        # Codex accepts a missing cwd and then fails every shell command: catch it here.
        raise r.error("codex_cwd", f"{str(cwd)!r} is not a directory")

    proxy_id = r.require("proxy_id", r.string)
    config = ProxyConfig(
        source=str(file),
        manager_ws=manager_ws,
        proxy_id=proxy_id,
        proxy_token=token,
        codex_cwd=cwd,
        codex_bin=r.get("codex_bin", r.string, "codex"),
        approval_policy=r.get("approval_policy", r.choice(APPROVAL_POLICIES), "on-request"),
        sandbox=r.get("sandbox", r.choice(SANDBOX_MODES), "workspace-write"),
        capacity=capacity,
        labels=r.get("labels", r.strings, ()),
        http_proxy=r.get("http_proxy", r.string, None),
        https_proxy=r.get("https_proxy", r.string, None),
        no_proxy=r.get("no_proxy", r.string, None),
        state_dir=Path(r.get("state_dir", r.string, f"state/proxy-{proxy_id}")).expanduser(),
        heartbeat_timeout_s=r.get("heartbeat_timeout_s", r.heartbeat, 30.0),
        manager_ca_file=r.get("manager_ca_file", r.existing_file, None),
        thread_idle_unload_s=r.get("thread_idle_unload_s", r.non_negative_number, 1800.0),
    )
    r.check_unknown()
    return config
